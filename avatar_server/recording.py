"""Server-side recording of a session: ``record.start`` / ``record.stop`` and why a recording
stopped (:class:`SessionRecording`, composed by :class:`~avatar_server.connection.ClientConnection`;
the recorder itself is :mod:`streaming.recorder`)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from avatar_server import protocol
from avatar_server.errors import ClientError
from avatar_server.limits import ConnectionLimits, LimitError
from avatar_server.settings import Limits, Settings
from streaming.recorder import LIMIT_DISK, LIMIT_DURATION, LIMIT_SIZE, RecordingResult
from streaming.session import SessionRunner

if TYPE_CHECKING:
    from avatar_server.metrics import Metrics

logger = logging.getLogger(__name__)


def recording_stop_reason(result: RecordingResult, requested: str) -> str:
    """The ``record.stopped`` reason of ``result``: ``failed``, the limit that ended it
    (``max_duration``, ``max_size``, ``disk_full``), or ``requested`` (``stopped`` by
    ``record.stop``, ``session_ended``)."""
    if result.error is not None:
        return "failed"
    return result.limit or requested


def recording_stop_message(result: RecordingResult, reason: str, limits: Limits) -> str:
    """Why a recording stopped, naming the limit when one stopped it."""
    seconds = result.duration_ms / 1000
    if reason == LIMIT_DURATION:
        return (
            f"recording stopped after {seconds:g} s of media: the limit is max_recording_s = {limits.max_recording_s:g}"
        )
    if reason == LIMIT_SIZE:
        return (
            f"recording stopped after {seconds:g} s at {result.size_bytes} bytes: "
            f"the limit is max_recording_bytes = {limits.max_recording_bytes}"
        )
    if reason == LIMIT_DISK:
        free = "too few" if result.free_bytes is None else str(result.free_bytes)
        return (
            f"recording stopped after {seconds:g} s: {free} bytes free on the recordings volume; "
            f"the limit is min_recording_free_bytes = {limits.min_recording_free_bytes}"
        )
    if reason == "failed":
        return f"recording failed after {seconds:g} s: {result.error}"
    if reason == "session_ended":
        return f"recording stopped after {seconds:g} s: the session ended"
    return f"recording stopped after {seconds:g} s by record.stop"


def recording_name(path: Path, recordings_dir: Path) -> str:
    """What the wire says of a recording's file: its path relative to ``recordings_dir``
    (POSIX separators), never the server's own directories (issue 18). A file outside
    ``recordings_dir`` (none is written there) is named by its file name alone."""
    try:
        return Path(path).relative_to(recordings_dir).as_posix()
    except ValueError:
        return Path(path).name


class SessionRecording:
    """``record.start`` / ``record.stop`` of one connection's session: the recording running
    (:attr:`recording_id`), how many were made, and the ``record.*`` frames.

    Composed by :class:`~avatar_server.connection.ClientConnection`, which hands it the
    session each time; it reaches nothing of the connection but ``send`` / ``send_error``
    (the connection's outgoing frames) and the connection's :class:`ConnectionLimits`
    (the recording counts).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        limits: ConnectionLimits,
        send: Callable[[protocol.ServerMessage], None],
        send_error: Callable[[str, str], None],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._limits = limits
        self._send = send
        self._send_error = send_error
        self.recording_id: str | None = None  # the recording running, if any
        self.count = 0  # recordings started by this session
        self._end_tasks: set[asyncio.Task[None]] = set()  # recordings ended by a limit

    async def start(self, session: SessionRunner, session_id: str, still_current: Callable[[], bool]) -> None:
        """``record.start``: checked against the recording limits (per session, server-wide,
        free disk), then started with the length/size/disk bounds of ``settings.limits``;
        ``still_current()``: the session still runs after the disk check's await.

        Raises:
            LimitError: ``recording_active``, ``too_many_recordings``, ``disk_full``.
            ClientError: ``no_session`` (the session ended meanwhile).
        """
        settings = self._settings
        try:
            self._limits.reserve_recording()
        except LimitError as exc:
            self._refused(exc)
        try:
            try:
                await self._limits.check_recording_disk(settings.recordings_dir)
            except LimitError as exc:
                self._refused(exc)
            if not still_current():
                raise ClientError("no_session", "type: record.start needs a session; send session.start first", field="type")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            recording_id = f"{session_id}-{self.count + 1}"
            path = settings.recordings_dir / f"{stamp}-{recording_id}.mp4"
            recorder = session.start_recording(path)
        except BaseException:
            self._limits.release_recording(started=False)
            raise
        on_end = functools.partial(self._ended_by_itself, session, recorder)
        recorder.set_limits(self._limits.recording_limits(), on_end=on_end)
        self.count += 1
        self.recording_id = recording_id
        self._metrics.recordings_active.inc()
        logger.info("session %s: recording to %s", session_id, path)
        self._send(protocol.RecordStarted(recording_id=recording_id, path=recording_name(path, settings.recordings_dir)))

    def _refused(self, exc: LimitError) -> NoReturn:
        """Count a refused ``record.start`` (by its limit) and raise the refusal."""
        if exc.code != "recording_active":
            self._metrics.recordings_refused.labels(exc.code).inc()
        raise exc

    def _ended_by_itself(self, session: SessionRunner, recorder: Any) -> None:
        """A recording ended by itself (a limit or a write error; its file is finished): stop
        it and tell the client, unless it was stopped meanwhile."""
        if session.recorder is not recorder:
            return

        async def finish() -> None:
            if session.recorder is recorder:
                self.stopped(await session.stop_recording(), "stopped")

        task = asyncio.get_running_loop().create_task(finish(), name="recording-end")
        self._end_tasks.add(task)
        task.add_done_callback(self._end_tasks.discard)

    async def stop(self, session: SessionRunner) -> None:
        """``record.stop``: stop ``session``'s recording and report it (``stopped``).

        Raises:
            SessionInputError: ``no_recording`` (none runs).
        """
        self.stopped(await session.stop_recording(), "stopped")

    async def finish(self, session: SessionRunner) -> None:
        """The session ends: stop its recording, if one runs, and report it (``session_ended``)."""
        if session.recorder is not None:
            self.stopped(await session.stop_recording(), "session_ended")

    def stopped(self, result: RecordingResult, requested: str) -> None:
        """Account a finished recording and send ``record.stopped`` (its ``reason``: a limit,
        ``failed``, or ``requested``: ``stopped`` or ``session_ended``)."""
        metrics = self._metrics
        self._limits.release_recording()
        metrics.recordings_active.dec()
        dropped = result.dropped_video_frames + result.dropped_audio_chunks
        if dropped:
            metrics.recording_frames_dropped.inc(dropped)
        reason = recording_stop_reason(result, requested)
        metrics.recordings_stopped.labels(reason).inc()
        message = recording_stop_message(result, reason, self._settings.limits)
        if reason != requested:
            logger.info("recording %s: %s", self.recording_id, message)
        if result.error is not None:
            self._send_error("recording_failed", f"record.stop: {result.error}")
        self._send(
            protocol.RecordStopped(
                recording_id=self.recording_id or "",
                path=recording_name(result.path, self._settings.recordings_dir),
                duration_ms=result.duration_ms,
                dropped_frames=result.dropped_video_frames,
                error=result.error,
                reason=reason,
                message=message,
                size_bytes=result.size_bytes,
            )
        )
        self.recording_id = None
