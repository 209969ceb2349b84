"""A session on air: a :class:`~streaming.session.SessionRunner` with its server-side media
pump, live outputs and WHEP viewers, driven without a browser.

:class:`LiveSession` owns, and closes in reverse order: the runner (segment loop), the
:class:`~streaming.fanout.MediaFanout` that plays it out in real time on the server's clock,
the outputs (:class:`~streaming.outputs.rtmp.RtmpOutput`,
:class:`~streaming.outputs.whip.WhipOutput`) and the :class:`~streaming.whep.WhepRelay`.
It only uses the runner's public methods (``video_track``, ``audio_track``, ``speak``,
``speak_end``, ``interrupt``, ``start_recording``, ``stop_recording``, ``stats``).

Events go to every subscriber (:meth:`LiveSession.subscribe`): the runner's
:data:`~streaming.events.SessionEvent` s, :class:`~streaming.outputs.base.OutputState` and
:class:`ViewerLeft`. Each subscriber has a bounded queue; a subscriber that does not keep up
loses its oldest events (counted in ``dropped``), never the session's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiortc import RTCPeerConnection

from streaming.events import SessionEvent
from streaming.fanout import MediaFanout
from streaming.outputs.base import Backoff, OutputState
from streaming.outputs.rtmp import EncoderSettings, RtmpOutput
from streaming.outputs.whip import WhipOutput
from streaming.recorder import RecordingLimits, RecordingResult
from streaming.session import SessionInputError, SessionRunner
from streaming.whep import ViewerBudget, WhepRelay
from streaming.whep import default_peer_connection as _host_only_pc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewerLeft:
    """A WHEP viewer left (``reason``: ``left``, ``stalled...``, ``connection failed``...)."""

    viewer_id: str
    reason: str


LiveEvent = SessionEvent | OutputState | ViewerLeft


@dataclass(frozen=True)
class OutputSpec:
    """What an output should do (validated by the server's request model).

    Attributes:
        type: ``rtmp`` (also ``rtmps://`` URLs) or ``whip``.
        url: the ingest URL (secret parts redacted everywhere it is shown).
        bearer_token: WHIP ``Authorization: Bearer`` token (a secret).
        video_bitrate_bps, audio_bitrate_bps: RTMP bitrates, bits per second.
        gop_s: RTMP keyframe period, seconds.
        width, height: RTMP frame size (default: the session's).
    """

    type: Literal["rtmp", "whip"]
    url: str
    bearer_token: str | None = None
    video_bitrate_bps: int = 1_500_000
    audio_bitrate_bps: int = 128_000
    gop_s: float = 2.0
    width: int | None = None
    height: int | None = None


class EventFeed:
    """One subscriber's bounded queue of :data:`LiveEvent` (oldest dropped when full)."""

    def __init__(self, max_events: int = 256) -> None:
        self.queue: asyncio.Queue[LiveEvent | None] = asyncio.Queue(max_events)
        self.dropped = 0

    def put(self, event: LiveEvent | None) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> LiveEvent | None:
        """The next event; ``None`` once the session has ended."""
        return await self.queue.get()


class LiveSession:
    """One session on air (see the module docstring).

    Args:
        runner: the session (not started; :meth:`start` starts it).
        max_outputs: live outputs at once.
        max_viewers: WHEP viewers at once.
        viewer_budget: the server's shared viewer slots.
        peer_connection_factory: makes WHIP and WHEP peer connections (STUN/TURN servers).
        backoff: reconnect policy of the outputs.
        whep_bitrate_bps: video bitrate of the viewers' shared H.264 encode.
        whep_connect_timeout_s: seconds a WHEP viewer has to connect before it is dropped.
        on_event: sees every event first (metrics), on the event loop; must not block.
        owns_runner: start and close the runner (and its recording) with this object. ``False``
            for a session that a WebSocket connection runs: only the pump, outputs and viewers
            are this object's; the pump is then a second reader of the playout buffer beside
            the peer's tracks: both get the same frames and chunks, counted once
            (:meth:`~streaming.playout.PlayoutBuffer.pull_video_frame`).
    """

    def __init__(
        self,
        runner: SessionRunner,
        *,
        max_outputs: int = 4,
        max_viewers: int = 50,
        viewer_budget: ViewerBudget | None = None,
        peer_connection_factory: Callable[[], RTCPeerConnection] = _host_only_pc,
        backoff: Backoff | None = None,
        whep_bitrate_bps: int = 1_000_000,
        whep_connect_timeout_s: float = 15.0,
        on_event: Callable[[LiveEvent], None] | None = None,
        owns_runner: bool = True,
    ) -> None:
        self.runner = runner
        self.owns_runner = owns_runner
        self._on_event = on_event
        self.max_outputs = max_outputs
        self._pc_factory = peer_connection_factory
        self._backoff = backoff
        self.fanout = MediaFanout(runner.video_track(), runner.audio_track())
        self.relay = WhepRelay(
            self.fanout,
            width=runner.width,
            height=runner.height,
            fps=runner.buffer.fps,
            max_viewers=max_viewers,
            budget=viewer_budget,
            bitrate_bps=whep_bitrate_bps,
            connect_timeout_s=whep_connect_timeout_s,
            peer_connection_factory=peer_connection_factory,
            on_viewer_left=lambda viewer_id, reason: self.emit(ViewerLeft(viewer_id, reason)),
        )
        self.outputs: dict[str, RtmpOutput | WhipOutput] = {}
        self._output_ids = itertools.count(1)
        self._feeds: set[EventFeed] = set()
        self.closed = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the segment loop (when owned) and the pump (the media clock starts with it)."""
        if self.owns_runner:
            self.runner.start()
        self.fanout.start()

    async def close(self) -> None:
        """Stop outputs, viewers, the pump and the session (a running recording is finished)."""
        if self.closed:
            return
        self.closed = True
        for output in list(self.outputs.values()):
            await output.stop()
        self.outputs.clear()
        await self.relay.close()
        if self.owns_runner and self.runner.recorder is not None:
            with contextlib.suppress(SessionInputError):
                await self.runner.stop_recording()
        await self.fanout.close()
        if self.owns_runner:
            await self.runner.close()
        for feed in list(self._feeds):
            feed.put(None)

    # ----------------------------------------------------------------------------- events
    def subscribe(self, max_events: int = 256) -> EventFeed:
        feed = EventFeed(max_events)
        self._feeds.add(feed)
        return feed

    def unsubscribe(self, feed: EventFeed) -> None:
        self._feeds.discard(feed)

    def emit(self, event: LiveEvent) -> None:
        """Hand ``event`` to every subscriber (the runner's ``on_event`` calls this too)."""
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("live session event handler failed")
        for feed in tuple(self._feeds):
            feed.put(event)

    # ----------------------------------------------------------------------------- control
    def speak(self, utterance_id: str, text: str, *, final: bool = False, language: str | None = None) -> None:
        """A chunk of one utterance; ``final`` ends it.

        Raises:
            SessionInputError: as ``SessionRunner.speak`` / ``speak_end``.
        """
        if text:
            self.runner.speak(utterance_id, text, language)
        if final:
            if not text:
                self.runner.speak(utterance_id, "", language)  # an utterance may end empty
            self.runner.speak_end(utterance_id)

    def interrupt(self) -> list[Any]:
        return self.runner.interrupt()

    def start_recording(self, path: str | Path, limits: RecordingLimits | None = None,
                        on_end: Callable[[], None] | None = None):
        recorder = self.runner.start_recording(path)
        if limits is not None or on_end is not None:
            recorder.set_limits(limits or RecordingLimits(), on_end=on_end)
        return recorder

    async def stop_recording(self) -> RecordingResult:
        return await self.runner.stop_recording()

    # ----------------------------------------------------------------------------- outputs
    def add_output(self, spec: OutputSpec) -> str:
        """Start an output; returns its id.

        Raises:
            SessionInputError: ``output_limit``; ``invalid_field`` (bad URL or settings).
        """
        if self.closed:
            raise SessionInputError("no_session", "the session has ended")
        if len(self.outputs) >= self.max_outputs:
            raise SessionInputError("output_limit", f"outputs: the session has its {self.max_outputs} outputs")
        output_id = f"out{next(self._output_ids)}"
        try:
            if spec.type == "rtmp":
                fps = self.runner.buffer.fps
                encoder = EncoderSettings(
                    width=spec.width or self.runner.width,
                    height=spec.height or self.runner.height,
                    fps=fps,
                    video_bitrate_bps=spec.video_bitrate_bps,
                    audio_bitrate_bps=spec.audio_bitrate_bps,
                    gop_frames=max(1, round(spec.gop_s * fps)),
                )
                output: RtmpOutput | WhipOutput = RtmpOutput(
                    output_id, spec.url, encoder=encoder, on_state=self.emit, backoff=self._backoff
                )
                self.fanout.add_sink(output)
            else:
                output = WhipOutput(
                    output_id,
                    spec.url,
                    self.fanout,
                    bearer_token=spec.bearer_token,
                    on_state=self.emit,
                    backoff=self._backoff,
                    peer_connection_factory=self._pc_factory,
                )
        except ValueError as exc:
            raise SessionInputError("invalid_field", str(exc)) from None
        self.outputs[output_id] = output
        output.start()
        return output_id

    async def remove_output(self, output_id: str) -> dict[str, object]:
        """Stop an output; returns its last stats.

        Raises:
            SessionInputError: ``unknown_output``.
        """
        output = self.outputs.pop(output_id, None)
        if output is None:
            raise SessionInputError("unknown_output", f"output_id: no output {output_id[:64]!r}")
        if isinstance(output, RtmpOutput):
            self.fanout.remove_sink(output)
        await output.stop()
        return output.stats()

    def stats(self) -> dict[str, object]:
        return {
            **self.runner.stats(),
            "outputs": [output.stats() for output in self.outputs.values()],
            **self.relay.stats(),
            "frames_pumped": self.fanout.frames_pumped["video"],
        }
