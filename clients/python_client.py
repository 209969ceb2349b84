"""Python client on aiortc: image + text (or an audio file as its microphone) in, MP4 out.

:class:`AvatarClient` speaks the protocol of docs/PROTOCOL.md over ``/ws`` and receives the
avatar over WebRTC. The client reads each received track itself, logs every frame (arrival
time, pts, and for audio the samples; tests measure on this log) and then hands the frame on
to aiortc's ``MediaRecorder`` (optional MP4). The log is written before the recorder sees the
frame because PyAV's encoder rebases a frame's ``pts`` in place.

Every client message of the protocol is reachable: ``session.start`` (with ``mode``,
``barge_in``, ``session_id``), ``webrtc.offer`` (with or without a microphone),
``speak``/``speak.end``, ``interrupt``, ``session.update``, ``record.start``/``record.stop``.
An audio file is sent as a live microphone by :class:`AudioFileTrack`: decoded once, resampled
to 48 kHz mono and paced at real time on a monotonic clock, then silence, as a real microphone
would go quiet.

``avatar-server client`` (see :func:`run_client`) drives it from the command line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRecorder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection, connect

from avatar_server.settings import is_loopback_host
from avatar_server.webrtc import make_peer_connection, use_host_addresses, wait_connected

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MIC_SAMPLE_RATE_HZ = 48_000
MIC_FRAME_MS = 20
SESSION_MODES = ("lipsync", "conversation")
# ``avatar-server client --mode``: what the user sends -> the session's ``mode`` (None: no
# microphone, the server's default mode).
CLIENT_MODES: dict[str, str | None] = {"text": None, "microphone": "lipsync", "conversation": "conversation"}
# Error codes that refuse record.start / record.stop (a refusal's message also starts with the
# message type). ``recording_failed`` is not one: ``record.stopped`` follows it.
_RECORD_START_ERRORS = frozenset({"recording_active", "too_many_recordings", "disk_full", "no_session"})
_RECORD_STOP_ERRORS = frozenset({"no_recording", "no_session"})
# Error codes that answer session.resume besides resume_failed (whose field is resume_token).
_RESUME_ERRORS = frozenset({"session_exists", "too_many_sessions"})


def _refuses(message: dict[str, Any], what: str, codes: frozenset[str]) -> bool:
    code = message.get("code")
    return code in codes or (
        code != "recording_failed" and str(message.get("message", "")).startswith(f"{what}:")
    )


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


@dataclass
class Received:
    """Everything the client received, in order."""

    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    video: list[VideoRecord] = field(default_factory=list)
    audio: list[AudioRecord] = field(default_factory=list)

    def audio_samples(self) -> np.ndarray:
        """All received audio as one mono float32 array (empty when none was kept)."""
        if not self.audio:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([rec.samples for rec in self.audio])


class _ForwardTrack(MediaStreamTrack):
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


class AudioFileTrack(MediaStreamTrack):
    """Mono int16 samples sent as a live microphone: 20 ms frames paced at real time.

    Frame ``k`` carries ``pts = k * samples_per_frame`` in a ``1 / sample_rate_hz`` time base
    and is released at ``start + pts / sample_rate_hz`` on a monotonic clock (the start is the
    first :meth:`recv`, when the peer connection begins to send). After the last sample the
    track goes on with silence, as a microphone in a quiet room does, so the server's voice
    detection sees the speech end; :attr:`finished` is set once the last sample is handed out.

    Args:
        samples: mono int16 audio (see :func:`read_audio_file`).
        sample_rate_hz: its sample rate.
    """

    kind = "audio"

    def __init__(self, samples: np.ndarray, sample_rate_hz: int = MIC_SAMPLE_RATE_HZ) -> None:
        super().__init__()
        if samples.ndim != 1 or samples.dtype != np.int16:
            raise ValueError(f"samples: need mono int16, got {samples.dtype} with shape {samples.shape}")
        self.samples = samples
        self.sample_rate_hz = sample_rate_hz
        self.samples_per_frame = sample_rate_hz * MIC_FRAME_MS // 1000
        self.finished = asyncio.Event()
        self._time_base = Fraction(1, sample_rate_hz)
        self._start_s: float | None = None
        self._pts = 0

    @classmethod
    def from_file(cls, path: str | Path) -> AudioFileTrack:
        """The audio of ``path`` (decoded now; see :func:`read_audio_file`) as a microphone."""
        return cls(read_audio_file(path))

    @property
    def duration_s(self) -> float:
        """Length of the audio (the silence after it not counted)."""
        return self.samples.size / self.sample_rate_hz

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms frame, released at its media time (silence after the file)."""
        if self.readyState != "live":
            raise MediaStreamError
        now_s = time.monotonic()
        if self._start_s is None:
            self._start_s = now_s
        pts = self._pts
        wait_s = self._start_s + pts / self.sample_rate_hz - now_s
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        chunk = self.samples[pts : pts + self.samples_per_frame]
        if chunk.size < self.samples_per_frame:
            chunk = np.concatenate([chunk, np.zeros(self.samples_per_frame - chunk.size, dtype=np.int16)])
        if pts + self.samples_per_frame >= self.samples.size:
            self.finished.set()
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate_hz
        frame.pts = pts
        frame.time_base = self._time_base
        self._pts = pts + self.samples_per_frame
        return frame


