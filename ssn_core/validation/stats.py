"""What validation's replies show: rates per condition, each suppressed set against its random controls (the seeds'
spread, `compare_to_control`, and the paired per-prompt difference), the reinforce sweep with over-refusal, the
direction control's share, and SS-count vs baseline-ASR `correlation` (`summarize`)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ssn_core.validation.conditions import SUPPRESS_TARGETS


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
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
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


def _rates(verdicts: Sequence, language: str) -> dict:
    """ASR / refusal / off-target rates of one condition's verdicts, with bootstrap CIs (95%, seeded)."""
    from ssn_core.metrics import rate_table

    m = rate_table(verdicts, language, True, pooled=False)[language]
    return {"n": m.n_harmful, "asr": m.asr.value, "refusal": m.refusal.value, "off_target": m.off_target.value,
            "ci_low": m.asr.ci_low, "ci_high": m.asr.ci_high,
            "refusal_ci_low": m.refusal.ci_low, "refusal_ci_high": m.refusal.ci_high}


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
