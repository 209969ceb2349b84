"""Next-segment policy: from an immutable snapshot of a session to a :class:`Decision`.

Pure functions, no asyncio, no engine, no buffer: :class:`~streaming.session.SessionRunner`
takes a :class:`SessionSnapshot` and applies the :class:`Decision` (drops idle content,
ends a microphone run, takes microphone audio, builds one ``SegmentRequest``). The policy:

1. speech text of the oldest open utterance, once a segment's worth of words (or the end of
   the utterance) is buffered -> ``SPEAK``;
2. voiced microphone audio (``lipsync`` mode), once a segment's worth (or the end of the
   voiced span) has arrived -> ``LIPSYNC`` with that audio;
3. otherwise ``IDLE`` (``LISTEN`` while the user speaks), so the picture never freezes.

Nothing is generated while ``playout_target_ms`` of media is queued, except that speech and
lip-sync (and listening, over idle) overtake idle content: idle segments queued beyond the
new segment's lead time are dropped (:func:`idle_drop_frame`), and the new segment cuts into
the idle segment that will be on screen when it is ready (:class:`Cut`) instead of waiting for
its end. A full-length segment is asked for only when it can be ready before the buffer runs
dry; otherwise a short one, so that the picture moves again sooner.

Times are seconds (``*_s``, media or engine time), milliseconds (``*_ms``, media) or frames
on the playout timeline (``*_frame``, 25 fps).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from engine.api import SegmentKind, segment_frame_count
from streaming.language import detect_language
from streaming.text import PromptStyle, speech_seconds, take_chunk

IDLE_KINDS = (SegmentKind.IDLE, SegmentKind.LISTEN)
MIN_LIPSYNC_S = 0.36  # 9 frames: the shortest lip-sync segment requested
CUT_MARGIN_S = 0.15  # planned cut of an idle segment: lead beyond the expected generation time


@dataclass(frozen=True)
class LoopConfig:
    """Knobs of the segment loop.

    Attributes:
        segment_seconds: length of speech and lip-sync segments, s.
        idle_segment_seconds: length of idle segments, s.
        min_segment_seconds: shortest segment the loop requests, s.
        playout_target_ms: media kept queued ahead of playback, ms.
        words_per_second: speaking rate used to size speech segments.
        max_utterance_chars: longest utterance (all chunks together).
        seed: base seed; segment ``n`` of a session uses ``seed + n``.
        prompt_style: wording of generated prompt parts.
        mode: what the microphone does: ``lipsync`` (the user's voice drives the lips and is
            played back) or ``conversation`` (the avatar listens while the user speaks).
        barge_in: the user starting to speak interrupts the avatar's speech.
        super_resolution: re-render queued segments through the engine's super-resolution
            model in its spare time, and send video at the SR size (ignored without an SR
            model).
    """

    segment_seconds: float = 2.0
    idle_segment_seconds: float = 2.0
    min_segment_seconds: float = 1.0
    playout_target_ms: float = 2000.0
    words_per_second: float = 2.5
    max_utterance_chars: int = 5000
    seed: int = 0
    prompt_style: PromptStyle = field(default_factory=PromptStyle)
    mode: str = "lipsync"
    barge_in: bool = False
    super_resolution: bool = False


# --------------------------------------------------------------------------------- snapshot
@dataclass(frozen=True)
class HeldSegment:
    """A segment held by the playout buffer: ``[start_frame, end_frame)`` on the timeline."""

    kind: SegmentKind
    start_frame: int
    end_frame: int
    started: bool = False


@dataclass(frozen=True)
class PendingUtterance:
    """An open utterance: its unspoken ``text``, whether ``speak.end`` came, its language."""

    utterance_id: str
    text: str
    input_ended: bool = False
    language: str | None = None


@dataclass(frozen=True)
class MicrophoneState:
    """The microphone as the loop sees it (:class:`~streaming.microphone.Microphone`).

    Attributes:
        speaking: voice now.
        run_active: a lip-sync run (voice and its tail) is going on.
        run_closing: the run's voice is over: only its tail is left.
        run_id: counts runs.
        available_s: audio of the run received and not taken yet, s.
        voiced_remaining_s: from the read position to the end of the voiced audio, s.
    """

    speaking: bool = False
    run_active: bool = False
    run_closing: bool = False
    run_id: int = 0
    available_s: float = 0.0
    voiced_remaining_s: float = 0.0


@dataclass(frozen=True)
class SessionSnapshot:
    """What the policy looks at, taken at one instant.

    Attributes:
        config: the loop knobs.
        engine_fps: the engine's frame rate (for segment lengths, ``segment_frame_count``).
        max_segment_seconds: the engine's longest segment, s.
        playout_fps: the playout timeline's frame rate.
        head_frame: first timeline frame not played yet.
        end_frame: timeline frame after the last queued one.
        held: segments the buffer holds, in timeline order.
        utterances: open utterances, oldest first.
        microphone: ``None`` without a microphone.
        lipsync_run_id: the microphone run lip-sync segments were last made for.
        real_time_factor: last segment's generation time / media time (``None``: none yet).
        generate_s: last segment's generation time, s.
        engine_waiting: engine jobs ahead of a new one (queued + running, all sessions).
    """

    config: LoopConfig
    engine_fps: int = 25
    max_segment_seconds: float = 10.0
    playout_fps: int = 25
    head_frame: int = 0
    end_frame: int = 0
    held: tuple[HeldSegment, ...] = ()
    utterances: tuple[PendingUtterance, ...] = ()
    microphone: MicrophoneState | None = None
    lipsync_run_id: int = 0
    real_time_factor: float | None = None
    generate_s: float | None = None
    engine_waiting: int = 0

    @property
    def depth_ms(self) -> float:
        """Media queued ahead of the head, ms."""
        return 1000.0 * max(0, self.end_frame - self.head_frame) / self.playout_fps


# --------------------------------------------------------------------------------- decision
@dataclass(frozen=True)
class Cut:
    """Start the new segment at timeline frame ``frame``, inside ``held[index]`` (an idle
    segment of the snapshot); it continues from frame ``frame - 1``: what is on screen then."""

    index: int
    frame: int


@dataclass(frozen=True)
class SegmentPlan:
    """The next segment to request.

    Attributes:
        kind: what it shows.
        seconds: requested length, s.
        text: the words spoken (``SPEAK``).
        language: of the words (``SPEAK``; detected when the utterance has none yet).
        utterance_id: the utterance it speaks (``SPEAK``).
        remaining_text: the utterance's text left after this chunk (``SPEAK``).
        audio_s: microphone audio it lip-syncs to, s (``LIPSYNC``: the segment's media length).
        cut: where it cuts into idle content on the timeline, or ``None`` (after the tail).
    """

    kind: SegmentKind
    seconds: float
    text: str = ""
    language: str | None = None
    utterance_id: str | None = None
    remaining_text: str | None = None
    audio_s: float | None = None
    cut: Cut | None = None


@dataclass(frozen=True)
class Decision:
    """What the loop does now.

    Attributes:
        segment: the segment to generate, or ``None`` to wait (buffer full, or waiting for
            microphone audio).
        drop_idle_from_frame: drop the idle segments at the tail that have not started and
            start at or after this frame (speech or lip-sync overtaking idle), or ``None``.
        end_microphone_run: the microphone run's tail is too short to speak: end the run.
    """

    segment: SegmentPlan | None
    drop_idle_from_frame: int | None = None
    end_microphone_run: bool = False


# --------------------------------------------------------------------------------- helpers
def max_seconds(snap: SessionSnapshot, seconds: float) -> float:
    """``seconds`` capped at the engine's longest segment."""
    return min(seconds, snap.max_segment_seconds)


def fit_seconds(snap: SessionSnapshot, seconds: float) -> float:
    """Largest request length whose decoded duration does not exceed ``seconds``."""
    fps = snap.engine_fps
    fitted = seconds
    while fitted > 1 / fps and segment_frame_count(fitted, fps) / fps > seconds + 1e-9:
        fitted -= 1 / fps
    return fitted


def lipsync_full_s(snap: SessionSnapshot) -> float:
    """Media duration of a full-length lip-sync segment, s."""
    fps = snap.engine_fps
    return segment_frame_count(max_seconds(snap, snap.config.segment_seconds), fps) / fps


def low_water_ms(snap: SessionSnapshot) -> float:
    """Depth below which the loop must start generating something now, ms."""
    rtf = snap.real_time_factor or 0.0
    return max(200.0, 1000.0 * rtf * snap.config.min_segment_seconds + 200.0)


def lead_frames(snap: SessionSnapshot, seconds: float) -> int:
    """Frames from the head within which a new segment of ``seconds`` can be ready: its
    generation time (real-time factor 1 before the first segment), the engine work queued
    before it (other sessions'), and :data:`CUT_MARGIN_S`."""
    rtf = snap.real_time_factor if snap.real_time_factor is not None else 1.0
    lead_s = rtf * seconds + snap.engine_waiting * (snap.generate_s or 0.0) + CUT_MARGIN_S
    return max(1, math.ceil(lead_s * snap.playout_fps))


def next_speech_chunk(snap: SessionSnapshot, seconds: float | None = None) -> tuple[PendingUtterance, str, str] | None:
    """``(utterance, chunk, text left)``: the next chunk of at most ``seconds`` of speech
    (default ``segment_seconds``) of the oldest utterance that has one; ``None`` when the
    oldest open utterance is still waiting for words (utterances are spoken in order)."""
    cfg = snap.config
    max_words = cfg.words_per_second * max_seconds(snap, cfg.segment_seconds if seconds is None else seconds)
    for utt in snap.utterances:
        chunk = take_chunk(utt.text, max_words, final=utt.input_ended)
        if chunk is not None and chunk[0]:
            return utt, chunk[0], chunk[1]
        if not utt.input_ended:
            return None
    return None


def idle_drop_frame(snap: SessionSnapshot) -> int:
    """First timeline frame from which idle content is dropped when speech or lip-sync
    overtakes it. Idle segments starting before it (about twice the lead time of a new
    segment, plus a second) stay: the new segment cuts into them where it starts, and until
    it is there they cover its generation, even when that takes longer than expected."""
    lead = lead_frames(snap, max_seconds(snap, snap.config.segment_seconds))
    return snap.head_frame + 2 * lead + snap.playout_fps


def after_idle_drop(snap: SessionSnapshot, from_frame: int) -> SessionSnapshot:
    """The snapshot once the unstarted idle segments at the tail from ``from_frame`` on are
    dropped (as :meth:`~streaming.playout.PlayoutBuffer.drop_unstarted_tail` drops them)."""
    held = list(snap.held)
    while held:
        seg = held[-1]
        if seg.started or seg.start_frame < snap.head_frame or seg.kind not in IDLE_KINDS:
            break
        if seg.start_frame < from_frame:
            break
        held.pop()
    if len(held) == len(snap.held):
        return snap
    return dataclasses.replace(snap, held=tuple(held), end_frame=held[-1].end_frame if held else 0)


def fitting_speech_seconds(snap: SessionSnapshot) -> float | None:
    """A shorter speech segment when a full one would not be generated before the media
    queued now runs out (a slow engine, or speech arriving as an idle segment ends): it is
    ready sooner, so speech starts sooner and the picture does not hold; the following
    segments grow back to full length as the buffer fills. ``None``: full length."""
    rtf = snap.real_time_factor
    if not rtf:
        return None
    fits_s = (snap.depth_ms / 1000 - CUT_MARGIN_S) / rtf
    if fits_s >= max_seconds(snap, snap.config.segment_seconds):
        return None
    return max(snap.config.min_segment_seconds, fits_s)


def plan_cut(snap: SessionSnapshot, kind: SegmentKind, seconds: float) -> Cut | None:
    """Where a new segment of ``kind`` starts inside the idle content queued now, or ``None``.

    Idle (or, for speech and lip-sync, listening) content is cut at frame ``c``, the lead
    time (:func:`lead_frames`) ahead of the head. Without this, speech waits for the rest of
    the idle segment on screen (half a segment on average). No cut when the tail is not
    cuttable content or ends about then anyway.
    """
    if kind is SegmentKind.IDLE:
        return None
    cuttable = (SegmentKind.IDLE,) if kind is SegmentKind.LISTEN else IDLE_KINDS
    held = snap.held
    frame = snap.head_frame + lead_frames(snap, seconds)
    if not held or held[-1].kind not in cuttable or frame >= held[-1].end_frame - 1:
        return None
    index = next((i for i, seg in enumerate(held) if seg.start_frame < frame <= seg.end_frame), None)
    if index is None or any(seg.kind not in cuttable for seg in held[index:]):
        return None
    return Cut(index, frame)


# --------------------------------------------------------------------------------- policy
def decide(snap: SessionSnapshot) -> Decision:
    """The next step of the segment loop (module docstring)."""
    cfg = snap.config
    mic = snap.microphone
    lipsync_mic = mic if cfg.mode == "lipsync" else None  # conversation: the mic only listens
    speech = next_speech_chunk(snap)
    depth_ms = snap.depth_ms
    last_kind = snap.held[-1].kind if snap.held else None
    overtake = speech is not None or (lipsync_mic is not None and lipsync_mic.available_s >= lipsync_full_s(snap))
    drop_from: int | None = None
    after = snap
    if overtake:  # speech and lip-sync overtake idle content
        drop_from = idle_drop_frame(snap)
        after = after_idle_drop(snap, drop_from)
        if last_kind in IDLE_KINDS:
            depth_ms = 0.0  # the idle content queued will be cut where the new segment starts
    elif mic is not None and mic.speaking and last_kind is SegmentKind.IDLE:
        depth_ms = 0.0  # listening overtakes idle content the same way
    if depth_ms >= cfg.playout_target_ms:
        return Decision(None, drop_from)

    if speech is not None:
        fit_s = fitting_speech_seconds(after)
        taken = None if fit_s is None else next_speech_chunk(after, fit_s)
        utt, text, rest = taken or speech
        seconds = speech_seconds(
            text,
            words_per_second=cfg.words_per_second,
            min_seconds=cfg.min_segment_seconds,
            max_seconds=max_seconds(snap, cfg.segment_seconds),
        )
        language = utt.language or detect_language(utt.text)  # once, on the text there now
        plan = SegmentPlan(
            SegmentKind.SPEAK, seconds, text=text, language=language, utterance_id=utt.utterance_id,
            remaining_text=rest, cut=plan_cut(after, SegmentKind.SPEAK, seconds),
        )
        return Decision(plan, drop_from)

    end_run = False
    if lipsync_mic is not None and lipsync_mic.run_active:
        step = _microphone_step(snap, lipsync_mic, depth_ms)
        if step == "wait":
            return Decision(None, drop_from)
        if step == "end_run":
            end_run = True
        elif step is not None:
            kind, seconds = step
            if kind is SegmentKind.LIPSYNC:  # lip-sync overtakes idle content
                drop_from = idle_drop_frame(snap) if drop_from is None else drop_from
                after = after_idle_drop(snap, drop_from)
                audio_s = segment_frame_count(seconds, snap.engine_fps) / snap.engine_fps
            else:
                audio_s = None
            plan = SegmentPlan(kind, seconds, audio_s=audio_s, cut=plan_cut(after, kind, seconds))
            return Decision(plan, drop_from)

    kind = SegmentKind.LISTEN if mic is not None and mic.speaking else SegmentKind.IDLE
    # A full-length segment only when it will be ready before the buffer runs dry; else a
    # short one (session start, after an interrupt, a slow engine): the picture moves again
    # after a shorter generation.
    seconds = max_seconds(snap, cfg.idle_segment_seconds)
    ready_ms = 1000.0 * (snap.real_time_factor or 0.0) * seconds + 200.0
    if depth_ms < max(ready_ms, low_water_ms(snap)):
        seconds = max_seconds(snap, min(cfg.min_segment_seconds, seconds))
    return Decision(SegmentPlan(kind, seconds, cut=plan_cut(after, kind, seconds)), drop_from, end_run)


def _microphone_step(
    snap: SessionSnapshot, mic: MicrophoneState, depth_ms: float
) -> tuple[SegmentKind, float] | str | None:
    """The next lip-sync step of an active run: ``(kind, seconds)``, ``"wait"`` (for more
    audio), ``"end_run"`` (its tail is too short to speak) or ``None`` (nothing to do).

    Lip-sync segments are full length while the audio keeps up. Before a run's first full
    segment, the loop waits for audio (idle content queued covers the wait) rather than
    request a short lip-sync segment early, which would let the buffer run dry before the
    next one is due, so the user's audio plays back without gaps. When the buffer is about to
    run dry anyway (slow engine), the run goes on with what has arrived, and a run that has
    not begun yet is covered with a short ``LISTEN`` segment.
    """
    cfg = snap.config
    full_s = lipsync_full_s(snap)
    if mic.run_closing:  # the voice is over: play out its tail
        tail_s = min(mic.available_s, mic.voiced_remaining_s, full_s)
        if tail_s < 0.1:
            return "end_run"
        return SegmentKind.LIPSYNC, fit_seconds(snap, max(tail_s, MIN_LIPSYNC_S))
    if mic.available_s >= full_s:
        return SegmentKind.LIPSYNC, max_seconds(snap, cfg.segment_seconds)
    if depth_ms > low_water_ms(snap):
        return "wait"
    if snap.lipsync_run_id == mic.run_id and mic.available_s >= MIN_LIPSYNC_S:
        return SegmentKind.LIPSYNC, fit_seconds(snap, mic.available_s)
    # Cover the wait for the run's first full segment: about the audio still missing plus the
    # time to generate it.
    missing_s = full_s - mic.available_s + (snap.real_time_factor or 0.0) * full_s
    listen_s = min(cfg.min_segment_seconds, max(MIN_LIPSYNC_S, missing_s))
    return SegmentKind.LISTEN, max_seconds(snap, listen_s)

