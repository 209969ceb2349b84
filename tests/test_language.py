"""Language detection for the dialogue label: real sentences in the model's six languages,
client-given names, and the way a session uses both."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import SegmentKind
from streaming.language import (
    ENGLISH,
    FRENCH,
    GERMAN,
    JAPANESE,
    KOREAN,
    MANDARIN,
    detect_language,
    latin_scores,
    normalize_language,
)
from streaming.text import count_words, take_chunk
from tests.test_streaming_session import make_runner, play_until

SENTENCES = {
    ENGLISH: [
        "Hello there, this is a test of the streaming avatar. It speaks English first.",
        "Ask not what your country can do for you, ask what you can do for your country.",
        "The weather is lovely today, so we could go for a walk by the river.",
        "I don't think that's what she meant.",
        "Where's the nearest train station?",
    ],
    GERMAN: [
        "Guten Tag, wie geht es Ihnen heute? Jetzt spreche ich Deutsch.",
        "Pulver mit dran gemacht, gibt's ja auch als Paste, aber als Pulver ist das hier ein bisschen...",
        "Die Katze schläft auf dem Sofa, weil es draußen regnet.",
        "Können Sie mir bitte sagen, wo der Bahnhof ist?",
        "Ich bin müde.",
    ],
    FRENCH: [
        "Bonjour, je suis un avatar. Je parle français aujourd'hui.",
        "Le chat dort sur le canapé parce qu'il pleut dehors.",
        "Pourriez-vous me dire où se trouve la gare, s'il vous plaît ?",
        "C'est la vie.",
        "Nous avons mangé une excellente crêpe à la fête.",
    ],
    MANDARIN: [
        "你好，我是一个数字人。今天天气很好，我们出去走走吧。",
        "有的人在一起生活一辈子，还带着假面具呢。",
        "北京是中国的首都。",
        "我们用iPhone拍照。",
    ],
    JAPANESE: [
        "平和で豊かな世界が続く、次の未来へ。私たちは、持続可能な社会の実現のため、事業活動を通じてSDGsに取り組んでいます。",
        "東京は日本の首都です。",
        "今日はとても暑いですね。",
        "コーヒーをください。",
    ],
    KOREAN: [
        "안녕하세요, 저는 디지털 휴먼입니다. 오늘 날씨가 좋네요.",
        "나비번알아, 눌러그럼",
        "서울은 한국의 수도입니다.",
        "감사합니다!",
    ],
}


@pytest.mark.parametrize(
    ("language", "text"), [(language, text) for language, texts in SENTENCES.items() for text in texts]
)
def test_detects_real_sentences(language: str, text: str) -> None:
    assert detect_language(text) == language


def test_no_evidence_gives_the_default_and_ties_prefer_it() -> None:
    assert detect_language("") == ENGLISH
    assert detect_language("OK 42") == ENGLISH
    assert detect_language("Avatar", default=GERMAN) == GERMAN
    assert latin_scores("Avatar") == {ENGLISH: 0.0, GERMAN: 0.0, FRENCH: 0.0}


def test_diacritics_and_elisions_score() -> None:
    scores = latin_scores("l'été où ça")
    assert scores[FRENCH] > scores[GERMAN] and scores[FRENCH] > scores[ENGLISH]
    assert latin_scores("Straße")[GERMAN] == 0.5
    assert latin_scores("isn't")[ENGLISH] == 1.0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("English", ENGLISH), ("en", ENGLISH), ("en-US", ENGLISH),
        ("German", GERMAN), ("de", GERMAN), ("Deutsch", GERMAN), ("de_DE", GERMAN),
        ("French", FRENCH), ("fr", FRENCH), ("français", FRENCH),
        ("Chinese", MANDARIN), ("zh", MANDARIN), ("zh-CN", MANDARIN), ("Mandarin", MANDARIN), ("中文", MANDARIN),
        ("Japanese", JAPANESE), ("ja", JAPANESE), ("日本語", JAPANESE),
        ("Korean", KOREAN), ("ko", KOREAN),
        ("Cantonese", "Cantonese"), ("", None), (None, None),
    ],
)
def test_normalize_language(given, expected) -> None:
    assert normalize_language(given) == expected


def test_cjk_is_sized_by_characters() -> None:
    assert count_words("你好世界") == 2  # Han: half a word each
    assert count_words("감사합니다") == pytest.approx(2.0)  # Hangul: 0.4
    assert count_words("コーヒー") == pytest.approx(4 * 0.35)  # kana: 0.35
    # five words of Mandarin are ten characters: a 2 s segment at 2.5 words/s
    chunk, rest = take_chunk("我们今天去公园散步，然后一起吃晚饭。", 5, final=False)
    assert chunk == "我们今天去公园散步，" and rest == "然后一起吃晚饭。"
    # abbreviations and ordinals do not end a sentence
    assert take_chunk("We met Mr. Smith and his wife", 6, final=False)[0] == "We met Mr. Smith and his"
    assert take_chunk("Wir kommen am 3. Mai wieder", 5, final=False)[0] == "Wir kommen am 3. Mai"


async def test_session_labels_the_dialogue_with_the_detected_or_given_language() -> None:
    runner, engine, log = await make_runner()
    runner.start()
    try:
        runner.speak("zh", "你好，我是一个数字人。今天天气很好。")
        runner.speak_end("zh")
        runner.speak("de", "Guten Tag, wie geht es Ihnen heute?", language="de")
        runner.speak_end("de")
        runner.speak("fr", "Bonjour, je suis un avatar. Je parle français aujourd'hui.")
        runner.speak_end("fr")
        from streaming import events

        await play_until(
            runner, log, lambda e: isinstance(e, events.SpeakEnded) and e.utterance_id == "fr", timeout_s=20
        )
    finally:
        await runner.close()
    prompts = [r.prompt for r in engine.requests if r.kind is SegmentKind.SPEAK]
    assert any('<The person, Mandarin>: "你 好，我 是 一 个 数 字 人。' in p for p in prompts)
    assert any("<The person, German>: \"Guten Tag" in p for p in prompts)
    assert any("<The person, French>: \"Bonjour" in p for p in prompts)
    # every request carries the session's identity
    assert all(r.identity is runner.identity for r in engine.requests)
    assert np.array_equal(engine.requests[0].identity.image, runner.identity.image)
