"""Faithfulness: dose-response curves of a method's neuron sets against matched random sets, on held-out prompts.

A neuron score is only worth what its sets do to the model. For each score table (one per method), each dose p (the
top fraction that `identify.select` takes) and each language, the language's MS-Neurons (and, for non-high-resource
languages, its SS-Neurons) are switched off and the held-out harmful prompts of that language are answered:

- the continuous refusal margin (`ssn_core.refusal`, teacher-forced, no generation) for every dose, and
- the generated, judged refusal rate at a few doses (``generate_at``),

each next to random neurons with the same count in every (layer, site) (``seeds``). The refusal-direction ablation,
when given, is the row that says how far refusal can be broken at all. Nothing here was used to find the neurons:
the prompts must be held out (the CLI takes the items identify did not use).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import PromptSetError, SSNError
from ssn_core.identify import select
from ssn_core.interventions import Intervention, intervene
from ssn_core.io import atomic_write_json, atomic_write_text, csv_text, writing_result_dir
from ssn_core.scoring import ScoreTable
from ssn_core.validation import random_matched

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

RESULT_KIND = "ssn-lab/faithfulness"
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.03)
COLUMNS: tuple[str, ...] = ("method", "language", "set", "p", "share", "n_neurons", "condition", "seed", "margin",
                            "margin_drop", "refusal", "refusal_drop", "n")


@dataclass
class FaithfulnessResult:
    rows: list[dict]  # COLUMNS
    manifest: dict = field(default_factory=dict)
    replies: list[dict] = field(default_factory=list)  # generated replies (language, method, p, condition, ...)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(COLUMNS))

    def summary(self) -> list[dict]:
        """Per method, language, set and dose: target drop, mean random drop and their difference."""
        out = []
        keys = dict.fromkeys((r["method"], r["language"], r["set"], r["p"]) for r in self.rows
                             if r["condition"] == "target")
        for method, language, which, p in keys:
            group = [r for r in self.rows if (r["method"], r["language"], r["set"], r["p"]) == (method, language,
                                                                                            which, p)]
            target = next(r for r in group if r["condition"] == "target")
            randoms = [r for r in group if r["condition"] == "random"]
            row = {"method": method, "language": language, "set": which, "p": p, "n_neurons": target["n_neurons"],
                   "share": target["share"], "margin_drop": target["margin_drop"],
                   "random_margin_drop": _mean([r["margin_drop"] for r in randoms]),
                   "refusal_drop": target["refusal_drop"],
                   "random_refusal_drop": _mean([r["refusal_drop"] for r in randoms if r["refusal_drop"] is not None])}
            row["margin_drop_vs_random"] = _minus(row["margin_drop"], row["random_margin_drop"])
            row["refusal_drop_vs_random"] = _minus(row["refusal_drop"], row["random_refusal_drop"])
            out.append(row)
        return out

    def chart(self):
        """Altair: margin drop vs share of scored neurons (log x), target solid, random dashed, the direction control
        as a grey rule; one facet per language (rows) and set (columns)."""
        import altair as alt
        import pandas as pd

        curves = pd.DataFrame([r for r in self.rows if r["condition"] in ("target", "random") and r["share"]])
        if curves.empty:
            return alt.Chart(pd.DataFrame({"share": [], "margin_drop": []})).mark_point()
        curves = curves.groupby(["method", "language", "set", "p", "share", "condition"], as_index=False)[
            "margin_drop"].mean()
        controls = [{**r, "set": which, "share": None} for r in self.rows if r["condition"] == "direction"
                    for which in sorted(set(curves["set"]))]
        frame = pd.concat([curves, pd.DataFrame(controls)], ignore_index=True) if controls else curves
        lines = alt.Chart().transform_filter(alt.datum.condition != "direction").mark_line(point=True).encode(
            x=alt.X("share:Q", scale=alt.Scale(type="log"), title="share of scored neurons switched off"),
            y=alt.Y("margin_drop:Q", title="drop of the refusal margin (nats)"),
            color=alt.Color("method:N"),
            strokeDash=alt.StrokeDash("condition:N", sort=["target", "random"]),
            tooltip=["method", "language", "set", "p", "share", "condition", "margin_drop"],
        )
        layers = [lines]
        if controls:
            layers.append(alt.Chart().transform_filter(alt.datum.condition == "direction").mark_rule(
                color="gray", strokeDash=[2, 2]).encode(y="margin_drop:Q", tooltip=["language", "margin_drop"]))
        return alt.layer(*layers, data=frame).facet(row=alt.Row("language:N"), column=alt.Column("set:N")).properties(
            title="Dose-response: the top neurons vs matched random neurons switched off (held-out prompts); "
                  "grey: refusal direction ablated")

    def save(self, directory: str | Path) -> Path:
        import json

        with writing_result_dir(directory, RESULT_KIND) as tmp:
            atomic_write_text(tmp / "curve.csv", csv_text(self.rows, COLUMNS))
            atomic_write_json(tmp / "curve.json", self.rows)
            atomic_write_json(tmp / "summary.json", self.summary())
            atomic_write_text(tmp / "replies.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.replies))
            atomic_write_text(tmp / "chart.html", self.chart().to_html())
            atomic_write_json(tmp / "manifest.json", self.manifest)
        return Path(directory).expanduser()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _minus(a, b):
    return None if a is None or b is None else a - b


def faithfulness(lm: LoadedModel, tables: dict[str, ScoreTable], prompts, languages: Sequence[str], *,
                 hr: Sequence[str] = ("en",), fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 ranking: str | dict[str, str] = "per-site",
                 seeds: Sequence[int] = (0,), generate_at: Sequence[float] = (), settings=None, judge=None,
                 direction: torch.Tensor | None = None, sets: Sequence[str] = ("ms", "ss"),
                 limit_per_language: int | None = None, batch_size: int = 8, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> FaithfulnessResult:
    """Dose-response of every table's MS/SS sets (see the module docstring). ``ranking``: one for all tables or one
    per table name. ``prompts``: held-out prompts; their harmful ones of each language are answered."""
    from ssn_core.generation import GenerationSettings
    from ssn_core.judges import MarkerJudge
    from ssn_core.refusal import refusal_margin
    from ssn_core.validation import Condition, run_packed

    if not tables:
        raise SSNError("no score tables to check")
    if not seeds:
        raise SSNError("faithfulness needs at least one random-control seed")
    for p in fractions:
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0 < p <= 1):
            raise SSNError(f"every dose must be a fraction in (0, 1], got {p}")
    unknown = [s for s in sets if s not in ("ms", "ss")]
    if unknown:
        raise SSNError(f"unknown set kind {unknown[0]!r}; expected ms and/or ss")
    settings = settings or GenerationSettings(max_new_tokens=32)
    judge = judge or MarkerJudge()
    items = list(getattr(prompts, "prompts", prompts))
    by_language = {lang: [p for p in items if p.language == lang and p.label == "harmful"][:limit_per_language]
                   for lang in languages}
    empty = [lang for lang, ps in by_language.items() if not ps]
    if empty:
        raise PromptSetError(f"no held-out harmful prompts in: {', '.join(empty)}")
    from ssn_core import distributed

    distributed.check_enough(sum(len(ps) for ps in by_language.values()), "held-out prompts")
    sites = lm.sites
    started = time.time()

    def margin(lang: str, intervention=None) -> torch.Tensor:
        check_cancel(cancel, "the faithfulness check was cancelled; nothing was written")
        texts = [p.text for p in by_language[lang]]
        if intervention is None:
            return refusal_margin(lm, texts, [lang] * len(texts), batch_size=batch_size)
        with intervene(lm, intervention):
            return refusal_margin(lm, texts, [lang] * len(texts), batch_size=batch_size)

    def refusal_rates(lang: str, conditions: list[Condition]) -> tuple[list[float], list[list[str]]]:
        texts = [p.text for p in by_language[lang]]
        replies = run_packed(lm, texts, conditions, settings, batch_size, cancel=cancel, judge=judge, language=lang)
        rates = []
        for j in range(len(conditions)):
            verdicts = judge.judge_many(texts, [replies[i][j] for i in range(len(texts))], [lang] * len(texts))
            rates.append(sum(v.label == "refusal" for v in verdicts) / len(verdicts))
        return rates, replies

    rows: list[dict] = []
    reply_rows: list[dict] = []
    baseline_margin = {lang: margin(lang) for lang in languages}
    baseline_refusal: dict[str, float] = {}
    if generate_at:
        for lang in languages:
            conditions = [Condition("baseline")]
            if direction is not None:
                conditions.append(Condition("direction", "refusal", direction=direction))
            base_rates, replies = refusal_rates(lang, conditions)
            baseline_refusal[lang] = base_rates[0]
            _keep_replies(reply_rows, lang, "baseline", None, conditions, by_language[lang], replies)
            if direction is not None:
                control_margin = margin(lang, _direction_intervention(direction))
                rows.append(_row("control", lang, "direction", None, None, 0, "direction", None, baseline_margin[lang],
                                 control_margin, base_rates[1], baseline_refusal[lang]))
    elif direction is not None:
        for lang in languages:
            rows.append(_row("control", lang, "direction", None, None, 0, "direction", None, baseline_margin[lang],
                             margin(lang, _direction_intervention(direction)), None, None))
    for lang in languages:
        rows.append(_row("baseline", lang, "-", None, 0.0, 0, "baseline", None, baseline_margin[lang],
                         baseline_margin[lang], baseline_refusal.get(lang), baseline_refusal.get(lang)))

    total_neurons = {name: sum(sites.get(0, k).size * sites.n_layers for k in table.kinds)
                     for name, table in tables.items()}
    steps = len(tables) * len(fractions) * len(languages)
    step = 0
    for name, table in tables.items():
        table_ranking = ranking[name] if isinstance(ranking, dict) else ranking
        for p in fractions:
            selection = select(table, [lang for lang in languages if lang not in hr], tuple(hr), p, table_ranking,
                               sites)
            for lang in languages:
                step += 1
                wanted = [("ms", selection["ms"].get(lang))]
                if lang not in hr:
                    wanted.append(("ss", selection["ss"].get(lang)))
                for which, neurons in wanted:
                    if which not in sets or neurons is None or len(neurons) == 0:
                        continue
                    share = len(neurons) / total_neurons[name]
                    controls = [random_matched(neurons, sites, seed=int(seed)) for seed in seeds]
                    target_margin = margin(lang, Intervention(neurons, scale=0.0))
                    random_margins = [margin(lang, Intervention(c, scale=0.0)) for c in controls]
                    rates: Sequence[float | None] = [None] * (1 + len(controls))
                    if any(math.isclose(p, g) for g in generate_at):
                        conditions = [Condition("suppress", which, neurons, scale=0.0)] + [
                            Condition("random", which, c, scale=0.0, seed=int(s))
                            for c, s in zip(controls, seeds, strict=True)]
                        rates, replies = refusal_rates(lang, conditions)
                        _keep_replies(reply_rows, lang, name, p, conditions, by_language[lang], replies)
                    rows.append(_row(name, lang, which, p, share, len(neurons), "target", None, baseline_margin[lang],
                                     target_margin, rates[0], baseline_refusal.get(lang)))
                    for seed, m, rate in zip(seeds, random_margins, rates[1:], strict=True):
                        rows.append(_row(name, lang, which, p, share, len(neurons), "random", int(seed),
                                         baseline_margin[lang], m, rate, baseline_refusal.get(lang)))
                if progress is not None:
                    progress(step, steps, f"{name} p={p:g} {lang}")
    from ssn_core.metrics import make_manifest

    manifest = make_manifest(settings, [judge], lm, kind="ssn-lab/faithfulness", methods=list(tables),
                             tables={name: {"method": t.method, "aggregate": t.aggregate}
                                     for name, t in tables.items()},
                             languages=list(languages), hr=list(hr), fractions=[float(f) for f in fractions],
                             ranking=ranking, seeds=[int(s) for s in seeds],
                             generate_at=[float(g) for g in generate_at],
                             prompts={lang: len(ps) for lang, ps in by_language.items()},
                             prompt_ids=sorted({p.id for ps in by_language.values() for p in ps}),
                             direction=direction is not None, seconds=round(time.time() - started, 1)).to_dict()
    return FaithfulnessResult(rows=rows, manifest=manifest, replies=reply_rows)


def _direction_intervention(direction: torch.Tensor):
    from ssn_core.direction import DirectionAblation

    return DirectionAblation(direction)


def _row(method, language, which, p, share, n_neurons, condition, seed, base_margin, margins, refusal, base_refusal):
    mean_margin = float(margins.mean()) if isinstance(margins, torch.Tensor) else float(margins)
    base = float(base_margin.mean()) if isinstance(base_margin, torch.Tensor) else float(base_margin)
    refusal_drop = None if refusal is None or base_refusal is None else base_refusal - refusal
    return {"method": method, "language": language, "set": which, "p": p, "share": share, "n_neurons": n_neurons,
            "condition": condition, "seed": seed, "margin": mean_margin, "margin_drop": base - mean_margin,
            "refusal": refusal, "refusal_drop": refusal_drop,
            "n": int(margins.numel()) if isinstance(margins, torch.Tensor) else None}


def _keep_replies(out: list[dict], language: str, method: str, p, conditions, prompts, replies) -> None:
    for i, prompt in enumerate(prompts):
        for j, condition in enumerate(conditions):
            out.append({"language": language, "method": method, "p": p, "condition": condition.key, "id": prompt.id,
                        "prompt": prompt.text, "reply": replies[i][j]})
