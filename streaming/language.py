"""Which of the model's six languages a text is in, without a dependency.

The model's dialogue block names the language of each line (``<speaker, Language>: "..."``,
upstream ``prompts/enhanced_prompt_design.md``); it was trained on English, Mandarin Chinese,
Japanese, Korean, German and French. :func:`detect_language` picks one of those:

1. **Script** settles the CJK languages: any Hangul syllables or jamo -> Korean; any kana
   (hiragana, katakana) -> Japanese (Japanese mixes kanji with kana, Chinese never uses kana);
   Han characters without kana -> Mandarin. The script with the most letters wins when a text
   mixes scripts (e.g. a Latin brand name inside a Chinese sentence).
2. **Latin text** is scored for German, French and English: each word that is a frequent
   function word of exactly one of the three languages scores 1 for it, each letter that only
   one of them uses (``ä ö ü ß``; ``é è ê ë à â ç î ï ô û ù œ``) scores 0.5, and French elisions
   (``l'``, ``d'``, ``qu'`` ...) and English clitics (``'s``, ``n't``, ``'re`` ...) score 1. The
   highest score wins; no evidence at all means English.

Names a client may send in ``speak.language`` (``German``, ``de``, ``Deutsch``, ``zh-CN`` ...)
are mapped to the model's names by :func:`normalize_language`.
"""

from __future__ import annotations

import re
import unicodedata

ENGLISH = "English"
MANDARIN = "Mandarin"
JAPANESE = "Japanese"
KOREAN = "Korean"
GERMAN = "German"
FRENCH = "French"
LANGUAGES = (ENGLISH, MANDARIN, JAPANESE, KOREAN, GERMAN, FRENCH)

_ALIASES = {
    ENGLISH: ("english", "en", "eng", "en-us", "en-gb", "englisch", "anglais"),
    MANDARIN: (
        "mandarin", "chinese", "zh", "zh-cn", "zh-hans", "zh-tw", "zh-hant", "cmn", "putonghua",
        "中文", "汉语", "漢語", "普通话", "chinesisch", "chinois",
    ),
    JAPANESE: ("japanese", "ja", "jp", "jpn", "日本語", "japanisch", "japonais"),
    KOREAN: ("korean", "ko", "kor", "한국어", "koreanisch", "coréen"),
    GERMAN: ("german", "de", "deu", "ger", "de-de", "deutsch", "allemand"),
    FRENCH: ("french", "fr", "fra", "fre", "fr-fr", "français", "francais", "französisch", "franzosisch"),
}
_BY_ALIAS = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}

# Frequent function words that belong to one of the three languages only (words shared by two,
# such as "in", "an", "die", "des", "son", "was", are left out).
_STOP_WORDS = {
    ENGLISH: frozenset(
        "the and is are was were be been to of that this these those it you he she they we what which who "
        "how why with for from have has had not but or would could should can do does did there their "
        "them my your our his her its at by about if then than just very only because when where".split()
    ),
    GERMAN: frozenset(
        "der das und ist nicht ich sie wir ihr es ein eine einen einem einer zu mit den dem von auf für sich "
        "auch wie sind bin hat haben wird werden waren aber oder wenn dann noch nur schon sehr heute "
        "guten tag hier dort dieser diese dieses kein keine mein meine dein bitte danke ja nein gibt mir dir "
        "uns euch wo warum wer weil dass doch mal jetzt immer ganz gut viel".split()
    ),
    FRENCH: frozenset(
        "le la les et est un une que qui pas je tu il elle nous vous ils elles ce cette ces dans pour "
        "avec sur au aux ne se mais où sont suis êtes être avoir ai avez ont mon ma mes ton ta tes notre "
        "votre leur très bien aussi comme tout tous toute quand oui non bonjour merci aujourd'hui c'est "
        "été fait peut plus moins parce".split()
    ),
}
_DIACRITICS = {GERMAN: frozenset("äöüß"), FRENCH: frozenset("éèêëàâçîïôûùœÿ")}
_DIACRITIC_WEIGHT = 0.5
_FRENCH_ELISION = re.compile(r"^(?:l|d|j|qu|n|s|c|m|t|jusqu|lorsqu|puisqu)['’]\w", re.IGNORECASE)
_ENGLISH_CLITIC = re.compile(r"\w(?:['’](?:s|re|ve|ll|d|m)|n['’]t)$", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


def normalize_language(name: str | None) -> str | None:
    """The model's name for a language given by a client, or the name as given when unknown.

    ``None`` and blank names give ``None``; ``"de"``, ``"Deutsch"``, ``"german"`` give ``German``;
    ``"zh"``, ``"Chinese"`` give ``Mandarin``.
    """
    if name is None or not name.strip():
        return None
    key = name.strip().lower().replace("_", "-")
    return _BY_ALIAS.get(key, _BY_ALIAS.get(key.split("-")[0], name.strip()))


def _script_counts(text: str) -> dict[str, int]:
    counts = {"hangul": 0, "kana": 0, "han": 0, "latin": 0}
    for ch in text:
        code = ord(ch)
        if 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
            counts["hangul"] += 1
        elif 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:
            if code not in (0x30FB, 0x30FC):  # the middle dot and the long-vowel mark are shared
                counts["kana"] += 1
        elif 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF:
            counts["han"] += 1
        elif ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
            counts["latin"] += 1
    return counts


def latin_scores(text: str) -> dict[str, float]:
    """Evidence for English, German and French in ``text`` (see the module docstring)."""
    scores = {ENGLISH: 0.0, GERMAN: 0.0, FRENCH: 0.0}
    for match in _WORD.finditer(text.lower()):
        word = match.group().replace("’", "'")
        for language, words in _STOP_WORDS.items():
            if word in words:
                scores[language] += 1.0
        if _FRENCH_ELISION.match(word):
            scores[FRENCH] += 1.0
        elif _ENGLISH_CLITIC.search(word):
            scores[ENGLISH] += 1.0
        for language, letters in _DIACRITICS.items():
            scores[language] += _DIACRITIC_WEIGHT * sum(ch in letters for ch in word)
    return scores


def detect_language(text: str, default: str = ENGLISH) -> str:
    """The most likely of :data:`LANGUAGES` for ``text`` (``default`` when there is no evidence)."""
    counts = _script_counts(text)
    cjk = counts["hangul"] + counts["kana"] + counts["han"]
    if cjk and cjk >= counts["latin"] / 4:  # CJK letters carry ~4x the speech of a Latin letter
        if counts["hangul"] >= max(counts["kana"], 1) and counts["hangul"] >= counts["han"] / 4:
            return KOREAN
        if counts["kana"]:
            return JAPANESE
        if counts["han"]:
            return MANDARIN
    scores = latin_scores(text)
    best = max(scores, key=lambda language: scores[language])
    if scores[best] == 0:
        return default
    if list(scores.values()).count(scores[best]) > 1:  # a tie: prefer the default, then English
        tied = [language for language, score in scores.items() if score == scores[best]]
        return default if default in tied else (ENGLISH if ENGLISH in tied else tied[0])
    return best
