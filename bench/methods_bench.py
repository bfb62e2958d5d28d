"""The causal-neuron methods (issue 11) vs a plain forward over the same prompts: what each costs.

Throughput ratio = plain forward time / method time (1.0 = free on top of the forward; 0.25 = four forwards). The
gradient methods keep every carrier in the graph and run backward passes (``global:K``: K of them), attribution
also teacher-forces the refusal and compliance openings, direction scores ride on one forward, and the refusal
margin (the dose-response curves' measure) is one forward plus the openings on a shared cache.
"""

from __future__ import annotations

from bench.common import BenchContext, BenchResult, alternate, fmt_ratio, median, paired_ratio, require
from bench.workloads import batch_shape, bench_prompts, plain_forward, scoring_batches


def methods_vs_forward(ctx: BenchContext) -> BenchResult:
    attribution = require("ssn_core.attribution")
    direction_mod = require("ssn_core.direction")
    refusal = require("ssn_core.refusal")
    lm = ctx.lm
    cfg = ctx.config
    n_prompts, batch_size = cfg.pick(2, 8, 32), cfg.pick(2, 8, 8)
    batches = scoring_batches(lm, n_prompts=n_prompts, batch_size=batch_size, aggregate="last")
    items = bench_prompts(n_prompts)
    item_batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    kinds = lm.sites.kinds
    writers = tuple(k for k in kinds if k not in ("attn_q", "attn_k"))
    english = require("ssn_core.prompts").load_builtin(["en"]).prompts  # the direction needs both labels
    per_label = max(4, n_prompts // 2)
    direction_items = ([p for p in english if p.label == "harmful"][:per_label]
                       + [p for p in english if p.label == "harmless"][:per_label])
    directions, _ = direction_mod.difference_of_means(lm, direction_items, batch_size=batch_size)

    def run_forward():
        for batch in batches:
            plain_forward(lm, batch)

    def run_global(k: int):
        def fn():
            for batch in batches:
                attribution.global_batch(lm, batch, kinds, projections=k)
        return fn

    def run_attribution():
        for chunk in item_batches:
            attribution.attribution_batch(lm, chunk, kinds)

    def run_direction():
        for batch in batches:
            direction_mod.direction_batch(lm, batch, writers, directions)

    def run_margin():
        for chunk in item_batches:
            refusal.refusal_margin(lm, [p.text for p in chunk], [p.language for p in chunk], batch_size=batch_size)

    fns = {"forward": run_forward, "global:1": run_global(1), "global:4": run_global(4),
           "attribution": run_attribution, "direction": run_direction, "refusal_margin": run_margin}
    ctx.log(f"{len(batches)} batches of {batch_size}, {cfg.rounds} alternating rounds of {', '.join(fns)}")
    times = alternate(fns, cfg.rounds, warm=["forward", "direction"])
    ratios = {name: paired_ratio(times["forward"], times[name]) for name in fns if name != "forward"}
    B, T = batch_shape(batches)
    result = BenchResult(
        name="methods-vs-forward", ratios=ratios, goals={}, summary="", batch=B, seq_len=T,
        details={"median_s": {k: median(v) for k, v in times.items()}, "times_s": times,
                 "n_batches": len(batches), "sites": list(kinds), "direction_sites": list(writers),
                 "reference": "base-model forward, no LM head; throughput ratio = forward time / method time"})
    result.summary = "methods-vs-forward: " + " ".join(f"{k}={fmt_ratio(v)}" for k, v in ratios.items())
    return result
