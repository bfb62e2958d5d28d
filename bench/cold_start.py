"""Cold start: first load of the starter (assemble the PyPI chunks, dequantize the GGUF, save the cache)
vs a later load from the safetensors cache.

Each load runs in a fresh process (``python -m bench.cold_start``) with ``SSN_CACHE`` pointing at a
temporary directory, so the first load really converts and the user's own cache is never touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from bench.common import (
    BenchConfig,
    BenchContext,
    BenchResult,
    Skipped,
    fmt_ratio,
    goal_text,
    load_bench_model,
    median,
    peak_rss_bytes,
    require,
    run_worker,
)


def worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cold_start")
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        lm = load_bench_model(BenchConfig(model=args.model, smoke=args.smoke))
    except Skipped as exc:
        print(json.dumps({"skipped": str(exc)}))
        return
    seconds = time.perf_counter() - start
    summary = getattr(lm, "summary", None)
    print(json.dumps({"seconds": seconds, "loaded_from": getattr(summary, "loaded_from", None),
                      "peak_rss": peak_rss_bytes()}))


def cold_start(ctx: BenchContext) -> BenchResult:
    cfg = ctx.config
    require("ssn_core.loading")
    if cfg.gpu:
        raise Skipped("cold-start measures the CPU-side GGUF conversion; run it without --gpu")
    if not cfg.smoke and not cfg.model.startswith("starter:"):
        raise Skipped(f"cold-start measures the starter's GGUF -> safetensors path; {cfg.model!r} is not a starter")
    cached_loads = cfg.pick(1, 1, 3)
    cache = tempfile.mkdtemp(prefix="ssn-bench-cache-")
    old = os.environ.get("SSN_CACHE")
    os.environ["SSN_CACHE"] = cache  # inherited by the workers
    args = ["--model", cfg.model] + (["--smoke"] if cfg.smoke else [])
    try:
        ctx.log(f"first load into an empty cache ({cache}): assemble + GGUF dequantize + save safetensors")
        first = run_worker("bench.cold_start", args, timeout=1800, in_process=cfg.smoke)
        cached = []
        for i in range(cached_loads):
            ctx.log(f"load {i + 1}/{cached_loads} from the safetensors cache")
            cached.append(run_worker("bench.cold_start", args, timeout=900, in_process=cfg.smoke))
    finally:
        if old is None:
            os.environ.pop("SSN_CACHE", None)
        else:
            os.environ["SSN_CACHE"] = old
        shutil.rmtree(cache, ignore_errors=True)
    cached_s = median([row["seconds"] for row in cached])
    ratio = first["seconds"] / cached_s
    result = BenchResult(
        name="cold-start",
        ratios={"first_load_vs_cached": ratio},
        goals={},
        summary="",
        details={"first_load_s": first["seconds"], "first_loaded_from": first["loaded_from"],
                 "cached_load_s": cached_s, "cached_loads": [row["seconds"] for row in cached],
                 "cached_loaded_from": cached[0]["loaded_from"], "peak_rss_first": first["peak_rss"],
                 "peak_rss_cached": cached[0]["peak_rss"]},
        notes=["times are whole load_model calls in a fresh process (python start-up and imports excluded)",
               "the issue sets no goal for this ratio; it documents what the cache buys"],
    )
    result.summary = (f"cold-start: first load (GGUF) {first['seconds']:.1f} s vs cached {cached_s:.1f} s = "
                      f"{fmt_ratio(ratio)} faster from the cache{goal_text(result, 'first_load_vs_cached')}")
    return result


if __name__ == "__main__":
    worker(sys.argv[1:])
