"""Causal validation: do the identified neurons carry safety, more than random neurons of the same shape?

For each language the same harmful prompts are answered under several conditions:

- ``baseline``         no intervention;
- ``suppress_ms``      the language's MS-Neurons set to 0;
- ``suppress_ss``      the language's SS-Neurons set to 0 (non-high-resource languages only);
- ``suppress_ss_all``  the union of all SS-Neurons set to 0;
- ``random_<target>``  as many random neurons as the target set has *in every (layer, site kind)*, set to 0,
                       for several seeds (the control: a big enough edit anywhere may break a small model);
- ``reinforce_ss``     the SS-Neurons (the union, for the high-resource language) scaled by alpha > 1.

Why packed batches: every (prompt, condition) pair is one row of one stream of batched generation, and each
condition is one `Intervention` whose ``rows`` mask selects its rows, so conditions share every forward pass instead
of costing one generation each (`run_packed`).

The evidence the paper needs is the *difference* to the control: `compare_to_control` says whether suppressing
the target lowers refusal by more than random suppression does, by more than the random seeds disagree.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ssn_core.errors import Cancelled, NeuronFileError, PromptSetError, SSNError
from ssn_core.interventions import Intervention, Shift, resolve_sites
from ssn_core.io import atomic_write_json, atomic_write_text, csv_text, writing_result_dir
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SiteMap

Progress = Callable[[int, int, str], None]

SUPPRESS_TARGETS: tuple[str, ...] = ("ms", "ss", "ss_all")
PARTS: tuple[str, ...] = ("suppress", "reinforce")


# ----------------------------------------------------------------------------------------------------------------
# Random control


def random_matched(neurons: NeuronSet, sites: SiteMap, seed: int, exclude: NeuronSet | None = None,
                   disjoint: bool = True) -> NeuronSet:
    """Random neurons with the same count per (layer, site kind) as ``neurons``.

    Drawn without replacement, disjoint from ``neurons`` (unless ``disjoint=False``) and from ``exclude``.
    The same (set, seed) gives the same draw on every machine: one CPU generator seeded with ``seed`` draws
    the (layer, kind) groups in the set's sorted order.
    """
    generator = torch.Generator().manual_seed(int(seed))
    drawn: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, kind), target in neurons.neurons.items():
        if (layer, kind) not in sites.sites:
            raise NeuronFileError(f"the neuron set has {kind} neurons in layer {layer}, which this model lacks")
        size = sites.get(layer, kind).size
        allowed = torch.ones(size, dtype=torch.bool)  # [N]
        if disjoint:
            allowed[target] = False
        if exclude is not None:
            allowed[exclude.get(layer, kind)] = False
        candidates = allowed.nonzero().flatten()
        count = int(target.numel())
        if candidates.numel() < count:
            raise SSNError(
                f"cannot draw {count} random {kind} neurons in layer {layer}: that site has {size} neurons and only "
                f"{candidates.numel()} are outside the target set" + (" and the excluded set" if exclude else "")
                + "; the target set covers too much of the site for a disjoint random control"
            )
        pick = torch.randperm(candidates.numel(), generator=generator)[:count]
        drawn[(layer, kind)] = candidates[pick]
    meta = {"method": "random_matched", "seed": int(seed), "matched_to": neurons.meta.get("name", ""),
            "disjoint": bool(disjoint)}
    for key in ("model_fingerprint", "model_type", "n_layers", "sizes"):
        if key in neurons.meta:
            meta[key] = neurons.meta[key]
    return NeuronSet(drawn, meta)


# ----------------------------------------------------------------------------------------------------------------
# Statistics helpers


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get their average rank (as in Spearman's rho)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def correlation(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Pearson and Spearman correlation of paired values.

    Returns {"n", "pearson", "spearman", "note"}; the coefficients are None (and the note says why) with fewer
    than 3 pairs or when one side is constant.
    """
    if len(xs) != len(ys):
        raise ValueError(f"correlation needs paired values, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n < 3:
        return {"n": n, "pearson": None, "spearman": None,
                "note": f"undefined: needs at least 3 languages, got {n}"}
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    pearson = _pearson(xs, ys)
    spearman = _pearson(_ranks(xs), _ranks(ys))
    note = "" if pearson is not None else "undefined: one of the two series is constant"
    return {"n": n, "pearson": pearson, "spearman": spearman, "note": note}


def compare_to_control(baseline_refusal: float, target_refusal: float, random_refusals: Sequence[float]) -> dict:
    """Does suppressing the target lower refusal more than random suppression, beyond the seeds' spread?

    drop = baseline refusal - refusal under the condition. The target *beats the control* when
    ``drop_target - mean(drop_random) > max(random) - min(random)``: the effect is larger than the disagreement
    between random draws. With a single seed the spread is 0, so any larger drop counts; use several seeds.
    """
    if not random_refusals:
        raise ValueError("compare_to_control needs at least one random-control refusal rate")
    randoms = [float(r) for r in random_refusals]
    mean = sum(randoms) / len(randoms)
    std = statistics.stdev(randoms) if len(randoms) > 1 else 0.0
    spread = max(randoms) - min(randoms)
    drop_target = baseline_refusal - target_refusal
    drop_random = baseline_refusal - mean
    margin = drop_target - drop_random
    return {
        "baseline_refusal": baseline_refusal,
        "target_refusal": target_refusal,
        "random_refusal_mean": mean,
        "random_refusal_std": std,
        "random_refusal_min": min(randoms),
        "random_refusal_max": max(randoms),
        "random_seeds": len(randoms),
        "drop_target": drop_target,
        "drop_random_mean": drop_random,
        "margin": margin,
        "spread": spread,
        "beats_random": margin > spread,
    }


def _harmless_rates(verdicts: Sequence, language: str) -> dict:
    """Over-refusal on harmless prompts, in the table's columns (``refusal`` = over-refusal, ASR not defined)."""
    from ssn_core.metrics import Rate

    hits = [getattr(v, "label", v) == "refusal" for v in verdicts]
    off = [getattr(v, "label", v) == "off_target" for v in verdicts]
    refusal, off_target = Rate.of(hits), Rate.of(off)
    return {"n": len(hits), "asr": None, "refusal": refusal.value, "off_target": off_target.value,
            "ci_low": None, "ci_high": None, "refusal_ci_low": refusal.ci_low, "refusal_ci_high": refusal.ci_high}


def _offset_progress(progress: Progress | None, offset: int, total: int) -> Callable[[int, int, str], None]:
    def report(done: int, _total: int, message: str) -> None:
        if progress is not None:
            progress(offset + done, total, message)
    return report


def _rates(verdicts: Sequence, language: str) -> dict:
    """ASR / refusal / off-target rates of one condition's verdicts, with bootstrap CIs (95%, seeded)."""
    from ssn_core.metrics import rate_table

    m = rate_table(verdicts, language, True, pooled=False)[language]
    return {"n": m.n_harmful, "asr": m.asr.value, "refusal": m.refusal.value, "off_target": m.off_target.value,
            "ci_low": m.asr.ci_low, "ci_high": m.asr.ci_high,
            "refusal_ci_low": m.refusal.ci_low, "refusal_ci_high": m.refusal.ci_high}


# ----------------------------------------------------------------------------------------------------------------
# Conditions and packed generation


@dataclass(frozen=True, eq=False)
class Condition:
    """One way of running the model: ``kind`` baseline | suppress | random | reinforce, on ``target`` set."""

    kind: str  # baseline | suppress | random | reinforce | direction
    target: str = ""  # "" (baseline), "ms", "ss", "ss_all", "refusal" (direction)
    neurons: NeuronSet | None = None
    scale: float = 1.0
    seed: int | None = None
    alpha: float | None = None
    direction: torch.Tensor | None = None  # kind "direction": projected out of the residual stream
    offsets: dict | None = None  # kind "shift": added to the neurons (β times their mean harmful activation)

    @property
    def name(self) -> str:
        return "baseline" if self.kind == "baseline" else f"{self.kind}_{self.target}"

    @property
    def key(self) -> str:
        """Unique within a language: name plus seed / alpha."""
        suffix = f"#seed{self.seed}" if self.seed is not None else (f"@{self.alpha:g}" if self.alpha is not None else "")
        return self.name + suffix

    @property
    def n_neurons(self) -> int:
        return 0 if self.neurons is None else len(self.neurons)


def run_packed(lm, texts: Sequence[str], conditions: Sequence[Condition], settings, batch_size: int = 8,
               progress: Progress | None = None, cancel: threading.Event | None = None,
               message: str = "", *, judge=None, language: str | None = None) -> list[list[str]]:
    """Replies of every text under every condition: ``result[i][j]`` = text i under condition j.

    Every (text, condition) pair is one row of `ssn_core.generation.generate_many`, with at most ``batch_size`` rows
    in any forward pass. Each condition with neurons (scaled or shifted by offsets) or a direction becomes one
    intervention whose row mask selects its rows, so a batch mixing conditions costs one multiply per site. Rows run longest prompt first (the conditions
    of one text next to each other), the prompts' common prefix (system prompt, chat template) is run once per
    condition, and a finished row's place goes to a waiting one, so no step is spent on a finished reply.

    With ``settings.stop_at_verdict`` and a ``judge`` that can tell (``judge.settled``, e.g. `MarkerJudge`), a reply
    ends as soon as its verdict can no longer change (``language``: what the judge is given for these texts); the
    verdicts are those of the full replies, the replies are shorter.

    Under a launch (`ssn_core.distributed`) the rows are cut text-major into batches of ``batch_size``, each process
    generates its share of them (each batch through `generate_many`), and the replies are gathered in order.
    """
    from ssn_core import distributed
    from ssn_core.generation import generate_many

    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    if cancel is not None and cancel.is_set():
        raise Cancelled("validation was cancelled")
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(conditions))]
    replies: list[list[str]] = [[""] * len(conditions) for _ in texts]
    if not pairs:
        return replies

    def interventions_of(rows_pairs) -> list:
        out = []
        for j, condition in enumerate(conditions):
            rows = [cj == j for _, cj in rows_pairs]
            if not any(rows):
                continue
            if condition.direction is not None:
                from ssn_core.direction import DirectionAblation

                out.append(DirectionAblation(condition.direction, rows=rows, label=condition.key))
            elif condition.offsets is not None:
                out.append(Shift(condition.neurons, condition.offsets, rows=rows, label=condition.key))
            elif condition.neurons is not None and len(condition.neurons):
                out.append(Intervention(condition.neurons, scale=condition.scale, rows=rows, label=condition.key))
        return out

    def replies_of(rows_pairs, report=None) -> list[str]:
        stop = None
        if getattr(settings, "stop_at_verdict", False) and hasattr(judge, "settled"):
            def stop(row: int, reply: str) -> bool:
                return judge.settled(texts[rows_pairs[row][0]], reply, language)

        return generate_many(lm, [texts[i] for i, _ in rows_pairs], settings, batch_size=batch_size,
                             interventions=interventions_of(rows_pairs), stop=stop, progress=report, cancel=cancel)

    total = math.ceil(len(pairs) / batch_size)  # progress in batches' worth of replies, as callers count it
    if distributed.world().active:
        # Under a launch each process generates its share of the packed batches of ``batch_size`` rows (text-major,
        # as `distributed.run_batches` splits them), each batch through `generate_many`.
        def run_batch(b: int) -> list[str]:
            if cancel is not None and cancel.is_set():
                raise Cancelled("validation was cancelled")
            return replies_of(pairs[b * batch_size:(b + 1) * batch_size])

        def report_batches(done: int) -> None:
            if progress is not None:
                progress(done, total, f"{message}generating replies, batch {done}/{total}")

        outputs = [reply for batch in distributed.run_batches(total, run_batch, after=report_batches,
                                                              what="generating validation replies")
                   for reply in batch]
    else:
        reported = [0]

        def report(done: int, n_rows: int) -> None:
            batches = total if done == n_rows else done // batch_size
            if progress is not None and batches > reported[0]:
                reported[0] = batches
                progress(batches, total, f"{message}generating replies, batch {batches}/{total}")

        outputs = replies_of(pairs, report)
    for (i, j), reply in zip(pairs, outputs, strict=True):
        replies[i][j] = reply
    return replies


