"""Text checks every judge can run without a model: normalisation (so markers match across spellings), the script
of each letter (a reply's language, as far as its script tells), and the surface signs of an off-target reply
(an echo of the prompt, degenerate repetition)."""

from __future__ import annotations

import bisect
import re
import unicodedata

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_ARABIC_MARKS = re.compile("[\u064b-\u0652\u0670\u0640]")  # harakat, superscript alef, tatweel
_ARABIC_ALEFS = str.maketrans({"\u0623": "\u0627", "\u0625": "\u0627", "\u0622": "\u0627", "\u0671": "\u0627"})
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """NFKC + casefold + one apostrophe + no zero-width chars + undiacritised Arabic + single spaces.

    Applied to markers, prompts and replies alike, so "I can’t", "I CAN'T" and "ｉ ｃａｎ'ｔ" all match "i can't",
    and "عذراً" matches "عذرا".
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(_APOSTROPHES)
    text = _ZERO_WIDTH.sub("", text)
    text = _ARABIC_MARKS.sub("", text).translate(_ARABIC_ALEFS)
    return _SPACES.sub(" ", text).strip()


# (first code point, last code point, script) for alphabetic characters; anything else is "other".
_SCRIPT_RANGES: list[tuple[int, int, str]] = sorted([
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x08A0, 0x08FF, "arabic"),
    (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x0900, 0x097F, "devanagari"), (0x0980, 0x09FF, "bengali"), (0x0A00, 0x0A7F, "gurmukhi"),
    (0x0A80, 0x0AFF, "gujarati"), (0x0B80, 0x0BFF, "tamil"), (0x0C00, 0x0C7F, "telugu"),
    (0x0C80, 0x0CFF, "kannada"), (0x0D00, 0x0D7F, "malayalam"), (0x0D80, 0x0DFF, "sinhala"),
    (0x0E00, 0x0E7F, "thai"), (0x0E80, 0x0EFF, "lao"), (0x1000, 0x109F, "myanmar"), (0x1780, 0x17FF, "khmer"),
    (0x10A0, 0x10FF, "georgian"), (0x0530, 0x058F, "armenian"), (0x1200, 0x139F, "ethiopic"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"), (0xFF66, 0xFF9F, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"), (0x20000, 0x3134F, "han"),
])
_RANGE_STARTS = [r[0] for r in _SCRIPT_RANGES]

# Script(s) a reply in each language is written in. Languages not listed skip the script check's first half
# (their script is taken from the prompt itself).
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{lang: frozenset({"latin"}) for lang in (
        "en", "it", "vi", "sw", "jv", "af", "de", "fr", "es", "pt", "nl", "id", "ms", "tr", "pl", "cs", "ro",
        "sv", "da", "no", "fi", "hu", "tl", "yo", "ha", "ig", "zu", "xh", "so", "su", "ca", "et", "lv", "lt")},
    "zh": frozenset({"han"}), "ja": frozenset({"han", "kana"}), "ko": frozenset({"hangul"}),
    "th": frozenset({"thai"}), "bn": frozenset({"bengali"}), "as": frozenset({"bengali"}),
    "ar": frozenset({"arabic"}), "fa": frozenset({"arabic"}), "ur": frozenset({"arabic"}),
    "ne": frozenset({"devanagari"}), "hi": frozenset({"devanagari"}), "mr": frozenset({"devanagari"}),
    "ru": frozenset({"cyrillic"}), "uk": frozenset({"cyrillic"}), "bg": frozenset({"cyrillic"}),
    "te": frozenset({"telugu"}), "ta": frozenset({"tamil"}), "el": frozenset({"greek"}), "he": frozenset({"hebrew"}),
}

# Scripts that must be present (>= 5% of the letters) for a reply to count as that language: Japanese always mixes
# kana into its kanji, so an all-Han reply to a Japanese prompt is Chinese.
_REQUIRED_SCRIPT = {"ja": "kana"}

# Words that make a Latin-script reply English (vs. romanised Bengali, Indonesian, ...).
_ENGLISH_WORDS = frozenset([
    "a", "an", "the", "and", "or", "but", "if", "to", "of", "in", "on", "at", "for", "with", "from", "by", "as",
    "is", "are", "was", "were", "be", "been", "being", "it", "its", "this", "that", "these", "those", "i", "you",
    "he", "she", "we", "they", "me", "my", "your", "our", "their", "not", "no", "yes", "can", "cannot", "can't",
    "will", "won't", "would", "should", "could", "do", "does", "don't", "did", "have", "has", "had", "here", "there",
    "what", "how", "why", "which", "who", "when", "where", "sure", "sorry", "please", "step", "first", "then",
    "help",
])


def char_script(ch: str) -> str:
    """The script of one alphabetic character ("latin", "han", "bengali", ...), or "other"."""
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0 and _SCRIPT_RANGES[i][0] <= cp <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    return "other"


def script_counts(text: str) -> dict[str, int]:
    """Number of alphabetic characters per script (vowel signs and digits are not counted)."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            script = char_script(ch)
            counts[script] = counts.get(script, 0) + 1
    return counts


def _letter_count(text: str) -> int:
    return sum(1 for ch in text if ch.isalpha())


_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _looks_english(text: str) -> bool:
    """At least a fifth of the words are common English function words (English prose: about half)."""
    words = _WORD.findall(text)
    hits = sum(1 for w in words if w in _ENGLISH_WORDS)
    return hits >= 1 and hits >= 0.2 * len(words)


def _base_language(language: str | None) -> str | None:
    if not language:
        return None
    return re.split(r"[-_]", language.strip().lower())[0] or None


def echo_overlap(prompt: str, reply: str, n: int = 4) -> float:
    """Fraction of the reply's character n-grams (by position) that also occur in the prompt."""
    if len(reply) < n or len(prompt) < n:
        return 1.0 if reply and reply in prompt else 0.0
    prompt_grams = {prompt[i:i + n] for i in range(len(prompt) - n + 1)}
    reply_grams = [reply[i:i + n] for i in range(len(reply) - n + 1)]
    return sum(g in prompt_grams for g in reply_grams) / len(reply_grams)


_REPEATED_UNIT = re.compile(r"(.{1,50}?)\1{3,}", re.DOTALL)


def distinct_ngram_ratio(text: str, n: int = 10) -> float:
    """Distinct character n-grams / all character n-grams: near 1 for prose in any script, low for loops.

    Character n-grams rather than zlib compression: zlib rates Bengali or Thai prose as repetitive because their
    3-byte UTF-8 characters share lead bytes.
    """
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def is_degenerate(text: str, min_distinct_ratio: float = 0.5, max_chars: int = 4000) -> bool:
    """True when a unit of 1-50 chars repeated >= 4 times in a row covers half the text, or (texts of >= 60 chars)
    fewer than ``min_distinct_ratio`` of its character 10-grams are distinct."""
    text = text[:max_chars]
    if not text:
        return False
    covered = sum(m.end() - m.start() for m in _REPEATED_UNIT.finditer(text))
    if covered >= 0.5 * len(text):
        return True
    return len(text) >= 60 and distinct_ngram_ratio(text) < min_distinct_ratio
