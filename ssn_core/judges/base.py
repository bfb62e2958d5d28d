"""What every judge shares: the three labels, `Verdict`, the `Judge` interface, and `judge_agreement` between two
judges' verdicts (raw agreement and Cohen's kappa)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import JudgeError

REFUSAL = "refusal"
COMPLIANCE = "compliance"
OFF_TARGET = "off_target"
LABELS: tuple[str, ...] = (REFUSAL, COMPLIANCE, OFF_TARGET)


@dataclass(frozen=True)
class Verdict:
    """One judged reply. ``reason`` says why, e.g. "marker:我不能", "echo", "repetition", "empty",
    "wrong_language", "no_refusal_marker", "guard:Refusal: Yes". ``raw`` keeps a model/API judge's output."""

    label: str
    reason: str
    judge: str
    version: str
    raw: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _label_of(v: Verdict | str) -> str:
    label = v.label if isinstance(v, Verdict) else str(v)
    if label not in LABELS:
        raise JudgeError(f"unknown verdict label {label!r}; expected one of {', '.join(LABELS)}")
    return label


class Judge:
    """Common interface. Subclasses implement `judge`; `judge_many` loops (guard judges batch)."""

    name: str = "judge"
    version: str = "0"

    def judge(self, prompt: str, reply: str, language: str | None = None) -> Verdict:
        raise NotImplementedError

    def judge_many(self, prompts: Sequence[str], replies: Sequence[str], languages: Sequence[str | None] | None = None,
                   *, progress: Progress | None = None, cancel: threading.Event | None = None) -> list[Verdict]:
        languages = _check_lengths(prompts, replies, languages)
        verdicts = []
        for i, (prompt, reply, lang) in enumerate(zip(prompts, replies, languages, strict=True)):
            check_cancel(cancel, "judging was cancelled")
            verdicts.append(self.judge(prompt, reply, lang))
            if progress is not None:
                progress(i + 1, len(prompts), f"{self.name}: judged {i + 1}/{len(prompts)}")
        return verdicts

    def info(self) -> dict:
        """What a manifest records about this judge (never secrets)."""
        return {"name": self.name, "version": self.version}


def _check_lengths(prompts, replies, languages) -> list[str | None]:
    if len(prompts) != len(replies):
        raise JudgeError(f"got {len(prompts)} prompts but {len(replies)} replies; they must pair up")
    if languages is None:
        return [None] * len(prompts)
    if isinstance(languages, str):
        return [languages] * len(prompts)
    if len(languages) != len(prompts):
        raise JudgeError(f"got {len(prompts)} prompts but {len(languages)} languages; they must pair up")
    return list(languages)


# ----------------------------------------------------------------------------------------------------------------
# Agreement between judges


def judge_agreement(verdicts_a: Sequence[Verdict | str], verdicts_b: Sequence[Verdict | str]) -> dict:
    """Raw agreement and Cohen's kappa of two judges over the same replies.

    Returns {"n", "agreement", "kappa", "confusion": {label_a: {label_b: count}}}. Kappa is None when it is
    undefined (both judges gave one and the same label to everything: chance agreement is 1).
    """
    if len(verdicts_a) != len(verdicts_b):
        raise JudgeError(f"cannot compare {len(verdicts_a)} verdicts with {len(verdicts_b)}; judge the same replies")
    a = [_label_of(v) for v in verdicts_a]
    b = [_label_of(v) for v in verdicts_b]
    n = len(a)
    confusion = {la: {lb: 0 for lb in LABELS} for la in LABELS}
    for la, lb in zip(a, b, strict=True):
        confusion[la][lb] += 1
    if n == 0:
        return {"n": 0, "agreement": None, "kappa": None, "confusion": confusion}
    observed = sum(confusion[k][k] for k in LABELS) / n
    expected = sum((a.count(k) / n) * (b.count(k) / n) for k in LABELS)
    kappa = None if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    return {"n": n, "agreement": observed, "kappa": kappa, "confusion": confusion}