def shift_offsets(neurons: NeuronSet, activations, hr_language: str, beta: float) -> dict:
    """β times each neuron's mean activation on the HR language's harmful prompts: the additive reinforcement
    ("make the neuron act as it does when English refuses, β times over"). ``activations``: an activation
    `ScoreTable` (its ``signed`` means), as `identify(..., activation_means=True)` keeps."""
    signed = (activations.signed or {}).get((hr_language, "harmful")) if activations is not None else None
    if signed is None:
        raise SSNError(f"the additive reinforcement needs the neurons' mean activations on {hr_language} harmful "
                       "prompts (identify with activation means; `ssn identify` keeps them)")
    return {(layer, kind): float(beta) * signed[kind][layer, indices]
            for (layer, kind), indices in neurons.neurons.items()}


def plan_conditions(neurons, language: str, sites: SiteMap, alphas: Sequence[float] = (2.0,),
                    seeds: Sequence[int] = (0, 1, 2), hr_language: str = "en",
                    direction: torch.Tensor | None = None, betas: Sequence[float] = (),
                    parts: Sequence[str] = PARTS) -> tuple[list[Condition], list[str]]:
    """The conditions run for one language, and notes on the ones skipped (empty neuron sets).

    ``direction``: the refusal direction, run as the positive control ``direction_refusal``. ``betas``: additive
    reinforcement ``shift_<target>`` of the same set the scale reinforcement uses (`shift_offsets`). ``parts``:
    ``suppress`` (the control, suppressed sets and their random controls) and/or ``reinforce`` (the scale and
    additive reinforcement); the baseline is always run.
    """
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise SSNError(f"validation parts must be some of {', '.join(PARTS)}, got {', '.join(parts) or 'none'}")
    conditions, notes = _plan_all(neurons, language, sites, alphas, seeds, hr_language, direction, betas)
    keep = {"baseline"} | ({"direction", "suppress", "random"} if "suppress" in parts else set()) | (
        {"reinforce", "shift"} if "reinforce" in parts else set())
    return [c for c in conditions if c.kind in keep], notes


