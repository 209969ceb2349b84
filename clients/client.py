"""Python client on aiortc: image + text (or an audio file as its microphone) in, MP4 out.

:class:`AvatarClient` speaks the protocol of docs/PROTOCOL.md over ``/ws`` with the pydantic
models of :mod:`avatar_server.protocol`: every client message is built as its model and sent
as ``model_dump_json()``; every server frame is validated into its model (a discriminated
union on ``type``) and kept, in order, in :attr:`AvatarClient.received`. Refusals are matched
on the error frame's ``code`` (and ``in_reply_to`` where the server sends it), never on its
text.

The avatar arrives over WebRTC. The client reads each received track itself, logs every frame
(arrival time, pts, and for audio the samples; tests measure on this log) and then hands the
frame on to aiortc's ``MediaRecorder`` (optional MP4). The log is written before the recorder
sees the frame because PyAV's encoder rebases a frame's ``pts`` in place.

Every client message of the protocol is reachable: ``session.start`` (with ``mode``,
``barge_in``, ``session_id``), ``webrtc.offer`` (with or without a microphone),
``speak``/``speak.end``, ``interrupt``, ``session.update``, ``record.start``/``record.stop``,
``session.resume``. An audio file is sent as a live microphone by
:class:`clients.media.AudioFileTrack`.

Only :mod:`avatar_server.protocol` and the WebRTC helpers of :mod:`avatar_server.webrtc` are
imported from the server's packages. ``avatar-server client`` (:mod:`clients.cli`) drives it
from the command line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

import av
import numpy as np
import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRecorder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect

from avatar_server import protocol
from avatar_server.webrtc import make_peer_connection, use_host_addresses, wait_connected
from clients.media import AudioFileTrack, AudioRecord, ForwardTrack, VideoRecord, audio_frame_to_mono
from streaming.webrtc import StereoTrack

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SESSION_MODES = ("lipsync", "conversation")
# Error codes that refuse record.start / record.stop. ``recording_failed`` is not one:
# ``record.stopped`` follows it.
_RECORD_START_ERRORS = frozenset({"recording_active", "too_many_recordings", "disk_full", "no_session"})
_RECORD_STOP_ERRORS = frozenset({"no_recording", "no_session"})
# Error codes that answer session.resume besides resume_failed.
_RESUME_ERRORS = frozenset({"resume_failed", "session_exists", "too_many_sessions"})

ServerFrame = Annotated[protocol.ServerMessage, Field(discriminator="type")]
_SERVER_ADAPTER: TypeAdapter[Any] = TypeAdapter(ServerFrame)
# wire type ("speak.ended") -> its model (protocol.SpeakEnded)
SERVER_MODELS: dict[str, type[BaseModel]] = {
    model.model_fields["type"].default: model for model in get_args(protocol.ServerMessage)
}
M = TypeVar("M", bound=BaseModel)


def _model(kind: type[M] | str) -> type[M]:
    if isinstance(kind, str):
        try:
            return SERVER_MODELS[kind]  # type: ignore[return-value]
        except KeyError:
            raise ValueError(f"type: {kind!r} is not a server message type") from None
    return kind


def parse_server_message(raw: str | bytes) -> Any:
    """One server frame as its :mod:`avatar_server.protocol` model (``SessionReady``,
    ``SpeakEnded``, ``ErrorMessage``, ...).

    Raises:
        pydantic.ValidationError: not JSON, an unknown ``type`` or a field of the wrong type.
    """
    return _SERVER_ADAPTER.validate_json(raw)


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def answers(error: protocol.ErrorMessage, what: str, codes: frozenset[str]) -> bool:
    """Whether ``error`` refuses the client message of type ``what``: its ``in_reply_to`` says
    so (servers that send it), or its ``code`` is one of ``codes`` (those that refuse it)."""
    in_reply_to = getattr(error, "in_reply_to", None)
    if in_reply_to is not None:
        return in_reply_to == what
    return str(error.code) in codes


class RefusedError(RuntimeError):
    """The server answered a client message with an error frame (kept in :attr:`error`)."""

    def __init__(self, what: str, error: protocol.ErrorMessage) -> None:
        super().__init__(f"{what} refused: {error.code}: {error.message}")
        self.error = error

    @property
    def code(self) -> str:
        """The error frame's ``code``."""
        return str(self.error.code)


