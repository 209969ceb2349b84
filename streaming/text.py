"""Speech text -> segment-sized chunks, and the prompt of each segment.

Text arrives in chunks of an utterance (e.g. from an LLM that streams). It is cut into pieces
of about ``words_per_second * segment_seconds`` words, preferring sentence ends, then clause
ends, then any word boundary. CJK characters count as half a word each (they are spoken about
twice as fast as words of alphabetic languages).

The prompt follows the enhanced-prompt format of the model: the appearance body, then a
``Dialogue:`` block and a ``Background Sound:`` block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.api import SegmentKind

WORDS_PER_SECOND = 2.5
CJK_WORD_WEIGHT = 0.5

_SENTENCE_END = set(".!?…。！？")
_CLAUSE_END = set(",;:—–、，；：")
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")  # one CJK character, or a run of anything else
_CLOSERS = "\"'”’»)]」』"


def _token_words(token: str) -> float:
    if _CJK.fullmatch(token):
        return CJK_WORD_WEIGHT
    return 1.0 if any(ch.isalnum() for ch in token) else 0.0  # punctuation alone is not spoken


def count_words(text: str) -> float:
    """Spoken length of ``text`` in words (CJK characters weigh ``CJK_WORD_WEIGHT``)."""
    return sum(_token_words(tok) for tok in _TOKEN.findall(text))


def _boundary_rank(token: str) -> int:
    """2 after a sentence end, 1 after a clause end, 0 otherwise."""
    stripped = token.rstrip(_CLOSERS)
    if not stripped:
        return 0
    if stripped[-1] in _SENTENCE_END:
        return 2
    if stripped[-1] in _CLAUSE_END:
        return 1
    return 0


def take_chunk(text: str, max_words: float, *, final: bool) -> tuple[str, str] | None:
    """Cut the next chunk of at most ``max_words`` words off ``text``.

    Args:
        text: buffered text of one utterance.
        max_words: words per segment.
        final: no more text will come (``speak.end`` was received).

    Returns:
        ``(chunk, rest)``, or ``None`` when more text should be awaited first: fewer than
        ``max_words`` words are buffered, the utterance is still open, and the text does not
        end a sentence of at least half a segment.
    """
    tokens = list(_TOKEN.finditer(text))
    if not tokens:
        return None
    total = count_words(text)
    if total <= max_words:
        complete_sentence = _boundary_rank(tokens[-1].group()) == 2 and total >= max_words / 2
        if final or complete_sentence:
            return text.strip(), ""
        return None
    # More than one segment's worth: find the best cut at or before max_words.
    best_end: int | None = None
    best_rank = -1
    words = 0.0
    for tok in tokens:
        words += _token_words(tok.group())
        if words > max_words:
            break
        rank = _boundary_rank(tok.group()) if words >= max_words / 2 else -1
        if rank >= best_rank:
            best_rank, best_end = rank, tok.end()
    if best_end is None:  # a single token longer than a segment: cut after it
        best_end = tokens[0].end()
    return text[:best_end].strip(), text[best_end:].lstrip()


def speech_seconds(text: str, *, words_per_second: float, min_seconds: float, max_seconds: float) -> float:
    """Segment length for speaking ``text``: words / rate, clamped to ``[min, max]`` seconds."""
    return min(max_seconds, max(min_seconds, count_words(text) / words_per_second))


@dataclass(frozen=True)
class PromptStyle:
    """Wording of the generated prompt parts.

    Attributes:
        speaker: how the dialogue block names the person.
        background: the ``Background Sound:`` line.
    """

    speaker: str = "The person"
    background: str = "<No prominent background sound effects>"


_KIND_SENTENCE = {
    SegmentKind.IDLE: "The person waits calmly with the mouth closed, breathing and blinking naturally.",
    SegmentKind.LISTEN: "The person listens attentively with the mouth closed, nodding slightly.",
    SegmentKind.SPEAK: "The person speaks clearly and naturally, looking at the camera.",
    SegmentKind.LIPSYNC: "The person speaks naturally, looking at the camera.",
}


def build_prompt(
    appearance: str,
    kind: SegmentKind,
    text: str = "",
    *,
    language: str | None = None,
    style: PromptStyle = PromptStyle(),  # noqa: B008 - frozen dataclass, safe as default
) -> str:
    """The enhanced prompt of one segment: appearance, ``Dialogue:``, ``Background Sound:``."""
    body = " ".join(part for part in (appearance.strip(), _KIND_SENTENCE[kind]) if part)
    if kind is SegmentKind.SPEAK and text.strip():
        label = f"{style.speaker}, {language}" if language else style.speaker
        spoken = text.strip().replace('"', "'")
        dialogue = f'<{label}>: "{spoken}"'
    else:
        dialogue = "<No dialogue>"
    return f"{body}\n\nDialogue:\n{dialogue}\n\nBackground Sound:\n{style.background}"
