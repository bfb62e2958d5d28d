"""Training step: targeted neuron deltas vs LoRA (PEFT, r=8) vs full fine-tuning.

Each method runs in its own fresh process (``python -m bench.train_step --method M``): PEFT wraps the
model's modules in place and full fine-tuning rewrites every weight, so sharing one model would let one
method's wrappers slow another's steps; and peak memory is only meaningful per process. The processes
run back to back, alternating order across rounds, and the step-time ratio is the median over rounds.
Every method trains on the same batch with the same loss (`ssn_core.training.response_loss`), AdamW,
gradient clipping: the step the engine's training loop takes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

from bench.common import (
    BenchConfig,
    BenchContext,
    BenchResult,
    Skipped,
    current_rss_bytes,
    fmt_ratio,
    goal_text,
    load_bench_model,
    median,
    require,
    run_worker,
)
from bench.memory import _RssSampler
from bench.workloads import bench_prompts, random_neuron_set

METHODS = ("targeted", "lora", "full")
SS_FRACTION = 0.003
REFUSAL = "I'm sorry, but I can't help with that request. It could cause real harm to people."


def _batch(lm, training, batch_size: int, max_length: int):
    """One fixed training batch: harmful prompts paired with a refusal (the shape of the engine's safety data)."""
    examples = [training.TrainExample(item_id=str(i), language=p.language, kind="refusal", user_text=p.text,
                                      reply=REFUSAL) for i, p in enumerate(bench_prompts(batch_size))]
    encoded = [training.encode_example(lm, ex, max_length) for ex in examples]
    return training._collate(encoded, require("ssn_core._conventions").pad_id(lm))


def _setup(method: str, lm, training):
    """(trainable params, context factory for the forward, model to call, description)."""
    model = lm.model
    if method == "targeted":
        delta_mod = require("ssn_core.delta")
        neurons = random_neuron_set(lm.sites, SS_FRACTION, seed=0)
        delta = delta_mod.NeuronDelta.zeros(model, lm.sites, neurons).requires_grad_(True)
        for p in model.parameters():
            p.requires_grad_(False)
        return delta.parameters(), (lambda: delta_mod.apply_delta(model, delta)), model, {"neurons": len(neurons)}
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        targets = sorted(training._linear_targets(model, lm.sites))
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                      bias="none"))
        params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params, nullcontext, peft_model, {"rank": 8, "target_modules": len(targets)}
    if method == "full":
        for p in model.parameters():
            if not p.dtype.is_floating_point:
                raise Skipped("full fine-tuning needs a full-precision model (this one is quantized)")
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        return params, nullcontext, model, {}
    raise ValueError(f"unknown method {method!r}")


def worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step")
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--quant", default="4bit-nf4", help="--gpu: bitsandbytes quantization, or none (bfloat16)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():  # in-process (GPU profile): the previous method's model must be gone first
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    try:
        training = require("ssn_core.training")
        lm = load_bench_model(BenchConfig(model=args.model, smoke=args.smoke, gpu=args.gpu,
                                          quantization=args.quant))
    except Skipped as exc:
        print(json.dumps({"skipped": str(exc)}))
        return
    input_ids, attention, labels = _batch(lm, training, args.batch_size, args.max_length)
    cuda = lm.device.type == "cuda"
    total_params = training._total_params(lm.model)
    rss_before = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    try:
        params, context, model, info = _setup(args.method, lm, training)
    except Skipped as exc:
        print(json.dumps({"skipped": str(exc)}))
        return
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    model.train(False)  # dropout off, as in the engine's loop (the models have none anyway)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss, _ = training.response_loss(model, input_ids, attention, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    times = []
    with _RssSampler() as sampler:
        step()  # warm-up: allocates gradients and AdamW state
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    row = {
        "method": args.method,
        "step_s": median(times),
        "step_times_s": times,
        "trainable_params": trainable,
        "total_params": total_params,
        "rss_before_training": rss_before,
        "peak_rss": sampler.peak,
        "batch": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        **info,
    }
    if cuda:
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        row["cuda_before_bytes"] = cuda_before
    print(json.dumps(row))


