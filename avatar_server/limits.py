"""Limits on what a client can make the server do, and how slow or vanished clients are ended.

Each limit is a setting of :class:`~avatar_server.settings.Limits` and the error it produces
names it (``"... the limit is max_messages_per_s = 20"``); the table of limits and defaults is
in docs/PROTOCOL.md ("Limits").

* The server-wide counts (:class:`~avatar_server.admission.AdmissionRegistry`) and the
  handshake refusals are in :mod:`avatar_server.admission`; SDP checks in :mod:`avatar_server.sdp`.
  The client address is the one :meth:`~avatar_server.auth.Authenticator.client_address`
  decides (the TCP peer, or the forwarded client behind a trusted proxy).
* :class:`ConnectionLimits` (one per WebSocket, owned by the connection) holds the
  per-connection limits: the message rate (a token bucket), pending utterances (asked of the
  session's :class:`~streaming.utterances.UtteranceQueue`), sessions per token/address and the
  session id a token binds, the time to get media flowing, consecutive engine failures, and
  recordings (per session, server-wide, free disk space; the recorder itself enforces the
  length, size and disk floor of a running recording). Its checks return decisions (an
  :class:`EndConnection`, or a :class:`LimitError` raised for a refused message); it never
  calls the connection, which acts on them: it sends an ``error`` frame and closes the
  WebSocket with a reason that names the limit. The counts go with the session: when a
  session is parked (its WebSocket dropped) the WebSocket's count is released
  (:meth:`~ConnectionLimits.detach`) and the session's kept; when another connection resumes
  it, that connection's WebSocket side and counts move over (:meth:`~ConnectionLimits.adopt`).
* :class:`GuardedMicrophoneTrack` checks each incoming microphone frame (sample rate, channels,
  frame length) and drops audio that arrives faster than real time;
  :class:`GuardedTrack` turns a crash of an outgoing track or its encoder into a clean end of
  the session instead of a silently frozen stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from streaming.utterances import UtteranceQueue

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.25
ERROR_SEND_TIMEOUT_S = 1.0
CLOSE_POLICY = 1008  # WebSocket close code: policy violation
CLOSE_INTERNAL = 1011  # WebSocket close code: internal error


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
@dataclasses.dataclass(frozen=True)
class EndConnection:
    """A decision of :class:`ConnectionLimits`: end the connection with an ``error`` frame
    ``code``/``message`` (naming the limit) and the WebSocket close code ``close_code``."""

    code: str
    message: str
    close_code: int = CLOSE_POLICY


class ConnectionLimits:
    """The per-connection limits of one WebSocket and the session it drives (see the module
    docstring): checks that return a decision (:class:`EndConnection`, ``None``) or raise a
    :class:`LimitError` for a refused message, and the counts this connection holds in the
    server-wide :class:`~avatar_server.admission.AdmissionRegistry`. It never acts on the
    connection: the connection acts on what it returns.

    Counts held: one in ``connections_by_address`` (from construction until
    :meth:`release_connection`, :meth:`detach` or handing it over with :meth:`adopt`), the
    reserved session's (:meth:`reserve_session`) and a running recording's
    (:meth:`reserve_recording`).
    """

    def __init__(self, limits: Limits, admission: AdmissionRegistry, grant: Grant) -> None:
        self.limits = limits
        self.admission = admission
        self.grant = grant
        self._bucket = TokenBucket(limits.max_messages_per_s, limits.message_burst)
        self._throttled = False
        self._counts_connection = True  # holds one count in connections_by_address
        self._session_id: str | None = None  # set while a session is reserved
        self._engine_failures = 0
        self._media_phase: str | None = None
        self._media_deadline_s = 0.0
        self._recording = False  # a recording is reserved (running or starting)
        self.recordings_started = 0
        self._opened_s = time.monotonic()
        admission.connections_by_address[self.address] += 1

    @property
    def address(self) -> str:
        """The client address the counts are kept for (the grant's)."""
        return self.grant.address

    def check_open(self) -> EndConnection | None:
        """A connection over ``max_connections_per_address`` or ``max_connections`` (a burst
        that got past the handshake check) is ended: ``too_many_connections``."""
        admission, limits = self.admission, self.limits
        limit = limits.max_connections_per_address
        total = sum(admission.connections_by_address.values())
        if admission.connections_by_address[self.address] > limit:
            return EndConnection(
                "too_many_connections",
                f"too many connections from {self.address}: the limit is max_connections_per_address = {limit}",
            )
        if total > limits.max_connections:
            return EndConnection(
                "too_many_connections", f"server busy: the limit is max_connections = {limits.max_connections}"
            )
        return None

    # ----------------------------------------------------------------------------- frames
    def pace(self) -> tuple[float, LimitError | None]:
        """How long to wait before reading the next frame (s) to keep the client to
        ``max_messages_per_s`` (burst ``message_burst``), and the ``rate_limited`` notice to
        send once per episode. Call :meth:`spend` once the wait is over.

        Over the rate, frames are not dropped but read more slowly: the connection's reader
        waits, so TCP pushes back on the client; nothing it sent is lost.
        """
        if self._bucket.full:
            self._throttled = False
        wait_s = self._bucket.wait_s()
        notice = None
        if wait_s > 0 and not self._throttled:
            self._throttled = True
            limits = self.limits
            notice = LimitError(
                "rate_limited",
                f"more than max_messages_per_s = {limits.max_messages_per_s:g} "
                f"(burst message_burst = {limits.message_burst}): messages are read more slowly",
            )
        return wait_s, notice

    def spend(self) -> None:
        """One frame was read."""
        self._bucket.spend()

    def check_message(self, message: Any, utterances: UtteranceQueue | None) -> None:
        """Check a parsed message against the per-connection limits before it is handled;
        ``utterances``: the session's queue (``None`` before a session exists).

        Raises:
            LimitError: ``too_many_utterances`` (a ``speak`` opening an utterance while
                ``max_pending_utterances`` are open).
        """
        if isinstance(message, protocol.Speak) and utterances is not None:
            if utterances.is_known(message.utterance_id):
                return
            limit = self.limits.max_pending_utterances
            if utterances.open_count >= limit:
                raise LimitError(
                    "too_many_utterances",
                    f"utterance_id: {utterances.open_count} utterances are pending; "
                    f"the limit is max_pending_utterances = {limit}",
                    field="utterance_id",
                    limit="max_pending_utterances",
                )

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
        ``connections_by_address``; the session's counts (address, token, session id), engine
        failures and recording stay. Idempotent."""
        self.release_connection()

    def check_adopt(self, other: ConnectionLimits) -> None:
        """Whether ``other``'s connection (its address and token) may take over this one's
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

    def adopt(self, other: ConnectionLimits) -> None:
        """Take over the WebSocket side of ``other`` (the connection that resumed this one's
        parked session): its grant, address, message-rate bucket and its count in
        ``connections_by_address``; the session's counts move from this one's address and
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
        self.grant = other.grant
        self._bucket, self._throttled = other._bucket, other._throttled
        self._counts_connection, other._counts_connection = other._counts_connection, False
        self._media_phase = None  # the resumed client gets fresh offer / ICE timeouts

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
        raise LimitError(code, message, field="type", limit=limit)

    # ----------------------------------------------------------------------------- media
    def check_progress(self, *, session_running: bool, pc_state: str | None, now_s: float) -> EndConnection | None:
        """Called every ``WATCH_PERIOD_S`` while the connection is attached (not parked, not
        ending): a connection that starts no session within ``session_start_timeout_s``
        (``session_timeout``), a session whose peer connection is not offered within
        ``offer_timeout_s`` or not connected within ``ice_timeout_s`` (``media_timeout``).
        ``pc_state``: the peer connection's ``connectionState``, ``None`` without one."""
        limits = self.limits
        if not session_running:
            limit_s = limits.session_start_timeout_s
            if self._session_id is None and now_s - self._opened_s > limit_s:
                return EndConnection("session_timeout", f"no session.start within session_start_timeout_s = {limit_s:g}")
            return None
        if pc_state == "connected":
            self._media_phase = "connected"
            return None
        phase = "ice" if pc_state in ("new", "connecting") else "offer"
        if phase != self._media_phase:
            self._media_phase = phase
            self._media_deadline_s = now_s + (limits.ice_timeout_s if phase == "ice" else limits.offer_timeout_s)
            return None
        if now_s < self._media_deadline_s:
            return None
        if phase == "ice":
            message = f"webrtc: not connected within ice_timeout_s = {limits.ice_timeout_s:g} of the answer; the session ends"
        else:
            message = f"webrtc: no peer connection within offer_timeout_s = {limits.offer_timeout_s:g}; the session ends"
        return EndConnection("media_timeout", message)

    def observe(self, event: events.SessionEvent) -> EndConnection | None:
        """Account a session event: ``max_engine_failures`` failed segments in a row end the
        session (``engine_failed``)."""
        if isinstance(event, events.SessionError) and event.code == "engine_failed":
            self._engine_failures += 1
            limit = self.limits.max_engine_failures
            if self._engine_failures >= limit:
                return EndConnection(
                    "engine_failed",
                    f"session ended: {self._engine_failures} segments failed in a row; "
                    f"the limit is max_engine_failures = {limit}",
                    close_code=CLOSE_INTERNAL,
                )
        elif isinstance(event, events.SegmentGenerated):
            self._engine_failures = 0
        return None

    # ----------------------------------------------------------------------------- send side
    def send_queue_full(self) -> EndConnection:
        """The decision for a client whose send queue is full (``slow_client``)."""
        limit = self.limits.max_send_queue_messages
        return EndConnection("slow_client", f"the client does not read: max_send_queue_messages = {limit} are waiting")

    def send_stalled(self) -> EndConnection:
        """The decision for a client that did not take one frame within ``send_timeout_s``."""
        limit_s = self.limits.send_timeout_s
        return EndConnection("slow_client", f"the client does not read: one message waited send_timeout_s = {limit_s:g}")

    # ----------------------------------------------------------------------------- release
    def release_connection(self) -> None:
        """Give up this connection's count in ``connections_by_address`` (idempotent)."""
        if self._counts_connection:
            self._counts_connection = False
            self.admission.drop(self.admission.connections_by_address, self.address)

    def release(self) -> None:
        """Give up every count held (idempotent): the connection's, the session's, the recording's."""
        self.release_session()
        self.release_recording()
        self.release_connection()


async def drain_track(track: MediaStreamTrack) -> None:
    """Read and drop every frame of ``track`` until it ends (a remote track nobody reads)."""
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()
