"""`validate`: every condition on each language's harmful prompts (and the reinforce conditions on its harmless
ones), judged, tabulated and summarised against the random controls."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, cast

import torch

from ssn_core._conventions import Progress
from ssn_core.errors import PromptSetError, SSNError
from ssn_core.generation.settings import GENERATION_BATCH_SIZE
from ssn_core.interventions import resolve_sites
from ssn_core.validation.conditions import PARTS, plan_conditions
from ssn_core.validation.packed import PackedGroup, run_packed_groups
from ssn_core.validation.result import RESULT_KIND, ValidationResult
from ssn_core.validation.stats import _harmless_rates, _rates, summarize

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


def validate(lm: LoadedModel, neurons, prompts, languages: Sequence[str], settings, alphas: Sequence[float] = (2.0,),
             seeds: Sequence[int] = (0, 1, 2), judge=None, batch_size: int = GENERATION_BATCH_SIZE,
             limit_per_language: int | None = None,
             hr_language: str | None = None, direction: torch.Tensor | Literal[False] | None = None,
             over_refusal: bool = True,
             betas: Sequence[float] = (), parts: Sequence[str] = PARTS, reinforce_sets: Sequence[str] = ("own",),
             reinforce_random: bool = False, progress: Progress | None = None,
             cancel: threading.Event | None = None) -> ValidationResult:
    """Run every condition on the harmful prompts of each language and compare with the random controls.

    ``neurons``: an `IdentifyResult` (anything with ``.ms`` / ``.ss`` {language: NeuronSet} and ``.ss_all``).
    ``prompts``: a `PromptSet`; its harmful prompts of each language are used (``limit_per_language`` each), and with
    ``over_refusal`` its harmless prompts answer the baseline and reinforce conditions (over-refusal).
    ``hr_language``: the high-resource language (no SS set of its own); default: the neuron result's first HR
    language, else English. ``direction`` ([hidden]): the refusal direction, run as a positive control (default:
    the neuron result's own, when it has one; ``False``: none). ``betas``: additive reinforcement strengths
    (`shift_offsets`), beside the scale reinforcement ``alphas``. ``reinforce_sets`` / ``reinforce_random``: which
    sets are reinforced, and a matched random set beside each (`plan_conditions`).
    """
    from ssn_core.judges import MarkerJudge
    from ssn_core.metrics import make_manifest

    judge = judge if judge is not None else MarkerJudge()
    if hr_language is None:
        hr = tuple(getattr(neurons, "hr", ()) or (getattr(neurons, "manifest", None) or {}).get("hr", ()) or ("en",))
        hr_language = hr[0]
    sites = resolve_sites(lm)
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise PromptSetError("no languages given to validate")
    if not seeds:
        raise SSNError("validation needs at least one random-control seed")
    selected = prompts.select(languages=languages, label="harmful", limit_per_language=limit_per_language)
    by_language = {lang: [p for p in selected if p.language == lang] for lang in languages}
    empty = [lang for lang, items in by_language.items() if not items]
    if empty:
        raise PromptSetError(f"the prompt set has no harmful prompts in: {', '.join(empty)}")

    if direction is False:  # asked for no control
        direction = None
    elif direction is None and getattr(neurons, "direction", None) is not None:
        direction = cast(torch.Tensor, neurons.direction.unit)  # the neuron result's RefusalDirection
    plans = {lang: plan_conditions(neurons, lang, sites, alphas, seeds, hr_language, direction, betas, parts,
                                   reinforce_sets=reinforce_sets, reinforce_random=reinforce_random)
             for lang in languages}
    harmless_by_language: dict[str, list] = {lang: [] for lang in languages}
    if over_refusal:
        for p in prompts.select(languages=languages, label="harmless", limit_per_language=limit_per_language) \
                if "harmless" in prompts.labels else ():
            harmless_by_language[p.language].append(p)
    harmless_plans = {lang: [c for c in plans[lang][0] if c.kind in ("baseline", "reinforce", "shift")]
                      for lang in languages}
    harmless_plans = {lang: plan if len(plan) > 1 else [] for lang, plan in harmless_plans.items()}  # no reinforce
    # Every (language, label) share of the run: its prompts, the conditions they are answered under.
    shares = [(lang, label, label_items, label_conditions) for lang in languages
              for label, label_items, label_conditions in (("harmful", by_language[lang], plans[lang][0]),
                                                           ("harmless", harmless_by_language[lang],
                                                            harmless_plans[lang]))
              if label_items and label_conditions]
    n_rows = sum(len(items) * len(conditions) for _, _, items, conditions in shares)
    total_batches = math.ceil(n_rows / batch_size)
    from ssn_core import distributed

    distributed.check_enough(n_rows, "packed validation rows (prompts x conditions)")
    started = time.time()
    if progress is not None:  # the first batch can take a minute: say what is happening before it
        progress(0, total_batches, f"{', '.join(languages)}: generating replies")
    # One stream of generation for the whole run (every language and label): one tail of draining rows, not one
    # per share (`run_packed_groups`).
    groups = [PackedGroup([p.text for p in items], conditions, lang) for lang, _, items, conditions in shares]
    all_replies = run_packed_groups(lm, groups, settings, batch_size, progress, cancel,
                                    message=f"{', '.join(languages)}: ", judge=judge)
    table: list[dict] = []
    rows: list[dict] = []
    notes: list[str] = [note for lang in languages for note in plans[lang][1]]
    for (lang, label, label_items, label_conditions), replies in zip(shares, all_replies, strict=True):
        for j, condition in enumerate(label_conditions):
            condition_replies = [replies[i][j] for i in range(len(label_items))]
            verdicts = judge.judge_many([p.text for p in label_items], condition_replies,
                                        [lang] * len(label_items), cancel=cancel)
            for prompt, reply, verdict in zip(label_items, condition_replies, verdicts, strict=True):
                rows.append({"language": lang, "label": label, "condition": condition.name,
                             "seed": condition.seed, "alpha": condition.alpha, "id": prompt.id,
                             "prompt": prompt.text, "reply": reply, "verdict": verdict.label,
                             "reason": verdict.reason})
            table.append({"language": lang, "label": label, "condition": condition.name,
                          "target": condition.target, "seed": condition.seed, "alpha": condition.alpha,
                          "n_neurons": condition.n_neurons,
                          **(_rates(verdicts, lang) if label == "harmful" else _harmless_rates(verdicts, lang))})

    ss_counts = {lang: len(neurons.ss[lang]) for lang in languages if lang != hr_language and lang in neurons.ss}
    summary = summarize(table, ss_counts, rows)
    summary["notes"] = notes
    summary["prompts_per_language"] = {lang: len(items) for lang, items in by_language.items()}
    summary["harmless_per_language"] = {lang: len(items) for lang, items in harmless_by_language.items()}
    manifest = make_manifest(
        settings, [judge], lm,
        kind=RESULT_KIND, languages=languages, hr_language=hr_language,
        alphas=[float(a) for a in alphas], betas=[float(b) for b in betas], seeds=[int(s) for s in seeds],
        parts=list(parts), reinforce_sets=list(reinforce_sets), reinforce_random=bool(reinforce_random),
        batch_size=batch_size,
        prompts={"n_per_language": summary["prompts_per_language"], "data_hash": _data_hash(prompts)},
        neurons=dict(getattr(neurons, "manifest", None) or {}),
        conditions={lang: [c.key for c in plans[lang][0]] for lang in languages},
        seconds=round(time.time() - started, 2),
    ).to_dict()
    return ValidationResult(table=table, rows=rows, summary=summary, manifest=manifest)


def _data_hash(prompts) -> str | None:
    value = getattr(prompts, "data_hash", None)
    return value() if callable(value) else value
