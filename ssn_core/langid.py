"""Which language is a prompt in? Script first, then a small word-list language ID for shared scripts.

The marker judge needs the prompt's language (its refusal markers and its script). Typing a Chinese prompt
into the Chat page should not need a language picker, so `detect_language` guesses it:

1. **Script** (`ssn_core.judges.script_counts`): most scripts belong to one language here — Han → zh (with kana
   → ja), Hangul → ko, Thai → th, Bengali → bn, Greek → el, Hebrew → he, Tamil → ta, Telugu → te, ...
2. **Letters** that only some languages of a shared script use: Arabic script → fa (پ چ ژ گ ی) or ur (ٹ ڈ ڑ ں ے)
   else ar; Cyrillic → uk (і ї є ґ) or bg/ru by their function words; Latin → vi (ơ ư ă đ ...).
3. **Function words** for the rest (Latin script, Devanagari): the language whose list of very common words
   (pronouns, prepositions, question words, written for SSN Lab) covers most of the text's words wins.

It is deliberately small (no model, no download) and says how sure it is: ``confidence`` is 1.0 for a script
that settles it and the winning word share's margin otherwise; below ``MIN_CONFIDENCE`` the guess is ``None``
and callers fall back to a default or ask. Short or mixed texts are where it fails; the app offers an override.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

MIN_CONFIDENCE = 0.15
WORD_BONUS = 2.0

# Scripts that name one language (of those SSN Lab knows).
SCRIPT_LANGUAGE: dict[str, str] = {
    "hangul": "ko", "thai": "th", "bengali": "bn", "greek": "el", "hebrew": "he", "tamil": "ta", "telugu": "te",
    "kannada": "kn", "malayalam": "ml", "gujarati": "gu", "gurmukhi": "pa", "sinhala": "si", "lao": "lo",
    "myanmar": "my", "khmer": "km", "georgian": "ka", "armenian": "hy", "ethiopic": "am",
}

_PERSIAN_LETTERS = set("پچژگی")
_URDU_LETTERS = set("ٹڈڑںےھ")
_UKRAINIAN_LETTERS = set("іїєґ")
_VIETNAMESE_LETTERS = set("ăâđêôơưạảấầẩẫậắằẳẵặẹẻẽếềểễệỉịọỏốồổỗộớờởỡợụủứừửữựỳỵỷỹ")

# Very common words per language (lower case). Words shared by two languages count for both.
FUNCTION_WORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in {
    "en": "the a an and or but of to in on at for with from by as is are was were be been it its this that these "
          "those i you he she we they me my your our their not no yes can cannot will would should could do does "
          "did have has had what how why which who when where some any all there here about into without so if "
          "than then just make someone something get best way write",
    "it": "il lo la i gli le di del della dei delle da dal dalla in nel nella con su per tra fra che e è un una "
          "uno non come posso puoi può qual quale quali cosa chi dove quando perché mio mia miei tuo tua suo sua "
          "senza qualcuno modo più anche sono sei ho hai ha fare si ci mi ti al alla sul sulla questo questa",
    "es": "el la los las de del en con por para que y es un una no cómo como puedo puede qué cuál dónde cuando "
          "porque mi mis tu su sin alguien más también soy eres hacer se lo le al este esta",
    "pt": "o a os as de do da dos das em no na com por para que e é um uma não como posso pode qual onde quando "
          "porque meu minha seu sua sem alguém mais também sou fazer se ao à este esta você",
    "fr": "le la les de du des en dans avec sur pour que qui et est un une ne pas comment puis peut quel quelle "
          "où quand pourquoi mon ma mes ton ta son sa sans quelqu'un plus aussi suis faire se je tu il elle "
          "nous vous au aux ce cette",
    "de": "der die das den dem des und ist sind ein eine einen nicht wie kann können was wer wo wann warum mein "
          "meine dein sein ohne jemand jemanden mehr auch bin machen sich ich du er sie wir ihr mit auf für zu "
          "von im am",
    "nl": "de het een en is zijn niet hoe kan kunnen wat wie waar wanneer waarom mijn jouw zijn haar zonder "
          "iemand meer ook ben maken zich ik jij je hij zij we wij met op voor te van in",
    "af": "die 'n en is nie hoe kan wat wie waar wanneer hoekom my jou sy haar sonder iemand meer ook maak ek "
          "jy hy ons julle met op vir te van in om dit het se by",
    "sw": "na ya wa kwa ni za la cha vya bila mtu watu gani wapi nini jinsi yangu wangu zangu changu yake yako "
          "hii hiyo huu hili kuna kama sana kwenye katika ili au lakini je ninawezaje ninaweza unaweza "
          "nyumbani bora njia kuhusu kwamba pia tu",
    "jv": "aku sing lan ing karo kanggo piye carane apa tanpa wong liya dheweke ora iki kuwi supaya marang saka "
          "uga wis arep ngendi endi omah nggawe gawe dadi amarga isih wae banget mung kabeh sampeyan kowe "
          "panjenengan kang utawa nanging yen menawa opo seng nek ae ki iku sopo lapo koyo mbak mas",
    "id": "yang dan di untuk dengan tidak ini itu saya bagaimana cara apakah dari ke ada akan atau agar "
          "seseorang orang tanpa rumah membuat saja juga sudah harus kamu anda dia mereka kami kita bisa dapat",
    "tr": "bir ve bu şu nasıl ben sen için ile mi mı ne kim nerede neden benim senin olmadan biri daha da de "
          "yapmak çok",
    "vi": "tôi bạn làm thế nào để không của và có một người là cách gì ai đó mà ở đâu với cho này được những "
          "các khi nếu thì",
    "hi": "है हैं के की का को में से पर और मैं मुझे मेरा मेरी आप तुम यह वह क्या कैसे कहाँ क्यों किसी कोई "
          "बिना लिए सकता सकती सकते करना करें था थी",
    "ne": "छ छु छन् हो हुन् को का की लाई मा बाट र म मलाई मेरो मेरी तपाईं तिमी यो त्यो के कसरी कहाँ किन "
          "कसैलाई कुनै बिना लागि सक्छु सक्छ गर्न गर्ने",
    "mr": "आहे आहेत चा ची चे ला मध्ये आणि मी मला माझा माझी तुम्ही हे ते काय कसे कुठे का कोणाला कोणत्याही "
          "शिवाय साठी शकतो करणे",
    "ru": "и в не на я что как с по это он она мы вы они мне мой моя без кто где когда почему можно могу "
          "сделать чтобы или но для",
    "bg": "и в не на аз че как с по това той тя ние вие те ми моя моят без кой къде кога защо мога да "
          "направя или но за",
    "uk": "і в не на я що як з по це він вона ми ви вони мені мій моя без хто де коли чому можна можу "
          "зробити щоб або але для",
}.items()}



@dataclass(frozen=True)
class LanguageGuess:
    """``code``: ISO 639-1 code or None when unsure; ``confidence`` 0..1; ``reason`` says what decided it."""

    code: str | None
    confidence: float
    script: str
    reason: str


def _words(text: str) -> list[str]:
    """Lower-case words: runs of letters and combining marks (Devanagari vowel signs are marks, not letters),
    with inner apostrophes ("quelqu'un", "'n")."""
    text = unicodedata.normalize("NFC", text).casefold().replace("’", "'")
    words: list[str] = []
    current: list[str] = []
    for ch in text + " ":
        if ch.isalpha() or unicodedata.category(ch).startswith("M") or ch == "'":
            current.append(ch)
        else:
            if current:
                word = "".join(current).strip("'") if "".join(current) != "'n" else "'n"
                if word:
                    words.append(word)
            current = []
    return words


def _by_words(words: list[str], candidates: tuple[str, ...]) -> tuple[str | None, float, str]:
    """The candidate language whose function words cover most of ``words``; (code, confidence, reason)."""
    if not words:
        return None, 0.0, "no words"
    shares = {lang: sum(w in FUNCTION_WORDS[lang] for w in words) / len(words) for lang in candidates}
    ranked = sorted(shares.items(), key=lambda kv: kv[1], reverse=True)
    (best, top), second = ranked[0], (ranked[1][1] if len(ranked) > 1 else 0.0)
    if top == 0:
        return None, 0.0, "no common words"
    confidence = min(1.0, (top - second) / top + min(top, 0.5)) if top > second else 0.0
    return best, round(confidence, 3), f"words:{best}"

# ----------------------------------------------------------------------------------------------------------------
# Character n-gram model (naive Bayes) for Latin and Devanagari, trained at first use on the project's own texts


_ASSETS = Path(__file__).resolve().parent.parent / "assets"
NGRAM_ORDERS = (1, 2, 3)


def _ngrams(text: str) -> list[str]:
    grams: list[str] = []
    for word in _words(text):
        padded = f" {word} "
        for n in NGRAM_ORDERS:
            grams += [padded[i:i + n] for i in range(len(padded) - n + 1) if padded[i:i + n].strip()]
    return grams


def _training_texts() -> dict[str, list[str]]:
    """Our own texts per language: built-in prompts, refusal templates and markers, and the word lists."""
    texts: dict[str, list[str]] = {lang: [" ".join(sorted(words))] for lang, words in FUNCTION_WORDS.items()}
    for name in ("harmful", "harmless"):
        path = _ASSETS / "prompts" / "builtin" / f"{name}.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                for lang, value in row.items():
                    if len(lang) == 2 and isinstance(value, str):
                        texts.setdefault(lang, []).append(value)
    for path, key in ((_ASSETS / "refusals" / "refusal_templates.json", "templates"),
                      (_ASSETS / "judges" / "refusal_markers.json", "markers")):
        if path.is_file():
            for lang, values in json.loads(path.read_text(encoding="utf-8")).get(key, {}).items():
                texts.setdefault(lang, []).extend(v for v in values if isinstance(v, str))
    return texts


@lru_cache(maxsize=1)
def _ngram_model() -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per Latin-script language: log P(n-gram) with add-one smoothing, and the log P of an unseen n-gram."""
    counts: dict[str, Counter] = {lang: Counter(g for text in texts for g in _ngrams(text))
                                  for lang, texts in _training_texts().items() if lang in _NGRAM_LANGUAGES}
    vocabulary = len(set().union(*counts.values())) + 1
    logp, unseen = {}, {}
    for lang, grams in counts.items():
        total = sum(grams.values()) + vocabulary
        logp[lang] = {g: math.log((c + 1) / total) for g, c in grams.items()}
        unseen[lang] = math.log(1 / total)
    return logp, unseen


