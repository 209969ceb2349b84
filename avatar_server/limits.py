"""Limits on what a client can make the server do, and how slow or vanished clients are ended.

Each limit is a setting of :class:`~avatar_server.settings.Limits` and the error it produces
names it (``"... the limit is max_messages_per_s = 20"``); the table of limits and defaults is
in docs/PROTOCOL.md ("Limits").

* The server-wide counts (:class:`~avatar_server.admission.AdmissionRegistry`) and the
  handshake refusals are in :mod:`avatar_server.admission`; SDP checks in :mod:`avatar_server.sdp`.
  The client address is the one :meth:`~avatar_server.auth.Authenticator.client_address`
  decides (the TCP peer, or the forwarded client behind a trusted proxy).
* :class:`ConnectionGuard` (one per WebSocket) enforces the per-connection limits: the message
  rate (a token bucket), pending utterances, sessions per token/address and the session id a
  token binds, the microphone track, the time to get media flowing,
  consecutive engine failures, and recordings (per session, server-wide, free disk space; the
  recorder itself enforces the length, size and disk floor of a running recording). It ends a connection by sending an ``error`` frame and closing
  the WebSocket with a reason that names the limit; the connection's own ``close`` (which runs
  when the WebSocket ends) then releases the session, its peer connection, tracks and tasks.
  The guard goes with the session: when a session is parked (its WebSocket dropped) the guard
  gives up the WebSocket's count (:meth:`~ConnectionGuard.detach`) and keeps the session's;
  when another connection resumes it, the guard takes over that connection's WebSocket side
  and moves the session's counts to its address and token (:meth:`~ConnectionGuard.adopt`).
* :class:`GuardedMicrophoneTrack` checks each incoming microphone frame (sample rate, channels,
  frame length) and drops audio that arrives faster than real time;
  :class:`GuardedTrack` turns a crash of an outgoing track or its encoder into a clean end of
  the session instead of a silently frozen stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from avatar_server import protocol
from avatar_server.admission import AdmissionRegistry, TokenBucket
from avatar_server.auth import SESSION_ID_RE, Grant, new_session_id
from avatar_server.errors import ClientError
from avatar_server.settings import Limits
from streaming import events
from streaming.recorder import (
    RecordingLimits,
)

if TYPE_CHECKING:
    from avatar_server.server import ClientConnection

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.25
ERROR_SEND_TIMEOUT_S = 1.0
CLOSE_POLICY = 1008  # WebSocket close code: policy violation
CLOSE_INTERNAL = 1011  # WebSocket close code: internal error
_REMEMBERED_UTTERANCES = 1024


class LimitError(ClientError):
    """A request over a limit (or outside what the connection's token allows); ``code`` is the
    protocol error code and the message names the limit."""


# --------------------------------------------------------------------------------- tracks
SENDER_STOP_SETTLE_S = 1.0  # see GuardedTrack._judge_stop_later


class GuardedTrack(MediaStreamTrack):
    """An outgoing track that reports its own crash, or its sender's (an encoder error stops
    the track while the peer connection is still up), once, through ``on_failure``."""

    def __init__(
        self, inner: MediaStreamTrack, *, on_failure: Callable[[str], None], expected_stop: Callable[[], bool]
    ) -> None:
        super().__init__()
        self.kind = inner.kind
        self._inner = inner
        self._on_failure = on_failure
        self._expected_stop = expected_stop
        self._failed = False

    async def recv(self) -> Any:
        try:
            return await self._inner.recv()
        except MediaStreamError:
            raise
        except Exception as exc:
            logger.exception("outgoing %s track failed", self.kind)
            self._fail(f"{self.kind} track failed ({type(exc).__name__})")
            self.stop()
            raise MediaStreamError from None

    def stop(self) -> None:
        if self.readyState == "live" and not self._expected_stop():
            self._judge_stop_later()
        super().stop()
        self._inner.stop()

    def _judge_stop_later(self) -> None:
        """A sender stopped while the peer connection read ``connected``. When the client closes
        its peer connection, the DTLS transport (and with it every sender) stops a moment before
        the connection's state follows; so the stop is judged ``SENDER_STOP_SETTLE_S`` later: a
        failure only if the connection still reads ``connected`` (and nothing else ended it)."""

        def judge() -> None:
            if not self._expected_stop():
                self._fail(f"{self.kind} sender stopped (encoder or transport error)")

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # stopped outside the event loop: judge now
            judge()
            return
        loop.call_later(SENDER_STOP_SETTLE_S, judge)

    def _fail(self, what: str) -> None:
        if not self._failed:
            self._failed = True
            self._on_failure(what)


class GuardedMicrophoneTrack(MediaStreamTrack):
    """The client's microphone track, checked frame by frame.

    A frame with an unusable format (sample rate not in ``microphone_sample_rates_hz``, more
    than ``max_microphone_channels`` channels, longer than ``max_microphone_frame_ms``) ends
    the track (``microphone_invalid``). Audio arriving more than ``max_microphone_lead_s``
    ahead of wall-clock time since its first frame is dropped (``microphone_too_fast``, once).
    """

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, limits: Limits, report: Callable[[str, str], None]) -> None:
        super().__init__()
        self.source = source
        self._limits = limits
        self._report = report
        self._first_wall_s: float | None = None
        self._received_s = 0.0
        self._warned_fast = False
        self.frames_dropped = 0

    def problem(self, frame: Any) -> str | None:
        """What is wrong with a frame's format, or ``None``."""
        limits = self._limits
        rate = int(getattr(frame, "sample_rate", 0) or 0)
        if rate not in limits.microphone_sample_rates_hz:
            return f"microphone: sample rate {rate} Hz is not one of microphone_sample_rates_hz"
        channels = len(frame.layout.channels)
        if not 1 <= channels <= limits.max_microphone_channels:
            return f"microphone: {channels} channels; the limit is max_microphone_channels = {limits.max_microphone_channels}"
        frame_ms = 1000.0 * frame.samples / rate
        if frame_ms > limits.max_microphone_frame_ms:
            return f"microphone: {frame_ms:.0f} ms frame; the limit is max_microphone_frame_ms = {limits.max_microphone_frame_ms:g}"
        return None

    async def recv(self) -> Any:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            frame = await self.source.recv()
            problem = self.problem(frame)
            if problem is not None:
                self._report("microphone_invalid", problem)
                self.stop()
                raise MediaStreamError
            now_s = time.monotonic()
            if self._first_wall_s is None:
                self._first_wall_s = now_s
            duration_s = frame.samples / frame.sample_rate
            if self._received_s + duration_s > now_s - self._first_wall_s + self._limits.max_microphone_lead_s:
                self.frames_dropped += 1
                if not self._warned_fast:
                    self._warned_fast = True
                    self._report(
                        "microphone_too_fast",
                        "microphone: audio arrives faster than real time; frames over "
                        f"max_microphone_lead_s = {self._limits.max_microphone_lead_s:g} are dropped",
                    )
                continue
            self._received_s += duration_s
            return frame


