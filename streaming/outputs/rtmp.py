"""Push a session to a live platform over RTMP or RTMPS: H.264 + AAC in FLV, PyAV in-process.

An :class:`RtmpOutput` is a :class:`~streaming.fanout.FrameSink`: the pump hands it every
frame; ``put`` appends to a bounded queue and returns (the oldest item is dropped and counted
when the queue is full). One writer thread per output opens the connection, encodes and
writes, so the event loop never waits on the network or the encoder.

Encoding: libx264 (``preset`` veryfast, ``tune`` zerolatency: no B-frames, no lookahead)
at ``video_bitrate_bps`` with a keyframe every ``gop_frames`` frames (platforms ask for 2 s),
``yuv420p`` at the output size; FFmpeg's AAC-LC at ``audio_bitrate_bps``, 48 kHz mono. FLV
timestamps are milliseconds (FLV spec v10.1, E.4.1); both streams count from the media time
of the first video frame written on this connection, so their offset is the session's.

Network: the connection is opened with FFmpeg's RTMP client (``rtmps://`` through TLS) with
``open_timeout_s`` / ``rw_timeout_s`` bounds. Any failure (refused, reset, timed out, the
server restarted) closes the container and, after :class:`~streaming.outputs.base.Backoff`,
opens a new one, resuming at the live edge (what queued during the outage is dropped: a
live viewer wants now, not a replay). Each change is an
:class:`~streaming.outputs.base.OutputState` event, delivered on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import av

from streaming.fanout import MediaKind, copy_frame
from streaming.outputs.base import Backoff, OutputState, OutputStateName, redact_text, redact_url, url_secrets

logger = logging.getLogger(__name__)

RTMP_SCHEMES = ("rtmp", "rtmps")


@dataclass(frozen=True)
class EncoderSettings:
    """Encoding of one output.

    Attributes:
        width, height: output frame size in pixels (even; frames are scaled to it).
        fps: frame rate of the session (frames per second).
        video_bitrate_bps: H.264 target bitrate, bits per second.
        audio_bitrate_bps: AAC bitrate, bits per second.
        gop_frames: frames between keyframes (``2 * fps``: the 2 s that platforms ask for).
        sample_rate_hz: audio sample rate of the output.
    """

    width: int
    height: int
    fps: int = 25
    video_bitrate_bps: int = 1_500_000
    audio_bitrate_bps: int = 128_000
    gop_frames: int = 50
    sample_rate_hz: int = 48_000

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"width x height: {self.width}x{self.height} must be positive and even (yuv420p)")
        if not 1 <= self.fps <= 120:
            raise ValueError(f"fps: {self.fps} is outside 1..120")
        if not 100_000 <= self.video_bitrate_bps <= 50_000_000:
            raise ValueError(f"video_bitrate_bps: {self.video_bitrate_bps} is outside 100000..50000000")
        if not 32_000 <= self.audio_bitrate_bps <= 320_000:
            raise ValueError(f"audio_bitrate_bps: {self.audio_bitrate_bps} is outside 32000..320000")
        if not 1 <= self.gop_frames <= 10 * self.fps:
            raise ValueError(f"gop_frames: {self.gop_frames} is outside 1..{10 * self.fps}")


class RtmpOutput:
    """One RTMP/RTMPS push (see the module docstring).

    Args:
        output_id: the owner's id for it (in events).
        url: ``rtmp://host[:port]/app/stream-key`` or ``rtmps://...``; the key is a secret.
        encoder: encoding settings.
        on_state: called on the event loop with every :class:`OutputState`.
        backoff: reconnect policy.
        max_queue_s: media queued for the writer at most, seconds (older items are dropped).
        open_timeout_s, rw_timeout_s: network bounds of one connection attempt / one write.

    Raises:
        ValueError: ``url`` is not rtmp(s) with a host.
    """

    type = "rtmp"

    def __init__(
        self,
        output_id: str,
        url: str,
        *,
        encoder: EncoderSettings,
        on_state: Callable[[OutputState], None] | None = None,
        backoff: Backoff | None = None,
        max_queue_s: float = 2.0,
        open_timeout_s: float = 5.0,
        rw_timeout_s: float = 5.0,
    ) -> None:
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in RTMP_SCHEMES or not rest.split("/")[0]:
            raise ValueError(f"url: scheme {scheme[:10]!r} is not rtmp or rtmps, or the url has no host")
        self.output_id = output_id
        self._url = url
        self.url = redact_url(url)
        self._secrets = url_secrets(url)
        self.encoder = encoder
        self._on_state = on_state
        self._backoff = backoff or Backoff()
        self._open_timeout_s = open_timeout_s
        self._rw_timeout_s = rw_timeout_s
        max_items = max(8, round(max_queue_s * encoder.fps * 3))  # video + 2 audio chunks per frame
        self._queue: collections.deque[tuple[MediaKind, av.VideoFrame | av.AudioFrame]] = collections.deque(
            maxlen=max_items
        )
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state: OutputStateName | None = None  # None: not started
        self.reason: str | None = None
        self.dropped = 0
        self.video_frames_sent = 0
        self.audio_frames_sent = 0
        self.connects = 0
        self.encode_s = 0.0  # thread seconds spent encoding and writing
        self.live_since_s: float | None = None

    # ----------------------------------------------------------------------------- sink (event loop)
    def put(self, kind: MediaKind, frame: av.VideoFrame | av.AudioFrame) -> None:
        """Queue a frame for the writer (never blocks; drops the oldest when full)."""
        with self._ready:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append((kind, copy_frame(frame)))  # the writer thread's own frame
            self._ready.notify()

    # ----------------------------------------------------------------------------- control
    def start(self) -> None:
        """Start the writer thread (call on the event loop that receives the state events)."""
        if self._thread is not None:
            return
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._thread = threading.Thread(target=self._run, name=f"rtmp-{self.output_id}", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop pushing: the writer finishes the stream (FLV trailer) and the thread ends."""
        self._stop.set()
        with self._ready:
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.state != "failed":
            self._set_state("stopped")

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------- writer thread
    def _set_state(self, state: OutputStateName, reason: str | None = None, attempt: int = 0) -> None:
        if state == self.state and reason == self.reason and state not in ("reconnecting",):
            return
        self.state, self.reason = state, reason
        event = OutputState(self.output_id, self.type, state, self.url, reason, attempt)
        if state in ("reconnecting", "failed"):
            logger.warning("output %s (%s) %s: %s", self.output_id, self.url, state, reason)
        else:
            logger.info("output %s (%s) %s", self.output_id, self.url, state)
        if self._on_state is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._on_state, event)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._on_state(event)

    def _run(self) -> None:
        attempt = 0
        self._set_state("connecting")
        while not self._stop.is_set():
            try:
                self._stream_once()
                return  # stopped
            except Exception as exc:
                if self._stop.is_set():
                    return
                reason = redact_text(f"{type(exc).__name__}: {exc}", self._secrets)
                if self.live_since_s is not None:
                    attempt = 0  # it was live: a fresh series of attempts
                self.live_since_s = None
                attempt += 1
                limit = self._backoff.max_attempts
                if limit is not None and attempt > limit:
                    self._set_state("failed", f"{reason} (after {limit} attempts)", attempt)
                    return
                self._set_state("reconnecting", reason, attempt)
                self._stop.wait(self._backoff.delay_s(attempt))

    def _stream_once(self) -> None:
        enc = self.encoder
        with self._ready:
            self._queue.clear()  # resume at the live edge
        container = av.open(
            self._url,
            mode="w",
            format="flv",
            container_options={"avoid_negative_ts": "make_non_negative"},
            timeout=(self._open_timeout_s, self._rw_timeout_s),
        )
        try:
            video = container.add_stream("libx264", rate=enc.fps)
            video.width, video.height, video.pix_fmt = enc.width, enc.height, "yuv420p"
            video_time_base = fractions.Fraction(1, enc.fps)  # the stream's becomes FLV's 1/1000
            video.time_base = video_time_base
            video.bit_rate = enc.video_bitrate_bps
            video.options = {
                "preset": "veryfast",
                "tune": "zerolatency",
                "g": str(enc.gop_frames),
                "keyint_min": str(enc.gop_frames),
                "sc_threshold": "0",
                "maxrate": str(enc.video_bitrate_bps),
                "bufsize": str(2 * enc.video_bitrate_bps),
            }
            audio = container.add_stream("aac", rate=enc.sample_rate_hz)
            audio.layout = "mono"
            audio_time_base = fractions.Fraction(1, enc.sample_rate_hz)
            audio.time_base = audio_time_base
            audio.bit_rate = enc.audio_bitrate_bps
            container.start_encoding()  # connects (handshake, publish) and writes the FLV header
            self.connects += 1
            origin_s: float | None = None
            last_video_pts = -1
            last_audio_pts = -1
            while not self._stop.is_set():
                item = self._next_item()
                if item is None:
                    continue
                kind, frame = item
                began_s = time.perf_counter()
                media_s = float(frame.pts * frame.time_base)
                if kind == "video":
                    if origin_s is None:
                        origin_s = media_s
                    pts = round((media_s - origin_s) * enc.fps)
                    if pts <= last_video_pts:
                        continue
                    last_video_pts = pts
                    out = frame.reformat(width=enc.width, height=enc.height, format="yuv420p")
                    out.pts = pts
                    out.time_base = video_time_base
                    packets = video.encode(out)
                else:
                    if origin_s is None or media_s < origin_s:
                        continue  # audio starts with the first video frame
                    pts = round((media_s - origin_s) * enc.sample_rate_hz)
                    if pts <= last_audio_pts:
                        continue
                    last_audio_pts = pts
                    out = frame
                    out.pts = pts
                    out.time_base = audio_time_base
                    packets = audio.encode(out)
                for packet in packets:
                    container.mux(packet)
                if packets and self.live_since_s is None:
                    self.live_since_s = time.monotonic()
                    self._set_state("live")
                if kind == "video":
                    self.video_frames_sent += 1
                else:
                    self.audio_frames_sent += 1
                self.encode_s += time.perf_counter() - began_s
            try:  # stopped: flush the encoders and write the trailer
                for stream in (video, audio):
                    for packet in stream.encode(None):
                        container.mux(packet)
            except Exception as exc:  # the stream ends either way
                logger.debug("output %s: flush failed: %s", self.output_id, redact_text(str(exc), self._secrets))
        finally:
            try:
                container.close()
            except Exception as exc:
                logger.debug("output %s: close failed: %s", self.output_id, redact_text(str(exc), self._secrets))

    def _next_item(self) -> tuple[MediaKind, av.VideoFrame | av.AudioFrame] | None:
        with self._ready:
            if not self._queue:
                self._ready.wait(0.2)
            if not self._queue:
                return None
            return self._queue.popleft()

    def stats(self) -> dict[str, object]:
        """Figures for metrics and the API (no secrets): state, counts, encode seconds."""
        return {
            "output_id": self.output_id,
            "type": self.type,
            "url": self.url,
            "state": self.state,
            "reason": self.reason,
            "video_frames_sent": self.video_frames_sent,
            "audio_frames_sent": self.audio_frames_sent,
            "dropped": self.dropped,
            "connects": self.connects,
            "encode_s": round(self.encode_s, 3),
        }
