"""The next-segment planner: exact decisions for given session snapshots (no asyncio, no engine).

Numbers used throughout: 25 fps, ``segment_seconds`` 2 (a 2 s request decodes to 49 frames,
1.96 s), ``min_segment_seconds`` 1, ``playout_target_ms`` 2000, 2.5 words per second (5 words
per full speech segment). Lead of a new segment: ``ceil((rtf * seconds + waiting * generate_s
+ 0.15) * 25)`` frames.
"""

from __future__ import annotations

import pytest

from engine.api import SegmentKind
from streaming import planner
from streaming.planner import (
    Cut,
    Decision,
    HeldSegment,
    LoopConfig,
    MicrophoneState,
    PendingUtterance,
    SegmentPlan,
    SessionSnapshot,
    decide,
)

IDLE, LISTEN, SPEAK, LIPSYNC = SegmentKind.IDLE, SegmentKind.LISTEN, SegmentKind.SPEAK, SegmentKind.LIPSYNC
CFG = LoopConfig()


def snapshot(held=(), head=0, **kwargs) -> SessionSnapshot:
    held = tuple(HeldSegment(kind, start, end, start <= head < end or end <= head) for kind, start, end in held)
    end = held[-1].end_frame if held else 0
    return SessionSnapshot(config=kwargs.pop("config", CFG), head_frame=head, end_frame=end, held=held, **kwargs)


def ended(text: str, utterance_id: str = "u1", language: str | None = None) -> PendingUtterance:
    return PendingUtterance(utterance_id, text, input_ended=True, language=language)


# ------------------------------------------------------------------------------- idle
def test_an_empty_buffer_is_refilled_with_a_short_idle_segment_first() -> None:
    assert decide(snapshot()) == Decision(SegmentPlan(IDLE, 1.0))


def test_a_full_length_idle_segment_when_it_is_ready_before_the_buffer_runs_dry() -> None:
    # 1000 ms queued; a 2 s segment at rtf 0.1 is ready in 200 ms (+ 200 ms margin)
    assert decide(snapshot([(IDLE, 0, 25)], head=0, real_time_factor=0.1)) == Decision(SegmentPlan(IDLE, 2.0))
    # at rtf 0.5 it takes 1000 ms (+ 200): too late, so a short one
    assert decide(snapshot([(IDLE, 0, 25)], real_time_factor=0.5)) == Decision(SegmentPlan(IDLE, 1.0))
    # the engine's own limit caps every length
    assert decide(snapshot(max_segment_seconds=0.8)) == Decision(SegmentPlan(IDLE, 0.8))


def test_nothing_is_generated_while_the_target_is_queued() -> None:
    assert decide(snapshot([(IDLE, 0, 60)], head=10)) == Decision(None)  # exactly 2000 ms ahead
    assert decide(snapshot([(IDLE, 0, 60)], head=11)) == Decision(SegmentPlan(IDLE, 2.0))  # 1960 ms


# ------------------------------------------------------------------------------- speech
def test_speech_overtakes_idle_content_and_cuts_into_the_segment_on_screen() -> None:
    snap = snapshot(
        [(IDLE, 0, 50), (IDLE, 50, 100)], head=5, utterances=(ended("Hello there."),),
        real_time_factor=0.1, generate_s=0.2,
    )
    decision = decide(snap)
    # drop from head + 2 * lead(2 s) + 1 s = 5 + 2 * 9 + 25 = 48: the second idle segment goes
    assert decision.drop_idle_from_frame == 48
    # 2 words: 1 s (the minimum); the cut is the lead of a 1 s segment ahead of the head: 5 + 7
    assert decision.segment == SegmentPlan(
        SPEAK, 1.0, text="Hello there.", language="English", utterance_id="u1", remaining_text="", cut=Cut(0, 12)
    )
    assert planner.after_idle_drop(snap, 48).held == snap.held[:1]


def test_speech_waits_behind_queued_speech_when_the_target_is_reached() -> None:
    snap = snapshot([(SPEAK, 0, 60)], utterances=(ended("More words to say."),))
    decision = decide(snap)
    assert decision.segment is None and decision.drop_idle_from_frame == 0 + 2 * 54 + 25  # lead of 2 s at rtf 1: 54


def test_speech_is_chunked_in_order_and_an_open_utterance_waits_for_words() -> None:
    words = "one two three four five six seven eight."
    first = decide(snapshot(utterances=(ended(words, language="German"),))).segment
    assert (first.text, first.remaining_text, first.seconds, first.language) == (
        "one two three four five", "six seven eight.", 2.0, "German"
    )
    # the oldest utterance has too few words and no speak.end: the next one waits behind it
    waiting = (PendingUtterance("u1", "Just", input_ended=False), ended("Second utterance.", "u2"))
    assert decide(snapshot(utterances=waiting)).segment == SegmentPlan(IDLE, 1.0)
    # an ended one with no words left is passed over
    spent = (ended("", "u1"), ended("Second utterance.", "u2"))
    assert decide(snapshot(utterances=spent)).segment.utterance_id == "u2"


def test_a_slow_engine_gets_a_shorter_speech_segment_that_fits_the_queued_media() -> None:
    # 1.6 s of speech queued at rtf 0.5: (1.6 - 0.15) / 0.5 = 2.9 s fits, full length
    words = "one two three four five six seven eight."
    full = decide(snapshot([(SPEAK, 0, 40)], utterances=(ended(words),), real_time_factor=0.5)).segment
    assert full.text == "one two three four five" and full.seconds == 2.0
    # at rtf 1: 1.45 s fits -> at most 1.45 * 2.5 = 3.6 words
    short = decide(snapshot([(SPEAK, 0, 40)], utterances=(ended(words),), real_time_factor=1.0)).segment
    assert short.text == "one two three" and short.remaining_text == "four five six seven eight."
    assert short.seconds == pytest.approx(1.2) and short.cut is None  # speech is not cut


