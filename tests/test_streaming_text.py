"""Speech text -> segment chunks, and the segment prompt."""

from __future__ import annotations

import pytest

from engine.api import SegmentKind
from streaming.text import build_prompt, count_words, speech_seconds, take_chunk


def drain(text: str, max_words: float) -> list[str]:
    chunks = []
    while (cut := take_chunk(text, max_words, final=True)) is not None:
        chunk, text = cut
        chunks.append(chunk)
    return chunks


def test_count_words_weighs_cjk_characters_as_half_words() -> None:
    assert count_words("Hello there, my friend.") == 4
    assert count_words("你好世界") == 2
    assert count_words("  ") == 0
    assert count_words("你好，世界。") == 2  # punctuation alone is not a word


def test_chunks_prefer_sentence_then_clause_boundaries() -> None:
    text = "Hello there, my friend. This is a longer sentence that goes on, and on; until it ends."
    chunks = drain(text, 5)
    assert chunks[0] == "Hello there, my friend."
    assert all(count_words(c) <= 5 for c in chunks)
    assert " ".join(chunks) == text
    assert chunks[2][-1] in ",;"  # a clause boundary when no sentence end fits


def test_open_utterance_waits_for_more_words() -> None:
    assert take_chunk("Hello wor", 5, final=False) is None  # a partial word is never cut
    assert take_chunk("Hi.", 5, final=False) is None  # a short sentence may still grow
    assert take_chunk("Good morning to you.", 5, final=False) == ("Good morning to you.", "")
    chunk, rest = take_chunk("one two three four five six seven", 5, final=False)
    assert chunk == "one two three four five" and rest == "six seven"
    assert take_chunk("Hi", 5, final=True) == ("Hi", "")


def test_bilingual_and_cjk_text() -> None:
    german = "Guten Tag, wie geht es Ihnen heute? Ich hoffe, es geht Ihnen gut."
    assert drain(german, 5)[0] == "Guten Tag, wie geht es"
    chinese = "你好，我是一个数字人。今天天气很好，我们出去走走吧。"
    chunks = drain(chinese, 5)
    assert "".join(chunks) == chinese
    assert chunks[0] == "你好，我是一个数字人。"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("one two", 1.0), ("one two three four five", 2.0), ("a b c d e f g h i j k l", 2.0)],
)
def test_speech_seconds(text: str, expected: float) -> None:
    assert speech_seconds(text, words_per_second=2.5, min_seconds=1.0, max_seconds=2.0) == expected


def test_prompt_has_appearance_dialogue_and_background_blocks() -> None:
    prompt = build_prompt("A man in a green shirt.", SegmentKind.SPEAK, 'Say "hi"', language="English")
    body, dialogue, background = prompt.split("\n\n")
    assert body.startswith("A man in a green shirt.")
    assert dialogue == "Dialogue:\n<The person, English>: \"Say 'hi'\""
    assert background.startswith("Background Sound:\n")
    idle = build_prompt("A man.", SegmentKind.IDLE)
    assert "Dialogue:\n<No dialogue>" in idle and "mouth closed" in idle
