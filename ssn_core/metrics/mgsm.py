"""MGSM accuracy: the problems (a folder of mgsm_<lang>.tsv files or the hub dataset), the final number of a reply
in the writing conventions of its language (`extract_answer`), and `mgsm_accuracy` over generated replies."""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from ssn_core import distributed
from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import PromptSetError, SSNError
from ssn_core.metrics.manifest import _settings_dict
from ssn_core.metrics.rates import Rate

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


MGSM_LANGUAGES: tuple[str, ...] = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
MGSM_HUB_ID = "juletxara/mgsm"
# Languages that write 1.234,5 (a single "." followed by exactly three digits is a thousands separator).
DECIMAL_COMMA_LANGUAGES = frozenset({"de", "es", "fr", "it", "ru", "pt", "nl", "vi", "id", "tr", "pl", "uk", "af"})
# English instruction after the native question (the "EN-CoT"-style prompt of the MGSM paper, Shi et al. 2022).
MGSM_TEMPLATE = "{question}\nSolve the problem step by step, then give the final answer as a number on the last line."


@dataclass(frozen=True)
class MgsmItem:
    question: str
    answer: float


def load_mgsm(lang: str, path_or_dir: str | Path | None = None, n: int | None = None) -> list[MgsmItem]:
    """MGSM problems of one language: the first `n` (all when None).

    `path_or_dir`: a folder holding mgsm_<lang>.tsv or the .tsv itself ("question<TAB>answer", no header, as in
    ../shared/datasets/mgsm); None loads the Hugging Face dataset `juletxara/mgsm` (needs `datasets` and a network).
    """
    lang = (lang or "").strip().lower()
    if n is not None and n < 1:
        raise PromptSetError(f"n must be at least 1, got {n}")
    if path_or_dir is None:
        items = _load_mgsm_hub(lang)
    else:
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / f"mgsm_{lang}.tsv"
        if not path.is_file():
            raise PromptSetError(f"MGSM file not found: {path} (expected mgsm_<lang>.tsv, 'question<TAB>answer')")
        items = _read_mgsm_tsv(path)
    if not items:
        raise PromptSetError(f"no MGSM problems for language {lang!r}")
    return items if n is None else items[:n]


def _read_mgsm_tsv(path: Path) -> list[MgsmItem]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"cannot read MGSM file {path}: {e}") from None
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise PromptSetError(f"{path}:{lineno}: expected 'question<TAB>answer', found no tab")
        question, answer = line.rsplit("\t", 1)
        value = parse_number(answer.strip())
        if value is None or not question.strip():
            raise PromptSetError(f"{path}:{lineno}: cannot read the answer {answer!r} as a number")
        items.append(MgsmItem(question.strip(), value))
    return items


def _load_mgsm_hub(lang: str) -> list[MgsmItem]:
    if lang not in MGSM_LANGUAGES:
        raise PromptSetError(f"MGSM has no language {lang!r}; it has {', '.join(MGSM_LANGUAGES)}")
    try:
        import datasets  # optional dependency, only for the hub
    except ImportError:
        raise PromptSetError("loading MGSM from the Hugging Face hub needs the `datasets` package (pip install "
                             "datasets); or pass a folder of mgsm_<lang>.tsv files") from None
    try:
        rows = datasets.load_dataset(MGSM_HUB_ID, lang, split="test")
    except Exception as e:  # noqa: BLE001 - network, auth and format errors all mean "cannot load"
        raise PromptSetError(f"could not load {MGSM_HUB_ID} ({lang}) from the hub: {e}. Offline? Pass a folder "
                             "of mgsm_<lang>.tsv files instead") from None
    return [MgsmItem(str(r["question"]).strip(), float(r["answer_number"])) for r in rows]


_NUMBER = re.compile(r"(?:(?<![\w-])-)?\d+(?:[.,]\d+)*")
_GROUP_SPACE = re.compile(r"(?<=\d)[\u00a0\u202f\u2009](?=\d{3}(?!\d))")  # 1 200 with a no-break / thin space
_GROUP_PLAIN_SPACE = re.compile(r"(?<=\d) (?=\d{3}(?!\d))")
# Languages that group thousands with a plain space too (1 200): there "1 200" is one number.
SPACE_GROUP_LANGUAGES = frozenset({"fr", "ru", "uk", "pl", "cs", "sk", "sv", "no", "fi", "et", "bg"})


def _ascii_digits(text: str) -> str:
    """Bengali ০-৯, Devanagari, Thai, Arabic-Indic, full-width ... digits -> 0-9 (any Unicode decimal digit)."""
    text = unicodedata.normalize("NFKC", text)  # full-width digits and commas
    text = text.replace("\u066b", ".").replace("\u066c", ",").replace("\u2212", "-")  # Arabic separators, minus
    return "".join(str(unicodedata.decimal(ch)) if ch.isdecimal() and not ch.isascii() else ch for ch in text)