# ------------------------------------------------------------------------------- microphone
def mic(**kwargs) -> MicrophoneState:
    return MicrophoneState(**{"speaking": True, "run_active": True, "run_id": 3, **kwargs})


def test_a_full_segment_of_voice_is_lip_synced_and_overtakes_idle() -> None:
    snap = snapshot([(IDLE, 0, 50), (IDLE, 50, 100)], microphone=mic(available_s=2.0), real_time_factor=0.1)
    decision = decide(snap)
    assert decision.drop_idle_from_frame == 0 + 2 * 9 + 25
    assert decision.segment == SegmentPlan(LIPSYNC, 2.0, audio_s=pytest.approx(1.96), cut=Cut(0, 9))


def test_the_loop_waits_for_voice_while_media_is_queued_and_covers_a_new_run_with_listen() -> None:
    waiting = snapshot([(SPEAK, 0, 25)], microphone=mic(available_s=1.0))
    assert decide(waiting) == Decision(None)
    # buffer dry, a new run (the last lip-sync was for run 2): listen for the missing audio
    new_run = snapshot(microphone=mic(available_s=0.5), lipsync_run_id=2)
    assert decide(new_run) == Decision(SegmentPlan(LISTEN, 1.0))
    # rtf 0: 1.96 - 1.8 = 0.16 s missing -> the shortest listen, 0.36 s
    assert decide(snapshot(microphone=mic(available_s=1.8))).segment == SegmentPlan(LISTEN, 0.36)
    # the same run going on: lip-sync with what has arrived (0.42 s decodes to 9 frames, 0.36 s)
    going_on = decide(snapshot(microphone=mic(available_s=0.5), lipsync_run_id=3)).segment
    assert going_on.kind is LIPSYNC and going_on.seconds == pytest.approx(0.42)
    assert going_on.audio_s == pytest.approx(0.36)


def test_the_tail_of_a_run_is_played_out_then_the_run_ends() -> None:
    tail = decide(snapshot(microphone=mic(speaking=False, run_closing=True, available_s=1.0, voiced_remaining_s=0.7)))
    assert tail.segment.kind is LIPSYNC and tail.segment.seconds == pytest.approx(0.7)
    assert tail.segment.audio_s == pytest.approx(0.68) and not tail.end_microphone_run
    done = decide(snapshot(microphone=mic(speaking=False, run_closing=True, available_s=0.05, voiced_remaining_s=0.05)))
    assert done == Decision(SegmentPlan(IDLE, 1.0), end_microphone_run=True)


def test_conversation_mode_listens_and_listening_cuts_only_idle() -> None:
    cfg = LoopConfig(mode="conversation")
    snap = snapshot([(IDLE, 0, 50), (IDLE, 50, 100)], config=cfg, microphone=mic(available_s=5.0), real_time_factor=0.1)
    # no lip-sync in conversation mode; the idle queued does not hold listening back (it counts
    # as empty: a short segment), and nothing idle is dropped for it
    assert decide(snap) == Decision(SegmentPlan(LISTEN, 1.0, cut=Cut(0, 7)))
    over_listen = snapshot([(LISTEN, 0, 100)], config=cfg, microphone=mic(), real_time_factor=0.1)
    assert decide(over_listen) == Decision(None)  # listening does not cut listening


# ------------------------------------------------------------------------------- cuts and preemption
def test_no_cut_into_speech_or_when_the_idle_ends_about_then() -> None:
    snap = snapshot([(IDLE, 0, 50), (SPEAK, 50, 60)], real_time_factor=0.1)
    assert planner.plan_cut(snap, SPEAK, 1.0) is None
    assert planner.plan_cut(snapshot([(IDLE, 0, 8)], real_time_factor=0.1), SPEAK, 1.0) is None  # 7 >= 8 - 1
    assert planner.plan_cut(snapshot([(IDLE, 0, 9)], real_time_factor=0.1), SPEAK, 1.0) == Cut(0, 7)
    assert planner.plan_cut(snapshot([(IDLE, 0, 50)], real_time_factor=0.1), IDLE, 1.0) is None


def test_engine_work_queued_by_other_sessions_lengthens_the_lead() -> None:
    alone = snapshot([(IDLE, 0, 100)], real_time_factor=0.1, generate_s=0.5)
    busy = snapshot([(IDLE, 0, 100)], real_time_factor=0.1, generate_s=0.5, engine_waiting=2)
    assert planner.lead_frames(alone, 1.0) == 7
    assert planner.lead_frames(busy, 1.0) == 32  # + 2 * 0.5 s
    assert planner.plan_cut(busy, SPEAK, 1.0) == Cut(0, 32)


def test_idle_drop_keeps_started_and_near_segments() -> None:
    snap = snapshot([(IDLE, 0, 30), (IDLE, 30, 45), (IDLE, 45, 60), (LISTEN, 60, 90)], head=10)
    # lead at rtf 1 for 2 s: 54 frames -> drop from 10 + 108 + 25 = 143: nothing that far
    assert planner.idle_drop_frame(snap) == 143
    assert planner.after_idle_drop(snap, 143) is snap
    after = planner.after_idle_drop(snap, 40)
    assert [s.start_frame for s in after.held] == [0, 30] and after.end_frame == 45 and after.depth_ms == 1400
    assert planner.after_idle_drop(snap, 0).held == snap.held[:1]  # the segment playing stays
    with_speech = snapshot([(IDLE, 0, 30), (SPEAK, 30, 45), (IDLE, 45, 60)], head=10)
    assert planner.after_idle_drop(with_speech, 0).held == with_speech.held[:2]