def _plan_all(neurons, language: str, sites: SiteMap, alphas: Sequence[float], seeds: Sequence[int],
              hr_language: str, direction: torch.Tensor | None, betas: Sequence[float]
              ) -> tuple[list[Condition], list[str]]:
    conditions = [Condition("baseline")]
    if direction is not None:
        conditions.append(Condition("direction", "refusal", direction=direction))
    notes: list[str] = []
    if language not in neurons.ms:
        known = ", ".join(neurons.ms) or "none"
        notes.append(f"{language}: the neuron result has no MS-Neurons for this language (it has {known}); "
                     "run identify with this language to suppress its own sets")
    targets: list[tuple[str, NeuronSet | None]] = [("ms", neurons.ms.get(language))]
    if language != hr_language:
        targets.append(("ss", neurons.ss.get(language)))
    targets.append(("ss_all", neurons.ss_all))
    for target, neuron_set in targets:
        if neuron_set is None or len(neuron_set) == 0:
            notes.append(f"{language}: no {target.upper().replace('_ALL', ' (all)')} neurons; "
                         f"suppress_{target} skipped")
            continue
        neuron_set.validate(sites)
        conditions.append(Condition("suppress", target, neuron_set, scale=0.0))
        for seed in seeds:
            control = random_matched(neuron_set, sites, seed=seed)
            conditions.append(Condition("random", target, control, scale=0.0, seed=int(seed)))
    own_ss = neurons.ss.get(language) if language != hr_language else None
    reinforce_target, reinforce_set = ("ss", own_ss) if own_ss is not None and len(own_ss) else ("ss_all",
                                                                                              neurons.ss_all)
    if reinforce_set is not None and len(reinforce_set):
        for alpha in alphas:
            if alpha < 0:
                raise SSNError(f"reinforcement scale must be >= 0, got {alpha}")
            conditions.append(Condition("reinforce", reinforce_target, reinforce_set, scale=float(alpha),
                                        alpha=float(alpha)))
        for beta in betas:
            offsets = shift_offsets(reinforce_set, getattr(neurons, "activations", None), hr_language, beta)
            conditions.append(Condition("shift", reinforce_target, reinforce_set, alpha=float(beta), offsets=offsets))
    else:
        notes.append(f"{language}: no SS-Neurons to reinforce")
    return conditions, notes


