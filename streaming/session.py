"""Per-session segment loop: keeps the playout buffer filled from the engine.

:class:`EngineWorker` owns the engine and its single worker thread (one per engine, shared by
all sessions): ``generate`` never runs on the event loop.

:class:`SessionRunner` owns one session: a :class:`~streaming.playout.PlayoutBuffer`, the
media clock, the outgoing tracks, the optional microphone, and one asyncio task (the segment
loop). The loop keeps about ``playout_target_ms`` of media queued ahead and picks each next
segment in this order:

1. speech text of the oldest open utterance, once a segment's worth of words (or the end of
   the utterance) is buffered -> ``SPEAK``;
2. voiced microphone audio, once a segment's worth (or the end of the voiced span) has
   arrived -> ``LIPSYNC`` with that audio;
3. otherwise ``IDLE`` (``LISTEN`` while the user speaks), so the picture never freezes.

Every segment continues from the previous one (``continue_from`` is the last queued
segment's :class:`~engine.api.Continuation`). Speech and lip-sync overtake idle content:
idle segments that are queued but not playing are dropped, and idle generation in flight is
cancelled, so that speech begins after the segment on screen ends.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.api import (
    CancelledError,
    Continuation,
    EngineInputError,
    Identity,
    Segment,
    SegmentEngine,
    SegmentKind,
    SegmentRequest,
    segment_frame_count,
)
from streaming.clock import MediaClock
from streaming.events import (
    AvatarState,
    FirstFrame,
    Interrupted,
    SegmentGenerated,
    SessionError,
    SessionEvent,
    SpeakEnded,
    SpeakStarted,
    StateChanged,
    Underrun,
)
from streaming.microphone import MIC_SAMPLE_RATE_HZ, Microphone
from streaming.playout import PlayoutBuffer, QueuedSegment, frames_to_ms
from streaming.text import PromptStyle, build_prompt, speech_seconds, take_chunk
from streaming.tracks import AvatarAudioTrack, AvatarVideoTrack

logger = logging.getLogger(__name__)

_IDLE_KINDS = (SegmentKind.IDLE, SegmentKind.LISTEN)
_ERROR_BACKOFF_S = 0.5
_WAIT = object()  # "wait for more microphone audio"
_MIN_LIPSYNC_S = 0.36  # 9 frames: the shortest lip-sync segment requested


class EngineWorker:
    """An engine and the one worker thread that runs it, shared by every session.

    Args:
        engine: any :class:`~engine.api.SegmentEngine`.
    """

    def __init__(self, engine: SegmentEngine) -> None:
        self.engine = engine
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"engine-{engine.name}"
        )

    async def prepare_identity(self, image: np.ndarray, appearance: str) -> Identity:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.engine.prepare_identity, image, appearance)

    async def generate(self, request: SegmentRequest, cancel: threading.Event) -> Segment:
        """Run ``engine.generate`` in the worker thread; cancelling the awaiting task sets ``cancel``."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self.engine.generate, request, cancel)
        try:
            return await future
        except asyncio.CancelledError:
            cancel.set()
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class LoopConfig:
    """Knobs of the segment loop.

    Attributes:
        segment_seconds: length of speech and lip-sync segments.
        idle_segment_seconds: length of idle segments.
        min_segment_seconds: shortest segment the loop requests.
        playout_target_ms: media kept queued ahead of playback.
        words_per_second: speaking rate used to size speech segments.
        max_utterance_chars: longest utterance (all chunks together).
        seed: base seed; segment ``n`` of a session uses ``seed + n``.
        prompt_style: wording of generated prompt parts.
    """

    segment_seconds: float = 2.0
    idle_segment_seconds: float = 2.0
    min_segment_seconds: float = 1.0
    playout_target_ms: float = 2000.0
    words_per_second: float = 2.5
    max_utterance_chars: int = 5000
    seed: int = 0
    prompt_style: PromptStyle = field(default_factory=PromptStyle)


