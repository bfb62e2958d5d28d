"""How fast is this model here? A short measurement, and time estimates for the long jobs built on it.

The app's hints ("about 3 min on this machine") come from `measure_speed` on the loaded model, not from fixed
text: one forward pass over a small batch (prompt tokens per second) and a few greedy decoding steps (generated
row-tokens per second). Estimates combine those rates with the job's shape (rows, tokens, steps); scoring q/k
sites costs extra forward passes, by the ratios `bench/README.md` measured (scoring-vs-forward per site kind).

Estimates are rough (±2× on a shared CPU): they say whether a job takes seconds, minutes or an hour. The running
job's own ETA (`ssn_core.progress`) replaces them with the speed measured in that job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from ssn_core._conventions import input_device
from ssn_core.generation.decoder import _forward_names
from ssn_core.packed_linear import MAX_PACK_ROWS, MIN_PACK_ROWS, packed_linears, weight_left_products

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

# Extra forward passes per prompt for scoring a site kind with the impact method (bench/README.md,
# scoring-vs-forward per kind on the starter: mlp / attn_v / attn_o ride on the forward, q ≈ 3.2×, k ≈ 4.1×).
SCORING_EXTRA_FORWARDS: dict[str, float] = {"mlp": 0.05, "attn_v": 0.05, "attn_o": 0.05, "attn_q": 2.2,
                                            "attn_k": 3.1}
TRAIN_STEP_FORWARDS = 3.0  # forward + backward of a training step ≈ three forward passes
DEFAULT_PROMPT_TOKENS = 40  # a chat-formatted short prompt (system prompt, role headers, the request)


@dataclass(frozen=True)
class ModelSpeed:
    """Measured rates of one model on this machine."""

    prefill_tokens_per_s: float  # prompt tokens through a forward pass, per second (batched)
    decode_tokens_per_s: float  # generated tokens per second, counted over all rows of a batch
    batch: int  # the batch size the rates were measured at
    seconds: float  # how long the measurement took
    wide_batch: int = 0  # a second, wider batch the decoding step was timed at (0: none)
    wide_step_ratio: float | None = None  # a decoding step of wide_batch rows / one of batch rows
    packed_step_ratio: float | None = None  # that wide step with packed products (ssn_core.packed_linear) / without
    # prompt tokens per second of a generation's prefill (logits at the last position only), at the widest batch
    generation_prefill_tokens_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def step_seconds(self, rows: int) -> float:
        """One decoding step of a batch of ``rows``.

        Between and beyond the two measured batches the cost is interpolated in log(rows): a step streams every
        weight whatever the rows, so on a CPU it grows far slower than the rows (the starter on two cores: 96, 234,
        272, 321 ms for 2, 8, 16, 32 rows; this model gives 96, 234, 303, 372) and on a GPU hardly at all. Without
        the wider measurement, linearly in the rows (an upper end).
        """
        one_step = self.batch / self.decode_tokens_per_s  # a step of `batch` rows
        if rows <= self.batch:
            return one_step
        if self.wide_step_ratio is None or self.wide_batch <= self.batch:
            return one_step * rows / self.batch
        growth = max(self.wide_step_ratio - 1.0, 0.0) / math.log2(self.wide_batch / self.batch)
        plain = one_step * (1.0 + growth * math.log2(rows / self.batch))
        if self.packed_step_ratio is not None and MIN_PACK_ROWS <= rows <= MAX_PACK_ROWS:
            return plain * self.packed_step_ratio  # what a generation of this many rows runs (ssn_core.packed_linear)
        return plain

    def describe(self) -> str:
        wide = (f"; a step of {self.wide_batch} rows costs {self.wide_step_ratio:.1f}× one of {self.batch}"
                if self.wide_step_ratio is not None else "")
        if self.packed_step_ratio is not None:
            wide += f", {self.packed_step_ratio:.2f}× that with packed weights"
        return (f"measured here: {self.prefill_tokens_per_s:,.0f} prompt tokens/s, "
                f"{self.decode_tokens_per_s:,.1f} generated tokens/s at batch {self.batch}{wide}")


def measure_speed(lm: LoadedModel, batch: int = 2, prompt_tokens: int = 24, new_tokens: int = 4,
                  wide_batch: int = 8) -> ModelSpeed:
    """Time one forward pass of ``batch`` × ``prompt_tokens`` and ``new_tokens`` greedy decoding steps, then the
    decoding steps of ``wide_batch`` rows (how a step's cost grows with the rows; 0: not measured), plain and, where
    `ssn_core.packed_linear` applies (CPU, float32), with packed weights, as a generation of that many rows runs them.

    Uses the model's own forward with its KV cache; a warm-up step first (lazy initialisation would otherwise
    count). Takes about six seconds on a 0.5B model on two CPU cores.
    """
    from transformers import GenerationConfig

    started = time.perf_counter()
    model = lm.model
    device = input_device(model)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(lm.tokenizer))
    generator = torch.Generator().manual_seed(0)
    rows = max(batch, wide_batch)
    ids = torch.randint(3, max(4, min(vocab, 1000)), (rows, prompt_tokens), generator=generator).to(device)  # [B, T]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              pad_token_id=0, eos_token_id=None)
    # Generations run the weight-left product where it pays (ssn_core.packed_linear): so are the steps timed here.
    with torch.no_grad(), weight_left_products(model):
        model(input_ids=ids[:1, :4], attention_mask=torch.ones_like(ids[:1, :4]))  # warm-up
        prefill, decode, steps, generate_prefill = _timed(model, ids[:batch], config)
        wide = _timed(model, ids[:wide_batch], config, full_prefill=False) if wide_batch > batch else None
        packed_ratio = None
        if wide is not None and MIN_PACK_ROWS <= wide_batch <= MAX_PACK_ROWS:
            with packed_linears(model, wide_batch) as n_packed:
                if n_packed:  # its prefill (wide_batch x prompt_tokens rows) runs unpacked: the same as wide's
                    fast_decode, fast_steps = _timed_decode(model, ids[:wide_batch], config, wide[3])
                    packed_ratio = (fast_decode / max(fast_steps, 1)) / (wide[1] / max(wide[2], 1))
    ratio = None if wide is None else (wide[1] / max(wide[2], 1)) / (decode / max(steps, 1))
    prefill_rows, generate_prefill = (batch, generate_prefill) if wide is None else (wide_batch, wide[3])
    return ModelSpeed(prefill_tokens_per_s=batch * prompt_tokens / prefill,
                      decode_tokens_per_s=max(steps * batch, 1) / decode, batch=batch,
                      seconds=round(time.perf_counter() - started, 3),
                      wide_batch=wide_batch if wide is not None else 0, wide_step_ratio=ratio,
                      packed_step_ratio=packed_ratio,
                      generation_prefill_tokens_per_s=prefill_rows * prompt_tokens / generate_prefill)


def _timed(model, ids: torch.Tensor, config, full_prefill: bool = True) -> tuple[float, float, int, float]:
    """(prefill seconds, decoding seconds, decoding steps, generate's own prefill seconds) of ``ids`` [B, T]: one
    forward with logits at every position (as scoring runs it; skipped unless ``full_prefill``: 0.0), one with the
    last position's only (as `generate` runs its prefill), then greedy `generate`, whose decoding time is its total
    less that prefill."""
    attention = torch.ones_like(ids)
    prefill = 0.0
    if full_prefill:
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=attention)
        prefill = max(time.perf_counter() - t0, 1e-6)
    _, keeps_logits = _forward_names(model)  # as the decoder asks it (a PEFT wrapper unwrapped)
    t0 = time.perf_counter()
    model(input_ids=ids, attention_mask=attention, **({"logits_to_keep": 1} if keeps_logits else {}))
    generate_prefill = max(time.perf_counter() - t0, 1e-6)
    decode, steps = _timed_decode(model, ids, config, generate_prefill)
    return prefill, decode, steps, generate_prefill


def _timed_decode(model, ids: torch.Tensor, config, generate_prefill: float) -> tuple[float, int]:
    """(decoding seconds, decoding steps) of greedy `generate` on ``ids`` [B, T], its prefill being known."""
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)  # [B, T+new]
    total = max(time.perf_counter() - t0, 1e-6)
    return max(total - generate_prefill, 1e-6), out.shape[1] - ids.shape[1]


def generation_seconds(speed: ModelSpeed, rows: int, max_new_tokens: int, batch_size: int = 8,
                       prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> float:
    """Generating ``rows`` replies of up to ``max_new_tokens``, ``batch_size`` rows at a time.

    A decoding step's cost grows with the rows of a batch as `ModelSpeed.step_seconds` says (measured at two batch
    sizes, interpolated).
    """
    if rows <= 0:
        return 0.0
    batches = math.ceil(rows / max(batch_size, 1))
    per_batch_rows = min(rows, batch_size)
    prefill = per_batch_rows * prompt_tokens / (speed.generation_prefill_tokens_per_s or speed.prefill_tokens_per_s)
    step = speed.step_seconds(per_batch_rows)  # one decoding step of the whole batch
    return batches * (prefill + max_new_tokens * step)


def scoring_seconds(speed: ModelSpeed, prompts: int, kinds: Iterable[str],
                    prompt_tokens: int = DEFAULT_PROMPT_TOKENS) -> float:
    """Scoring ``prompts`` prompts with the impact method on the given site kinds."""
    forwards = 1.0 + sum(SCORING_EXTRA_FORWARDS.get(kind, 1.0) for kind in set(kinds))
    return prompts * prompt_tokens * forwards / speed.prefill_tokens_per_s


def training_seconds(speed: ModelSpeed, steps: int, batch_size: int, tokens_per_example: int = 96) -> float:
    """``steps`` optimizer steps of ``batch_size`` examples (prompt + reply ≈ ``tokens_per_example`` tokens)."""
    return steps * batch_size * tokens_per_example * TRAIN_STEP_FORWARDS / speed.prefill_tokens_per_s


def fine_tune_plan(speed: ModelSpeed, *, languages: int, items_per_language: int, steps: int, batch_size: int,
                   evaluate: bool, heldout_fraction: float = 0.25, reply_tokens: int = 48,
                   eval_tokens: int = 48) -> list[tuple[str, float]]:
    """(phase, seconds) for a targeted fine-tune as the Fine-tune page runs it (retain replies, evaluations)."""
    harmless = languages * items_per_language
    heldout = 2 * max(1, round(items_per_language * heldout_fraction)) * languages  # harmful + harmless held out
    plan = [("retain replies", generation_seconds(speed, harmless, reply_tokens))]
    if evaluate:
        plan.append(("evaluating before", generation_seconds(speed, heldout, eval_tokens)))
    plan.append(("training", training_seconds(speed, steps, batch_size)))
    if evaluate:
        plan.append(("evaluating after", generation_seconds(speed, heldout, eval_tokens)))
    return plan


def total_seconds(plan: Sequence[tuple[str, float]]) -> float:
    return sum(seconds for _, seconds in plan)
