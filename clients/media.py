"""Media of the Python client: the audio file sent as a live microphone, and the log of what
was received (one record per frame, written before anything else touches the frame).

Imports PyAV, numpy and aiortc's track class; nothing of the server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

MIC_SAMPLE_RATE_HZ = 48_000
MIC_FRAME_MS = 20


@dataclass
class VideoRecord:
    """One received video frame: arrival (monotonic s), pts in seconds, size, mean luma (0-255)."""

    arrival_s: float
    pts_s: float
    width: int
    height: int
    mean_luma: float


@dataclass
class AudioRecord:
    """One received audio frame: arrival (monotonic s), pts in seconds, mono float32 samples."""

    arrival_s: float
    pts_s: float
    sample_rate: int
    samples: np.ndarray


def audio_frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """The samples of ``frame`` as mono float32 in [-1, 1] (channels averaged; packed or
    planar, s16 or float). Shape ``[frame.samples]``."""
    pcm = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mono = pcm.reshape(channels, -1).astype(np.float32).mean(axis=0)
    else:
        mono = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1)
    scale = 32768.0 if pcm.dtype == np.int16 else 1.0
    return mono / scale


class ForwardTrack(MediaStreamTrack):
    """Frames pushed by the client's reader, for the recorder; ``None`` ends the track."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[av.frame.Frame | None] = asyncio.Queue()

    def push(self, frame: av.frame.Frame | None) -> None:
        self._queue.put_nowait(frame)

    async def recv(self) -> av.frame.Frame:
        frame = await self._queue.get()
        if frame is None:
            self.stop()
            raise MediaStreamError
        return frame


def read_audio_file(path: str | Path, sample_rate_hz: int = MIC_SAMPLE_RATE_HZ) -> np.ndarray:
    """Decode any PyAV-readable audio file to mono int16 at ``sample_rate_hz`` (channels averaged).

    Raises:
        ValueError: the file is missing, cannot be decoded, has no audio stream or no samples;
            the message starts with ``audio:`` and names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio: {path}: no such file")
    # float32 planar first: averaging the channels ourselves keeps the level (FFmpeg's
    # stereo->mono matrix adds 3 dB); one stateful resampler for the whole file.
    resampler = av.AudioResampler(format="fltp", rate=sample_rate_hz)
    parts: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"audio: {path} has no audio stream")
            for frame in container.decode(audio=0):
                parts.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(frame))
            parts.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise ValueError(f"audio: cannot decode {path}: {exc}") from None
    if not parts or sum(part.size for part in parts) == 0:
        raise ValueError(f"audio: {path} holds no audio samples")
    samples = np.concatenate(parts)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)


class PacedMicrophoneTrack(MediaStreamTrack):
    """A live microphone of mono int16 samples: 20 ms frames paced at real time.

    Frame ``k`` carries ``pts = k * samples_per_frame`` in a ``1 / sample_rate_hz`` time base
    and is released at ``start + pts / sample_rate_hz`` on a monotonic clock (the start is the
    first :meth:`recv`, when the peer connection begins to send). Subclasses give the samples
    of each frame (:meth:`next_chunk`); a short chunk is padded with silence.

    Args:
        sample_rate_hz: sample rate of the frames sent.
    """

    kind = "audio"

    def __init__(self, sample_rate_hz: int = MIC_SAMPLE_RATE_HZ) -> None:
        super().__init__()
        self.sample_rate_hz = sample_rate_hz
        self.samples_per_frame = sample_rate_hz * MIC_FRAME_MS // 1000
        self._time_base = Fraction(1, sample_rate_hz)
        self._start_s: float | None = None
        self._pts = 0

    def next_chunk(self, pts: int) -> np.ndarray:
        """The int16 samples of the frame at ``pts`` (at most ``samples_per_frame``)."""
        raise NotImplementedError

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms frame, released at its media time."""
        if self.readyState != "live":
            raise MediaStreamError
        now_s = time.monotonic()
        if self._start_s is None:
            self._start_s = now_s
        pts = self._pts
        wait_s = self._start_s + pts / self.sample_rate_hz - now_s
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        chunk = self.next_chunk(pts)
        if chunk.size < self.samples_per_frame:
            chunk = np.concatenate([chunk, np.zeros(self.samples_per_frame - chunk.size, dtype=np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate_hz
        frame.pts = pts
        frame.time_base = self._time_base
        self._pts = pts + self.samples_per_frame
        return frame


class AudioFileTrack(PacedMicrophoneTrack):
    """Mono int16 samples sent as a live microphone (:class:`PacedMicrophoneTrack`). After the
    last sample the track goes on with silence, as a microphone in a quiet room does, so the
    server's voice detection sees the speech end; :attr:`finished` is set once the last sample
    is handed out.

    Args:
        samples: mono int16 audio (see :func:`read_audio_file`).
        sample_rate_hz: its sample rate.
    """

    def __init__(self, samples: np.ndarray, sample_rate_hz: int = MIC_SAMPLE_RATE_HZ) -> None:
        if samples.ndim != 1 or samples.dtype != np.int16:
            raise ValueError(f"samples: need mono int16, got {samples.dtype} with shape {samples.shape}")
        super().__init__(sample_rate_hz)
        self.samples = samples
        self.finished = asyncio.Event()

    @classmethod
    def from_file(cls, path: str | Path) -> AudioFileTrack:
        """The audio of ``path`` (decoded now; see :func:`read_audio_file`) as a microphone."""
        return cls(read_audio_file(path))

    @property
    def duration_s(self) -> float:
        """Length of the audio (the silence after it not counted)."""
        return self.samples.size / self.sample_rate_hz

    def next_chunk(self, pts: int) -> np.ndarray:
        """The file's samples at ``pts`` (none after its end)."""
        if pts + self.samples_per_frame >= self.samples.size:
            self.finished.set()
        return self.samples[pts : pts + self.samples_per_frame]


class PushAudioTrack(PacedMicrophoneTrack):
    """A live microphone fed by :meth:`push` (:class:`PacedMicrophoneTrack`), silence whenever
    nothing is queued. Audio pushed faster than real time (a TTS answers in bursts) waits in the
    queue; audio pushed while the queue is empty starts with the next frame.

    Args:
        sample_rate_hz: sample rate of the pushed samples and of the frames sent.
    """

    def __init__(self, sample_rate_hz: int = MIC_SAMPLE_RATE_HZ) -> None:
        super().__init__(sample_rate_hz)
        self.sent_samples = 0  # pushed samples handed out so far (silence not counted)
        self._queue = np.zeros(0, dtype=np.int16)

    @property
    def queued_samples(self) -> int:
        """Samples pushed and not yet sent."""
        return int(self._queue.size)

    def push(self, samples: np.ndarray) -> None:
        """Queue mono int16 ``samples`` (shape ``[n]``) behind what is queued.

        Raises:
            ValueError: ``samples`` is not one-dimensional int16.
        """
        if samples.ndim != 1 or samples.dtype != np.int16:
            raise ValueError(f"samples: need mono int16, got {samples.dtype} with shape {samples.shape}")
        self._queue = np.concatenate([self._queue, samples])

    def clear(self) -> int:
        """Drop everything queued (an interruption); returns the number of samples dropped."""
        dropped = self._queue.size
        self._queue = np.zeros(0, dtype=np.int16)
        return int(dropped)

    def next_chunk(self, pts: int) -> np.ndarray:
        """The next queued samples (counted in :attr:`sent_samples`)."""
        chunk, self._queue = self._queue[: self.samples_per_frame], self._queue[self.samples_per_frame :]
        self.sent_samples += chunk.size
        return chunk