class SessionInputError(ValueError):
    """A client request the session cannot take; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False)
class _Utterance:
    utterance_id: str
    language: str | None
    created_s: float
    text: str = ""
    chars: int = 0
    input_ended: bool = False
    in_flight: int = 0
    started: bool = False
    segments: list[QueuedSegment] = field(default_factory=list)

    @property
    def played_ms(self) -> int:
        return frames_to_ms(sum(seg.played_frames for seg in self.segments))


@dataclass(eq=False)
class _InFlight:
    kind: SegmentKind
    cancel: threading.Event
    stale: bool = False


EventCallback = Callable[[SessionEvent], None]


class SessionRunner:
    """One avatar session: segment loop, playout buffer, clock and tracks.

    Args:
        worker: the shared :class:`EngineWorker`.
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

        hold = identity.image if identity.image.shape == (self.engine.height, self.engine.width, 3) else None
        self.clock = MediaClock()
        self.buffer = PlayoutBuffer(
            width=self.engine.width,
            height=self.engine.height,
            fps=self.engine.fps,
            hold_frame=hold,
            on_segment_start=self._on_segment_start,
            on_segment_end=self._on_segment_end,
            on_underrun=self._on_underrun,
        )
        self.microphone: Microphone | None = None
        self.state: AvatarState = "idle"
        self.segments_generated = 0
        self.last_real_time_factor: float | None = None
        self.first_frame_s: float | None = None

        self._utterances: collections.OrderedDict[str, _Utterance] = collections.OrderedDict()
        self._closed_ids: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> "ended"/"interrupted"
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
        for task in reversed(self._tasks):
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop logs its own failures; closing must go on
                logger.exception("segment loop failed")
        self._tasks.clear()
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
        if utterance_id in self._closed_ids:
            if self._closed_ids[utterance_id] == "interrupted":
                return  # chunks still in flight when the client interrupted: dropped quietly
            raise SessionInputError(
                "utterance_ended", f"utterance_id {utterance_id!r}: speak.end was already received"
            )
        utt = self._utterances.get(utterance_id)
        if utt is not None and utt.input_ended:
            raise SessionInputError(
                "utterance_ended", f"utterance_id {utterance_id!r}: speak.end was already received"
            )
        chars = (utt.chars if utt is not None else 0) + len(text)
        if chars > self.config.max_utterance_chars:
            raise SessionInputError(
                "utterance_too_long",
                f"text: utterance {utterance_id!r} would have {chars} characters; "
                f"the limit is max_utterance_chars = {self.config.max_utterance_chars}",
            )
        if utt is None:
            utt = _Utterance(utterance_id=utterance_id, language=language, created_s=time.monotonic())
            self._utterances[utterance_id] = utt
        utt.chars = chars
        utt.text += text  # chunks are joined verbatim: the client sends the spaces it means
        if language and not utt.language:
            utt.language = language
        if self._next_speech_chunk(consume=False) is not None:
            self._cancel_idle_in_flight()  # speech is ready: idle work in flight would delay it
        self._wake.set()

    def speak_end(self, utterance_id: str) -> None:
        """No more text will come for this utterance.

        Raises:
            SessionInputError: ``unknown_utterance``.
        """
        if self._closed_ids.get(utterance_id) == "interrupted":
            return
        utt = self._utterances.get(utterance_id)
        if utt is None:
            raise SessionInputError("unknown_utterance", f"utterance_id {utterance_id!r} has no pending speak")
        utt.input_ended = True
        self._maybe_finish(utt)
        self._wake.set()

    def interrupt(self) -> list[Interrupted]:
        """Stop speaking now: clear the buffer at the next frame, cancel work, drop pending text.

        Returns (and emits) one :class:`Interrupted` per pending utterance, or one with
        ``utterance_id=None`` when nothing was pending.
        """
        if self._in_flight is not None:
            self._in_flight.stale = True
            self._in_flight.cancel.set()
        cut, _dropped = self.buffer.clear()
        if cut is not None:
            self._tail_continuation = cut.continuation
        else:
            self._tail_continuation = self._played_continuation
        events = [Interrupted(utt.utterance_id, utt.played_ms) for utt in self._utterances.values()]
        for utt in self._utterances.values():
            self._remember_closed(utt.utterance_id, "interrupted")
        self._utterances.clear()
        if not events:
            events.append(Interrupted(None, 0))
        if self.microphone is not None:
            self.microphone.discard_pending()
        for event in events:
            self._emit(event)
        self._update_state()
        self._wake.set()
        return events

    def stats(self) -> dict[str, float | int | None]:
        """Live figures for the client overlay."""
        return {
            "buffer_ms": round(self.buffer.depth_ms),
            "underruns": self.buffer.underruns,
            "segments": self.segments_generated,
            "rtf": None if self.last_real_time_factor is None else round(self.last_real_time_factor, 3),
            "ttff_ms": None if self.first_frame_s is None else round(1000 * self.first_frame_s),
            "frames_sent": self.buffer.video_frames_pulled,
        }

    # ----------------------------------------------------------------------------- loop
    async def _run(self) -> None:
        segment_index = 0
        while True:
            self._wake.clear()
            choice = self._decide()
            if choice is None:
                await self._sleep(self._poll_s())
                continue
            request, utt = choice
            request.seed = self.config.seed + segment_index
            request.continue_from = self._tail_continuation
            segment_index += 1
            if utt is not None:
                utt.in_flight += 1
            try:
                segment = await self._generate(request)
            finally:
                if utt is not None:
                    utt.in_flight -= 1
            if segment is not None:
                self._queue(segment, request, utt)
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

    def _decide(self) -> tuple[SegmentRequest, _Utterance | None] | None:
        """The next request, or ``None`` to wait (buffer full, or waiting for mic audio)."""
        cfg = self.config
        mic = self.microphone
        speech = self._next_speech_chunk(consume=False)
        if speech is not None or (mic is not None and mic.available_s() >= self._lipsync_full_s()):
            self._preempt_idle()  # speech and lip-sync overtake idle content
        depth_ms = self.buffer.depth_ms
        if depth_ms >= cfg.playout_target_ms:
            return None
        if speech is not None:
            utt, text = self._next_speech_chunk(consume=True) or speech
            seconds = speech_seconds(
                text,
                words_per_second=cfg.words_per_second,
                min_seconds=cfg.min_segment_seconds,
                max_seconds=self._max_seconds(cfg.segment_seconds),
            )
            return self._request(SegmentKind.SPEAK, seconds, text=text, language=utt.language), utt
        if mic is not None:
            choice = self._microphone_choice(mic, depth_ms)
            if choice is _WAIT:
                return None
            if choice is not None:
                return choice, None
        kind = SegmentKind.LISTEN if mic is not None and mic.speaking else SegmentKind.IDLE
        return self._request(kind, self._max_seconds(cfg.idle_segment_seconds)), None

    def _lipsync_full_s(self) -> float:
        """Media duration of a full-length lip-sync segment."""
        fps = self.engine.fps
        return segment_frame_count(self._max_seconds(self.config.segment_seconds), fps) / fps

    def _microphone_choice(self, mic: Microphone, depth_ms: float) -> SegmentRequest | object | None:
        """The next lip-sync step: a request, :data:`_WAIT`, or ``None`` (no run: nothing to do).

        A run's first segment waits for a full segment of audio, which sets the run's latency
        to one segment plus generation time; from then on each segment's audio has arrived by
        the time it is due, so the user's audio plays back without gaps. When the buffer is
        about to run dry anyway (slow engine), the run goes on with what has arrived, and a
        run that has not begun yet is covered with a short ``LISTEN`` segment.
        """
        cfg = self.config
        if not mic.run_active:
            return None
        available_s = mic.available_s()
        if mic.run_closing:  # the voice is over: play out its tail
            tail_s = min(available_s, mic.voiced_remaining_s(), self._lipsync_full_s())
            if tail_s < 0.1:
                mic.end_run()
                return None
            return self._lipsync(mic, self._fit_seconds(max(tail_s, _MIN_LIPSYNC_S)))
        if available_s >= self._lipsync_full_s():
            return self._lipsync(mic, self._max_seconds(cfg.segment_seconds))
        if depth_ms > self._low_water_ms():
            return _WAIT
        if self._lipsync_run_id == mic.run_id and available_s >= _MIN_LIPSYNC_S:
            return self._lipsync(mic, self._fit_seconds(available_s))
        # Cover the wait for the run's first full segment: about the audio still missing
        # plus the time to generate it.
        full_s = self._lipsync_full_s()
        missing_s = full_s - available_s + (self.last_real_time_factor or 0.0) * full_s
        listen_s = min(cfg.min_segment_seconds, max(_MIN_LIPSYNC_S, missing_s))
        return self._request(SegmentKind.LISTEN, self._max_seconds(listen_s))

    def _lipsync(self, mic: Microphone, seconds: float) -> SegmentRequest:
        duration_s = segment_frame_count(seconds, self.engine.fps) / self.engine.fps
        self._preempt_idle()
        self._lipsync_run_id = mic.run_id
        request = self._request(SegmentKind.LIPSYNC, seconds)
        request.audio = mic.take_audio(duration_s)
        request.audio_sample_rate = MIC_SAMPLE_RATE_HZ
        return request

    def _request(self, kind: SegmentKind, seconds: float, *, text: str = "", language: str | None = None):
        prompt = build_prompt(
            self.identity.appearance, kind, text, language=language, style=self.config.prompt_style
        )
        return SegmentRequest(identity=self.identity, kind=kind, prompt=prompt, text=text, seconds=seconds)

    def _max_seconds(self, seconds: float) -> float:
        return min(seconds, self.engine.max_segment_seconds)

    def _fit_seconds(self, seconds: float) -> float:
        """Largest request length whose decoded duration does not exceed ``seconds``."""
        fps = self.engine.fps
        fitted = seconds
        while fitted > 1 / fps and segment_frame_count(fitted, fps) / fps > seconds + 1e-9:
            fitted -= 1 / fps
        return fitted

    def _low_water_ms(self) -> float:
        """Depth below which the loop must start generating something now."""
        rtf = self.last_real_time_factor or 0.0
        return max(200.0, 1000.0 * rtf * self.config.min_segment_seconds + 200.0)

    def _next_speech_chunk(self, *, consume: bool) -> tuple[_Utterance, str] | None:
        """The next speech chunk of the oldest open utterance (taken off its text if ``consume``)."""
        max_words = self.config.words_per_second * self._max_seconds(self.config.segment_seconds)
        for utt in self._utterances.values():
            chunk = take_chunk(utt.text, max_words, final=utt.input_ended)
            if chunk is not None and chunk[0]:
                if consume:
                    utt.text = chunk[1]
                return utt, chunk[0]
            if not utt.input_ended:
                return None  # utterances are spoken in order: wait for this one's text
        return None

    async def _generate(self, request: SegmentRequest) -> Segment | None:
        in_flight = _InFlight(kind=request.kind, cancel=threading.Event())
        self._in_flight = in_flight
        try:
            segment = await self.worker.generate(request, in_flight.cancel)
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

    def _queue(self, segment: Segment, request: SegmentRequest, utt: _Utterance | None) -> None:
        if utt is not None and utt.utterance_id not in self._utterances:
            return  # interrupted while generating
        queued = self.buffer.append(
            segment.frames,
            segment.audio,
            segment.sample_rate,
            kind=request.kind,
            utterance_id=None if utt is None else utt.utterance_id,
            continuation=segment.continuation,
        )
        self._tail_continuation = segment.continuation
        if utt is not None:
            utt.segments.append(queued)
        self.segments_generated += 1
        generate_s = float(segment.timings_s.get("total", 0.0))
        if segment.duration_s > 0:
            self.last_real_time_factor = generate_s / segment.duration_s
        self._emit(SegmentGenerated(request.kind, generate_s, segment.duration_s))

    def _preempt_idle(self) -> None:
        """Let speech overtake idle content that has not started playing."""
        self._cancel_idle_in_flight()
        dropped = self.buffer.drop_unstarted_tail(lambda seg: seg.kind in _IDLE_KINDS)
        if dropped:
            held = list(self.buffer.segments())
            self._tail_continuation = held[-1].continuation if held else self._played_continuation

    def _cancel_idle_in_flight(self) -> None:
        if self._in_flight is not None and self._in_flight.kind in _IDLE_KINDS:
            self._in_flight.stale = True
            self._in_flight.cancel.set()

    # ----------------------------------------------------------------------------- callbacks
    def _on_segment_start(self, seg: QueuedSegment) -> None:
        if self.first_frame_s is None:
            self.first_frame_s = time.monotonic() - self.created_s
            self._emit(FirstFrame(self.first_frame_s))
        if seg.utterance_id is not None:
            utt = self._utterances.get(seg.utterance_id)
            if utt is not None and not utt.started:
                utt.started = True
                self._emit(SpeakStarted(utt.utterance_id, time.monotonic() - utt.created_s))
        self._update_state()

    def _on_segment_end(self, seg: QueuedSegment) -> None:
        if not seg.cut:
            self._played_continuation = seg.continuation
        if seg.utterance_id is not None:
            utt = self._utterances.get(seg.utterance_id)
            if utt is not None:
                self._maybe_finish(utt)
        self._update_state()

    def _on_underrun(self) -> None:
        self._emit(Underrun())
        self._wake.set()

    def _on_mic_change(self, speaking: bool) -> None:
        if speaking:
            # Lip-sync should follow the voice as soon as its audio is in: idle content that
            # has not started would only delay it.
            self._preempt_idle()
        self._update_state()
        self._wake.set()

    def _maybe_finish(self, utt: _Utterance) -> None:
        if not utt.input_ended or utt.text.strip() or utt.in_flight:
            return
        if any(not seg.ended and not seg.dropped for seg in utt.segments):
            return
        if self._utterances.pop(utt.utterance_id, None) is None:
            return
        self._remember_closed(utt.utterance_id, "ended")
        if not utt.started:
            # An utterance without words still gets its start/end pair.
            self._emit(SpeakStarted(utt.utterance_id, time.monotonic() - utt.created_s))
        self._emit(SpeakEnded(utt.utterance_id, utt.played_ms))

    def _remember_closed(self, utterance_id: str, how: str) -> None:
        self._closed_ids[utterance_id] = how
        while len(self._closed_ids) > 1024:
            self._closed_ids.popitem(last=False)

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