def ws_url(url: str) -> str:
    """``http://h:p/`` or ``ws://h:p`` -> ``ws://h:p/ws``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class AvatarClient:
    """One avatar session from Python.

    Args:
        url: server URL (``http://127.0.0.1:8080/`` or ``ws://127.0.0.1:8080/ws``).
        record_path: write what is received to this MP4 (``None``: no recording).
        ice_servers: STUN/TURN URLs (none by default).
        host_addresses: ICE host candidates; default ``["127.0.0.1"]`` for a loopback server.
        keep_audio: keep received audio samples in :attr:`received` (for analysis).
        on_video_frame: called with every received ``av.VideoFrame`` (after logging it).
        token: session token (from the server's ``POST /v1/tokens``), sent as
            ``Authorization: Bearer``; needed when the server has an api key.
        on_message: called with every server message as it arrives (e.g. to print it).
        auto_resume: when the WebSocket drops abnormally (no close frame, or a code other than
            1000/1001), reconnect and take the session over with :meth:`resume`, retrying
            within the server's ``resume_grace_s``; the peer connection is kept.
    """

    def __init__(
        self,
        url: str,
        *,
        record_path: str | Path | None = None,
        ice_servers: Sequence[str] = (),
        host_addresses: Sequence[str] | None = None,
        keep_audio: bool = True,
        on_video_frame: Callable[[av.VideoFrame], None] | None = None,
        token: str | None = None,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        auto_resume: bool = False,
    ) -> None:
        self.url = ws_url(url)
        self.token = token
        self.record_path = None if record_path is None else Path(record_path)
        self.ice_servers = list(ice_servers)
        host = urlsplit(self.url).hostname or ""
        if host_addresses is None and is_loopback_host(host):
            host_addresses = ["127.0.0.1"]
        self.host_addresses = host_addresses
        self.keep_audio = keep_audio
        self.on_video_frame = on_video_frame
        self.on_message = on_message
        self.received = Received()
        self.session: dict[str, Any] | None = None
        self.pc: RTCPeerConnection | None = None
        self.microphone: MediaStreamTrack | None = None
        self.closed_reason: str | None = None  # set once the server closed the WebSocket
        self._ws: ClientConnection | None = None
        self._recorder: MediaRecorder | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._new_message = asyncio.Condition()
        self._cursor = 0
        self.auto_resume = auto_resume
        self.resumes = 0  # successful session.resume calls
        self._closing = False

    # ----------------------------------------------------------------------------- control
    async def connect(self) -> None:
        """Open the WebSocket and start reading server messages."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if (self.session or {}).get("session_id"):
            # A fleet's router (avatar_server/fleet.py) sends this WebSocket to the session's replica.
            headers["X-Session-Id"] = self.session["session_id"]
        ws = await connect(self.url, max_size=MAX_MESSAGE_BYTES, compression=None, additional_headers=headers or None)
        async with self._new_message:
            self._ws = ws
            self.closed_reason = None
        self._tasks.append(asyncio.get_running_loop().create_task(self._read_loop(ws), name="client-ws-read"))

    async def resume(self, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Reconnect the WebSocket and take the session over with ``session.resume`` (the
        ``resume_token`` of ``session.ready`` or of the last ``session.resumed``); the peer
        connection and its media are kept. An old WebSocket still open is dropped without a
        close frame (a normal close would end the session). The messages the server kept
        during the gap follow ``session.resumed`` and land in :attr:`received` in order.

        Returns ``session.resumed`` (:attr:`session` is updated with it). Raises
        ``RuntimeError`` without a token (no session, or the server has resume off) or when the
        server refuses (``resume_failed``: unknown or expired), ``OSError`` when it cannot be
        reached.
        """
        token = (self.session or {}).get("resume_token")
        if not token:
            raise RuntimeError("resume: no resume_token (no session yet, or the server has resume off)")
        if self._ws is not None:
            self._ws.transport.abort()  # harmless when it is already closed
        await self.connect()
        start = len(self.received.messages)
        await self.send({"type": "session.resume", "resume_token": token})
        reply = await self._wait_first(
            ("session.resumed", "error"),
            lambda m: m["type"] != "error" or m.get("field") == "resume_token" or m.get("code") in _RESUME_ERRORS,
            timeout_s,
            start=start,
        )
        if reply["type"] == "error":
            with contextlib.suppress(Exception):
                await self._ws.close()  # a connection without a session: nothing to keep
            raise RuntimeError(f"session.resume refused: {reply['code']}: {reply['message']}")
        assert self.session is not None
        self.session.update({key: value for key, value in reply.items() if key != "type"})
        self.resumes += 1
        return reply

    async def _auto_resume(self, reason: str) -> None:
        """Retry :meth:`resume` (0.25 s apart, doubling up to 2 s) until it works, the server
        refuses the token, or ``resume_grace_s`` has passed; then the connection counts as
        closed for ``reason`` (the drop)."""
        deadline_s = time.monotonic() + float((self.session or {}).get("resume_grace_s") or 0)
        wait_s = 0.25
        while not self._closing and time.monotonic() < deadline_s:
            try:
                await self.resume(timeout_s=max(1.0, deadline_s - time.monotonic()))
                logger.info("session resumed after a dropped WebSocket")
                return
            except RuntimeError as exc:
                logger.warning("%s", exc)
                break
            except (OSError, TimeoutError, ConnectionError, websockets.InvalidHandshake) as exc:
                logger.info("resume failed (%s); retrying in %.2f s", exc, wait_s)
            await asyncio.sleep(wait_s)
            wait_s = min(2.0, wait_s * 2)
        await self._set_closed(reason)

    async def send(self, message: dict[str, Any] | str) -> None:
        """Send a JSON message (a dict) or a raw text frame (a str, e.g. to test bad input)."""
        assert self._ws is not None, "connect() first"
        await self._ws.send(message if isinstance(message, str) else json.dumps(message))

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                if self.on_message is not None:
                    self.on_message(message)
                async with self._new_message:
                    self.received.messages.append((time.monotonic(), message))
                    self._new_message.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            close = ws.protocol.close_rcvd
            reason = (
                f"code {close.code}" + (f": {close.reason}" if close.reason else "")
                if close
                else "no close frame"
            )
            abnormal = close is None or close.code not in (1000, 1001)
            if ws is not self._ws:
                pass  # an old WebSocket that a resume replaced
            elif abnormal and self.auto_resume and not self._closing and (self.session or {}).get("resume_token"):
                # Waiters keep waiting: the messages come on the resumed WebSocket.
                task = asyncio.get_running_loop().create_task(self._auto_resume(reason), name="client-resume")
                self._tasks.append(task)
            else:
                await self._set_closed(reason)

    async def _set_closed(self, reason: str) -> None:
        async with self._new_message:
            self.closed_reason = reason
            self._new_message.notify_all()

    async def _wait_first(
        self,
        types: Sequence[str],
        predicate: Callable[[dict[str, Any]], bool] | None,
        timeout_s: float,
        *,
        start: int | None = None,
    ) -> dict[str, Any]:
        """The first message after the cursor whose type is in ``types`` and that matches
        ``predicate``; the cursor moves past it. With ``start`` (an index into
        :attr:`received`), the first from there, and the cursor stays (for the client's own
        waits, e.g. in :meth:`resume`, that must not take a message a caller waits for).
        Raises ``TimeoutError`` (naming what was awaited) or ``ConnectionError`` when the
        server closed the connection first."""
        what = " or ".join(types)
        try:
            async with asyncio.timeout(timeout_s), self._new_message:
                while True:
                    for index in range(self._cursor if start is None else start, len(self.received.messages)):
                        message = self.received.messages[index][1]
                        if message.get("type") in types and (predicate is None or predicate(message)):
                            if start is None:
                                self._cursor = index + 1
                            return message
                    if self.closed_reason is not None:
                        raise ConnectionError(
                            f"the server closed the connection ({self.closed_reason}) before {what}"
                        )
                    await self._new_message.wait()
        except TimeoutError:
            raise TimeoutError(f"no {what} from the server within {timeout_s:g} s") from None

    async def wait_for(
        self,
        type_: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """The next message of ``type_`` (after the last one returned) matching ``predicate``."""
        return await self._wait_first((type_,), predicate, timeout_s)

    def messages(self, type_: str) -> list[dict[str, Any]]:
        """Every message of ``type_`` received so far, in order."""
        return [m for _, m in self.received.messages if m.get("type") == type_]

    @property
    def state(self) -> str | None:
        """The avatar's state from the last ``state`` message (``None`` before the first)."""
        states = self.messages("state")
        return states[-1]["state"] if states else None

    async def start_session(
        self,
        image: bytes,
        prompt: str = "",
        *,
        mode: str | None = None,
        barge_in: bool | None = None,
        session_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        """Send ``session.start`` and return ``session.ready``.

        ``mode`` (``lipsync`` or ``conversation``), ``barge_in`` and ``session_id`` are sent only
        when given (the server's defaults apply otherwise). Raises ``ValueError`` for a bad
        ``mode`` and ``RuntimeError`` when the server refuses the session.
        """
        message: dict[str, Any] = {
            "type": "session.start",
            "image": base64.b64encode(image).decode(),
            "prompt": prompt,
        }
        if mode is not None:
            message["mode"] = _check_mode(mode)
        if barge_in is not None:
            message["barge_in"] = bool(barge_in)
        if session_id is not None:
            message["session_id"] = session_id
        await self.send(message)
        ready = await self._wait_first(("session.ready", "error"), None, timeout_s)
        if ready["type"] == "error":
            raise RuntimeError(f"session.start refused: {ready['code']}: {ready['message']}")
        self.session = ready
        return ready

    async def update_session(self, *, mode: str | None = None, barge_in: bool | None = None) -> None:
        """Send ``session.update`` with the options given (the others stay as they are)."""
        message: dict[str, Any] = {"type": "session.update"}
        if mode is not None:
            message["mode"] = _check_mode(mode)
        if barge_in is not None:
            message["barge_in"] = bool(barge_in)
        if len(message) == 1:
            raise ValueError("update_session: give mode and/or barge_in")
        await self.send(message)

    async def speak(self, utterance_id: str, chunks: Sequence[str], *, language: str | None = None) -> None:
        """Send an utterance as text chunks, then ``speak.end``."""
        for chunk in chunks:
            message: dict[str, Any] = {"type": "speak", "utterance_id": utterance_id, "text": chunk}
            if language:
                message["language"] = language
            await self.send(message)
        await self.send({"type": "speak.end", "utterance_id": utterance_id})

    async def wait_utterance_done(self, utterance_id: str, *, timeout_s: float = 60.0) -> dict[str, Any]:
        """``speak.ended`` or ``interrupted`` (an interrupt or a barge-in) of ``utterance_id``."""
        return await self._wait_first(
            ("speak.ended", "interrupted"), lambda m: m.get("utterance_id") == utterance_id, timeout_s
        )

    async def wait_state(self, state: str, *, timeout_s: float = 30.0) -> None:
        """Return once the avatar's state is ``state`` (at once if it is already)."""
        if self.state == state:
            return
        await self._wait_first(("state",), lambda m: m.get("state") == state, timeout_s)

    async def wait_idle(self, idle_s: float, *, timeout_s: float = 30.0) -> bool:
        """Wait until the avatar has been ``idle`` for ``idle_s`` seconds in a row (no state
        before the first ``state`` message counts as idle). Returns ``False`` when that did not
        happen within ``timeout_s`` plus ``idle_s``.

        With a microphone in ``lipsync`` mode the last words are lip-synced about one segment
        plus generation time after they were sent, after a quiet spell; an ``idle_s`` longer
        than that waits for them."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            if self.state not in (None, "idle"):
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return False
                try:
                    await self._wait_first(("state",), lambda m: m.get("state") == "idle", remaining_s)
                except TimeoutError:
                    return False
            try:  # idle now: done unless another state arrives within idle_s
                await self._wait_first(("state",), lambda m: m.get("state") != "idle", idle_s)
            except TimeoutError:
                return True

    async def interrupt(self) -> None:
        """Send ``interrupt`` (answered by ``interrupted`` per pending utterance)."""
        await self.send({"type": "interrupt"})

    async def start_recording(self, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Send ``record.start``; returns ``record.started`` (the file's id and server path).
        Raises ``RuntimeError`` when the server refuses (``recording_active``, a limit such as
        ``too_many_recordings`` or ``disk_full``)."""
        await self.send({"type": "record.start"})
        reply = await self._wait_first(
            ("record.started", "error"),
            lambda m: m["type"] != "error" or _refuses(m, "record.start", _RECORD_START_ERRORS),
            timeout_s,
        )
        if reply["type"] == "error":
            raise RuntimeError(f"record.start refused: {reply['code']}: {reply['message']}")
        return reply

    async def stop_recording(self, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """Send ``record.stop``; returns ``record.stopped`` once the server's file is complete.
        Raises ``RuntimeError`` when nothing is being recorded (``no_recording``)."""
        await self.send({"type": "record.stop"})
        reply = await self._wait_first(
            ("record.stopped", "error"),
            lambda m: m["type"] != "error" or _refuses(m, "record.stop", _RECORD_STOP_ERRORS),
            timeout_s,
        )
        if reply["type"] == "error":
            raise RuntimeError(f"record.stop refused: {reply['code']}: {reply['message']}")
        return reply

    # ----------------------------------------------------------------------------- media
    async def start_media(
        self, *, microphone: str | Path | MediaStreamTrack | None = None, timeout_s: float = 20.0
    ) -> None:
        """Negotiate WebRTC: receive video+audio; send ``microphone`` if given.

        ``microphone`` is an audio file (any format PyAV reads; sent at real-time pace by
        :class:`AudioFileTrack`, then silence) or an audio ``MediaStreamTrack``. Without one the
        audio section is ``recvonly``. The track sent is kept in :attr:`microphone`.
        """
        if isinstance(microphone, (str, Path)):
            microphone = await asyncio.to_thread(AudioFileTrack.from_file, microphone)
        use_host_addresses(self.host_addresses)
        # The server's STUN/TURN servers (session.ready) unless the caller chose its own.
        pc = make_peer_connection(self.ice_servers or (self.session or {}).get("ice_servers") or [])
        self.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            if microphone.kind != "audio":
                raise ValueError(f"microphone: need an audio track, got {microphone.kind}")
            self.microphone = microphone
            pc.addTransceiver(microphone, direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        if self.record_path is not None:
            self._recorder = MediaRecorder(str(self.record_path))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            forward = None
            if self._recorder is not None:
                forward = _ForwardTrack(track.kind)
                self._recorder.addTrack(forward)
            consume = self._consume_video if track.kind == "video" else self._consume_audio
            self._tasks.append(asyncio.get_running_loop().create_task(consume(track, forward)))

        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        await self.send({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
        answer = await self._wait_first(("webrtc.answer", "error"), None, timeout_s)
        if answer["type"] == "error":
            raise RuntimeError(f"webrtc.offer refused: {answer['code']}: {answer['message']}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        if self._recorder is not None:
            await self._recorder.start()
        await wait_connected(pc, timeout_s)

    async def _consume_video(self, track: MediaStreamTrack, forward: _ForwardTrack | None) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if forward is not None:
                    forward.push(None)
                return
            arrival_s = time.monotonic()
            luma = frame.to_ndarray(format="gray")
            self.received.video.append(
                VideoRecord(
                    arrival_s,
                    float(frame.pts * frame.time_base),
                    frame.width,
                    frame.height,
                    float(luma.mean()),
                )
            )
            if self.on_video_frame is not None:
                self.on_video_frame(frame)
            if forward is not None:
                forward.push(frame)

    async def _consume_audio(self, track: MediaStreamTrack, forward: _ForwardTrack | None) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if forward is not None:
                    forward.push(None)
                return
            arrival_s = time.monotonic()
            samples = np.zeros(0, dtype=np.float32)
            if self.keep_audio:
                pcm = frame.to_ndarray()
                channels = len(frame.layout.channels)
                if frame.format.is_planar:
                    mono = pcm.reshape(channels, -1).astype(np.float32).mean(axis=0)
                else:
                    mono = pcm.reshape(-1, channels).astype(np.float32).mean(axis=1)
                scale = 32768.0 if pcm.dtype == np.int16 else 1.0
                samples = mono / scale
            self.received.audio.append(
                AudioRecord(arrival_s, float(frame.pts * frame.time_base), frame.sample_rate, samples)
            )
            if forward is not None:
                forward.push(frame)

    async def close(self) -> None:
        """Stop recording (flushing the MP4), close the WebSocket (which ends the session on the
        server), then the peer connection. In that order the server sees a client that left,
        not a peer connection that failed under a running session."""
        self._closing = True
        if self._recorder is not None:
            with contextlib.suppress(Exception):
                await self._recorder.stop()
        if self._ws is not None:
            await self._ws.close()
        if self.pc is not None:
            await self.pc.close()
        if self.microphone is not None:
            self.microphone.stop()
        for task in reversed(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()


def _check_mode(mode: str) -> str:
    if mode not in SESSION_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(SESSION_MODES)}")
    return mode


def split_chunks(text: str, words_per_chunk: int) -> list[str]:
    """Split ``text`` into chunks of ``words_per_chunk`` words, keeping the spaces (as a
    streaming LLM would send them)."""
    words = text.split(" ")
    return [
        " ".join(words[i : i + words_per_chunk]) + (" " if i + words_per_chunk < len(words) else "")
        for i in range(0, len(words), words_per_chunk)
    ]


async def run_client(
    *,
    url: str,
    image: bytes,
    prompt: str,
    says: Sequence[str],
    language: str | None,
    microphone: Path | None,
    record: Path | None,
    chunk_words: int,
    duration_s: float,
    timeout_s: float,
    out: Callable[[str], None] = print,
    err: Callable[[str], None] | None = None,
    token: str | None = None,
    mode: str | None = None,
    barge_in: bool | None = None,
    session_id: str | None = None,
    server_record: bool = False,
    interrupt_after_s: float | None = None,
) -> dict[str, Any]:
    """What ``avatar-server client`` does; returns the summary it prints last.

    Every server message except ``stats`` is printed (``out``) as a JSON line as it arrives;
    ``error`` frames are also written to ``err`` as one readable line. The session starts
    with ``mode``/``barge_in``/``session_id`` (when given); ``microphone`` (an audio file) is
    sent at real-time pace, then silence. Each of ``says`` is one utterance, interrupted
    ``interrupt_after_s`` after its ``speak.started`` when that is given. Once the utterances
    are done and the microphone file is sent, the client leaves after the avatar has been idle
    for ``duration_s`` (see :meth:`AvatarClient.wait_idle`). With ``server_record`` the server
    records the session from media start to the end (``record.start`` / ``record.stop``) and
    the summary carries its ``record.stopped`` as ``server_recording``.

    The summary says ``failure`` (a refused session, a timeout, the server closing the
    connection) and lists the ``errors`` codes received; the client stops at a failure.
    Raises ``ValueError`` (naming the file) when ``microphone`` cannot be decoded.
    """
    errors: list[str] = []

    def on_message(message: dict[str, Any]) -> None:
        if message.get("type") == "stats":
            return
        out(json.dumps(message))
        if message.get("type") == "error":
            errors.append(str(message.get("code")))
            if err is not None:
                err(f"server error {message.get('code')}: {message.get('message')}")
        elif message.get("type") == "record.stopped" and message.get("reason") not in (None, "stopped"):
            # The server ended the recording itself (a limit, the session ending, a failure).
            if err is not None:
                detail = f": {message['message']}" if message.get("message") else ""
                err(
                    f"the server stopped recording {message.get('recording_id')} ({message['reason']}){detail}"
                )

    track = None if microphone is None else await asyncio.to_thread(AudioFileTrack.from_file, microphone)
    client = AvatarClient(url, record_path=record, keep_audio=False, token=token, on_message=on_message)
    started = time.monotonic()
    failure: str | None = None
    server_recording: dict[str, Any] | None = None
    await client.connect()
    try:
        await client.start_session(
            image, prompt, mode=mode, barge_in=barge_in, session_id=session_id, timeout_s=timeout_s
        )
        await client.start_media(microphone=track, timeout_s=timeout_s)
        if server_record:
            await client.start_recording(timeout_s=timeout_s)
        for number, text in enumerate(says, start=1):
            utterance_id = f"u{number}"
            await client.speak(utterance_id, split_chunks(text, chunk_words), language=language)
            if interrupt_after_s is not None:
                first = await client._wait_first(
                    ("speak.started", "speak.ended", "interrupted"),
                    lambda m, u=utterance_id: m.get("utterance_id") == u,
                    timeout_s,
                )
                if first["type"] != "speak.started":  # over before it started (e.g. no words)
                    continue
                await asyncio.sleep(interrupt_after_s)
                await client.interrupt()
            await client.wait_utterance_done(utterance_id, timeout_s=timeout_s)
        if track is not None:
            try:
                async with asyncio.timeout(track.duration_s + timeout_s):
                    await track.finished.wait()
            except TimeoutError:
                raise TimeoutError(
                    f"the microphone file was not sent within {track.duration_s + timeout_s:g} s"
                ) from None
        await client.wait_idle(duration_s, timeout_s=timeout_s)
        if server_record:
            stopped = client.messages("record.stopped")
            # The server may have stopped it already (a recording limit, a write error).
            server_recording = stopped[-1] if stopped else await client.stop_recording(timeout_s=timeout_s)
    except (RuntimeError, ConnectionError, TimeoutError) as exc:
        failure = str(exc)
        if err is not None:
            err(f"failed: {failure}")
    finally:
        await client.close()
    if server_record and server_recording is None and client.messages("record.stopped"):
        server_recording = client.messages("record.stopped")[-1]
    elapsed_s = time.monotonic() - started
    video = client.received.video
    span_s = video[-1].arrival_s - video[0].arrival_s if len(video) > 1 else 0.0
    summary = {
        "type": "summary",
        "video_frames": len(video),
        "video_fps": round((len(video) - 1) / span_s, 2) if span_s > 0 else None,
        "audio_frames": len(client.received.audio),
        "elapsed_s": round(elapsed_s, 2),
        "recording": None if record is None else str(record),
        "server_recording": None
        if server_recording is None
        else {k: v for k, v in server_recording.items() if k != "type"},
        "microphone_s": None if track is None else round(track.duration_s, 3),
        "errors": errors,
        "failure": failure,
    }
    out(json.dumps(summary))
    return summary
