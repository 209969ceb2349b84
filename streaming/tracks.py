"""Outgoing aiortc tracks that read the playout buffer on the shared media clock.

Each ``recv`` computes the media time of the next frame (``pts / clock_rate``), sleeps until
``clock.start + media time`` on the monotonic clock, then pulls the frame from the buffer, so
pacing never drifts (no fixed ``sleep(1 / fps)``) and the audio and video of one instant
leave together. ``pts`` are in clock-rate units: 90 kHz for video, 48 kHz for audio.

Each track measures itself (exponential moving averages, for ``stats`` and metrics):
``lateness_s``, how long after its due time a frame left (the difference between the two
tracks' figures is the A/V offset as sent), and for video ``encode_s``, the time from a frame
leaving ``recv`` to the sender asking for the next one: aiortc's sender encodes the frame and
sends its packets in between.

The clock starts when the first track is first read. A track whose first read comes within
``CATCH_UP_S`` of the clock's start begins at media time 0 too (sending its short backlog at
once), so that both tracks share the same origin: receivers that line streams up by their
first timestamps then see them in sync. A track that starts later begins with the frame due.
"""

from __future__ import annotations

import fractions
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.clock import MediaClock
from streaming.playout import PlayoutBuffer

VIDEO_CLOCK_RATE_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE_HZ)
CATCH_UP_S = 1.0
EMA_WEIGHT = 0.1


def _ema(previous: float | None, value: float) -> float:
    return value if previous is None else previous + EMA_WEIGHT * (value - previous)


def _first_index(clock: MediaClock, period_s: float) -> int:
    if clock.media_time_s() < CATCH_UP_S:
        return 0
    return clock.index_at(period_s)


async def _wait_for_slot(track) -> int:
    """Pace a track on the shared media clock: take its next frame index, sleep until that index's
    media time (``start + index * period``, never a fixed sleep), record the lateness (EMA, s).

    Raises:
        MediaStreamError: the track was stopped while waiting.
    """
    track._clock.start()
    if track._next_index is None:
        track._next_index = _first_index(track._clock, track._period_s)
    index = track._next_index
    track._next_index += 1
    await track._clock.sleep_until_media_s(index * track._period_s)
    if track.readyState != "live":
        raise MediaStreamError
    track.lateness_s = _ema(track.lateness_s, track._clock.media_time_s() - index * track._period_s)
    return index


class AvatarVideoTrack(MediaStreamTrack):
    """Video frames of a :class:`PlayoutBuffer` at its fps, 90 kHz pts.

    Args:
        buffer: the session's playout buffer.
        clock: the session's media clock (shared with the audio track).
        on_frame: optional callback after each frame is produced (metrics).
    """

    kind = "video"

    def __init__(self, buffer: PlayoutBuffer, clock: MediaClock, on_frame: Callable[[], None] | None = None):
        super().__init__()
        self._buffer = buffer
        self._clock = clock
        self._on_frame = on_frame
        self._next_index: int | None = None
        self._period_s = 1.0 / buffer.fps
        self._pts_per_frame = VIDEO_CLOCK_RATE_HZ // buffer.fps
        self.lateness_s: float | None = None
        self.encode_s: float | None = None
        self.on_encode: Callable[[float], None] | None = None
        self._returned_s: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._returned_s is not None:
            encode_s = self._clock.now_s() - self._returned_s
            self.encode_s = _ema(self.encode_s, encode_s)
            if self.on_encode is not None:
                self.on_encode(encode_s)
        index = await _wait_for_slot(self)
        image = self._buffer.pull_video_frame(index)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = index * self._pts_per_frame
        frame.time_base = VIDEO_TIME_BASE
        if self._on_frame is not None:
            self._on_frame()
        self._returned_s = self._clock.now_s()
        return frame


class AvatarAudioTrack(MediaStreamTrack):
    """20 ms mono s16 chunks of a :class:`PlayoutBuffer` at its sample rate, sample-rate pts."""

    kind = "audio"

    def __init__(self, buffer: PlayoutBuffer, clock: MediaClock):
        super().__init__()
        self._buffer = buffer
        self._clock = clock
        self._next_index: int | None = None
        self._sample_rate_hz = buffer.sample_rate_hz
        self._chunk_samples = buffer.chunk_samples
        self._period_s = buffer.chunk_samples / buffer.sample_rate_hz
        self._time_base = fractions.Fraction(1, buffer.sample_rate_hz)
        self.lateness_s: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        index = await _wait_for_slot(self)
        chunk = self._buffer.pull_audio_chunk(index)
        pcm = (np.clip(chunk, -1.0, 1.0) * 32767.0).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = self._sample_rate_hz
        frame.pts = index * self._chunk_samples
        frame.time_base = self._time_base
        return frame

