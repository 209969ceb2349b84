"""MP4 writing (H.264 + AAC) through PyAV, in-process (no ffmpeg subprocess).

:class:`Mp4Writer` takes video frames and audio incrementally on one timeline, so the same
class writes an offline clip (``avatar-server generate``) and a live session recording.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


class Mp4Writer:
    """Incremental H.264 + AAC MP4 writer.

    Args:
        path: output file.
        width, height: frame size in pixels (even numbers; yuv420p).
        fps: video frame rate (frames per second).
        sample_rate: audio sample rate in Hz (AAC supports 8-96 kHz).
        channels: 1 (mono) or 2 (stereo) audio channels.
        crf: libx264 constant rate factor (PIPELINE.md §15.3 uses 10 for offline clips).

    Video pts count frames (time base ``1/fps``); audio pts count samples (``1/sample_rate``),
    so both tracks share one timeline starting at 0.

    Raises:
        ValueError: odd frame size, bad channel count.
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 25, sample_rate: int = 48_000,
                 channels: int = 1, crf: int = 18):
        if width % 2 or height % 2:
            raise ValueError(f"frame size {width}x{height} must be even for yuv420p")
        if channels not in (1, 2):
            raise ValueError(f"channels must be 1 or 2, got {channels}")
        self.path = Path(path)
        self.width, self.height, self.fps, self.sample_rate, self.channels = width, height, fps, sample_rate, channels
        self._container = av.open(str(self.path), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.time_base = Fraction(1, fps)
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._audio = self._container.add_stream("aac", rate=sample_rate)
        self._audio.layout = "mono" if channels == 1 else "stereo"
        self._audio.time_base = Fraction(1, sample_rate)
        self._frames_written = 0
        self._samples_written = 0
        self._closed = False

    @property
    def video_seconds(self) -> float:
        return self._frames_written / self.fps

    @property
    def audio_seconds(self) -> float:
        return self._samples_written / self.sample_rate

    def write_video(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames ``[F, H, W, 3]`` (or one ``[H, W, 3]``)."""
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames {frames.shape[1:]} do not match {self.height}x{self.width}x3")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self._frames_written
            self._frames_written += 1
            for packet in self._video.encode(vf):
                self._container.mux(packet)

    def write_audio(self, samples: np.ndarray) -> None:
        """Append float32 audio in [-1, 1]: mono ``[N]`` or ``[N, channels]``."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim == 1:
            samples = samples[:, None]
        if samples.shape[1] != self.channels:
            samples = samples.mean(axis=1, keepdims=True) if self.channels == 1 else np.repeat(samples[:, :1], 2, 1)
        if samples.shape[0] == 0:
            return
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples.T), format="fltp",
                                        layout=self._audio.layout.name)
        af.sample_rate = self.sample_rate
        af.pts = self._samples_written
        self._samples_written += samples.shape[0]
        for packet in self._audio.encode(af):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush both encoders and finish the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for stream in (self._video, self._audio):
            for packet in stream.encode(None):
                self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_mp4(path: str | Path, frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: int = 25,
              crf: int = 10) -> Path:
    """Write a whole clip: uint8 frames ``[F, H, W, 3]`` and float32 audio ``[N]`` or ``[N, C]``."""
    channels = 1 if np.asarray(audio).ndim == 1 else min(2, np.asarray(audio).shape[1])
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps, sample_rate, channels, crf) as writer:
        writer.write_video(frames)
        writer.write_audio(audio)
    return Path(path)
