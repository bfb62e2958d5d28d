"""Languages: the codes this project knows (`LANGUAGES`), which the built-in set and MultiJail cover, the two
labels, parsing a user's language list, and named language groups (`LanguageGroups`: HR vs NHR)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ssn_core.errors import PromptSetError

LABELS: tuple[str, ...] = ("harmful", "harmless")

# ISO 639-1 code -> English name. The first block is what the built-in set and MultiJail cover; the rest are
# well-known codes that MGSM or users' own data may carry.
LANGUAGES: dict[str, str] = {
    "en": "English",
    "zh": "Chinese",
    "it": "Italian",
    "vi": "Vietnamese",
    "ar": "Arabic",
    "ko": "Korean",
    "th": "Thai",
    "bn": "Bengali",
    "sw": "Swahili",
    "jv": "Javanese",
    "af": "Afrikaans",
    "ne": "Nepali",
    # more languages (MGSM: de fr es ja ru te; others for user data)
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ja": "Japanese",
    "ru": "Russian",
    "te": "Telugu",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
    "uk": "Ukrainian",
    "cs": "Czech",
    "sv": "Swedish",
    "da": "Danish",
    "no": "Norwegian",
    "fi": "Finnish",
    "el": "Greek",
    "hu": "Hungarian",
    "ro": "Romanian",
    "bg": "Bulgarian",
    "tr": "Turkish",
    "he": "Hebrew",
    "fa": "Persian",
    "ur": "Urdu",
    "hi": "Hindi",
    "mr": "Marathi",
    "gu": "Gujarati",
    "pa": "Punjabi",
    "ta": "Tamil",
    "kn": "Kannada",
    "ml": "Malayalam",
    "si": "Sinhala",
    "my": "Burmese",
    "km": "Khmer",
    "lo": "Lao",
    "id": "Indonesian",
    "ms": "Malay",
    "tl": "Tagalog",
    "su": "Sundanese",
    "am": "Amharic",
    "ha": "Hausa",
    "yo": "Yoruba",
    "ig": "Igbo",
    "zu": "Zulu",
    "xh": "Xhosa",
    "so": "Somali",
}

BUILTIN_LANGUAGES: tuple[str, ...] = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv", "af", "ne")
MULTIJAIL_LANGUAGES: tuple[str, ...] = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")

# MultiJail's paper lists English on its own as high-resource; here it sits in "high" with zh, it, vi.
MULTIJAIL_GROUPS: dict[str, list[str]] = {
    "high": ["en", "zh", "it", "vi"],
    "medium": ["ar", "ko", "th"],
    "low": ["bn", "sw", "jv"],
}
# The SS-Neuron paper: English is the one high-resource (HR) language, everything else is non-high-resource.
PAPER_GROUPS: dict[str, list[str]] = {
    "hr": ["en"],
    "nhr": [lang for lang in BUILTIN_LANGUAGES if lang != "en"],
}


def language_name(code: str) -> str:
    return LANGUAGES.get(code, code)


def _known_list(known: Iterable[str]) -> str:
    return ", ".join(known)


def parse_languages(spec: str | Iterable[str], known: Iterable[str] | None = None) -> list[str]:
    """"en,zh,bn" (or "en zh bn", or a list) -> ["en", "zh", "bn"]: lower-cased, de-duplicated, validated."""
    known = tuple(known) if known is not None else tuple(LANGUAGES)
    parts = spec.replace(",", " ").split() if isinstance(spec, str) else [str(s) for s in spec]
    codes = list(dict.fromkeys(p.strip().lower() for p in parts if p.strip()))
    if not codes:
        raise PromptSetError("no language codes given; expected a comma-separated list such as en,zh,bn")
    unknown = [c for c in codes if c not in known]
    if unknown:
        raise PromptSetError(f"unknown language code(s) {', '.join(repr(c) for c in unknown)}; "
                             f"known codes: {_known_list(known)}")
    return codes


# ---------------------------------------------------------------------------------------------------------------
# Language groups
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageGroups:
    """Named groups of languages (e.g. high / medium / low resource); one of them is the high-resource group.

    SS-Neurons are defined against the HR languages; everything outside the HR group counts as NHR.
    """

    groups: dict[str, tuple[str, ...]]
    hr_group: str

    def __post_init__(self) -> None:
        groups = {str(name): tuple(langs) for name, langs in self.groups.items()}
        if not groups:
            raise PromptSetError("language groups are empty; give at least one group, e.g. {'hr': ['en']}")
        seen: dict[str, str] = {}
        for name, langs in groups.items():
            if not langs:
                raise PromptSetError(f"language group {name!r} has no languages")
            for lang in langs:
                if lang not in LANGUAGES:
                    raise PromptSetError(f"language group {name!r} has unknown language code {lang!r}; "
                                         f"known codes: {_known_list(LANGUAGES)}")
                if lang in seen:
                    raise PromptSetError(f"language {lang!r} is in two groups: {seen[lang]!r} and {name!r}")
                seen[lang] = name
        if self.hr_group not in groups:
            raise PromptSetError(f"high-resource group {self.hr_group!r} is not one of the groups "
                                 f"({', '.join(groups)})")
        object.__setattr__(self, "groups", groups)

    @classmethod
    def from_dict(cls, groups: Mapping[str, Iterable[str] | str], hr_group: str | None = None) -> LanguageGroups:
        """Build (and validate) groups from {"name": ["en", ...] or "en,zh"}; HR group defaults to "hr" or "high"."""
        if not isinstance(groups, Mapping):
            raise PromptSetError(f"language groups must be a mapping of group name -> languages, got "
                                 f"{type(groups).__name__}")
        parsed = {name: tuple(parse_languages(langs)) for name, langs in groups.items()}
        if hr_group is None:
            hr_group = next((g for g in ("hr", "high") if g in parsed), None)
            if hr_group is None:
                raise PromptSetError(f"say which group is high-resource (hr_group=...); groups: {', '.join(parsed)}")
        return cls(parsed, hr_group)

    @classmethod
    def multijail(cls) -> LanguageGroups:
        return cls.from_dict(MULTIJAIL_GROUPS, hr_group="high")

    @classmethod
    def paper(cls) -> LanguageGroups:
        return cls.from_dict(PAPER_GROUPS, hr_group="hr")

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(langs) for name, langs in self.groups.items()}

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(lang for langs in self.groups.values() for lang in langs)

    @property
    def hr_languages(self) -> tuple[str, ...]:
        return self.groups[self.hr_group]

    @property
    def nhr_languages(self) -> tuple[str, ...]:
        return tuple(lang for name, langs in self.groups.items() if name != self.hr_group for lang in langs)

    def group_of(self, lang: str) -> str:
        for name, langs in self.groups.items():
            if lang in langs:
                return name
        raise PromptSetError(f"language {lang!r} is in no group; groups: "
                             + "; ".join(f"{n}: {', '.join(ls)}" for n, ls in self.groups.items()))
