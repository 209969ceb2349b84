"""UtteranceQueue: the one book of a session's utterances (open, ended, interrupted)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import SegmentKind
from streaming.errors import SessionInputError
from streaming.playout import QueuedSegment
from streaming.utterances import UtteranceQueue


def segment(frames: int) -> QueuedSegment:
    return QueuedSegment(
        frames=np.zeros((frames, 2, 2, 3), np.uint8),
        audio=np.zeros(frames * 1920, np.float32),
        kind=SegmentKind.SPEAK,
        start_frame=0,
    )


def test_chunks_join_verbatim_in_order_with_the_first_language() -> None:
    queue = UtteranceQueue(max_chars=100)
    first = queue.add_text("a", "Hello ", None, now_s=1.0)
    queue.add_text("b", "Second.", "de", now_s=2.0)
    assert queue.add_text("a", "there.", "fr", now_s=3.0) is first
    assert queue.add_text("a", "", "es", now_s=4.0) is first
    assert [u.utterance_id for u in queue] == ["a", "b"]
    assert (first.text, first.chars, first.created_s, first.language) == ("Hello there.", 12, 1.0, "French")
    assert queue.get("b").language == "German"
    assert queue.open_count == len(queue) == 2


def test_refused_chunks_leave_the_queue_unchanged() -> None:
    queue = UtteranceQueue(max_chars=10)
    with pytest.raises(SessionInputError) as info:
        queue.add_text("a", "x" * 11, None, now_s=0.0)
    assert info.value.code == "utterance_too_long" and "max_utterance_chars = 10" in str(info.value)
    assert not queue.is_known("a") and queue.open_count == 0
    queue.add_text("a", "x" * 6, None, now_s=0.0)
    with pytest.raises(SessionInputError):
        queue.add_text("a", "x" * 5, None, now_s=0.0)  # 11 in all
    assert queue.get("a").chars == 6 and queue.get("a").text == "x" * 6
    queue.end_input("a")
    with pytest.raises(SessionInputError) as info:
        queue.add_text("a", "y", None, now_s=0.0)
    assert info.value.code == "utterance_ended"
    with pytest.raises(SessionInputError) as info:
        queue.end_input("nope")
    assert info.value.code == "unknown_utterance"


def test_an_utterance_ends_once_its_text_is_spoken_and_its_segments_played() -> None:
    queue = UtteranceQueue(max_chars=100)
    utt = queue.add_text("a", "Words.", None, now_s=0.0)
    queue.end_input("a")
    assert not queue.close_if_done(utt)  # text left
    utt.text = ""
    utt.in_flight = 1
    assert not queue.close_if_done(utt)  # a segment being generated
    utt.in_flight = 0
    played, dropped = segment(10), segment(5)
    utt.segments += [played, dropped]
    played.played_frames = 10
    assert not queue.close_if_done(utt)  # not played yet
    played.ended = dropped.dropped = True
    assert utt.played_ms == 400
    assert queue.close_if_done(utt) and not queue.close_if_done(utt)
    assert queue.closed_as("a") == "ended" and queue.is_known("a") and not queue.is_open("a")
    with pytest.raises(SessionInputError) as info:
        queue.add_text("a", "again", None, now_s=0.0)
    assert info.value.code == "utterance_ended"


def test_interrupted_utterances_drop_late_chunks_quietly() -> None:
    queue = UtteranceQueue(max_chars=100)
    queue.add_text("a", "one", None, now_s=0.0)
    queue.add_text("b", "two", None, now_s=0.0)
    assert [u.utterance_id for u in queue.interrupt_all()] == ["a", "b"]
    assert queue.open_count == 0 and queue.interrupt_all() == []
    assert queue.add_text("a", "late", None, now_s=0.0) is None
    assert queue.end_input("b") is None
    assert queue.closed_as("a") == queue.closed_as("b") == "interrupted" and queue.open_count == 0


def test_closed_ids_are_remembered_up_to_the_bound() -> None:
    queue = UtteranceQueue(max_chars=100, remember=3)
    for name in "abcd":
        queue.add_text(name, "x", None, now_s=0.0)
        queue.interrupt_all()
    assert [queue.closed_as(name) for name in "abcd"] == [None, "interrupted", "interrupted", "interrupted"]
    assert queue.add_text("a", "new", None, now_s=0.0) is not None  # forgotten: a new utterance