# --------------------------------------------------------------------------------- per connection
class ConnectionGuard:
    """The limits of one :class:`~avatar_server.server.ClientConnection` (see the module docstring).

    The connection calls :meth:`allow_frame` for every frame, :meth:`admit` / :meth:`accepted`
    around every message it handles, :meth:`reserve_session` when a session starts,
    :meth:`check_offer` for an offer, :meth:`observe` for every session event, and
    :meth:`close` first thing when it closes.
    """

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        app = conn.app
        self.limits: Limits = app.settings.limits
        self.admission: AdmissionRegistry = app.admission
        self.grant: Grant = conn.grant
        self.address = self.grant.address
        self._bucket = TokenBucket(self.limits.max_messages_per_s, self.limits.message_burst)
        self._throttled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ending = False
        self._closed = False
        self._detached = False  # the session is parked: no WebSocket is counted for it
        self._handed_over = False  # another guard took over this one's WebSocket (a resume)
        self._session_id: str | None = None  # set while a session is reserved
        self._pending_utterances: set[str] = set()
        self._closed_utterances: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._engine_failures = 0
        self._media_phase: str | None = None
        self._media_deadline_s = 0.0
        self._recording = False  # a recording is reserved (running or starting)
        self.recordings_started = 0
        self.ended_with: str | None = None  # the error code that ended the connection

        self._opened_s = time.monotonic()
        self.admission.connections_by_address[self.address] += 1
        limit = self.limits.max_connections_per_address
        total = sum(self.admission.connections_by_address.values())
        if self.admission.connections_by_address[self.address] > limit:  # a burst got past the handshake check
            self.end(
                "too_many_connections",
                f"too many connections from {self.address}: the limit is max_connections_per_address = {limit}",
            )
        elif total > self.limits.max_connections:
            self.end(
                "too_many_connections",
                f"server busy: the limit is max_connections = {self.limits.max_connections}",
            )
        self._spawn(self._watch(), "connection-watchdog")

    @property
    def ending(self) -> bool:
        """The connection is being ended by a limit (its frames are ignored)."""
        return self._ending

    @property
    def pending_utterances(self) -> frozenset[str]:
        """The utterance ids of the session not yet spoken (they count against
        ``max_pending_utterances``)."""
        return frozenset(self._pending_utterances)

    # ----------------------------------------------------------------------------- frames
    async def allow_frame(self, raw: str | bytes) -> bool:
        """Pace the client to ``max_messages_per_s`` (burst ``message_burst``); ``False``: the
        connection is ending, drop the frame.

        Over the rate, frames are not dropped but read more slowly: the connection's reader
        waits for the bucket, so TCP pushes back on the client. The client is told once per
        episode (``rate_limited``); nothing it sent is lost.
        """
        if self._ending:
            return False
        if self._bucket.full:
            self._throttled = False
        wait_s = self._bucket.wait_s()
        if wait_s > 0:
            if not self._throttled:
                self._throttled = True
                limits = self.limits
                self._conn.send_error(
                    "rate_limited",
                    f"more than max_messages_per_s = {limits.max_messages_per_s:g} "
                    f"(burst message_burst = {limits.message_burst}): messages are read more slowly",
                )
            await asyncio.sleep(wait_s)
        self._bucket.spend()
        return not self._ending

    def admit(self, message: Any) -> None:
        """Check a parsed message against the per-connection limits before it is handled.

        Raises:
            LimitError: ``too_many_utterances``.
        """
        if isinstance(message, protocol.Speak):
            utterance_id = message.utterance_id
            if utterance_id in self._pending_utterances or utterance_id in self._closed_utterances:
                return
            limit = self.limits.max_pending_utterances
            if self._conn.session is not None and len(self._pending_utterances) >= limit:
                raise LimitError(
                    "too_many_utterances",
                    f"utterance_id: {len(self._pending_utterances)} utterances are pending; "
                    f"the limit is max_pending_utterances = {limit}", field="utterance_id", limit="max_pending_utterances")

    def accepted(self, message: Any) -> None:
        """A message was handled without error."""
        if isinstance(message, protocol.Speak) and message.utterance_id not in self._closed_utterances:
            self._pending_utterances.add(message.utterance_id)

    # ----------------------------------------------------------------------------- sessions
    def reserve_session(self, message: Any) -> str:
        """Count a starting session against the token and address limits; returns its id (the
        token's, when the connection has one). Undo with :meth:`release_session`.

        Raises:
            LimitError: ``forbidden`` (``session_id`` names another session than the token's),
                ``invalid_field``, ``session_exists`` (that session id runs elsewhere) or
                ``too_many_sessions``.
        """
        grant, admission, limits = self.grant, self.admission, self.limits
        requested = getattr(message, "session_id", None)
        if grant.session_id is not None:
            if requested is not None and requested != grant.session_id:
                raise LimitError("forbidden", "session_id: this connection's token is for another session", field="session_id")
            session_id = grant.session_id
        elif requested is not None:
            if not SESSION_ID_RE.fullmatch(requested):
                raise LimitError("invalid_field", f"session_id: must match {SESSION_ID_RE.pattern}", field="session_id")
            session_id = requested
        else:
            session_id = new_session_id()
        if grant.token_id is not None and admission.sessions_by_token[grant.token_id] >= limits.max_sessions_per_token:
            raise LimitError(
                "too_many_sessions",
                f"this token already runs a session; the limit is max_sessions_per_token = {limits.max_sessions_per_token}", limit="max_sessions_per_token")
        if session_id in admission.running_session_ids:
            raise LimitError("session_exists", f"session_id: session {session_id} is already running", field="session_id")
        if admission.sessions_by_address[self.address] >= limits.max_sessions_per_address:
            raise LimitError(
                "too_many_sessions",
                f"{self.address} already runs {admission.sessions_by_address[self.address]} sessions; "
                f"the limit is max_sessions_per_address = {limits.max_sessions_per_address}", limit="max_sessions_per_address")
        admission.running_session_ids.add(session_id)
        admission.sessions_by_address[self.address] += 1
        if grant.token_id is not None:
            admission.sessions_by_token[grant.token_id] += 1
        self._session_id = session_id
        self._media_phase = None
        return session_id

    def release_session(self) -> None:
        """Undo :meth:`reserve_session` (idempotent)."""
        session_id, self._session_id = self._session_id, None
        if session_id is None:
            return
        admission = self.admission
        admission.running_session_ids.discard(session_id)
        admission.drop(admission.sessions_by_address, self.address)
        if self.grant.token_id is not None:
            admission.drop(admission.sessions_by_token, self.grant.token_id)

    # ----------------------------------------------------------------------------- park / resume
    def detach(self) -> None:
        """The session is parked: its WebSocket is gone, so release that connection's count in
        ``connections_by_address``; the session's counts (address, token, session id), pending
        utterances, engine failures and recording stay. The media timeouts pause until
        :meth:`adopt`. Idempotent."""
        if self._detached or self._closed:
            return
        self._detached = True
        self.admission.drop(self.admission.connections_by_address, self.address)

    def check_adopt(self, other: ConnectionGuard) -> None:
        """Whether ``other``'s connection (its address and token) may take over this guard's
        session: it must not push its address or token over ``max_sessions_per_address`` /
        ``max_sessions_per_token``.

        Raises:
            LimitError: ``too_many_sessions``.
        """
        admission, limits = self.admission, self.limits
        token = other.grant.token_id
        if token is not None and token != self.grant.token_id and admission.sessions_by_token[token] >= limits.max_sessions_per_token:
            raise LimitError(
                "too_many_sessions",
                f"this token already runs a session; the limit is max_sessions_per_token = {limits.max_sessions_per_token}", limit="max_sessions_per_token")
        if other.address != self.address and admission.sessions_by_address[other.address] >= limits.max_sessions_per_address:
            raise LimitError(
                "too_many_sessions",
                f"{other.address} already runs {admission.sessions_by_address[other.address]} sessions; "
                f"the limit is max_sessions_per_address = {limits.max_sessions_per_address}", limit="max_sessions_per_address")

    def adopt(self, other: ConnectionGuard) -> None:
        """Take over the WebSocket side of ``other`` (the connection that resumed this guard's
        parked session): its grant, address, message-rate bucket and its count in
        ``connections_by_address``; the session's counts move from this guard's address and
        token to ``other``'s (so each is counted once). ``other`` then releases nothing of it
        on close. Call :meth:`check_adopt` first."""
        admission = self.admission
        if self._session_id is not None:
            admission.drop(admission.sessions_by_address, self.address)
            admission.sessions_by_address[other.address] += 1
            if self.grant.token_id is not None:
                admission.drop(admission.sessions_by_token, self.grant.token_id)
            if other.grant.token_id is not None:
                admission.sessions_by_token[other.grant.token_id] += 1
        self.grant, self.address = other.grant, other.address
        self._bucket, self._throttled = other._bucket, other._throttled
        self._detached = False
        self._media_phase = None  # the resumed client gets fresh offer / ICE timeouts
        other._handed_over = True

    def observe(self, event: events.SessionEvent) -> None:
        """Account a session event: engine failures in a row end the session; utterances end."""
        if isinstance(event, events.SessionError) and event.code == "engine_failed":
            self._engine_failures += 1
            limit = self.limits.max_engine_failures
            if self._engine_failures >= limit:
                self.end(
                    "engine_failed",
                    f"session ended: {self._engine_failures} segments failed in a row; "
                    f"the limit is max_engine_failures = {limit}",
                    close_code=CLOSE_INTERNAL,
                )
        elif isinstance(event, events.SegmentGenerated):
            self._engine_failures = 0
        elif isinstance(event, events.SpeakEnded | events.Interrupted) and event.utterance_id is not None:
            self._pending_utterances.discard(event.utterance_id)
            self._closed_utterances[event.utterance_id] = None
            while len(self._closed_utterances) > _REMEMBERED_UTTERANCES:
                self._closed_utterances.popitem(last=False)

    # ----------------------------------------------------------------------------- recording
    def reserve_recording(self) -> None:
        """Count a starting recording against ``max_recordings_per_session`` and
        ``max_concurrent_recordings``. Undo with :meth:`release_recording`.

        Raises:
            LimitError: ``recording_active`` or ``too_many_recordings``.
        """
        limits, admission = self.limits, self.admission
        if self._recording:
            raise LimitError("recording_active", "record.start: the session is already recording")
        if self.recordings_started >= limits.max_recordings_per_session:
            self._refuse_recording(
                "too_many_recordings",
                f"record.start: this session made {self.recordings_started} recordings; "
                f"the limit is max_recordings_per_session = {limits.max_recordings_per_session}", limit="max_recordings_per_session")
        if admission.recordings_running >= limits.max_concurrent_recordings:
            self._refuse_recording(
                "too_many_recordings",
                f"record.start: {admission.recordings_running} recordings are running on the server; "
                f"the limit is max_concurrent_recordings = {limits.max_concurrent_recordings}", limit="max_concurrent_recordings")
        self._recording = True
        self.recordings_started += 1
        admission.recordings_running += 1

    def release_recording(self, *, started: bool = True) -> None:
        """Undo :meth:`reserve_recording` once the recording is finished (idempotent);
        ``started=False``: it never started and does not count against the session."""
        if not self._recording:
            return
        self._recording = False
        self.admission.recordings_running -= 1
        if not started:
            self.recordings_started -= 1

    async def check_recording_disk(self, directory: Path) -> None:
        """Refuse a recording while the volume of ``directory`` has less free space than
        ``min_recording_free_bytes`` (queried off the event loop; a volume that cannot be
        queried is not refused here: writing to it fails with its own error).

        Raises:
            LimitError: ``disk_full``.
        """
        floor = self.limits.min_recording_free_bytes
        if floor <= 0:
            return
        try:
            free = await asyncio.to_thread(self.admission.free_bytes, directory)
        except OSError as exc:
            logger.warning("free space of %s unknown (%s): recording anyway", directory, exc)
            return
        if free < floor:
            self._refuse_recording(
                "disk_full",
                f"record.start: {free} bytes free on the recordings volume; "
                f"the limit is min_recording_free_bytes = {floor}", limit="min_recording_free_bytes")

    def recording_limits(self) -> RecordingLimits:
        """The bounds of one recording of this connection's session."""
        limits = self.limits
        return RecordingLimits(
            max_seconds=limits.max_recording_s,
            max_bytes=limits.max_recording_bytes,
            min_free_bytes=limits.min_recording_free_bytes or None,
            free_bytes=self.admission.free_bytes,
        )

    def _refuse_recording(self, code: str, message: str, *, limit: str | None = None) -> None:
        self._conn.app.metrics.recordings_refused.labels(code).inc()
        raise LimitError(code, message, field="type", limit=limit)

    # ----------------------------------------------------------------------------- media
    def wrap_track(self, track: MediaStreamTrack) -> MediaStreamTrack:
        """An outgoing session track whose crash (or its encoder's) ends the session."""

        def expected_stop() -> bool:
            pc = self._conn.pc
            return self._ending or self._closed or pc is None or pc.connectionState != "connected"

        def on_failure(what: str) -> None:
            self.end("media_failed", f"webrtc: {what}; the session ends", close_code=CLOSE_INTERNAL)

        return GuardedTrack(track, on_failure=on_failure, expected_stop=expected_stop)

    def wrap_microphone(self, track: MediaStreamTrack) -> MediaStreamTrack:
        """The client's microphone track behind the microphone limits."""
        guarded: GuardedMicrophoneTrack

        def report(code: str, message: str) -> None:
            self._conn.send_error(code, message)
            if code == "microphone_invalid":
                # Nobody reads the remote track any more: drain it so that aiortc's receive
                # queue (unbounded) does not grow until the peer connection closes.
                self._spawn(_drain(guarded.source), "microphone-drain")

        guarded = GuardedMicrophoneTrack(track, self.limits, report)
        return guarded

    async def _watch(self) -> None:
        """End a connection that starts no session in time, and a session that gets no
        connected peer connection in time (see the limits)."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            conn = self._conn
            if self._ending or self._detached:  # parked: the grace period applies, not these
                continue
            if conn.session is None:
                limit_s = self.limits.session_start_timeout_s
                if self._session_id is None and time.monotonic() - self._opened_s > limit_s:
                    self.end("session_timeout", f"no session.start within session_start_timeout_s = {limit_s:g}")
                continue
            pc = conn.pc
            state = None if pc is None else pc.connectionState
            if state == "connected":
                self._media_phase = "connected"
                continue
            phase = "ice" if state in ("new", "connecting") else "offer"
            now_s = time.monotonic()
            if phase != self._media_phase:
                self._media_phase = phase
                limit_s = self.limits.ice_timeout_s if phase == "ice" else self.limits.offer_timeout_s
                self._media_deadline_s = now_s + limit_s
            elif now_s >= self._media_deadline_s:
                if phase == "ice":
                    message = (
                        f"webrtc: not connected within ice_timeout_s = {self.limits.ice_timeout_s:g} "
                        "of the answer; the session ends"
                    )
                else:
                    message = (
                        f"webrtc: no peer connection within offer_timeout_s = {self.limits.offer_timeout_s:g}; "
                        "the session ends"
                    )
                self.end("media_timeout", message)

    # ----------------------------------------------------------------------------- send side
    def send_queue_full(self) -> None:
        limit = self.limits.max_send_queue_messages
        self.end("slow_client", f"the client does not read: max_send_queue_messages = {limit} are waiting")

    def send_stalled(self) -> None:
        limit_s = self.limits.send_timeout_s
        self.end("slow_client", f"the client does not read: one message waited send_timeout_s = {limit_s:g}")

    # ----------------------------------------------------------------------------- ending
    def end(self, code: str, message: str, *, close_code: int = CLOSE_POLICY) -> None:
        """End the connection: an ``error`` frame whose message names the limit (and, when a
        session runs, ``session.ended`` with ``code`` as its reason), then a WebSocket close
        with the same reason. Further frames are ignored. Idempotent. A client that does not
        read (``slow_client``) is not waited for: its connection is dropped."""
        if self._ending or self._closed:
            return
        self._ending = True
        self.ended_with = code
        conn = self._conn
        logger.info("connection from %s ended: %s (session %s)", self.address, code, conn.session_id)
        if conn.session is not None and code != "slow_client":
            self._spawn(self._end_session(code, message, close_code), "session-end")
        else:
            self._spawn(self._close_websocket(code, message, close_code), "connection-end")

    async def _end_session(self, code: str, message: str, close_code: int) -> None:
        await self._conn.end_session(code, message, close_code=close_code, error=True)

    async def _close_websocket(self, code: str, message: str, close_code: int) -> None:
        link = self._conn.link
        self._conn.app.metrics.client_errors.labels(code).inc()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ERROR_SEND_TIMEOUT_S):
                await link.send(protocol.ErrorMessage(code=code, message=message).model_dump_json())
        reason = f"{code}: {message}".encode()[:120].decode("utf-8", "ignore")
        try:
            async with asyncio.timeout(self.limits.close_timeout_s):
                await link.close(close_code, reason)
        except TimeoutError:
            link.abort()  # a client that does not read does not answer a close either

    async def close(self) -> None:
        """Release everything this guard holds (idempotent; called first by the connection's close)."""
        if self._closed:
            return
        self._closed = True
        self.release_session()
        self.release_recording()
        if not (self._detached or self._handed_over):
            self.admission.drop(self.admission.connections_by_address, self.address)
        tasks = list(self._tasks)
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
