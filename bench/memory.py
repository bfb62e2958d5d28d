"""Scoring memory: peak RSS while scoring a small vs a 10x larger prompt set (statistics stream, nothing cached).

Peak RSS only grows within a process, so each size runs in a fresh subprocess (``python -m bench.memory``,
see `worker`). Besides the process's whole-life peak (``ru_maxrss``, which includes model loading), the
worker samples RSS during scoring only: that is the figure the goal is about.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from bench.common import (
    BenchConfig,
    BenchContext,
    BenchResult,
    Skipped,
    current_rss_bytes,
    fmt_ratio,
    goal_text,
    load_bench_model,
    peak_rss_bytes,
    require,
    run_worker,
)
from bench.workloads import bench_prompts


class _RssSampler:
    """Highest RSS seen by a background thread polling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def worker(argv: list[str] | None = None) -> None:
    """Load the model, score ``--n`` prompts with all sites, print one JSON line with the memory figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--kinds", default="", help="comma-separated site kinds (default: all)")
    parser.add_argument("--distinct", type=int, default=0,
                        help="cycle through this many distinct prompts (0: all distinct)")
    args = parser.parse_args(argv)
    try:
        scoring = require("ssn_core.scoring")
        lm = load_bench_model(BenchConfig(model=args.model, smoke=args.smoke, gpu=args.gpu))
    except Skipped as exc:
        print(json.dumps({"skipped": str(exc)}))
        return
    # Cycling the small set keeps the longest batch identical at both sizes: the peak then changes only if
    # something accumulates with the prompt count (the per-batch transient follows the longest batch).
    base = bench_prompts(args.distinct or args.n)
    prompts = (base * (args.n // len(base) + 1))[: args.n]
    after_load = current_rss_bytes()
    peak_before = peak_rss_bytes()
    start = time.perf_counter()
    with _RssSampler() as sampler:
        kinds = tuple(args.kinds.split(",")) if args.kinds else lm.sites.kinds
        scoring.score(lm, prompts, method="impact", kinds=kinds, batch_size=args.batch_size)
    row = {
        "n": args.n,
        "kinds": list(kinds),
        "rss_after_load": after_load,
        "scoring_peak_rss": sampler.peak,
        "lifetime_peak_rss": peak_rss_bytes(),
        "lifetime_peak_before_scoring": peak_before,
        "scoring_s": round(time.perf_counter() - start, 2),
    }
    print(json.dumps(row))


def scoring_memory(ctx: BenchContext) -> BenchResult:
    cfg = ctx.config
    require("ssn_core.scoring")
    small, large = cfg.pick((2, 6), (8, 80), (100, 1000))
    batch_size = cfg.pick(4, 8, 8)
    # --quick scores the closed-form kinds only (q/k's exact recomputation is ~2x the cost of the rest);
    # the q/k transient buffers are per batch, so they do not change with the prompt count either way.
    kinds = cfg.pick("", "mlp,attn_v,attn_o", "")
    args = ["--model", cfg.model, "--batch-size", str(batch_size), "--kinds", kinds]
    args += ["--smoke"] if cfg.smoke else []
    args += ["--gpu"] if cfg.gpu else []
    rows = {}
    for n in (small, large):
        ctx.log(f"scoring {n} prompts in a fresh process")
        rows[n] = run_worker("bench.memory", [*args, "--n", str(n), "--distinct", str(small)],
                             timeout=cfg.pick(300, 900, 3600),
                             in_process=cfg.smoke)
    s, b = rows[small], rows[large]
    ratio = b["scoring_peak_rss"] / s["scoring_peak_rss"]
    growth_small = s["scoring_peak_rss"] - s["rss_after_load"]
    growth_large = b["scoring_peak_rss"] - b["rss_after_load"]
    mib = 2**20
    result = BenchResult(
        name="scoring-memory",
        ratios={"peak_rss": ratio, "lifetime_peak_rss": b["lifetime_peak_rss"] / s["lifetime_peak_rss"]},
        goals={"peak_rss": "<= 1.05"},
        summary="",
        batch=batch_size,
        details={"prompts": [small, large], "workers": {str(k): v for k, v in rows.items()},
                 "growth_above_loaded_model_mib": [round(growth_small / mib, 1), round(growth_large / mib, 1)]},
        notes=[(f"the {large} prompts cycle through the same {small} distinct prompts, so both sizes have the same "
                "longest batch"),
               f"{'quick/smoke mode: ' if cfg.mode != 'full' else ''}{small} vs {large} prompts "
               "(the goal is stated for 100 vs 1000)" + (f", kinds {kinds}" if kinds else ", all kinds"),
               ("peak_rss = highest RSS sampled every 20 ms while scoring (model included); lifetime_peak_rss = "
                "ru_maxrss, which also covers loading")],
    )
    result.summary = (f"scoring-memory: peak RSS {large} vs {small} prompts = {fmt_ratio(ratio)}"
                      f"{goal_text(result, 'peak_rss')} ({s['scoring_peak_rss'] / mib:.0f} -> "
                      f"{b['scoring_peak_rss'] / mib:.0f} MiB; growth above the loaded model "
                      f"{growth_small / mib:.0f} -> {growth_large / mib:.0f} MiB)")
    return result


if __name__ == "__main__":
    worker(sys.argv[1:])