def train_step(ctx: BenchContext) -> BenchResult:
    cfg = ctx.config
    require("ssn_core.training")
    require("ssn_core.delta")
    steps = cfg.pick(1, 1, 4)
    rounds = cfg.repeats or cfg.pick(1, 1, 1 if cfg.gpu else 3)  # GPU: each round reloads the model 3 times
    args = ["--model", cfg.model, "--steps", str(steps), "--batch-size", str(cfg.pick(2, 2, 4)),
            "--max-length", str(cfg.pick(48, 48, 128))]
    args += ["--smoke"] if cfg.smoke else []
    args += ["--gpu", "--quant", cfg.quantization] if cfg.gpu else []
    # The GPU profile runs the methods in this process (a fresh interpreter per method would cost more than the
    # steps); CUDA's peak allocation is reset per method, and each method loads its own copy of the model.
    in_process = cfg.smoke or cfg.gpu
    rows: dict[str, list[dict]] = {m: [] for m in METHODS}
    methods = list(METHODS)
    notes = []
    if cfg.gpu and cfg.quantization != "none":  # known before loading anything: no full fine-tuning of 4-bit weights
        methods.remove("full")
        notes.append(f"full fine-tuning skipped (a {cfg.quantization} model cannot be fully fine-tuned); ratios are "
                     "against LoRA instead")
    for r in range(rounds):
        for method in (methods if r % 2 == 0 else methods[::-1]):
            ctx.log(f"round {r + 1}/{rounds}: {method} ({steps} timed steps) "
                    + ("on its own copy of the model" if in_process else "in a fresh process"))
            try:
                rows[method].append(run_worker("bench.train_step", [*args, "--method", method],
                                               timeout=cfg.pick(300, 900, 3600), in_process=in_process))
            except Skipped as exc:
                if method != "full":
                    raise
                notes.append(f"full fine-tuning skipped ({exc}); ratios are against LoRA instead")
                methods.remove("full")
    baseline = "full" if "full" in methods else "lora"
    use_cuda = "cuda_peak_bytes" in rows[baseline][0]

    def memory(row):  # what training needs: peak minus nothing (whole process, model included)
        return row["cuda_peak_bytes"] if use_cuda else row["peak_rss"]

    def ratio(method, key):
        return median([a[key] / b[key] for a, b in zip(rows[method], rows[baseline], strict=True)])

    def mem_ratio_of(method):
        return median([memory(a) / memory(b) for a, b in zip(rows[method], rows[baseline], strict=True)])

    time_ratio, mem_ratio = ratio("targeted", "step_s"), mem_ratio_of("targeted")
    share = rows["targeted"][0]["trainable_params"] / rows["targeted"][0]["total_params"]
    lora_share = rows["lora"][0]["trainable_params"] / rows["lora"][0]["total_params"]
    mib = 2**20
    if baseline == "full":
        ratios = {"time_vs_full": time_ratio, "memory_vs_full": mem_ratio, "trainable_share_pct": 100 * share,
                  "lora_time_vs_full": ratio("lora", "step_s"), "lora_memory_vs_full": mem_ratio_of("lora"),
                  "lora_trainable_share_pct": 100 * lora_share}
        goals = {"time_vs_full": "<= 0.6", "memory_vs_full": "<= 0.5", "trainable_share_pct": "<= 1"}
    else:
        ratios = {"time_vs_lora": time_ratio, "memory_vs_lora": mem_ratio, "trainable_share_pct": 100 * share,
                  "lora_trainable_share_pct": 100 * lora_share}
        goals = {"trainable_share_pct": "<= 1"}
    result = BenchResult(
        name="train-step",
        ratios=ratios,
        goals=goals,
        summary="",
        batch=rows[baseline][0]["batch"],
        seq_len=rows[baseline][0]["seq_len"],
        details={
            "table": [{"method": m, "step_s": median([x["step_s"] for x in rows[m]]),
                       "peak_memory_mib": round(median([memory(x) for x in rows[m]]) / mib),
                       "growth_above_loaded_model_mib": round(median(
                           [memory(x) - (x["cuda_before_bytes"] if use_cuda else x["rss_before_training"])
                            for x in rows[m]]) / mib),
                       "trainable_params": rows[m][0]["trainable_params"]} for m in methods],
            "memory": "peak CUDA allocation" if use_cuda else "peak process RSS sampled during the steps",
            "rounds": rounds, "steps_per_round": steps, "workers": rows,
        },
        notes=["targeted set: random, ~0.3% of every site's neurons (the size of a real SS set)",
               "full fine-tuning here updates the model in place (no deep copy), the cheapest full FT can be",
               *notes],
    )
    share_text = f"trainable {100 * share:.3g}% (goal <= 1%: {'met' if share <= 0.01 else 'MISSED'})"
    if baseline == "full":
        result.summary = (
            f"train-step: targeted/full step time {fmt_ratio(time_ratio)}{goal_text(result, 'time_vs_full')}, "
            f"peak memory {fmt_ratio(mem_ratio)}{goal_text(result, 'memory_vs_full')}, {share_text} | LoRA r=8 vs "
            f"full: time {fmt_ratio(ratios['lora_time_vs_full'])}, memory {fmt_ratio(ratios['lora_memory_vs_full'])}"
            f", trainable {100 * lora_share:.3g}%")
    else:
        result.summary = (f"train-step: targeted/LoRA step time {fmt_ratio(time_ratio)}, peak memory "
                          f"{fmt_ratio(mem_ratio)}, {share_text} (no full fine-tuning on a quantized model)")
    return result


if __name__ == "__main__":
    worker(sys.argv[1:])
