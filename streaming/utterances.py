"""The one utterance queue of a session: text received per ``utterance_id``, in order.

An utterance is *open* from its first ``speak`` chunk until it is *closed*, either ``ended``
(``speak.end`` received, all of its text spoken and every segment of it played or dropped) or
``interrupted``. Closed ids are remembered (the newest :data:`REMEMBERED_CLOSED` of them) so
that a late chunk of an interrupted utterance is dropped quietly and one of an ended utterance
is refused. The queue only keeps the books: the session decides what to speak next
(:mod:`streaming.planner`) and emits the events.

Everything here runs on the event loop.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from streaming.errors import SessionInputError
from streaming.language import normalize_language
from streaming.playout import QueuedSegment, frames_to_ms

REMEMBERED_CLOSED = 1024  # closed utterance ids kept for late chunks

ClosedAs = Literal["ended", "interrupted"]


@dataclass(eq=False)
class Utterance:
    """One open utterance.

    Attributes:
        utterance_id: the client's id.
        language: the model's language name (given with a chunk, or detected at its first
            segment), or ``None``.
        created_s: monotonic time of its first chunk, s.
        text: received text not spoken yet (chunks joined verbatim).
        chars: characters received in all (for ``max_chars``).
        input_ended: ``speak.end`` was received.
        in_flight: segments of it being generated now.
        started: its first segment started playing.
        segments: its segments on the playout timeline.
    """

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
        """Media time of it that has played, ms."""
        return frames_to_ms(sum(seg.played_frames for seg in self.segments))

    @property
    def done(self) -> bool:
        """Input ended, all text spoken, nothing in flight, every segment played or dropped."""
        if not self.input_ended or self.text.strip() or self.in_flight:
            return False
        return all(seg.ended or seg.dropped for seg in self.segments)


class UtteranceQueue:
    """Open utterances in the order of their first chunk, and the ids recently closed.

    Args:
        max_chars: most characters of one utterance (all chunks together).
        remember: closed ids kept (oldest forgotten first).
    """

    def __init__(self, *, max_chars: int, remember: int = REMEMBERED_CLOSED) -> None:
        self.max_chars = max_chars
        self._remember = remember
        self._open: collections.OrderedDict[str, Utterance] = collections.OrderedDict()
        self._closed: collections.OrderedDict[str, ClosedAs] = collections.OrderedDict()

    # ----------------------------------------------------------------------------- queries
    def __iter__(self) -> Iterator[Utterance]:
        """Open utterances, oldest first."""
        return iter(list(self._open.values()))

    def __len__(self) -> int:
        return len(self._open)

    @property
    def open_count(self) -> int:
        """Utterances received and not closed yet (what ``max_pending_utterances`` bounds)."""
        return len(self._open)

    def get(self, utterance_id: str) -> Utterance | None:
        """The open utterance with this id, or ``None``."""
        return self._open.get(utterance_id)

    def is_open(self, utterance_id: str) -> bool:
        return utterance_id in self._open

    def closed_as(self, utterance_id: str) -> ClosedAs | None:
        """``ended`` or ``interrupted`` for a remembered closed id, else ``None``."""
        return self._closed.get(utterance_id)

    def is_known(self, utterance_id: str) -> bool:
        """Open, or closed and still remembered: a ``speak`` with this id opens nothing new."""
        return utterance_id in self._open or utterance_id in self._closed

    # ----------------------------------------------------------------------------- changes
    def add_text(self, utterance_id: str, text: str, language: str | None, *, now_s: float) -> Utterance | None:
        """Append a chunk (opening the utterance on its first one); ``None`` when the chunk is
        dropped quietly (the utterance was interrupted: chunks still on their way).

        Args:
            language: as the client named it (normalised here); the first one given sticks.
            now_s: monotonic time, s (the utterance's ``created_s`` when it opens).

        Raises:
            SessionInputError: ``utterance_ended`` (``speak.end`` already received) or
                ``utterance_too_long`` (over ``max_chars``); the queue is unchanged.
        """
        closed = self._closed.get(utterance_id)
        if closed == "interrupted":
            return None
        utt = self._open.get(utterance_id)
        if closed == "ended" or (utt is not None and utt.input_ended):
            raise SessionInputError(
                "utterance_ended", f"utterance_id {utterance_id!r}: speak.end was already received"
            )
        chars = (utt.chars if utt is not None else 0) + len(text)
        if chars > self.max_chars:
            raise SessionInputError(
                "utterance_too_long",
                f"text: utterance {utterance_id!r} would have {chars} characters; "
                f"the limit is max_utterance_chars = {self.max_chars}",
            )
        language = normalize_language(language)
        if utt is None:
            utt = Utterance(utterance_id=utterance_id, language=language, created_s=now_s)
            self._open[utterance_id] = utt
        utt.chars = chars
        utt.text += text  # chunks are joined verbatim: the client sends the spaces it means
        if language and not utt.language:
            utt.language = language
        return utt

    def end_input(self, utterance_id: str) -> Utterance | None:
        """``speak.end``: no more text for this utterance; ``None`` if it was interrupted.

        Raises:
            SessionInputError: ``unknown_utterance`` (not open, not interrupted).
        """
        if self._closed.get(utterance_id) == "interrupted":
            return None
        utt = self._open.get(utterance_id)
        if utt is None:
            raise SessionInputError("unknown_utterance", f"utterance_id {utterance_id!r} has no pending speak")
        utt.input_ended = True
        return utt

    def close_if_done(self, utt: Utterance) -> bool:
        """Close ``utt`` as ``ended`` if it is :attr:`Utterance.done`; True when this call closed it."""
        if not utt.done or self._open.get(utt.utterance_id) is not utt:
            return False
        del self._open[utt.utterance_id]
        self._remember_closed(utt.utterance_id, "ended")
        return True

    def interrupt_all(self) -> list[Utterance]:
        """Close every open utterance as ``interrupted``; returns them, oldest first."""
        interrupted = list(self._open.values())
        self._open.clear()
        for utt in interrupted:
            self._remember_closed(utt.utterance_id, "interrupted")
        return interrupted

    def _remember_closed(self, utterance_id: str, how: ClosedAs) -> None:
        self._closed[utterance_id] = how
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)