@dataclass
class Received:
    """Everything the client received, in order: server frames as protocol models (with their
    arrival time, monotonic s), frames this client could not parse (raw), video and audio."""

    messages: list[tuple[float, Any]] = field(default_factory=list)
    unparsed: list[tuple[float, str]] = field(default_factory=list)
    video: list[VideoRecord] = field(default_factory=list)
    audio: list[AudioRecord] = field(default_factory=list)

    def audio_samples(self) -> np.ndarray:
        """All received audio as one mono float32 array (empty when none was kept)."""
        if not self.audio:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([rec.samples for rec in self.audio])


def ws_url(url: str) -> str:
    """``http://h:p/`` or ``ws://h:p`` -> ``ws://h:p/ws``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def split_chunks(text: str, words_per_chunk: int) -> list[str]:
    """Split ``text`` into chunks of ``words_per_chunk`` words, keeping the spaces (as a
    streaming LLM would send them)."""
    words = text.split(" ")
    return [
        " ".join(words[i : i + words_per_chunk]) + (" " if i + words_per_chunk < len(words) else "")
        for i in range(0, len(words), words_per_chunk)
    ]


def _check_mode(mode: str) -> str:
    if mode not in SESSION_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {', '.join(SESSION_MODES)}")
    return mode


class AvatarClient:
    """One avatar session from Python.

    Args:
        url: server URL (``http://127.0.0.1:8080/`` or ``ws://127.0.0.1:8080/ws``).
        record_path: write what is received to this MP4 (``None``: no recording).
        ice_servers: STUN/TURN URLs (none by default).
        host_addresses: ICE host candidates; default ``["127.0.0.1"]`` for a loopback server.
        keep_audio: keep received audio samples in :attr:`received` (for analysis).
        on_video_frame: called with every received ``av.VideoFrame`` (after logging it).
        on_audio_frame: called with every received ``av.AudioFrame`` (after logging it).
        token: session token (from the server's ``POST /v1/tokens``), sent as
            ``Authorization: Bearer``; needed when the server has an api key.
        on_message: called with every server frame (a protocol model) as it arrives.
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
        on_audio_frame: Callable[[av.AudioFrame], None] | None = None,
        token: str | None = None,
        on_message: Callable[[Any], None] | None = None,
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
        self.on_audio_frame = on_audio_frame
        self.on_message = on_message
        self.received = Received()
        self.session: protocol.SessionReady | None = None  # session.ready, then the last session.resumed
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
        if self.session is not None and self.session.session_id:
            # A fleet's request router (avatar_server/fleet.py) sends this WebSocket to the replica
            # that holds the session (ops/deploy/README.md).
            headers["X-Session-Id"] = self.session.session_id
        ws = await connect(self.url, max_size=MAX_MESSAGE_BYTES, compression=None, additional_headers=headers or None)
        async with self._new_message:
            self._ws = ws
            self.closed_reason = None
        self._tasks.append(asyncio.get_running_loop().create_task(self._read_loop(ws), name="client-ws-read"))

    async def resume(self, *, timeout_s: float = 10.0) -> protocol.SessionResumed:
        """Reconnect the WebSocket and take the session over with ``session.resume`` (the
        ``resume_token`` of ``session.ready`` or of the last ``session.resumed``); the peer
        connection and its media are kept. An old WebSocket still open is dropped without a
        close frame (a normal close would end the session). The messages the server kept
        during the gap follow ``session.resumed`` and land in :attr:`received` in order.

        Returns ``session.resumed`` (it becomes :attr:`session`). Raises ``RuntimeError``
        without a token (no session, or the server has resume off), :class:`RefusedError` when
        the server refuses (``resume_failed``: unknown or expired token; ``session_exists``,
        ``too_many_sessions``), ``OSError`` when it cannot be reached.
        """
        token = self.session.resume_token if self.session is not None else None
        if not token:
            raise RuntimeError("resume: no resume_token (no session yet, or the server has resume off)")
        if self._ws is not None:
            self._ws.transport.abort()  # harmless when it is already closed
        await self.connect()
        start = len(self.received.messages)
        await self.send(protocol.SessionResume(type="session.resume", resume_token=token))
        reply = await self._wait_first(
            (protocol.SessionResumed, protocol.ErrorMessage),
            lambda m: (
                not isinstance(m, protocol.ErrorMessage) or answers(m, "session.resume", _RESUME_ERRORS)
            ),
            timeout_s,
            start=start,
        )
        if isinstance(reply, protocol.ErrorMessage):
            with contextlib.suppress(Exception):
                await self._ws.close()  # a connection without a session: nothing to keep
            raise RefusedError("session.resume", reply)
        self.session = reply
        self.resumes += 1
        return reply

    async def _auto_resume(self, reason: str) -> None:
        """Retry :meth:`resume` (0.25 s apart, doubling up to 2 s) until it works, the server
        refuses the token, or ``resume_grace_s`` has passed; then the connection counts as
        closed for ``reason`` (the drop)."""
        grace_s = self.session.resume_grace_s if self.session is not None else 0.0
        deadline_s = time.monotonic() + grace_s
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

    async def send(self, message: BaseModel | str) -> None:
        """Send a protocol model (as ``model_dump_json()``), or a raw text frame (a str, e.g.
        to test how the server answers bad input)."""
        assert self._ws is not None, "connect() first"
        await self._ws.send(
            message if isinstance(message, str) else message.model_dump_json(exclude_none=True)
        )

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                arrival_s = time.monotonic()
                try:
                    message = parse_server_message(raw)
                except ValidationError as exc:
                    # A frame of a newer server (or a broken one): kept raw, not fatal.
                    logger.warning("server frame not understood: %s", exc.errors(include_url=False)[0]["msg"])
                    self.received.unparsed.append((arrival_s, raw if isinstance(raw, str) else raw.decode()))
                    continue
                if self.on_message is not None:
                    self.on_message(message)
                async with self._new_message:
                    self.received.messages.append((arrival_s, message))
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
            elif (
                abnormal
                and self.auto_resume
                and not self._closing
                and self.session is not None
                and self.session.resume_token
            ):
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
        types: Sequence[type[BaseModel] | str],
        predicate: Callable[[Any], bool] | None,
        timeout_s: float,
        *,
        start: int | None = None,
    ) -> Any:
        """The first message after the cursor that is one of the models ``types`` and matches
        ``predicate``; the cursor moves past it. With ``start`` (an index into
        :attr:`received`), the first from there, and the cursor stays (for the client's own
        waits, e.g. in :meth:`resume`, that must not take a message a caller waits for).
        Raises ``TimeoutError`` (naming what was awaited) or ``ConnectionError`` when the
        server closed the connection first."""
        wanted = tuple(_model(kind) for kind in types)
        # A subclass (session.resumed extends session.ready) is its own type on the wire.
        what = " or ".join(model.model_fields["type"].default for model in wanted)
        try:
            async with asyncio.timeout(timeout_s), self._new_message:
                while True:
                    for index in range(self._cursor if start is None else start, len(self.received.messages)):
                        message = self.received.messages[index][1]
                        if type(message) in wanted and (predicate is None or predicate(message)):
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
        model: type[M] | str,
        predicate: Callable[[M], bool] | None = None,
        *,
        timeout_s: float = 10.0,
    ) -> M:
        """The next server frame of ``model`` (a protocol model such as ``protocol.SpeakEnded``
        or its wire type ``"speak.ended"``; after the last one returned) matching
        ``predicate``. Raises ``ValueError`` for a type that is not a server message."""
        return await self._wait_first((model,), predicate, timeout_s)

    async def wait_first(
        self,
        models: Sequence[type[BaseModel] | str],
        predicate: Callable[[Any], bool] | None = None,
        *,
        timeout_s: float = 10.0,
    ) -> Any:
        """The next server frame that is one of ``models`` (after the last one returned)
        matching ``predicate``."""
        return await self._wait_first(models, predicate, timeout_s)

    def messages(self, model: type[M] | str) -> list[M]:
        """Every server frame of ``model`` (a protocol model or its wire type) received so far,
        in order."""
        wanted = _model(model)
        return [m for _, m in self.received.messages if type(m) is wanted]

    @property
    def websocket(self) -> ClientConnection | None:
        """The current signalling WebSocket (``websockets``' client connection; ``None`` before
        :meth:`connect`): read its ``close_code``, or abort its transport to simulate a drop."""
        return self._ws

    @property
    def state(self) -> str | None:
        """The avatar's state from the last ``state`` message (``None`` before the first)."""
        states = self.messages(protocol.State)
        return states[-1].state if states else None

    async def start_session(
        self,
        image: bytes,
        prompt: str = "",
        *,
        mode: str | None = None,
        barge_in: bool | None = None,
        session_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> protocol.SessionReady:
        """Send ``session.start`` and return ``session.ready``.

        ``mode`` (``lipsync`` or ``conversation``), ``barge_in`` and ``session_id`` are sent only
        when given (the server's defaults apply otherwise). Raises ``ValueError`` for a bad
        ``mode`` and :class:`RefusedError` when the server refuses the session.
        """
        options: dict[str, Any] = {}
        if mode is not None:
            options["mode"] = _check_mode(mode)
        if barge_in is not None:
            options["barge_in"] = bool(barge_in)
        if session_id is not None:
            options["session_id"] = session_id
        # Built unvalidated: the size limits are the server's settings, which it checks itself.
        message = protocol.SessionStart.model_construct(
            type="session.start", image=base64.b64encode(image).decode(), prompt=prompt, **options
        )
        # Fields left out are not sent: the server's defaults apply.
        await self.send(message.model_dump_json(include={"type", "image", "prompt", *options}))
        ready = await self._wait_first((protocol.SessionReady, protocol.ErrorMessage), None, timeout_s)
        if isinstance(ready, protocol.ErrorMessage):
            raise RefusedError("session.start", ready)
        self.session = ready
        return ready

    async def update_session(self, *, mode: str | None = None, barge_in: bool | None = None) -> None:
        """Send ``session.update`` with the options given (the others stay as they are)."""
        if mode is None and barge_in is None:
            raise ValueError("update_session: give mode and/or barge_in")
        await self.send(
            protocol.SessionUpdate(
                type="session.update",
                mode=None if mode is None else _check_mode(mode),
                barge_in=None if barge_in is None else bool(barge_in),
            )
        )

    async def speak_chunk(self, utterance_id: str, text: str, *, language: str | None = None) -> None:
        """Send one ``speak`` chunk of utterance ``utterance_id`` (chunks are joined verbatim)."""
        # Built unvalidated: max_text_chars is the server's setting, which it checks itself.
        message = protocol.Speak.model_construct(
            type="speak", utterance_id=utterance_id, text=text, language=language or None
        )
        await self.send(message)

    async def speak_end(self, utterance_id: str) -> None:
        """Send ``speak.end``: no more text comes for ``utterance_id``."""
        await self.send(protocol.SpeakEnd(type="speak.end", utterance_id=utterance_id))

    async def speak(self, utterance_id: str, chunks: Sequence[str], *, language: str | None = None) -> None:
        """Send an utterance as text chunks, then ``speak.end``."""
        for chunk in chunks:
            await self.speak_chunk(utterance_id, chunk, language=language)
        await self.speak_end(utterance_id)

    async def wait_utterance_done(
        self, utterance_id: str, *, timeout_s: float = 60.0
    ) -> protocol.SpeakEnded | protocol.Interrupted:
        """``speak.ended`` or ``interrupted`` (an interrupt or a barge-in) of ``utterance_id``."""
        return await self._wait_first(
            (protocol.SpeakEnded, protocol.Interrupted), lambda m: m.utterance_id == utterance_id, timeout_s
        )

    async def wait_state(self, state: str, *, timeout_s: float = 30.0) -> None:
        """Return once the avatar's state is ``state`` (at once if it is already)."""
        if self.state == state:
            return
        await self._wait_first((protocol.State,), lambda m: m.state == state, timeout_s)

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
                    await self._wait_first((protocol.State,), lambda m: m.state == "idle", remaining_s)
                except TimeoutError:
                    return False
            try:  # idle now: done unless another state arrives within idle_s
                await self._wait_first((protocol.State,), lambda m: m.state != "idle", idle_s)
            except TimeoutError:
                return True

    async def interrupt(self) -> None:
        """Send ``interrupt`` (answered by ``interrupted`` per pending utterance)."""
        await self.send(protocol.Interrupt(type="interrupt"))

    async def start_recording(self, *, timeout_s: float = 10.0) -> protocol.RecordStarted:
        """Send ``record.start``; returns ``record.started`` (the file's id and server path).
        Raises :class:`RefusedError` when the server refuses (``recording_active``, a limit
        such as ``too_many_recordings`` or ``disk_full``)."""
        await self.send(protocol.RecordStart(type="record.start"))
        reply = await self._wait_first(
            (protocol.RecordStarted, protocol.ErrorMessage),
            lambda m: (
                not isinstance(m, protocol.ErrorMessage) or answers(m, "record.start", _RECORD_START_ERRORS)
            ),
            timeout_s,
        )
        if isinstance(reply, protocol.ErrorMessage):
            raise RefusedError("record.start", reply)
        return reply

    async def stop_recording(self, *, timeout_s: float = 30.0) -> protocol.RecordStopped:
        """Send ``record.stop``; returns ``record.stopped`` once the server's file is complete.
        Raises :class:`RefusedError` when nothing is being recorded (``no_recording``)."""
        await self.send(protocol.RecordStop(type="record.stop"))
        reply = await self._wait_first(
            (protocol.RecordStopped, protocol.ErrorMessage),
            lambda m: (
                not isinstance(m, protocol.ErrorMessage)
                or (str(m.code) != "recording_failed" and answers(m, "record.stop", _RECORD_STOP_ERRORS))
            ),
            timeout_s,
        )
        if isinstance(reply, protocol.ErrorMessage):
            raise RefusedError("record.stop", reply)
        return reply

    # ----------------------------------------------------------------------------- media
    async def start_media(
        self, *, microphone: str | Path | MediaStreamTrack | None = None, timeout_s: float = 20.0
    ) -> None:
        """Negotiate WebRTC: receive video+audio; send ``microphone`` if given.

        ``microphone`` is an audio file (any format PyAV reads; sent at real-time pace by
        :class:`AudioFileTrack`, then silence) or an audio ``MediaStreamTrack``. Without one the
        audio section is ``recvonly``. The track sent is kept in :attr:`microphone`. Raises
        :class:`RefusedError` when the server refuses the offer.
        """
        if isinstance(microphone, (str, Path)):
            microphone = await asyncio.to_thread(AudioFileTrack.from_file, microphone)
        use_host_addresses(self.host_addresses)
        # The server's STUN/TURN servers (session.ready) unless the caller chose its own.
        pc = make_peer_connection(self.ice_servers or (self.session.ice_servers if self.session else []))
        self.pc = pc
        pc.addTransceiver("video", direction="recvonly")
        if microphone is not None:
            if microphone.kind != "audio":
                raise ValueError(f"microphone: need an audio track, got {microphone.kind}")
            self.microphone = microphone
            # stereo on the wire: aiortc's Opus encoder would upmix a mono track at -3 dB
            pc.addTransceiver(StereoTrack(microphone), direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        if self.record_path is not None:
            self._recorder = MediaRecorder(str(self.record_path))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            forward = None
            if self._recorder is not None:
                forward = ForwardTrack(track.kind)
                self._recorder.addTrack(forward)
            consume = self._consume_video if track.kind == "video" else self._consume_audio
            self._tasks.append(asyncio.get_running_loop().create_task(consume(track, forward)))

        offer = await pc.createOffer()
        await pc.setLocalDescription(offer)
        await self.send(protocol.WebRTCOffer(type="webrtc.offer", sdp=pc.localDescription.sdp))
        answer = await self._wait_first((protocol.WebRTCAnswer, protocol.ErrorMessage), None, timeout_s)
        if isinstance(answer, protocol.ErrorMessage):
            raise RefusedError("webrtc.offer", answer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        if self._recorder is not None:
            await self._recorder.start()
        await wait_connected(pc, timeout_s)

    async def _consume_video(self, track: MediaStreamTrack, forward: ForwardTrack | None) -> None:
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

    async def _consume_audio(self, track: MediaStreamTrack, forward: ForwardTrack | None) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if forward is not None:
                    forward.push(None)
                return
            arrival_s = time.monotonic()
            samples = audio_frame_to_mono(frame) if self.keep_audio else np.zeros(0, dtype=np.float32)
            self.received.audio.append(
                AudioRecord(arrival_s, float(frame.pts * frame.time_base), frame.sample_rate, samples)
            )
            if self.on_audio_frame is not None:
                self.on_audio_frame(frame)
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
