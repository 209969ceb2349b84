"""Viewers of a session over WHEP: one relay per session, many receive-only peers.

WHEP (the WebRTC-HTTP Egress Protocol, IETF draft ``draft-ietf-wish-whep``) mirrors WHIP
(RFC 9725): a viewer POSTs an SDP offer (``application/sdp``), the server answers
``201 Created`` with the SDP answer and a ``Location`` for the viewer's resource, and an HTTP
``DELETE`` of that resource leaves. The HTTP side lives in ``avatar_server``; this module
does the media: :class:`WhepRelay` turns an offer into an answer and a running viewer.

**One encode for all viewers.** Every viewer that can receive H.264 (packetization mode 1)
gets the same encoded access units: a :class:`SharedH264Encoder`, fed by the session's
:class:`~streaming.fanout.MediaFanout`, encodes each frame once (libx264, constrained
baseline, ``tune zerolatency``, a keyframe every ``gop_frames`` and as soon as a viewer
joins) in a worker thread, and each viewer's sender only packetizes (aiortc's
``H264Encoder.pack``). The cost of video per extra viewer is then RTP packetization and
SRTP, not an H.264 encode. A viewer whose offer has no H.264 gets frames through a
:class:`~streaming.fanout.SinkTrack` and its own encoder (VP8). Audio is encoded per viewer
(Opus, 20 ms: small beside video).

**Limits and failures.** At most ``max_viewers`` per relay and, through a shared
:class:`ViewerBudget`, per server. A viewer is dropped, touching neither the session nor the
other viewers, when its connection fails or closes, when it does not connect within
``connect_timeout_s``, or when it stalls: no RTCP receiver report for ``stall_s`` (a peer
that stopped reading or vanished without a ``DELETE``; receivers send reports about every
second, RFC 3550 section 6.2), or its queue overflowing for that long.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fractions
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.fanout import MediaFanout, MediaKind, SinkTrack, copy_frame
from streaming.outputs.base import receiver_report_key
from streaming.webrtc import StereoTrack

logger = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90_000)  # RTP video clock (RFC 6184 section 8.2.1)


class WhepError(Exception):
    """A viewer request the relay refuses.

    Attributes:
        code: ``viewer_limit`` (this session is full), ``server_viewer_limit`` (the server
            is), ``bad_sdp`` (not a usable offer with video), ``no_session`` (the relay closed).
        status: the HTTP status the server should answer with (400, 404, 503).
    """

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ViewerBudget:
    """Viewer slots shared by all relays of a server (``max_viewers``: ``None`` = unbounded)."""

    def __init__(self, max_viewers: int | None) -> None:
        self.max_viewers = max_viewers
        self.in_use = 0

    def acquire(self) -> bool:
        if self.max_viewers is not None and self.in_use >= self.max_viewers:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)


class PacketTrack(MediaStreamTrack):
    """A video track whose ``recv`` returns encoded H.264 access units (:class:`av.Packet`,
    Annex B, pts in 90 kHz units) from a :class:`SharedH264Encoder`; aiortc's sender then
    packetizes them without encoding (``RTCRtpSender`` packs any non-frame it receives).
    Queue bounded like :class:`~streaming.fanout.SinkTrack` (oldest dropped, counted)."""

    kind = "video"

    def __init__(self, max_queue: int = 25) -> None:
        super().__init__()
        self._queue: collections.deque[av.Packet] = collections.deque()
        self._max_queue = max_queue
        self._ready = asyncio.Event()
        self._waiting_key = True  # start at a keyframe
        self.dropped = 0
        self.delivered = 0
        self.last_read_s = time.monotonic()

    def put_packet(self, packet: av.Packet) -> None:
        if self.readyState != "live":
            return
        if self._waiting_key:
            if not packet.is_keyframe:
                return
            self._waiting_key = False
        if len(self._queue) >= self._max_queue:
            self._queue.clear()  # a gap: resume at the next keyframe, never mid-GOP
            self._waiting_key = not packet.is_keyframe
            self.dropped += self._max_queue
            if self._waiting_key:
                return
        self._queue.append(packet)
        self._ready.set()

    def stop(self) -> None:
        self._queue.clear()
        self._ready.set()
        super().stop()

    async def recv(self) -> av.Packet:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            self.last_read_s = time.monotonic()
            if self._queue:
                self.delivered += 1
                return self._queue.popleft()
            self._ready.clear()
            await self._ready.wait()


class SharedH264Encoder:
    """Encodes the session's video once for every :class:`PacketTrack` subscribed.

    A :class:`~streaming.fanout.FrameSink`: ``put`` queues the frame (at most
    ``max_queue`` frames; the oldest is dropped when the thread falls behind) for the encoder
    thread, which posts each packet back to the event loop for the subscribed tracks. The
    encoder runs only while somebody is subscribed.

    Args:
        fanout: the session's pump.
        width, height: frame size (even).
        fps: frame rate.
        bitrate_bps: target bitrate, bits per second.
        gop_frames: frames between periodic keyframes (also recovers viewers after loss).
    """

    def __init__(
        self,
        fanout: MediaFanout,
        *,
        width: int,
        height: int,
        fps: int = 25,
        bitrate_bps: int = 1_000_000,
        gop_frames: int = 50,
        max_queue: int = 10,
    ) -> None:
        self._fanout = fanout
        self.width, self.height, self.fps = width, height, fps
        self.bitrate_bps = bitrate_bps
        self.gop_frames = gop_frames
        self._tracks: list[PacketTrack] = []
        self._frames: collections.deque[av.VideoFrame] = collections.deque(maxlen=max_queue)
        self._cond = threading.Condition()
        self._force_key = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.frames_encoded = 0
        self.keyframes = 0
        self.dropped = 0
        self.encode_s = 0.0  # thread seconds spent encoding

    def subscribe(self) -> PacketTrack:
        """A new track for one viewer; the next frame is encoded as a keyframe."""
        track = PacketTrack(max_queue=2 * self.fps)
        self._tracks.append(track)
        self._force_key.set()
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="whep-h264", daemon=True)
            self._thread.start()
            self._fanout.add_sink(self)
        return track

    def unsubscribe(self, track: PacketTrack) -> None:
        track.stop()
        if track in self._tracks:
            self._tracks.remove(track)

    @property
    def subscribers(self) -> int:
        return len(self._tracks)

    def put(self, kind: MediaKind, frame: av.VideoFrame | av.AudioFrame) -> None:
        if kind != "video" or not self._tracks:
            return
        with self._cond:
            if len(self._frames) == self._frames.maxlen:
                self.dropped += 1
            self._frames.append(copy_frame(frame))  # the encoder thread's own frame
            self._cond.notify()

    async def close(self) -> None:
        self._fanout.remove_sink(self)
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for track in self._tracks:
            track.stop()
        self._tracks.clear()

    def _deliver(self, packets: list[av.Packet]) -> None:
        for packet in packets:
            for track in tuple(self._tracks):
                track.put_packet(packet)

    def _run(self) -> None:
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height, codec.pix_fmt = self.width, self.height, "yuv420p"
        codec.time_base = VIDEO_TIME_BASE
        codec.framerate = fractions.Fraction(self.fps, 1)
        codec.bit_rate = self.bitrate_bps
        codec.options = {
            "preset": "veryfast",
            "tune": "zerolatency",
            "profile": "baseline",
            "g": str(self.gop_frames),
            "keyint_min": str(self.gop_frames),
            "sc_threshold": "0",
            "repeat-headers": "1",
        }
        last_pts = -1
        while not self._stop.is_set():
            with self._cond:
                if not self._frames:
                    self._cond.wait(0.2)
                if not self._frames:
                    continue
                frame = self._frames.popleft()
            if frame.pts is None or frame.pts <= last_pts:
                continue
            last_pts = frame.pts
            began_s = time.perf_counter()
            out = frame.reformat(width=self.width, height=self.height, format="yuv420p")
            out.pts = int(frame.pts * frame.time_base / VIDEO_TIME_BASE)
            out.time_base = VIDEO_TIME_BASE
            if self._force_key.is_set():
                self._force_key.clear()
                out.pict_type = av.video.frame.PictureType.I
            try:
                packets = codec.encode(out)
            except Exception:
                logger.exception("shared H.264 encoder failed on a frame")
                continue
            for packet in packets:
                packet.time_base = VIDEO_TIME_BASE
                if packet.is_keyframe:
                    self.keyframes += 1
            self.frames_encoded += 1
            self.encode_s += time.perf_counter() - began_s
            loop = self._loop
            if packets and loop is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._deliver, packets)


@dataclass(eq=False)
class WhepViewer:
    """One viewer: its peer connection, tracks and watch figures."""

    viewer_id: str
    pc: RTCPeerConnection
    video: MediaStreamTrack
    audio: MediaStreamTrack | None
    shared: bool  # fed by the shared encoder (else per-viewer encoding)
    created_s: float = field(default_factory=time.monotonic)
    connected_s: float | None = None
    last_report_s: float | None = None
    _last_report_key: object = None
    close_reason: str | None = None


def _offer_has_h264(sdp: str) -> bool:
    return any(
        line.lower().startswith("a=rtpmap:") and " h264/90000" in line.lower() for line in sdp.splitlines()
    )


def default_peer_connection() -> RTCPeerConnection:
    """A peer connection that gathers host candidates only (no STUN server)."""
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


class WhepRelay:
    """All WHEP viewers of one session (see the module docstring).

    Args:
        fanout: the session's media pump.
        width, height, fps: the session's video.
        max_viewers: viewers of this session at most.
        budget: the server's shared viewer slots (``None``: no server limit).
        shared_encoding: encode H.264 once for all viewers that accept it.
        bitrate_bps: video bitrate of the shared encoder.
        gop_frames: keyframe period of the shared encoder.
        stall_s: seconds without an RTCP receiver report (or with a full queue) that drop a viewer.
        connect_timeout_s: seconds a viewer has to connect.
        peer_connection_factory: makes each viewer's :class:`RTCPeerConnection`.
        on_viewer_left: called with ``(viewer_id, reason)`` when a viewer is dropped or leaves.
    """

    def __init__(
        self,
        fanout: MediaFanout,
        *,
        width: int,
        height: int,
        fps: int = 25,
        max_viewers: int = 50,
        budget: ViewerBudget | None = None,
        shared_encoding: bool = True,
        bitrate_bps: int = 1_000_000,
        gop_frames: int = 50,
        stall_s: float = 5.0,
        connect_timeout_s: float = 15.0,
        peer_connection_factory: Callable[[], RTCPeerConnection] = default_peer_connection,
        on_viewer_left: Callable[[str, str], None] | None = None,
    ) -> None:
        self._fanout = fanout
        self.max_viewers = max_viewers
        self._budget = budget
        self._shared_encoding = shared_encoding
        self._encoder = SharedH264Encoder(
            fanout, width=width, height=height, fps=fps, bitrate_bps=bitrate_bps, gop_frames=gop_frames
        )
        self._stall_s = stall_s
        self._connect_timeout_s = connect_timeout_s
        self._pc_factory = peer_connection_factory
        self._on_viewer_left = on_viewer_left
        self._viewers: dict[str, WhepViewer] = {}
        self._watchdog: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.viewers_total = 0
        self.viewers_dropped = 0
        self._ids = itertools.count(1)

    @property
    def encoder(self) -> SharedH264Encoder:
        return self._encoder

    @property
    def viewers(self) -> dict[str, WhepViewer]:
        return dict(self._viewers)

    async def add_viewer(self, offer_sdp: str) -> tuple[str, str]:
        """Answer a viewer's offer: returns ``(viewer_id, answer_sdp)``.

        Raises:
            WhepError: ``closed`` (404), ``viewer_limit`` / ``server_viewer_limit`` (503),
                ``bad_offer`` (400: not SDP, or no video section).
        """
        if self._closed:
            raise WhepError("no_session", "the session has ended", 404)
        if len(self._viewers) >= self.max_viewers:
            raise WhepError("viewer_limit", f"viewers: the session has its {self.max_viewers} viewers", 503)
        if "m=video" not in offer_sdp:
            raise WhepError("bad_sdp", "offer: expected an SDP offer with a video section (m=video)", 400)
        if self._budget is not None and not self._budget.acquire():
            raise WhepError(
                "server_viewer_limit", f"viewers: the server has its {self._budget.max_viewers} viewers", 503
            )
        pc = self._pc_factory()
        viewer_id = f"v{next(self._ids)}-{secrets.token_hex(4)}"
        video: MediaStreamTrack | None = None
        audio: MediaStreamTrack | None = None
        try:
            # Transceivers made before the offer is applied take its m-lines (aiortc matches
            # a transceiver of the same kind without a mid), so the codec preference counts.
            shared = self._shared_encoding and _offer_has_h264(offer_sdp)
            video = self._encoder.subscribe() if shared else self._sink_track(viewer_id, "video")
            transceiver = pc.addTransceiver(video, direction="sendonly")
            if shared:
                capabilities = RTCRtpSender.getCapabilities("video").codecs
                codecs = [
                    c
                    for c in capabilities
                    if c.mimeType.lower() == "video/h264"
                    and c.parameters.get("profile-level-id", "").lower() in ("42e01f", "42001f")
                    and str(c.parameters.get("packetization-mode")) == "1"
                ]
                rtx = [c for c in capabilities if c.mimeType.lower() == "video/rtx"]
                transceiver.setCodecPreferences(codecs + rtx)
            if "m=audio" in offer_sdp:
                audio = self._sink_track(viewer_id, "audio")
                pc.addTransceiver(StereoTrack(audio), direction="sendonly")  # no -3 dB upmix in Opus
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            except Exception as exc:
                raise WhepError("bad_sdp", f"offer: not a usable SDP offer ({type(exc).__name__})", 400) from exc
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            if video is not None:
                self._release_track(video)
            if audio is not None:
                audio.stop()
            if self._budget is not None:
                self._budget.release()
            with contextlib.suppress(Exception):
                await pc.close()
            raise
        viewer = WhepViewer(viewer_id=viewer_id, pc=pc, video=video, audio=audio, shared=shared)
        self._viewers[viewer_id] = viewer
        self.viewers_total += 1

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected" and viewer.connected_s is None:
                viewer.connected_s = time.monotonic()
            elif pc.connectionState in ("failed", "closed"):
                self._drop(viewer_id, f"connection {pc.connectionState}")

        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="whep-watchdog")
        logger.info("whep: viewer %s joined (%s encoding); %d watching", viewer_id,
                    "shared" if shared else "own", len(self._viewers))
        return viewer_id, pc.localDescription.sdp

    def _sink_track(self, viewer_id: str, kind: MediaKind) -> SinkTrack:
        return SinkTrack(
            self._fanout, kind, stall_s=self._stall_s, on_stall=lambda: self._drop(viewer_id, "stalled")
        )

    def _release_track(self, track: MediaStreamTrack) -> None:
        if isinstance(track, PacketTrack):
            self._encoder.unsubscribe(track)
        else:
            track.stop()

    async def remove_viewer(self, viewer_id: str, reason: str = "left") -> bool:
        """The viewer leaves (WHEP ``DELETE``); ``False`` when there is no such viewer."""
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        await self._close_viewer(viewer, reason)
        return True

    def _drop(self, viewer_id: str, reason: str) -> None:
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is None:
            return
        self.viewers_dropped += 1
        logger.info("whep: viewer %s dropped (%s)", viewer_id, reason)
        task = asyncio.get_running_loop().create_task(self._close_viewer(viewer, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_viewer(self, viewer: WhepViewer, reason: str) -> None:
        viewer.close_reason = reason
        self._release_track(viewer.video)
        if viewer.audio is not None:
            viewer.audio.stop()
        if self._budget is not None:
            self._budget.release()
        try:
            await asyncio.wait_for(viewer.pc.close(), 5.0)
        except Exception as exc:  # the viewer is gone either way
            logger.debug("whep: closing viewer %s: %s", viewer.viewer_id, type(exc).__name__)
        if self._on_viewer_left is not None:
            try:
                self._on_viewer_left(viewer.viewer_id, reason)
            except Exception:
                logger.exception("whep: on_viewer_left failed")

    async def _watch(self) -> None:
        """Drop viewers that do not connect in time or whose receiver reports stopped."""
        while not self._closed:
            await asyncio.sleep(min(1.0, self._stall_s / 4))
            now = time.monotonic()
            for viewer in list(self._viewers.values()):
                if viewer.connected_s is None:
                    if now - viewer.created_s > self._connect_timeout_s:
                        self._drop(viewer.viewer_id, "connect timeout")
                    continue
                key = await receiver_report_key(viewer.pc)
                if key != viewer._last_report_key:
                    viewer._last_report_key = key
                    viewer.last_report_s = now
                since = viewer.last_report_s if viewer.last_report_s is not None else viewer.connected_s
                if now - since > self._stall_s:
                    self._drop(viewer.viewer_id, "stalled: no receiver report")
                elif isinstance(viewer.video, PacketTrack) and now - viewer.video.last_read_s > self._stall_s:
                    self._drop(viewer.viewer_id, "stalled: sender not reading")

    async def close(self) -> None:
        """Drop every viewer and stop the shared encoder."""
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        viewers, self._viewers = list(self._viewers.values()), {}
        for viewer in viewers:
            await self._close_viewer(viewer, "session ended")
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._encoder.close()

    def stats(self) -> dict[str, object]:
        """Viewer counts and encoder figures (for metrics and the API)."""
        return {
            "viewers": len(self._viewers),
            "viewers_total": self.viewers_total,
            "viewers_dropped": self.viewers_dropped,
            "shared_frames_encoded": self._encoder.frames_encoded,
            "shared_encode_s": round(self._encoder.encode_s, 3),
        }