def parse_number(token: str, lang: str | None = None) -> float | None:
    """One number written with thousands / decimal separators -> float ("1,234.5", "1.234,5", "2,125" -> 2125)."""
    token = _GROUP_SPACE.sub("", _ascii_digits(token.strip()))
    m = re.fullmatch(r"-?\d+(?:[.,]\d+)*", token)
    if m is None:
        return None
    sign = -1.0 if token.startswith("-") else 1.0
    body = token.lstrip("-")
    seps = [ch for ch in body if ch in ".,"]
    groups = re.split(r"[.,]", body)
    if not seps:
        return sign * float(body)
    if "." in seps and "," in seps:
        decimal = body[max(body.rfind("."), body.rfind(","))]
        thousands = "," if decimal == "." else "."
        return sign * float(body.replace(thousands, "").replace(decimal, "."))
    sep = seps[0]
    grouped = len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])
    if sep == ",":
        # 1,234,567 or the Indian 1,14,200 (lakh grouping, used in Bengali, Hindi, Nepali text)
        if len(groups[0]) <= 3 and len(groups[-1]) == 3 and all(len(g) in (2, 3) for g in groups[1:-1]):
            return sign * float(body.replace(",", ""))
        return sign * float(body.replace(",", ".")) if len(seps) == 1 else sign * float(groups[-1])
    # only "."
    if len(seps) > 1:
        return sign * float(body.replace(".", "")) if grouped else sign * float(groups[-1])
    if grouped and lang in DECIMAL_COMMA_LANGUAGES:
        return sign * float(body.replace(".", ""))
    return sign * float(body)


def extract_answer(text: str, lang: str | None = None) -> float | None:
    """The last number in a reply (None if there is none), any digit script, with separators handled."""
    normalized = _GROUP_SPACE.sub("", _ascii_digits(text or ""))
    if lang in SPACE_GROUP_LANGUAGES:
        normalized = _GROUP_PLAIN_SPACE.sub("", normalized)
    matches = _NUMBER.findall(normalized)
    return parse_number(matches[-1], lang) if matches else None


def answers_match(predicted: float | None, gold: float) -> bool:
    return predicted is not None and abs(predicted - gold) <= 1e-6 * max(1.0, abs(gold))


@dataclass(frozen=True)
class MgsmPrediction:
    question: str
    gold: float
    reply: str
    predicted: float | None
    correct: bool


@dataclass
class MgsmResult:
    language: str
    n: int
    n_correct: int
    accuracy: Rate
    predictions: list[MgsmPrediction]
    settings: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame.from_records([asdict(p) for p in self.predictions])


def mgsm_accuracy(lm: LoadedModel, lang: str, n: int | None = None, settings=None, *,
                  path_or_dir: str | Path | None = None, template: str = MGSM_TEMPLATE, batch_size: int = 8,
                  n_boot: int = 1000, seed: int = 0,
                  progress: Progress | None = None, cancel: threading.Event | None = None) -> MgsmResult:
    """Generate answers to the first `n` MGSM problems of `lang` and score the last number of each reply.

    Generation runs in chunks of `batch_size`; wrap the call in `intervene(...)` to measure an intervention
    (interventions with per-row masks do not apply here: chunking changes the batch rows).
    """
    from ssn_core.generation import GenerationSettings, generate

    if "{question}" not in template:
        raise SSNError("the MGSM template must contain '{question}'")
    settings = settings if settings is not None else GenerationSettings(max_new_tokens=256)
    items = load_mgsm(lang, path_or_dir, n)

    def run_chunk(chunk) -> list[str]:  # under a launch each process answers its share of the batches
        check_cancel(cancel, "MGSM evaluation was cancelled")
        return generate(lm, [template.format(question=it.question) for it in chunk], settings)

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"MGSM {lang}: {done}/{total}")

    replies = distributed.map_chunks(items, batch_size, run_chunk, after=report, what="answering MGSM problems")
    if len(replies) != len(items):
        raise SSNError(f"generation returned {len(replies)} replies for {len(items)} MGSM problems")
    predictions = []
    for item, reply in zip(items, replies, strict=True):
        predicted = extract_answer(reply, lang)
        predictions.append(MgsmPrediction(item.question, item.answer, reply, predicted,
                                          answers_match(predicted, item.answer)))
    hits = [p.correct for p in predictions]
    return MgsmResult(language=lang, n=len(items), n_correct=sum(hits),
                      accuracy=Rate.of(hits, n_boot=n_boot, seed=seed), predictions=predictions,
                      settings=_settings_dict(settings))
