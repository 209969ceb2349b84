"""Speech text -> segment-sized chunks, and the prompt of each segment.

Text arrives in chunks of an utterance (e.g. from an LLM that streams). It is cut into pieces
of about ``words_per_second * segment_seconds`` words, preferring sentence ends, then clause
ends, then any word boundary; abbreviations (``Dr.``, ``z.B.``, ``M.``) and ordinals (``3.``)
do not end a sentence. CJK text is counted by characters: a Han character weighs half a word
(Mandarin is spoken at about 5 characters a second when other languages run at 2.5 words),
a Hangul syllable 0.4 and a kana 0.35 (Korean and Japanese syllables and morae are shorter).

The prompt follows the model's enhanced-prompt format (upstream
``prompts/enhanced_prompt_design.md``, example in ``shared/media/prompt.txt``): the appearance
body with the spoken line woven in, then a ``Dialogue:`` block with
``<speaker, Language>: "text"`` and a ``Background Sound:`` block. CJK dialogue is written with
a space between characters, as the model was trained on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.api import SegmentKind

WORDS_PER_SECOND = 2.5
CJK_WORD_WEIGHT = 0.5  # one Han character
HANGUL_WORD_WEIGHT = 0.4  # one Hangul syllable
KANA_WORD_WEIGHT = 0.35  # one hiragana or katakana (about one mora)

_SENTENCE_END = set(".!?…。！？")
_CLAUSE_END = set(",;:—–、，；：")
_CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_RANGES}]")
_TOKEN = re.compile(f"[{_CJK_RANGES}]|[^\\s{_CJK_RANGES}]+")  # one CJK character, or a run of anything else
_CLOSERS = "\"'”’»)]」』"
_HANGUL = re.compile("[\uac00-\ud7af]")
_KANA = re.compile("[\u3040-\u30ff]")
# Tokens ending in "." that do not end a sentence (lower case; English, German, French).
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. prof. st. vs. etc. e.g. i.e. approx. no. fig. jr. sr. "
    "z.b. bzw. usw. ca. nr. evtl. ggf. u.a. d.h. hr. fr. "
    "m. mme. mlle. cf. p.ex. env.".split()
)


def _token_words(token: str) -> float:
    if _CJK.fullmatch(token):
        if _HANGUL.fullmatch(token):
            return HANGUL_WORD_WEIGHT
        if _KANA.fullmatch(token):
            return KANA_WORD_WEIGHT
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
    if stripped[-1] == "." and (stripped.lower() in _ABBREVIATIONS or stripped[:-1].isdigit()):
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
_LIPSYNC_LINE = "Follow the provided reference audio exactly."


def space_cjk(text: str) -> str:
    """Text with one space between CJK characters (``"你好，世界"`` -> ``"你 好，世 界"``)."""
    return re.sub(f"(?<=[{_CJK_RANGES}])(?=[{_CJK_RANGES}])", " ", text)


def build_prompt(
    appearance: str,
    kind: SegmentKind,
    text: str = "",
    *,
    language: str | None = None,
    style: PromptStyle = PromptStyle(),  # noqa: B008 - frozen dataclass, safe as default
) -> str:
    """The enhanced prompt of one segment: appearance, ``Dialogue:``, ``Background Sound:``.

    ``SPEAK`` segments weave the line into the body (as the model's prompts do: the line
    appears twice) and name ``language`` in the dialogue label; ``LIPSYNC`` segments ask the
    model to follow the provided audio.
    """
    sentence = _KIND_SENTENCE[kind]
    label = f"{style.speaker}, {language}" if language else style.speaker
    if kind is SegmentKind.SPEAK and text.strip():
        spoken = space_cjk(text.strip().replace('"', "'"))
        sentence = f'{sentence[:-1]}, and says, "{spoken}"'
        dialogue = f'<{label}>: "{spoken}"'
    elif kind is SegmentKind.LIPSYNC:
        dialogue = f'<{label}>: "{_LIPSYNC_LINE}"'
    else:
        dialogue = "<No dialogue>"
    body = " ".join(part for part in (appearance.strip(), sentence) if part)
    return f"{body}\n\nDialogue:\n{dialogue}\n\nBackground Sound:\n{style.background}"
