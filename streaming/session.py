"""Per-session segment loop: keeps the playout buffer filled from the engine.

:class:`SessionRunner` owns one session: a :class:`~streaming.playout.PlayoutBuffer`, the
media clock, the outgoing tracks, the optional microphone, the
:class:`~streaming.utterances.UtteranceQueue`, and one asyncio task (the segment loop). The
loop keeps about ``playout_target_ms`` of media queued ahead: at each step it hands a
snapshot of the session to :func:`streaming.planner.decide` (speech, then lip-sync, then idle
or listening; speech and lip-sync overtake idle content), applies the decision, builds the
one :class:`~engine.api.SegmentRequest` (:meth:`SessionRunner._request`) and awaits it from
the shared :class:`~streaming.engine_client.EngineWorker`.

Every segment continues from the previous one (``continue_from`` is the last queued
segment's :class:`~engine.api.Continuation`, or the frame on screen where it cuts into idle
content or where an interrupt cut the buffer).

**Segments stream into the buffer** (issue 17): the engine hands out each decoder window as a
:class:`~engine.api.SegmentChunk` and the session writes it into the playout buffer at once
(:class:`~streaming.playout.SegmentWriter`), so a segment starts playing before it is whole. A
planned cut into idle content is made at the first chunk. Chunks of a job that was made stale
(interrupt, idle overtaken by speech) are ignored from then on; what was already written stays, as
played media does: an interrupt cuts or drops it with the rest of the buffer, and idle content
that speech overtakes ends at its last written frame, whose picture the next segment continues from
(``Continuation(last_frame=...)``), so the timeline stays continuous. Super-resolution (background
work) never streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.api import (
    CancelledError,
    Continuation,
    EngineInputError,
    Identity,
    Segment,
    SegmentChunk,
    SegmentKind,
    SegmentRequest,
)
from streaming import planner
from streaming.clock import MediaClock
from streaming.engine_client import EngineWorker
from streaming.errors import SessionInputError
from streaming.events import (
    AvatarState,
    FirstFrame,
    Interrupted,
    InterruptSilenced,
    SegmentGenerated,
    SegmentSuperResolved,
    SessionError,
    SessionEvent,
    SessionStats,
    SpeakEnded,
    SpeakStarted,
    StateChanged,
    Underrun,
)
from streaming.frames import fit_frame
from streaming.microphone import MIC_SAMPLE_RATE_HZ, Microphone
from streaming.planner import LoopConfig
from streaming.playout import PlayoutBuffer, QueuedSegment, SegmentWriter
from streaming.recorder import RecordingResult, SessionRecorder
from streaming.super_resolution import SegmentSuperResolver, SuperResolutionResult
from streaming.tasks import cancel_and_wait
from streaming.text import build_prompt
from streaming.tracks import AvatarAudioTrack, AvatarVideoTrack
from streaming.utterances import Utterance, UtteranceQueue

logger = logging.getLogger(__name__)

_ERROR_BACKOFF_S = 0.5


@dataclass(frozen=True)
class _PlannedCut:
    segment: QueuedSegment  # the idle segment on screen
    frame: int  # timeline frame where the next segment starts
    continuation: Continuation  # frame ``frame - 1`` of it


@dataclass(eq=False)
class _InFlight:
    kind: SegmentKind
    cancel: threading.Event
    stale: bool = False
    submitted_s: float = 0.0  # monotonic time the job was submitted
    writer: SegmentWriter | None = None  # its chunks in the buffer (None until the first one)


EventCallback = Callable[[SessionEvent], None]


class SessionRunner:
    """One avatar session: segment loop, playout buffer, clock and tracks.

    Args:
        worker: the shared :class:`~streaming.engine_client.EngineWorker`.
        identity: the session's prepared identity.
        on_event: called on the event loop with every :class:`~streaming.events.SessionEvent`;
            must not block.
        config: loop knobs.
        microphone_factory: builds a :class:`~streaming.microphone.Microphone` for an
            incoming audio track (tests inject a fake VAD through it).
    """

    def __init__(
        self,
        *,
        worker: EngineWorker,
        identity: Identity,
        on_event: EventCallback,
        config: LoopConfig | None = None,
        microphone_factory: Callable[..., Microphone] = Microphone,
    ) -> None:
        self.worker = worker
        self.engine = worker.engine
        self.identity = identity
        self.config = config or LoopConfig()
        self._on_event = on_event
        self._microphone_factory = microphone_factory
        self.created_s = time.monotonic()

        # With idle super-resolution the video goes out at the SR size from the first frame.
        super_resolution = self.config.super_resolution and worker.can_super_resolve
        self.width, self.height = self.engine.width, self.engine.height
        if super_resolution:
            self.width, self.height = self.engine.sr_width, self.engine.sr_height  # type: ignore[attr-defined]
        self.clock = MediaClock()
        self.buffer = PlayoutBuffer(
            width=self.width,
            height=self.height,
            fps=self.engine.fps,
            hold_frame=identity.image,  # before the first segment: the reference, never black
            on_segment_start=self._on_segment_start,
            on_segment_end=self._on_segment_end,
            on_underrun=self._on_underrun,
        )
        self.buffer.audio_taps.append(self._on_audio_pulled)
        self.super_resolver: SegmentSuperResolver | None = None
        if super_resolution:
            self.super_resolver = SegmentSuperResolver(
                super_resolve=worker.super_resolve, buffer=self.buffer, clock=self.clock,
                on_result=self._on_super_resolved,
            )
        self.recorder: SessionRecorder | None = None
        self.microphone: Microphone | None = None
        self.state: AvatarState = "idle"
        self.segments_generated = 0
        self.last_real_time_factor: float | None = None
        self.last_generate_s: float | None = None
        self.first_frame_s: float | None = None
        # seconds from submitting the last segment's job to its first frame being in the playout buffer
        self.last_time_to_buffer_s: float | None = None
        self.last_voice_s: float | None = None  # monotonic time the microphone last carried voice
        self.last_interrupt_to_silence_s: float | None = None
        self.late_cuts = 0  # planned idle cuts that the new segment missed
        self._silence_due: tuple[float, int] | None = None  # (interrupt time, first chunk after the cut)

        self.utterances = UtteranceQueue(max_chars=self.config.max_utterance_chars)
        self._tail_continuation: Continuation | None = None
        self._played_continuation: Continuation | None = None
        self._in_flight: _InFlight | None = None
        self._lipsync_run_id = 0  # the microphone run that lip-sync segments were last made for
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tracks: list[AvatarVideoTrack | AvatarAudioTrack] = []
        self._closed = False

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the segment loop (idempotent)."""
        if not self._tasks:
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(), name="segment-loop"))

    async def close(self) -> None:
        """Stop the loop and the tracks; cancels owned tasks in reverse order of creation."""
        if self._closed:
            return
        self._closed = True
        if self._in_flight is not None:
            self._in_flight.stale = True
            self._in_flight.cancel.set()
        if self.super_resolver is not None:
            await self.super_resolver.close()
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*reversed(tasks))  # a failed one is logged: closing goes on
        if self.recorder is not None:
            await self.stop_recording()
        if self.microphone is not None:
            await self.microphone.close()
        for track in self._tracks:
            track.stop()

    def video_track(self, on_frame: Callable[[], None] | None = None) -> AvatarVideoTrack:
        track = AvatarVideoTrack(self.buffer, self.clock, on_frame=on_frame)
        self._tracks.append(track)
        return track

    def audio_track(self) -> AvatarAudioTrack:
        track = AvatarAudioTrack(self.buffer, self.clock)
        self._tracks.append(track)
        return track

    def attach_microphone(self, track) -> Microphone:
        """Consume the client's audio track (replaces an earlier one)."""
        old = self.microphone
        if old is not None:
            # Owned like the loop task: awaited (or cancelled) on close.
            self._tasks.append(asyncio.get_running_loop().create_task(old.close(), name="microphone-close"))
        mic = self._microphone_factory(on_change=self._on_mic_change)
        mic.attach(track)
        self.microphone = mic
        return mic

    # ----------------------------------------------------------------------------- control
    def speak(self, utterance_id: str, text: str, language: str | None = None) -> None:
        """Add a text chunk to an utterance (creating it on its first chunk).

        Raises:
            SessionInputError: ``utterance_ended`` (the id already ended) or
                ``utterance_too_long`` (over ``max_utterance_chars``).
        """
        if self.utterances.add_text(utterance_id, text, language, now_s=time.monotonic()) is None:
            return  # chunks still in flight when the client interrupted: dropped quietly
        if planner.next_speech_chunk(self._snapshot(microphone=False)) is not None:
            self._cancel_idle_in_flight()  # speech is ready: idle work in flight would delay it
        self._wake.set()

    def speak_end(self, utterance_id: str) -> None:
        """No more text will come for this utterance.

        Raises:
            SessionInputError: ``unknown_utterance``.
        """
        utt = self.utterances.end_input(utterance_id)
        if utt is None:
            return  # interrupted
        self._maybe_finish(utt)
        self._wake.set()

    def interrupt(self, *, discard_microphone: bool = True) -> list[Interrupted]:
        """Stop speaking now: clear the buffer at the next frame, cancel work, drop pending text.

        The next segment continues from the frame on screen at the cut (a bare
        ``Continuation(last_frame=...)``, which the engine encodes). ``discard_microphone``
        skips lip-sync to live audio (a barge-in keeps the voice that triggered it).

        Returns (and emits) one :class:`Interrupted` per pending utterance, or one with
        ``utterance_id=None`` when nothing was pending.
        """
        if self._in_flight is not None:
            self._in_flight.stale = True
            self._in_flight.cancel.set()
        cut, _dropped = self.buffer.clear()
        if cut is not None:
            on_screen = fit_frame(cut.frames[-1], self.engine.width, self.engine.height, downscale=True)
            cut.continuation = Continuation(last_frame=np.array(on_screen))
            self._tail_continuation = cut.continuation
        else:
            self._tail_continuation = self._played_continuation
        self._silence_due = (time.monotonic(), self.buffer.end_frame * self.buffer.chunks_per_frame)
        if self.super_resolver is not None:
            self.super_resolver.check()
        events = [Interrupted(utt.utterance_id, utt.played_ms) for utt in self.utterances.interrupt_all()]
        if not events:
            events.append(Interrupted(None, 0))
        if self.microphone is not None and discard_microphone:
            self.microphone.discard_pending()
        for event in events:
            self._emit(event)
        self._update_state()
        self._wake.set()
        return events

    def set_mode(self, *, mode: str | None = None, barge_in: bool | None = None) -> None:
        """Switch the microphone mode (``lipsync`` / ``conversation``) or barge-in while running.

        A switch skips the microphone audio not used yet (in either direction: voice heard in
        conversation mode is not played back later); lip-sync segments already queued play
        out, so the picture and sound go on without a break.
        """
        changes: dict[str, object] = {}
        if mode is not None and mode != self.config.mode:
            if mode not in ("lipsync", "conversation"):
                raise SessionInputError("invalid_field", f"mode: {mode!r} is not 'lipsync' or 'conversation'")
            changes["mode"] = mode
            if self.microphone is not None:  # audio from before the switch is not played back
                self.microphone.discard_pending()  # (a voice going on is lip-synced from now)
                if mode == "conversation":
                    self.microphone.end_run()
        if barge_in is not None:
            changes["barge_in"] = barge_in
        if changes:
            self.config = dataclasses.replace(self.config, **changes)
            self._wake.set()

    def start_recording(self, path: str | Path) -> SessionRecorder:
        """Record what the session plays out to ``path`` (MP4) from the next frame boundary.

        Raises:
            SessionInputError: ``recording_active``.
        """
        if self.recorder is not None:
            raise SessionInputError("recording_active", f"record.start: already recording to {self.recorder.path.name}")
        self.recorder = SessionRecorder(path, self.buffer)
        return self.recorder

    async def stop_recording(self) -> RecordingResult:
        """Finish the recording (the file is complete when this returns).

        Raises:
            SessionInputError: ``no_recording``.
        """
        recorder, self.recorder = self.recorder, None
        if recorder is None:
            raise SessionInputError("no_recording", "record.stop: the session is not recording")
        return await recorder.stop()

    @property
    def speech_pending(self) -> bool:
        """Speech is pending, queued or on screen (a graceful drain waits for it)."""
        return self._avatar_talking()

    @property
    def voice_active(self) -> bool:
        """The microphone carries voice now."""
        return self.microphone is not None and bool(self.microphone.speaking)

    def stats(self) -> SessionStats:
        """Live figures for the client overlay (fields documented in docs/PROTOCOL.md, ``stats``)."""
        # the newest tracks: a second offer (after a failed connection) makes new ones
        video = next((t for t in reversed(self._tracks) if isinstance(t, AvatarVideoTrack)), None)
        audio = next((t for t in reversed(self._tracks) if isinstance(t, AvatarAudioTrack)), None)
        av_offset_ms = None
        if video is not None and audio is not None and video.lateness_s is not None and audio.lateness_s is not None:
            av_offset_ms = round(1000 * (audio.lateness_s - video.lateness_s), 1)
        encode_ms = None if video is None or video.encode_s is None else round(1000 * video.encode_s, 2)
        silence_s = self.last_interrupt_to_silence_s
        return SessionStats(
            buffer_ms=round(self.buffer.depth_ms),
            underruns=self.buffer.underruns,
            segments=self.segments_generated,
            rtf=None if self.last_real_time_factor is None else round(self.last_real_time_factor, 3),
            ttff_ms=None if self.first_frame_s is None else round(1000 * self.first_frame_s),
            frames_sent=self.buffer.video_frames_pulled,
            frames_dropped=self.buffer.frames_dropped,
            gen_ms=None if self.last_generate_s is None else round(1000 * self.last_generate_s),
            encode_ms=encode_ms,
            av_offset_ms=av_offset_ms,
            interrupt_ms=None if silence_s is None else round(1000 * silence_s),
            queue=self.worker.jobs.queue_length,
            upgraded=0 if self.super_resolver is None else self.super_resolver.counts["done"],
            width=self.width,
            height=self.height,
            mode=self.config.mode,
            barge_in=self.config.barge_in,
            recording=self.recorder is not None,
        )

    # ----------------------------------------------------------------------------- loop
    async def _run(self) -> None:
        segment_index = 0
        while True:
            self._wake.clear()
            decision = planner.decide(self._snapshot())
            if decision.drop_idle_from_frame is not None:
                self._drop_idle(decision.drop_idle_from_frame)
            if decision.end_microphone_run and self.microphone is not None:
                self.microphone.end_run()
            if decision.segment is None:
                if self.super_resolver is not None:
                    self.super_resolver.poke()  # the buffer is full: spare engine time may re-render it
                await self._sleep(self._poll_s())
                continue
            request, utt, cut = self._request(decision.segment, self.config.seed + segment_index)
            segment_index += 1
            if utt is not None:
                utt.in_flight += 1
            in_flight = _InFlight(kind=request.kind, cancel=threading.Event())
            try:
                segment = await self._generate(request, in_flight, utt, cut)
            finally:
                if utt is not None:
                    utt.in_flight -= 1
            if segment is not None:
                self._queue(segment, request, utt, cut, in_flight)
            elif in_flight.writer is not None:
                self._end_partial(in_flight.writer)
            if utt is not None:
                self._maybe_finish(utt)

    async def _sleep(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            pass

    def _poll_s(self) -> float:
        if not self.clock.started:
            return 0.1
        excess_ms = self.buffer.depth_ms - self.config.playout_target_ms
        return min(0.2, max(0.01, excess_ms / 1000))

    def _snapshot(self, *, microphone: bool = True) -> planner.SessionSnapshot:
        """The session as the planner sees it now (``microphone=False``: without it, whose
        audio queries may end a finished run)."""
        mic_state = None
        mic = self.microphone if microphone else None
        if mic is not None:
            lipsync = self.config.mode == "lipsync"  # conversation: the mic only listens
            available_s = mic.available_s() if lipsync else 0.0  # first: it may end a finished run
            mic_state = planner.MicrophoneState(
                speaking=bool(mic.speaking),
                run_active=bool(mic.run_active),
                run_closing=bool(mic.run_closing) if lipsync else False,
                run_id=mic.run_id,
                available_s=available_s,
                voiced_remaining_s=mic.voiced_remaining_s() if lipsync else 0.0,
            )
        jobs = self.worker.jobs
        return planner.SessionSnapshot(
            config=self.config,
            engine_fps=self.engine.fps,
            max_segment_seconds=self.engine.max_segment_seconds,
            playout_fps=self.buffer.fps,
            head_frame=self.buffer.head_frame,
            end_frame=self.buffer.end_frame,
            held=tuple(
                planner.HeldSegment(seg.kind, seg.start_frame, seg.end_frame, seg.started)
                for seg in self.buffer.segments()
            ),
            utterances=tuple(
                planner.PendingUtterance(utt.utterance_id, utt.text, utt.input_ended, utt.language)
                for utt in self.utterances
            ),
            microphone=mic_state,
            lipsync_run_id=self._lipsync_run_id,
            real_time_factor=self.last_real_time_factor,
            generate_s=self.last_generate_s,
            engine_waiting=jobs.queue_length + (1 if jobs.busy else 0),
        )

    def _request(
        self, plan: planner.SegmentPlan, seed: int
    ) -> tuple[SegmentRequest, Utterance | None, _PlannedCut | None]:
        """The one place a :class:`~engine.api.SegmentRequest` is built: takes the planned
        speech text off its utterance, or the planned microphone audio, and the frame a cut
        continues from."""
        utt = None
        if plan.utterance_id is not None:
            utt = self.utterances.get(plan.utterance_id)
            assert utt is not None and plan.remaining_text is not None
            utt.text = plan.remaining_text
            if utt.language is None:
                utt.language = plan.language  # detected once, on the text there at its first segment
        audio: dict[str, object] = {}
        if plan.audio_s is not None and self.microphone is not None:
            self._lipsync_run_id = self.microphone.run_id
            audio = {"audio": self.microphone.take_audio(plan.audio_s), "audio_sample_rate": MIC_SAMPLE_RATE_HZ}
        continue_from = self._tail_continuation
        cut = None
        if plan.cut is not None:
            segment = list(self.buffer.segments())[plan.cut.index]
            on_screen = segment.frames[plan.cut.frame - 1 - segment.start_frame]
            continue_from = Continuation(
                last_frame=np.array(fit_frame(on_screen, self.engine.width, self.engine.height, downscale=True))
            )
            cut = _PlannedCut(segment, plan.cut.frame, continue_from)
        prompt = build_prompt(
            self.identity.appearance, plan.kind, plan.text, language=plan.language, style=self.config.prompt_style
        )
        request = SegmentRequest(
            identity=self.identity,
            kind=plan.kind,
            prompt=prompt,
            text=plan.text,
            seconds=plan.seconds,
            seed=seed,
            continue_from=continue_from,
            **audio,  # type: ignore[arg-type]
        )
        return request, utt, cut

    async def _generate(
        self, request: SegmentRequest, in_flight: _InFlight, utt: Utterance | None, cut: _PlannedCut | None
    ) -> Segment | None:
        self._in_flight = in_flight
        # Earliest deadline first across sessions: needed when the buffer's end will play.
        now_s = in_flight.submitted_s = time.monotonic()
        deadline_s = self.clock.wall_time_s(self.buffer.end_frame / self.buffer.fps) if self.clock.started else now_s
        estimate_s = (self.last_real_time_factor or 0.0) * request.seconds

        def on_chunk(chunk: SegmentChunk) -> None:
            self._write_chunk(chunk, request, in_flight, utt, cut)

        try:
            segment = await self.worker.generate(
                request, in_flight.cancel, deadline_s=deadline_s, estimate_s=estimate_s, on_chunk=on_chunk
            )
        except CancelledError:
            return None
        except EngineInputError as exc:
            logger.warning("engine rejected a %s segment: %s", request.kind.value, exc)
            self._emit(SessionError("engine_input", str(exc)))
            return None
        except Exception:
            logger.exception("segment generation failed")
            self._emit(SessionError("engine_failed", "segment generation failed; retrying"))
            await asyncio.sleep(_ERROR_BACKOFF_S)
            return None
        finally:
            self._in_flight = None
        if in_flight.stale:
            return None
        return segment

    def _write_chunk(
        self, chunk: SegmentChunk, request: SegmentRequest, in_flight: _InFlight, utt: Utterance | None,
        cut: _PlannedCut | None,
    ) -> None:
        """Write a streamed chunk of the segment in flight into the buffer (on the event loop)."""
        if in_flight.stale or self._closed:
            return  # interrupted or overtaken: the rest of this segment is not wanted
        if utt is not None and self.utterances.get(utt.utterance_id) is not utt:
            return  # its utterance was interrupted
        writer = in_flight.writer
        if writer is None:
            self._apply_cut(cut)
            writer = in_flight.writer = SegmentWriter(
                self.buffer, chunk.sample_rate, chunk.total_frames,
                kind=request.kind, utterance_id=None if utt is None else utt.utterance_id,
            )
        placed = writer.frames_placed
        try:
            pieces = writer.write(chunk.frames, chunk.audio, last=chunk.last)
        except ValueError:  # an engine whose chunks do not tile its segment: keep what fits
            logger.exception("engine streamed a bad chunk; the rest of the segment is dropped")
            writer.close()
            return
        if placed == 0 and writer.frames_placed > 0:
            self.last_time_to_buffer_s = time.monotonic() - in_flight.submitted_s
        if utt is not None:
            utt.segments.extend(pieces)

    def _end_partial(self, writer: SegmentWriter) -> None:
        """A streamed job ended without its segment (cancelled, failed): what it wrote stays and
        ends at its last written frame, which the next segment continues from (unless an interrupt
        or a drop already removed it and set the continuation)."""
        piece = writer.close()
        if piece is None:
            return
        piece.continuation = self._frame_continuation(piece)
        self._tail_continuation = piece.continuation  # nothing was queued after it meanwhile
        if piece.ended:
            self._played_continuation = piece.continuation

    def _frame_continuation(self, seg: QueuedSegment) -> Continuation:
        """Continue from ``seg``'s last frame (at the engine's size), encoded by the engine."""
        return Continuation(
            last_frame=np.array(fit_frame(seg.frames[-1], self.engine.width, self.engine.height, downscale=True)))

    def _apply_cut(self, cut: _PlannedCut | None) -> None:
        """Cut queued idle content at the planned frame, where the new segment starts."""
        if cut is None:
            return
        held = list(self.buffer.segments())
        after = held[held.index(cut.segment) :] if cut.segment in held else []
        if after and not cut.segment.dropped and all(seg.kind in planner.IDLE_KINDS for seg in after):
            if self.buffer.head_frame > cut.frame:
                self.late_cuts += 1  # generation took longer than planned: cut at the head
            trimmed, _ = self.buffer.clear(cut.frame)
            if trimmed is not None:
                trimmed.continuation = cut.continuation

    def _queue(
        self, segment: Segment, request: SegmentRequest, utt: Utterance | None, cut: _PlannedCut | None,
        in_flight: _InFlight,
    ) -> None:
        if utt is not None and self.utterances.get(utt.utterance_id) is not utt:
            return  # interrupted while generating
        if in_flight.writer is not None:
            self._finish_streamed(segment, request, in_flight.writer)
            return
        self.last_time_to_buffer_s = time.monotonic() - in_flight.submitted_s
        self._apply_cut(cut)
        queued = self.buffer.append(
            segment.frames,
            segment.audio,
            segment.sample_rate,
            kind=request.kind,
            utterance_id=None if utt is None else utt.utterance_id,
            continuation=segment.continuation,
            source=segment if self.super_resolver is not None else None,
        )
        self._tail_continuation = segment.continuation
        if utt is not None:
            utt.segments.append(queued)
        self._count(segment, request)

    def _finish_streamed(self, segment: Segment, request: SegmentRequest, writer: SegmentWriter) -> None:
        """The streamed segment is whole: its last piece carries its continuation (and, when it is
        one piece, the segment itself for super-resolution)."""
        if writer.frames_placed != segment.num_frames:  # a bad chunk closed it: it ends where it ends
            logger.error("engine streamed %d of %d frames", writer.frames_placed, segment.num_frames)
            self._end_partial(writer)
            return
        writer.close()
        pieces = writer.pieces
        if not pieces or pieces[-1].dropped or pieces[-1].cut:
            return
        pieces[-1].continuation = segment.continuation
        if pieces[-1].ended:
            self._played_continuation = segment.continuation
        if len(pieces) == 1 and self.super_resolver is not None:
            pieces[0].source = segment
        self._tail_continuation = segment.continuation
        self._count(segment, request)

    def _count(self, segment: Segment, request: SegmentRequest) -> None:
        self.segments_generated += 1
        generate_s = float(segment.timings_s.get("total", 0.0))
        self.last_generate_s = generate_s
        if segment.duration_s > 0:
            self.last_real_time_factor = generate_s / segment.duration_s
        self._emit(SegmentGenerated(request.kind, generate_s, segment.duration_s))

    def _preempt_idle(self) -> None:
        """Let speech, lip-sync or listening overtake idle content that has not started
        playing (:func:`streaming.planner.idle_drop_frame`), and idle generation in flight."""
        self._cancel_idle_in_flight()
        self._drop_idle(planner.idle_drop_frame(self._snapshot(microphone=False)))

    def _drop_idle(self, from_frame: int) -> None:
        dropped = self.buffer.drop_unstarted_tail(
            lambda seg: seg.kind in planner.IDLE_KINDS and seg.start_frame >= from_frame
        )
        if dropped:
            held = list(self.buffer.segments())
            self._tail_continuation = held[-1].continuation if held else self._played_continuation
            if self.super_resolver is not None:
                self.super_resolver.check()

    def _cancel_idle_in_flight(self) -> None:
        if self._in_flight is not None and self._in_flight.kind in planner.IDLE_KINDS:
            self._in_flight.stale = True
            self._in_flight.cancel.set()

    # ----------------------------------------------------------------------------- callbacks
    def _on_segment_start(self, seg: QueuedSegment) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = time.monotonic() - self.created_s
            self._emit(FirstFrame(self.first_frame_s))
        if seg.utterance_id is not None:
            utt = self.utterances.get(seg.utterance_id)
            if utt is not None and not utt.started:
                utt.started = True
                self._emit(SpeakStarted(utt.utterance_id, time.monotonic() - utt.created_s))
        self._update_state()

    def _on_segment_end(self, seg: QueuedSegment) -> None:
        continuation = seg.continuation  # a cut one's continues from its cut frame
        if continuation is None:
            continuation = self._frame_continuation(seg)  # played before its engine call returned (streamed)
        self._played_continuation = continuation
        if seg.utterance_id is not None:
            utt = self.utterances.get(seg.utterance_id)
            if utt is not None:
                self._maybe_finish(utt)
        self._update_state()

    def _on_underrun(self) -> None:
        self._emit(Underrun())
        self._wake.set()

    def _on_mic_change(self, speaking: bool) -> None:
        self.last_voice_s = time.monotonic()
        if speaking:
            if self.config.barge_in and self._avatar_talking():
                # Barge-in: the user talks over the avatar. The voice that started it is kept
                # (lip-sync mode plays it back next).
                self.interrupt(discard_microphone=False)
            # Lip-sync (or listening) should follow the voice as soon as its audio is in:
            # idle content that has not started would only delay it.
            self._preempt_idle()
        self._update_state()
        self._wake.set()

    def _avatar_talking(self) -> bool:
        """Speech is pending, queued or on screen."""
        return len(self.utterances) > 0 or any(
            seg.kind is SegmentKind.SPEAK and not seg.ended for seg in self.buffer.segments()
        )

    def _on_audio_pulled(self, index: int, chunk: np.ndarray) -> None:
        """Audio tap: time from an interrupt to the first audio after its cut leaving."""
        if self._silence_due is not None and index >= self._silence_due[1]:
            self.last_interrupt_to_silence_s = time.monotonic() - self._silence_due[0]
            self._silence_due = None
            self._emit(InterruptSilenced(self.last_interrupt_to_silence_s))

    def _on_super_resolved(self, result: SuperResolutionResult) -> None:
        self._emit(SegmentSuperResolved(result.result, result.seconds, result.media_s))

    def _maybe_finish(self, utt: Utterance) -> None:
        if not self.utterances.close_if_done(utt):
            return
        if not utt.started:
            # An utterance without words still gets its start/end pair.
            self._emit(SpeakStarted(utt.utterance_id, time.monotonic() - utt.created_s))
        self._emit(SpeakEnded(utt.utterance_id, utt.played_ms))

    def _update_state(self) -> None:
        playing = [seg for seg in self.buffer.segments() if seg.started and not seg.ended]
        if playing and playing[-1].kind in (SegmentKind.SPEAK, SegmentKind.LIPSYNC):
            state: AvatarState = "speaking"
        elif self.microphone is not None and self.microphone.speaking:
            state = "listening"
        else:
            state = "idle"
        if state != self.state:
            self.state = state
            self._emit(StateChanged(state))

    def _emit(self, event: SessionEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            logger.exception("session event handler failed")
