"""Explorer examples: top-k / bottom-k prompts of every neuron, streamed, vs a plain forward over the same prompts."""

from __future__ import annotations

from bench.common import BenchContext, BenchResult, alternate, fmt_ratio, goal_text, median, paired_ratio, require
from bench.workloads import batch_shape, bench_prompts, plain_forward

K = 5  # examples kept per neuron, language and label (the Explorer page's default)


def explorer_topk(ctx: BenchContext) -> BenchResult:
    """`top_examples.collect_top_examples` for every neuron of every site vs encoding + a plain base-model forward
    over the same prompts in the same batches (time ratio: 1.0 = collecting costs nothing on top)."""
    top_examples = require("ssn_core.top_examples")
    lm = ctx.lm
    cfg = ctx.config
    n_prompts, batch_size = cfg.pick(8, 32, 128), cfg.pick(4, 8, 8)
    prompts = bench_prompts(n_prompts)
    groups = list(dict.fromkeys((p.language, p.label) for p in prompts))

    def forward():
        for _, batch in top_examples.plan_batches(lm, prompts, groups, batch_size=batch_size):
            plain_forward(lm, batch)

    def collect():
        return top_examples.collect_top_examples(lm, prompts, k=K, batch_size=batch_size)

    ctx.log(f"{n_prompts} prompts in batches of {batch_size}, {len(groups)} (language, label) groups, "
            f"{lm.sites.total_neurons:,} neurons, {cfg.rounds} alternating rounds")
    times = alternate({"forward": forward, "collect": collect}, cfg.rounds)
    ratio = paired_ratio(times["collect"], times["forward"])
    examples = collect()
    state_bytes = sum(values.numel() * values.element_size() + index.numel() * index.element_size()
                      for store in (examples.top, examples.bottom) for per in store.values()
                      for values, index in per.values())
    B, T = batch_shape([batch for _, batch in top_examples.plan_batches(lm, prompts, groups, batch_size=batch_size)])
    result = BenchResult(
        name="explorer-topk",
        ratios={"collect_time": ratio},
        goals={"collect_time": "<= 1.3"},
        summary="",
        batch=B,
        seq_len=T,
        details={"prompts": n_prompts, "k": K, "groups": len(groups), "neurons": lm.sites.total_neurons,
                 "top_k_state_mib": round(state_bytes / 2**20, 1), "median_s": {k: median(v) for k, v in times.items()},
                 "times_s": times, "reference": "encode + base-model forward, same batches, no LM head"},
        notes=[("both sides encode the prompts; top and bottom k per neuron and group are kept (float32 values, "
                "int32 prompt indices), no per-token cache")],
    )
    result.summary = (f"explorer-topk: top/bottom-{K} examples of all {lm.sites.total_neurons:,} neurons over "
                      f"{n_prompts} prompts cost {fmt_ratio(ratio)} a plain forward{goal_text(result, 'collect_time')}"
                      f" (state {state_bytes / 2**20:.0f} MiB)")
    return result