def _by_ngrams(text: str, candidates: tuple[str, ...]) -> tuple[str | None, float, str]:
    grams = _ngrams(text)
    logp, unseen = _ngram_model()
    pool = [lang for lang in candidates if lang in logp]
    if not grams or not pool:
        return None, 0.0, "no n-grams"
    words = _words(text)
    # Mean log P per n-gram, plus a bonus for the share of the language's very common words.
    scores = {lang: sum(logp[lang].get(g, unseen[lang]) for g in grams) / len(grams)
              + WORD_BONUS * sum(w in FUNCTION_WORDS.get(lang, ()) for w in words) / max(len(words), 1)
              for lang in pool}
    ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
    best, top = ranked[0]
    margin = top - (ranked[1][1] if len(ranked) > 1 else top - 1.0)
    return best, round(1.0 - math.exp(-4.0 * margin), 3), f"ngrams:{best}"


def detect_language(text: str, candidates: tuple[str, ...] | None = None) -> LanguageGuess:
    """The language ``text`` is written in, as far as script, letters and common words tell.

    ``candidates`` restricts the word-list step (e.g. the languages a judge has markers for).
    """
    from ssn_core.judges import script_counts

    counts = script_counts(text or "")
    if not counts:
        return LanguageGuess(None, 0.0, "none", "no letters")
    letters = sum(counts.values())
    script = max(counts, key=counts.__getitem__)
    others = {k: v for k, v in counts.items() if k not in ("latin", "other")}
    if script == "latin" and others and max(others.values()) >= 0.25 * letters:
        script = max(others, key=others.__getitem__)  # Latin names inside a Chinese, Arabic, ... sentence
    chars = set(unicodedata.normalize("NFC", (text or "").casefold()))
    if script in ("han", "kana"):
        if counts.get("kana", 0) >= 0.05 * letters:
            return LanguageGuess("ja", 1.0, script, "script:kana")
        return LanguageGuess("zh", 1.0, script, "script:han")
    if script in SCRIPT_LANGUAGE:
        return LanguageGuess(SCRIPT_LANGUAGE[script], 1.0, script, f"script:{script}")
    if script == "arabic":
        if chars & _URDU_LETTERS:
            return LanguageGuess("ur", 0.9, script, "letters:ur")
        if chars & _PERSIAN_LETTERS:
            return LanguageGuess("fa", 0.9, script, "letters:fa")
        return LanguageGuess("ar", 0.9, script, "script:arabic")
    if script == "cyrillic":
        if chars & _UKRAINIAN_LETTERS:
            return LanguageGuess("uk", 0.9, script, "letters:uk")
        code, confidence, reason = _by_words(_words(text), ("ru", "bg", "uk"))
        return LanguageGuess(code or "ru", max(confidence, 0.5), script, reason if code else "script:cyrillic")
    if script == "devanagari":
        code, confidence, reason = _by_ngrams(text, ("hi", "ne", "mr"))
        return LanguageGuess(code if confidence >= MIN_CONFIDENCE else None, confidence, script, reason)
    if script == "latin":
        if len(chars & _VIETNAMESE_LETTERS) >= 2 or (chars & _VIETNAMESE_LETTERS and letters < 40):
            return LanguageGuess("vi", 0.95, script, "letters:vi")
        latin = tuple(lang for lang in FUNCTION_WORDS if lang in _LATIN)
        pool = tuple(lang for lang in (candidates or latin) if lang in _LATIN) or latin
        code, confidence, reason = _by_ngrams(text, pool)
        confidence = round(confidence * min(1.0, letters / 12), 3)  # two or three letters say little
        return LanguageGuess(code if confidence >= MIN_CONFIDENCE else None, confidence, script, reason)
    return LanguageGuess(None, 0.0, script, f"script:{script} (unknown language)")


_LATIN = frozenset({"en", "it", "es", "pt", "fr", "de", "nl", "af", "sw", "jv", "id", "tr", "vi"})
_NGRAM_LANGUAGES = _LATIN | {"hi", "ne", "mr"}