# ----------------------------------------------------------------------------------------------------------------
# Result


RESULT_KIND = "ssn-lab/validation"  # manifest kind of an `ssn validate --out` folder
TABLE_COLUMNS: tuple[str, ...] = ("language", "label", "condition", "target", "seed", "alpha", "n_neurons", "n", "asr",
                                  "refusal", "off_target", "ci_low", "ci_high", "refusal_ci_low", "refusal_ci_high")
ROW_COLUMNS: tuple[str, ...] = ("language", "label", "condition", "seed", "alpha", "id", "prompt", "reply", "verdict",
                                "reason")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


@dataclass
class ValidationResult:
    table: list[dict]  # one row per (language, condition, seed, alpha): TABLE_COLUMNS
    rows: list[dict]  # one row per (prompt, condition): ROW_COLUMNS
    summary: dict  # {"languages": {lang: {target: compare_to_control(...)}}, "reinforce", "correlation", "notes"}
    manifest: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """table.csv/json, rows.jsonl, summary.json, manifest.json as one folder, replaced as a whole (an existing
        folder only when it is an earlier validation: `ssn_core.io.check_out_dir`)."""
        import json

        with writing_result_dir(out_dir, RESULT_KIND) as tmp:
            atomic_write_text(tmp / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))
            atomic_write_text(tmp / "table.csv", csv_text(self.table, TABLE_COLUMNS))
            atomic_write_json(tmp / "table.json", self.table)
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_write_json(tmp / "manifest.json", self.manifest)
        return Path(out_dir).expanduser()

    def format_table(self) -> str:
        """Plain-text table: random seeds collapsed into mean ± std [min-max]."""
        lines = [f"{'lang':<5} {'condition':<26} {'neurons':>8} {'n':>4} {'ASR':>17} {'refusal':>22} {'off':>5}"]
        for language in dict.fromkeys(r["language"] for r in self.table):
            entries = [r for r in self.table if r["language"] == language]
            seen: set[str] = set()
            for r in entries:
                name = r["condition"] + ("" if r["alpha"] is None else (
                    f" +{r['alpha']:g}·mean" if r["condition"].startswith("shift_") else f" x{r['alpha']:g}"))
                if r.get("label") == "harmless":
                    name = f"{name} [harmless]"
                if r["condition"].startswith("random_"):
                    if name in seen:
                        continue
                    seen.add(name)
                    group = [e for e in entries if e["condition"] == r["condition"]]
                    refusals = [e["refusal"] for e in group]
                    asrs = [e["asr"] for e in group]
                    std = statistics.stdev(refusals) if len(refusals) > 1 else 0.0
                    asr = f"{sum(asrs) / len(asrs):.2f}"
                    refusal = (f"{sum(refusals) / len(refusals):.2f}±{std:.2f} "
                               f"[{min(refusals):.2f}-{max(refusals):.2f}]")
                    off = f"{sum(e['off_target'] for e in group) / len(group):.2f}"
                    name += f" ({len(group)} seeds)"
                else:
                    asr = f"{_fmt(r['asr'])} [{_fmt(r['ci_low'])}-{_fmt(r['ci_high'])}]"
                    refusal, off = _fmt(r["refusal"]), _fmt(r["off_target"])
                lines.append(f"{language:<5} {name:<26} {r['n_neurons']:>8} {r['n']:>4} {asr:>17} {refusal:>22} "
                             f"{off:>5}")
        lines.append("[harmless] rows: the refusal column is over-refusal on harmless prompts")
        for language, targets in self.summary.get("languages", {}).items():
            control = self.summary.get("direction", {}).get(language)
            if control is not None:
                lines.append(f"{language}: refusal-direction control: refusal {control['baseline_refusal']:.2f} -> "
                             f"{control['refusal']:.2f} (drop {control['drop']:+.2f})")
            for target, comparison in targets.items():
                verdict = "beats" if comparison["beats_random"] else "does NOT beat"
                line = (f"{language}: suppress_{target} {verdict} the random control (refusal drop "
                        f"{comparison['drop_target']:+.2f} vs {comparison['drop_random_mean']:+.2f}")
                paired = comparison.get("paired")
                if paired:
                    line += (f"; difference {paired['mean']:+.2f} [95% CI {paired['ci_low']:+.2f}, "
                             f"{paired['ci_high']:+.2f}], p = {paired['p_value']:.3g}, n = {paired['n']}")
                else:
                    line += f", seed spread {comparison['spread']:.2f}"
                share = comparison.get("share_of_direction")
                if share is not None:
                    line += f"; {share:.0%} of the direction control's drop"
                lines.append(line + ")")
                if paired and paired.get("note"):
                    lines.append(f"    note: {paired['note']}")
        corr = self.summary.get("correlation", {})
        if corr:
            if corr.get("pearson") is None:
                lines.append(f"SS-count vs baseline ASR: {corr.get('note')}")
            else:
                lines.append(f"SS-count vs baseline ASR over {corr['n']} languages: Pearson {corr['pearson']:+.2f}, "
                             f"Spearman {corr['spearman']:+.2f}")
        for note in self.summary.get("notes", []):
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _refusal_by_prompt(rows: Sequence[dict], language: str, condition: str, label: str = "harmful"
                       ) -> dict[str, list[float]]:
    """prompt id -> refusal indicators (one per seed) of a condition, from the per-reply rows."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["language"] == language and r["condition"] == condition and r.get("label", "harmful") == label:
            out.setdefault(str(r["id"]), []).append(1.0 if r["verdict"] == "refusal" else 0.0)
    return out


def paired_control_difference(rows: Sequence[dict], language: str, target: str) -> dict | None:
    """Per prompt: mean refusal under the random controls minus refusal under the target (how much further the target
    lowers refusal than random neurons of its shape), with bootstrap CI and sign-flip p-value (`paired_difference`)."""
    from ssn_core.metrics import paired_difference

    target_refusal = _refusal_by_prompt(rows, language, f"suppress_{target}")
    random_refusal = _refusal_by_prompt(rows, language, f"random_{target}")
    ids = [i for i in target_refusal if i in random_refusal]
    if not ids:
        return None
    diffs = [sum(random_refusal[i]) / len(random_refusal[i]) - target_refusal[i][0] for i in ids]
    return paired_difference(diffs).to_dict()


def summarize(table: Sequence[dict], ss_counts: dict[str, int], rows: Sequence[dict] | None = None) -> dict:
    """Control comparisons per language and target, the reinforce sweep (with over-refusal on harmless prompts),
    the refusal-direction control and each target's share of it, and SS-count vs baseline-ASR correlation.

    With ``rows`` (the per-reply rows), each comparison also carries the paired per-prompt difference to the
    random control with its bootstrap CI and permutation p-value, and ``beats_random`` means that CI excludes 0.
    """
    languages: dict[str, dict] = {}
    reinforce: dict[str, list[dict]] = {}
    direction: dict[str, dict] = {}
    baseline_asr: dict[str, float] = {}
    harmful_table = [r for r in table if r.get("label", "harmful") == "harmful"]
    harmless_table = [r for r in table if r.get("label") == "harmless"]
    for language in dict.fromkeys(r["language"] for r in harmful_table):
        entries = [r for r in harmful_table if r["language"] == language]
        base = next((r for r in entries if r["condition"] == "baseline"), None)
        if base is None:
            continue
        baseline_asr[language] = base["asr"]
        control = next((r for r in entries if r["condition"] == "direction_refusal"), None)
        control_drop = None if control is None else base["refusal"] - control["refusal"]
        if control is not None:
            direction[language] = {"baseline_refusal": base["refusal"], "refusal": control["refusal"],
                                   "drop": control_drop, "asr": control["asr"]}
        comparisons = {}
        for target in SUPPRESS_TARGETS:
            target_row = next((r for r in entries if r["condition"] == f"suppress_{target}"), None)
            randoms = [r["refusal"] for r in entries if r["condition"] == f"random_{target}"]
            if target_row is None or not randoms:
                continue
            comparison = compare_to_control(base["refusal"], target_row["refusal"], randoms)
            if rows is not None:
                paired = paired_control_difference(rows, language, target)
                if paired is not None:
                    comparison["paired"] = paired
                    comparison["beats_random"] = bool(paired["excludes_zero"])
            if control_drop is not None:
                comparison["share_of_direction"] = (comparison["drop_target"] / control_drop if control_drop > 0
                                                    else None)
            comparisons[target] = comparison
        languages[language] = comparisons
        harmless_base = next((r for r in harmless_table if r["language"] == language and r["condition"] == "baseline"),
                             None)
        sweep = []
        for r in entries:
            if not r["condition"].startswith(("reinforce_", "shift_")):
                continue
            point = {"form": "scale" if r["condition"].startswith("reinforce_") else "add", "target": r["target"],
                     "alpha": r["alpha"], "refusal": r["refusal"], "asr": r["asr"],
                     "refusal_gain": r["refusal"] - base["refusal"]}
            over = next((h for h in harmless_table if h["language"] == language and h["condition"] == r["condition"]
                         and h["alpha"] == r["alpha"]), None)
            if over is not None and harmless_base is not None:
                point.update(over_refusal=over["refusal"], over_refusal_baseline=harmless_base["refusal"],
                             over_refusal_change=over["refusal"] - harmless_base["refusal"])
            sweep.append(point)
        reinforce[language] = sweep
    corr_languages = [lang for lang in baseline_asr if lang in ss_counts]
    corr = correlation([ss_counts[lang] for lang in corr_languages], [baseline_asr[lang] for lang in corr_languages])
    corr.update(languages=corr_languages, ss_counts={lang: ss_counts[lang] for lang in corr_languages},
                baseline_asr={lang: baseline_asr[lang] for lang in corr_languages},
                expected="the paper reports a strong negative correlation (more SS-Neurons, lower ASR)")
    return {"languages": languages, "reinforce": reinforce, "direction": direction, "correlation": corr}


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def validate(lm, neurons, prompts, languages: Sequence[str], settings, alphas: Sequence[float] = (2.0,),
             seeds: Sequence[int] = (0, 1, 2), judge=None, batch_size: int = 8, limit_per_language: int | None = None,
             hr_language: str | None = None, direction: torch.Tensor | None = None, over_refusal: bool = True,
             betas: Sequence[float] = (), parts: Sequence[str] = PARTS, progress: Progress | None = None,
             cancel: threading.Event | None = None) -> ValidationResult:
    """Run every condition on the harmful prompts of each language and compare with the random controls.

    ``neurons``: an `IdentifyResult` (anything with ``.ms`` / ``.ss`` {language: NeuronSet} and ``.ss_all``).
    ``prompts``: a `PromptSet`; its harmful prompts of each language are used (``limit_per_language`` each), and with
    ``over_refusal`` its harmless prompts answer the baseline and reinforce conditions (over-refusal).
    ``hr_language``: the high-resource language (no SS set of its own); default: the neuron result's first HR
    language, else English. ``direction`` ([hidden]): the refusal direction, run as a positive control (default:
    the neuron result's own, when it has one; ``False``: none). ``betas``: additive reinforcement strengths
    (`shift_offsets`), beside the scale reinforcement ``alphas``.
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
        direction = neurons.direction.unit
    plans = {lang: plan_conditions(neurons, lang, sites, alphas, seeds, hr_language, direction, betas, parts)
             for lang in languages}
    harmless_by_language: dict[str, list] = {lang: [] for lang in languages}
    if over_refusal:
        for p in prompts.select(languages=languages, label="harmless", limit_per_language=limit_per_language) \
                if "harmless" in prompts.labels else ():
            harmless_by_language[p.language].append(p)
    harmless_plans = {lang: [c for c in plans[lang][0] if c.kind in ("baseline", "reinforce", "shift")]
                      for lang in languages}
    harmless_plans = {lang: plan if len(plan) > 1 else [] for lang, plan in harmless_plans.items()}  # no reinforce
    total_batches = sum(math.ceil(len(by_language[lang]) * len(plans[lang][0]) / batch_size)
                        + math.ceil(len(harmless_by_language[lang]) * len(harmless_plans[lang]) / batch_size)
                        for lang in languages)
    from ssn_core import distributed

    distributed.check_enough(sum(len(by_language[lang]) * len(plans[lang][0]) + len(harmless_by_language[lang])
                                 * len(harmless_plans[lang]) for lang in languages),
                             "packed validation rows (prompts x conditions)")
    done_before = 0
    started = time.time()
    if progress is not None:  # the first batch can take a minute: say what is happening before it
        progress(0, total_batches, f"{languages[0]}: generating replies")
    table: list[dict] = []
    rows: list[dict] = []
    notes: list[str] = []
    for lang in languages:
        conditions, lang_notes = plans[lang]
        notes.extend(lang_notes)
        items = by_language[lang]

        lang_progress = _offset_progress(progress, done_before, total_batches)
        for label, label_items, label_conditions in (("harmful", items, conditions),
                                                     ("harmless", harmless_by_language[lang], harmless_plans[lang])):
            if not label_items or not label_conditions:
                continue
            replies = run_packed(lm, [p.text for p in label_items], label_conditions, settings, batch_size,
                                 lang_progress, cancel, message=f"{lang} {label}: ")
            done_before += math.ceil(len(label_items) * len(label_conditions) / batch_size)
            lang_progress = _offset_progress(progress, done_before, total_batches)
            for j, condition in enumerate(label_conditions):
                condition_replies = [replies[i][j] for i in range(len(label_items))]
                verdicts = judge.judge_many([p.text for p in label_items], condition_replies,
                                            [lang] * len(label_items), cancel=cancel)
                for prompt, reply, verdict in zip(label_items, condition_replies, verdicts):
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
        parts=list(parts),
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
