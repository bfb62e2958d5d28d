"""What one decoding step costs by rows in flight, plain and with packed weights (`ssn_core.packed_linear`).

A step is one forward of one new token per row over a KV cache of ``cache_tokens`` prompt tokens (random ids),
logits at the last position only, as the pool's decoder runs it (the cache is cropped back after each step). Each
row count is timed plain and inside ``packed_linears(model, rows)`` (the pool packs for its rows in flight),
alternating, the fastest of the rounds. The packed step's greedy tokens are compared with the plain step's.
"""

from __future__ import annotations

import os

import torch

from bench.common import BenchContext, BenchResult, alternate, fmt_ratio, goal_text, require


def _step_fn(model, cache, next_ids):
    """One decoding step over ``cache``, which is cropped back after it (so every call sees the same cache length and
    pays what a real step pays: the new key and value appended to every layer's cache)."""
    def step():
        with torch.no_grad():
            logits = model(input_ids=next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        cache.crop(-1)
        return logits[:, -1]  # [rows, V]

    return step


def step_cost(ctx: BenchContext) -> BenchResult:
    packed = require("ssn_core.packed_linear")
    lm, cfg = ctx.lm, ctx.config
    model = lm.model
    row_counts = cfg.pick([1, 4], [1, 2, 4, 8, 16, 32, 64], [1, 2, 4, 8, 16, 24, 32, 48, 64])
    cache_tokens = cfg.pick(8, 90, 90)
    rounds = max(cfg.rounds, cfg.pick(1, 4, 5))
    generator = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(3, min(vocab, 20000), (max(row_counts), cache_tokens), generator=generator).to(lm.device)
    ctx.log(f"{len(row_counts)} row counts, a {cache_tokens}-token cache, {rounds} alternating rounds each")
    kernel = packed.kernel_available()
    by_default = packed.enabled()  # what a generation here would do (`pays_here`); the curve below packs anyway
    screen_by_default = require("ssn_core.generation.greedy_screen").enabled()
    switches = {name: os.environ.get(name) for name in ("SSN_PACKED_LINEAR", "SSN_GREEDY_SCREEN")}
    for name, value in switches.items():
        if value is None:  # the curve packs and screens wherever the kernels work, and says what is the default
            os.environ[name] = "1"
    try:
        return _curve(ctx, lm, model, ids, row_counts, cache_tokens, rounds, kernel, by_default, screen_by_default)
    finally:
        for name, value in switches.items():
            if value is None:
                os.environ.pop(name, None)


def _curve(ctx, lm, model, ids, row_counts, cache_tokens, rounds, kernel, by_default, screen_by_default
           ) -> BenchResult:
    packed = require("ssn_core.packed_linear")
    screen = require("ssn_core.generation.greedy_screen")
    plain_ms: dict[int, float] = {}
    packed_ms: dict[int, float | None] = {}
    screened_ms: dict[int, float | None] = {}
    same_tokens: dict[int, bool | None] = {}
    screened_same: dict[int, bool | None] = {}
    for rows in row_counts:
        with torch.no_grad():
            prefill = model(input_ids=ids[:rows], use_cache=True)
        cache, next_ids = prefill.past_key_values, prefill.logits[:, -1].argmax(-1, keepdim=True)  # [rows, 1]
        step = _step_fn(model, cache, next_ids)
        plain_tokens = step().argmax(-1)
        with packed.packed_linears(model, rows if kernel else None) as n_packed:
            packed_tokens = step().argmax(-1)
            # Both are timed inside the packing context, alternating; "plain" switches it off for its own calls.
            times = alternate({"plain": _outside(step), **({"packed": step} if n_packed else {})}, rounds)
        plain_ms[rows] = 1000 * min(times["plain"])
        packed_ms[rows] = 1000 * min(times["packed"]) if n_packed else None
        same_tokens[rows] = bool(torch.equal(packed_tokens, plain_tokens)) if n_packed else None
        # What a greedy generation runs: the output layer through the bfloat16 screen, every other layer packed.
        with (screen.screened_head(model, rows >= screen.MIN_ROWS) as screened,
              packed.packed_linears(model, rows if kernel else None)):
            screened_tokens = step().argmax(-1)
            screened_ms[rows] = 1000 * min(alternate({"screened": step}, rounds)["screened"]) if screened else None
        screened_same[rows] = bool(torch.equal(screened_tokens, plain_tokens)) if screened else None
        ctx.log(f"{rows:3d} rows: plain {plain_ms[rows]:.0f} ms"
                + (f", packed {packed_ms[rows]:.0f} ms ({plain_ms[rows] / packed_ms[rows]:.2f}x), same greedy "
                   f"tokens {same_tokens[rows]}" if packed_ms[rows] else ", packed: not applied (outside 4-32 rows "
                                                                        "or no kernel)")
                + (f"; screened output layer {screened_ms[rows]:.0f} ms, same greedy tokens {screened_same[rows]}"
                   if screened_ms[rows] else ""))
    speedups = {rows: plain_ms[rows] / ms for rows, ms in packed_ms.items() if ms}
    at = 16 if 16 in speedups else (max(speedups) if speedups else None)
    screen_gain = {rows: (packed_ms[rows] or plain_ms[rows]) / ms for rows, ms in screened_ms.items() if ms}
    screen_at = 16 if 16 in screen_gain else (max(screen_gain) if screen_gain else None)
    result = BenchResult(
        name="step-cost",
        ratios={"packed_step_speedup": speedups[at] if at is not None else float("nan"),
                "screened_vs_packed_step": screen_gain[screen_at] if screen_at is not None else float("nan")},
        goals={},
        summary="",
        batch=at,
        seq_len=cache_tokens,
        details={"rows": row_counts, "plain_ms": plain_ms, "packed_ms": packed_ms, "same_greedy_tokens": same_tokens,
                 "screened_ms": screened_ms, "screened_same_greedy_tokens": screened_same,
                 "screened_by_default_here": screen_by_default,
                 "rounds": rounds, "kernel_available": kernel, "packed_by_default_here": by_default,
                 "row_tokens_per_s_plain": {r: 1000 * r / ms for r, ms in plain_ms.items()},
                 "row_tokens_per_s_packed": {r: 1000 * r / ms for r, ms in packed_ms.items() if ms}},
        notes=["a step: one new token per row over a KV cache of random prompt ids; min of alternating rounds"],
    )
    curve = ", ".join(f"{r}: {plain_ms[r]:.0f}" + (f"/{packed_ms[r]:.0f}" if packed_ms[r] else "")
                      for r in row_counts)
    result.summary = (f"step-cost: ms a step plain/packed by rows {curve} | packed speed-up at {at} rows "
                      f"{fmt_ratio(result.ratios['packed_step_speedup'])}{goal_text(result, 'packed_step_speedup')} "
                      f"(generations here pack by default: {by_default}) | screened output layer at {screen_at} rows "
                      f"{fmt_ratio(result.ratios['screened_vs_packed_step'])} the packed step ("
                      + ", ".join(f"{r}: {ms:.0f}" for r, ms in screened_ms.items() if ms) + " ms)")
    return result


def _outside(step):
    """``step`` run with packing switched off for the call (the same process, the same cache copy)."""
    packed = require("ssn_core.packed_linear")

    def plain():
        token = packed._ACTIVE.set(None)
        try:
            return step()
        finally:
            packed._ACTIVE.reset(token)

    return plain
