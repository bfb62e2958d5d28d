"""Entry point: ``python -m bench [--quick] [--model SPEC] [--only NAME,...] [--gpu]``.

Runs the named benchmarks in order, each printing its ratio(s) on its last line and appending a row to
``bench/results/<name>.json``. A benchmark whose engine part is missing, or that needs CUDA without
one, prints ``skipped: <why>`` and the run goes on.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.common import GPU_MODEL, STARTER, BenchConfig, BenchContext, BenchResult, Skipped, write_row


def _registry() -> dict[str, tuple[Callable[[BenchContext], BenchResult], str]]:
    from bench.cold_start import cold_start
    from bench.explorer_bench import explorer_topk
    from bench.hook_overhead import hook_overhead
    from bench.memory import scoring_memory
    from bench.methods_bench import methods_vs_forward
    from bench.scoring_bench import scoring_vs_ablation, scoring_vs_forward, scoring_vs_peer
    from bench.step_cost import step_cost
    from bench.train_step import train_step
    from bench.validation_bench import validation_throughput

    return {
        "scoring-vs-forward": (scoring_vs_forward, "all-site impact scoring vs a plain forward (goal >= 0.85x)"),
        "scoring-vs-ablation": (scoring_vs_ablation, "impact scoring vs exact per-neuron ablation (goal >= 1000x)"),
        "scoring-vs-peer": (scoring_vs_peer, "capture+reduce: ours vs nnsight (goal >= 1.0x)"),
        "scoring-memory": (scoring_memory, "peak RSS at 10x more prompts (goal <= 1.05x)"),
        "hook-overhead": (hook_overhead, "generation with a 0.3% suppression set; A/B batched (>= 0.97x, <= 1.3x)"),
        "validation-throughput": (validation_throughput, ("validation/evaluation replies per second, new vs old path "
                                  "(goal >= 2x)")),
        "step-cost": (step_cost, "a decoding step's cost by rows in flight, plain vs packed weights"),
        "train-step": (train_step, "targeted vs LoRA vs full FT (<= 0.6x time, <= 0.5x memory, <= 1% params)"),
        "cold-start": (cold_start, "starter load: GGUF conversion vs safetensors cache"),
        "methods-vs-forward": (methods_vs_forward,
                               "causal methods (global, attribution, direction, margin) vs forward"),
        "explorer-topk": (explorer_topk,
                          "top-k examples of every neuron vs a plain forward, 128 prompts (goal <= 1.3x)"),
    }


BENCHMARKS = tuple(_registry())


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-core CPU (all benchmarks < 15 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds (used by the tests)")
    parser.add_argument("--model", default=None, help=f"model spec (default {STARTER}; --gpu: {GPU_MODEL})")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--gpu", action="store_true", help="GPU profile: larger model in bfloat16 and bitsandbytes "
                        "4-bit on one GPU; scoring-vs-forward, hook-overhead, train-step (bench/gpu_profile.py)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds per ratio (default by mode)")
    parser.add_argument("--results-dir", default=None, help="where result rows go (default bench/results)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    registry = _registry()
    if args.list:
        for name, (_, what) in registry.items():
            print(f"{name:22s} {what}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(registry)}", file=sys.stderr)
        return 2
    config = BenchConfig(
        model=args.model or (GPU_MODEL if args.gpu else STARTER),
        quick=args.quick,
        smoke=args.smoke,
        gpu=args.gpu,
        repeats=args.repeats,
        command="python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    if args.results_dir:
        config.results_dir = Path(args.results_dir)
    if args.gpu:  # the GPU profile: bfloat16 and 4-bit, three benchmarks, one table (bench/gpu_profile.py)
        from bench.gpu_profile import run_profile

        return run_profile(config, names)
    import torch

    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: thread start-up and contention would dominate
    try:
        return _run(config, names, registry)
    finally:
        torch.set_num_threads(threads)


def _run(config: BenchConfig, names: list[str], registry) -> int:
    ctx = BenchContext(config)
    failures = 0
    started = time.perf_counter()
    for name in names:
        fn, what = registry[name]
        print(f"[{name}] {what} ({config.mode}, {config.model if not config.smoke else 'tiny:qwen2'})", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn(ctx)
        except Skipped as exc:
            print(f"skipped: {exc}", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            failures += 1
            traceback.print_exc()
            print(f"failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        elapsed = time.perf_counter() - t0
        path = write_row(ctx, result, elapsed)
        for note in result.notes:
            print(f"  note: {note}")
        print(f"  ({elapsed:.0f} s, row appended to {path})")
        print(result.summary, flush=True)
    print(f"[bench] done in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0
