"""Server-side recording of a session: ``record.start`` / ``record.stop`` and why a recording
stopped (the part of :class:`~avatar_server.connection.ClientConnection` that
:class:`RecordingMixin` holds; the recorder itself is :mod:`streaming.recorder`)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
from typing import NoReturn

from avatar_server import protocol
from avatar_server.errors import ClientError
from avatar_server.limits import LimitError
from avatar_server.settings import Limits
from streaming.recorder import LIMIT_DISK, LIMIT_DURATION, LIMIT_SIZE, RecordingResult
from streaming.session import SessionRunner

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


class RecordingMixin:
    """``record.start`` / ``record.stop`` for :class:`~avatar_server.connection.ClientConnection`."""

    async def _record_start(self, session: SessionRunner) -> None:
        """``record.start``: checked against the recording limits (per session, server-wide,
        free disk), then started with the length/size/disk bounds of ``settings.limits``."""
        settings = self.app.settings
        try:
            self.limits.reserve_recording()
        except LimitError as exc:
            self._recording_refused(exc)
        try:
            try:
                await self.limits.check_recording_disk(settings.recordings_dir)
            except LimitError as exc:
                self._recording_refused(exc)
            if self.session is not session or self.ending:
                raise ClientError("no_session", "type: record.start needs a session; send session.start first", field="type")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            recording_id = f"{self.session_id}-{self.recordings + 1}"
            path = settings.recordings_dir / f"{stamp}-{recording_id}.mp4"
            recorder = session.start_recording(path)
        except BaseException:
            self.limits.release_recording(started=False)
            raise
        recorder.set_limits(self.limits.recording_limits(), on_end=functools.partial(self._recording_ended, recorder))
        self.recordings += 1
        self.recording_id = recording_id
        self.app.metrics.recordings_active.inc()
        logger.info("session %s: recording to %s", self.session_id, path)
        self.send(protocol.RecordStarted(recording_id=recording_id, path=str(path)))

    def _recording_refused(self, exc: LimitError) -> NoReturn:
        """Count a refused ``record.start`` (by its limit) and raise the refusal."""
        if exc.code != "recording_active":
            self.app.metrics.recordings_refused.labels(exc.code).inc()
        raise exc

    def _recording_ended(self, recorder) -> None:
        """A recording ended by itself (a limit or a write error; its file is finished): stop
        it and tell the client, unless it was stopped meanwhile."""
        session = self.session
        if session is None or session.recorder is not recorder:
            return

        async def finish() -> None:
            if session.recorder is recorder:
                self._recording_stopped(await session.stop_recording(), "stopped")

        task = asyncio.get_running_loop().create_task(finish(), name="recording-end")
        self._recording_end_tasks.add(task)
        task.add_done_callback(self._recording_end_tasks.discard)

    def _recording_stopped(self, result, requested: str) -> None:
        """Account a finished recording and send ``record.stopped`` (its ``reason``: a limit,
        ``failed``, or ``requested``: ``stopped`` or ``session_ended``)."""
        self.limits.release_recording()
        self.app.metrics.recordings_active.dec()
        dropped = result.dropped_video_frames + result.dropped_audio_chunks
        if dropped:
            self.app.metrics.recording_frames_dropped.inc(dropped)
        reason = recording_stop_reason(result, requested)
        self.app.metrics.recordings_stopped.labels(reason).inc()
        message = recording_stop_message(result, reason, self.app.settings.limits)
        if reason != requested:
            logger.info("session %s: %s", self.session_id, message)
        if result.error is not None:
            self.send_error("recording_failed", f"record.stop: {result.error}")
        self.send(
            protocol.RecordStopped(
                recording_id=self.recording_id or "",
                path=str(result.path),
                duration_ms=result.duration_ms,
                dropped_frames=result.dropped_video_frames,
                error=result.error,
                reason=reason,
                message=message,
                size_bytes=result.size_bytes,
            )
        )
        self.recording_id = None

    async def _on_record_start(self, message: protocol.RecordStart) -> None:
        await self._record_start(self._require_session("record.start"))

    async def _on_record_stop(self, message: protocol.RecordStop) -> None:
        session = self._require_session("record.stop")
        self._recording_stopped(await session.stop_recording(), "stopped")
