"""The training loop shared by every method: AdamW over the given tensors on the reply NLL.

The method decides which tensors train (neuron deltas, LoRA adapters, every weight of a copy) and under which
context the forward runs (``context_factory``, e.g. `apply_delta`); the loop owns the rest: batching from a
seeded shuffle, gradient accumulation, warm-up, clipping, stopping on a non-finite loss or gradient, progress,
cancel, and peak memory. Under several processes (``accelerate launch`` / torchrun, `ssn_core.distributed`) each
process trains on its share of every batch; its loss is its reply tokens' NLL sum over the whole batch's token
count, and the gradients are summed with one all-reduce before the optimizer step (the deltas are not an
nn.Module, so no DDP wrapper is needed), so every process takes the step a one-process run takes.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssn_core import distributed
from ssn_core._conventions import check_cancel, input_device, pad_id
from ssn_core.errors import TrainingError
from ssn_core.training.data import SafetyData
from ssn_core.training.loss import _collate, encode_example, response_loss
from ssn_core.training.results import TrainConfig, TrainProgress

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """requires_grad=False on every base parameter while training deltas (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class _PeakMemory:
    """Peak memory during a block: CUDA max allocated, or the process's peak RSS (Linux, reset via clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) of this process
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            try:
                with open("/proc/self/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_mb = int(line.split()[1]) / 1024
            except OSError:
                self.peak_mb = None
        return False


def is_main_process() -> bool:
    """True unless this is a non-zero rank under ``accelerate launch`` / torchrun (only rank 0 writes files)."""
    return distributed.is_main()


def _train_loop(lm: LoadedModel, model: nn.Module, params: Sequence[torch.Tensor], data: SafetyData,
                config: TrainConfig, context_factory=nullcontext, progress: TrainProgress | None = None,
                cancel: threading.Event | None = None) -> tuple[list[float], float, float | None]:
    """AdamW over ``params`` on the reply NLL; returns (losses per step, seconds, peak memory MB)."""
    config.check()
    rank, world = distributed.world().rank, distributed.world().size
    if world > config.batch_size:
        raise TrainingError(f"each of the {world} processes trains on a share of every batch, so the batch size "
                            f"({config.batch_size}) must be at least the number of processes")
    pad = pad_id(lm)
    encoded = [encode_example(lm, ex, config.max_length) for ex in data.train]
    total = config.total_steps(len(encoded))
    generator = random.Random(config.seed)
    order: list[int] = []

    def next_batch() -> list[tuple[list[int], int]]:
        nonlocal order
        batch: list[tuple[list[int], int]] = []
        while len(batch) < config.batch_size:
            if not order:
                order = list(range(len(encoded)))
                generator.shuffle(order)
            batch.append(encoded[order.pop()])
        return batch[rank::world] if world > 1 else batch

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        return config.lr

    losses: list[float] = []
    device = input_device(model)
    started = time.perf_counter()
    if progress is not None:
        progress(0, total, {"phase": "train"})
    with _PeakMemory(device) as memory:
        for step in range(total):
            check_cancel(cancel, "training was cancelled; nothing was written")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                batch = next_batch()  # this process's share of the batch (all of it with one process)
                # The loss is the mean over the whole batch's reply tokens: each process contributes its tokens' sum
                # divided by the batch's token count, and the gradients are summed below (one process: n / n = 1).
                n_local = sum(len(ids) - first for ids, first in batch)
                n_batch = n_local if world == 1 else int(distributed.all_reduce_sum(n_local, "counting reply tokens"))
                part = None
                if batch:
                    input_ids, attention, labels = _collate(batch, pad)
                    with context_factory():
                        loss, n_tokens = response_loss(model, input_ids, attention, labels)
                    part = loss * (n_tokens / max(n_batch, 1))
                part_value = 0.0 if part is None else float(part.detach())
                batch_loss = part_value if world == 1 else distributed.all_reduce_sum(part_value, "adding up the loss")
                if not math.isfinite(batch_loss):  # every process sees the same sum and stops the same way
                    raise TrainingError(
                        f"the training loss became {batch_loss} at step {step + 1}; stopped. Lower the learning "
                        f"rate (now {config.lr:g}), enable gradient clipping, or load the model in a wider dtype"
                    )
                if part is not None:
                    (part / config.grad_accum).backward()
                step_loss += batch_loss / config.grad_accum
            if world > 1:  # every rank reduces every tensor (a rank with an empty shard contributes zeros)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_gradients([p.grad for p in params if p.grad is not None])  # all set above
            grads = [p for p in params if p.grad is not None]
            if config.grad_clip > 0 and grads:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, config.grad_clip))
                if not math.isfinite(grad_norm):
                    raise TrainingError(f"the gradient norm became {grad_norm} at step {step + 1}; stopped. "
                                        f"Lower the learning rate (now {config.lr:g})")
            optimizer.step()
            losses.append(step_loss)
            if progress is not None:
                progress(step + 1, total, {"phase": "train", "loss": step_loss, "lr": lr_at(step)})
    seconds = time.perf_counter() - started
    return losses, seconds, memory.peak_mb


def _total_params(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        # bitsandbytes 4-bit packs two values per byte into a [n/2, 1] uint8 tensor
        total += p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()
    return total
