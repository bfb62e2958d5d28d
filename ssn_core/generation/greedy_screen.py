"""Greedy decoding's output layer through a bfloat16 screen, with a bound that keeps the argmax a float32 one.

Why: greedy decoding reads one number from the output layer, the index of its largest logit, yet computes all of
them: on the starter (151,936 tokens × 896) a 16-row product costs 66 ms in float32 and 35 ms packed, out of a
180-ms decoding step on the project's Intel Xeon. The same product in bfloat16 (AMX) takes 11 ms there.

How (per row of a call): L̂ = bf16(W) · bf16(h), bfloat16 out. Every logit's error is bounded,

    |L̂_v − L_v| ≤ e = a · max_v ‖w_v‖ · ‖h‖ + u/(1 − u) · max_v |L̂_v|,

with u = 2⁻⁸ (bfloat16's unit roundoff: rounding w and h, and the rounded output), a = (2u + u²) + 2 d 2⁻²⁴ (the
float32 sums of the bfloat16 kernel and of the float32 product it stands in for), times a safety factor. A token
whose float32 logit could be the row's largest therefore has L̂_v ≥ max L̂ − 2e. Those candidates (a few to a few
dozen per row on the starter) are recomputed in float32 from the float32 weight; every other logit is returned as
−inf, so only an argmax may read the result.

What changes in the results: the chosen token is the largest of the recomputed float32 logits. They differ from
``F.linear``'s by float rounding (about 1e-6 relative, summed in another order), as ``F.linear``'s own rows differ
between batch sizes; only a near-tie at that level can pick another token. Tests check the bound on random and
adversarial rows (the float32 argmax is always a candidate) and that greedy replies are unchanged.

Where it applies: `screened_head(model)` around a greedy generation (`ssn_core.generation.pool`) swaps the
forward of a plain float32, bias-free ``nn.Linear`` output layer on the CPU, in the current contextvars context
only, for calls of 1 to 64 rows without autograd or hooks on the layer, at the row counts where the screen is
faster than what the layer would run unscreened (`_screen_pays`, timed once per row bucket; on an AMD EPYC the
weight-left product of `ssn_core.packed_linear` wins at 1-2 rows, the screen from 4). It is skipped where bfloat16
products are not at least 1.6× faster than float32 ones on this CPU (`pays_here`: no AMX or AVX512-BF16), where
they fail a self-test, and under ``SSN_GREEDY_SCREEN=0`` (``=1``: at every row count, wherever the self-test
passes). Making the bfloat16 copy of
the weight costs about 0.15 s and 2 bytes a weight for the block's duration (the starter: 272 MB), so the pool
enters it only for generations of at least `MIN_STEPS` new tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssn_core.forward_swap import ForwardSwap, env_switch, fastest_alternating
from ssn_core.packed_linear import (
    linear_forward,
    packed_sample,
    weight_left_active,
    weight_left_linear,
    weight_left_would_run,
)

MIN_ROWS = 1  # whether a call of few rows is worth screening is timed per row count (`_screen_pays`)
MAX_ROWS = 64  # more rows (a prefill without logits_to_keep): the plain product
MIN_STEPS = 8  # new tokens a generation needs before the bfloat16 copy (about 0.15 s) is worth making
_MAX_CANDIDATE_TOKENS = 8192  # more distinct candidates in a call (very flat rows): its float32 product instead
_SAFETY = 1.5  # on top of the rounding bound; the self-test checks errors stay below half of it
_UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16
_ENV_SWITCH = "SSN_GREEDY_SCREEN"
_TUNING_HEAD_BYTES = 64 << 20  # the output layer's first rows up to this size time the screen against its fallback


@dataclass
class _Screen:
    """An output layer's bfloat16 copy and the constants of its error bound (valid while the weight is unchanged)."""

    weight: torch.Tensor  # the module's float32 weight  [V, d]
    version: int  # its tensor version then
    low: torch.Tensor  # bfloat16 copy  [V, d]
    max_row_norm: float  # max_v ‖w_v‖₂, rounded up
    product_error: float  # a: relative error of one rounded product and of both float32 sums, with the safety factor

    @classmethod
    def of(cls, weight: torch.Tensor) -> _Screen:
        u = _UNIT_ROUNDOFF
        d = weight.shape[1]
        values = weight.detach()
        return cls(weight, weight._version, values.to(torch.bfloat16),
                   float(values.norm(dim=1).max()) * (1 + 1e-5),
                   _SAFETY * ((2 * u + u * u) + 2 * d * 2.0 ** -24))

    def candidates(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, tokens) that may hold each row's largest float32 logit  [k] each, and the bfloat16 logits
        [n, V]."""
        # The weight on the left: 1.5x faster here than F.linear's layout for bfloat16 (and the transposed copy is
        # cheaper than what it saves).
        low = torch.mm(self.low, flat.to(torch.bfloat16).T).T.contiguous()  # [n, V] bfloat16
        top = low.amax(dim=1, keepdim=True).float()  # [n, 1]
        largest = torch.maximum(top.abs(), low.amin(dim=1, keepdim=True).float().abs())  # max_v |L̂_v|  [n, 1]
        u = _UNIT_ROUNDOFF
        error = (self.product_error * self.max_row_norm * flat.norm(dim=1, keepdim=True)
                 + _SAFETY * u / (1 - u) * largest)  # e per row  [n, 1]
        rows, tokens = (low >= top - 2 * error).nonzero(as_tuple=True)  # compared in float32 (promotion)
        return rows, tokens, low

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an argmax: the candidates' float32 values, −inf elsewhere  [..., V]."""
        flat = x.reshape(-1, x.shape[-1])  # [n, d]
        weight = self.weight.detach()
        rows, tokens, _ = self.candidates(flat)
        tokens_needed, column = torch.unique(tokens, return_inverse=True)  # [u], and each candidate's index into it
        if (tokens_needed.numel() > _MAX_CANDIDATE_TOKENS
                or bool((torch.bincount(rows, minlength=flat.shape[0]) == 0).any())):
            # very flat rows, or a row without candidates (non-finite values): the float32 product itself
            return F.linear(x, weight)
        exact = (flat @ weight[tokens_needed].T)[rows, column]  # [k] float32, the candidates' logits
        out = flat.new_full((flat.shape[0], weight.shape[0]), float("-inf"))
        out[rows, tokens] = exact
        return out.reshape(*x.shape[:-1], weight.shape[0])


# The screen active in the current context (thread / task): id(module) -> its screen.
_ACTIVE: ContextVar[dict[int, _Screen] | None] = ContextVar("ssn_greedy_screen", default=None)


def _row_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the row counts the screen is timed at."""
    return 1 << max(rows - 1, 0).bit_length()


def _tuning_rows(weight: torch.Tensor) -> int:
    """How many of the output layer's first rows (at most `_TUNING_HEAD_BYTES`) its speed checks are timed on."""
    return min(weight.shape[0], max(1, _TUNING_HEAD_BYTES // (4 * weight.shape[1])))


# (tuning rows of the weight, columns, row bucket, weight-left product in play) -> whether the screen is faster.
_SCREEN_CHOICE: dict[tuple[int, int, int, bool], bool] = {}


def _screen_pays(screen: _Screen, rows: int, repeats: int = 3) -> bool:
    """Whether screening a call of ``rows`` rows is faster here than what the layer would run unscreened
    (`ssn_core.packed_linear.linear_forward`: ``F.linear``, or the weight-left product where this context runs
    it): timed once per process, shape and row bucket, on at most the weight's first `_TUNING_HEAD_BYTES` (on an
    AMD EPYC the weight-left product is faster for 1-2 rows, the screen from 4). ``SSN_GREEDY_SCREEN=1``: always."""
    if _switch() == "on":
        return True
    n_out = _tuning_rows(screen.weight)
    left = weight_left_active() and weight_left_would_run(screen.weight, rows)
    key = (n_out, screen.weight.shape[1], _row_bucket(rows), left)
    choice = _SCREEN_CHOICE.get(key)
    if choice is None:
        weight = screen.weight.detach()[:n_out]  # [n_out, d], views: nothing is copied
        sample = _Screen(weight, screen.version, screen.low[:n_out], screen.max_row_norm, screen.product_error)
        x = torch.randn(key[2], weight.shape[1], generator=torch.Generator().manual_seed(0))  # [bucket, d]
        fallback = (lambda: weight_left_linear(weight, None, x)) if left else (lambda: F.linear(x, weight))
        fallback_s, screened_s = fastest_alternating(fallback, lambda: sample.logits(x), repeats)
        choice = _SCREEN_CHOICE.setdefault(key, screened_s < fallback_s)
    return choice


def _head_to_time(model: nn.Module) -> tuple[nn.Linear | None, bool]:
    """(the output layer whose speed checks decide, None) or (None, the answer without timing): no servable layer
    never pays; ``SSN_GREEDY_SCREEN=1`` always does."""
    head = screenable_head(model)
    if head is None:
        return None, False
    return (None, True) if _switch() == "on" else (head, False)


# (tuning rows of the weight, columns, packing kernel, packed rows) -> whether the screen beats the packed product.
_PACKED_CHOICE: dict[tuple[int, int, str, int], bool] = {}


def beats_packed(model: nn.Module, kernel: str, rows: int, repeats: int = 3) -> bool:
    """Whether screening ``model``'s output layer for ``rows`` rows is faster here than its packed product with
    ``kernel`` (`ssn_core.packed_linear`), which a generation that packs for ``rows`` runs on the layer instead:
    timed once per process, shape, kernel and row count on the layer's first `_TUNING_HEAD_BYTES`. On an AMD EPYC
    oneDNN's packed product beat the screen at 4-32 rows (bench/README.md, issue 17 eighth pass); with AMX the
    screen's bfloat16 product is the faster. ``SSN_GREEDY_SCREEN=1``: always."""
    head, decided = _head_to_time(model)
    if head is None:
        return decided
    n_out = _tuning_rows(head.weight)
    key = (n_out, head.weight.shape[1], kernel, rows)
    choice = _PACKED_CHOICE.get(key)
    if choice is None:
        weight = head.weight.detach()[:n_out]  # [n_out, d], a view
        sample = _Screen.of(weight)
        packed = packed_sample(kernel, weight, rows)
        x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))  # [rows, d]
        packed_s, screened_s = fastest_alternating(lambda: packed.linear(x, None), lambda: sample.logits(x), repeats)
        choice = _PACKED_CHOICE.setdefault(key, screened_s < packed_s)
    return choice


def may_pay(model: nn.Module, rows: int) -> bool:
    """Whether screening ``model``'s output layer may pay for some call of 1 to ``rows`` rows: false only once
    every row bucket up to ``rows`` was timed here and the screen lost (a generation then skips making the bfloat16
    copy, about 0.15 s on the starter)."""
    head, decided = _head_to_time(model)
    if head is None:
        return decided
    n_out = _tuning_rows(head.weight)
    for bucket in (1 << i for i in range(_row_bucket(max(rows, 1)).bit_length())):
        choices = [_SCREEN_CHOICE.get((n_out, head.weight.shape[1], bucket, left)) for left in (False, True)]
        if True in choices or all(choice is None for choice in choices):  # won, or not timed yet
            return True
    return False


def _dispatch(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The output layer's forward while some context screens it: the screened logits when this context's call
    qualifies and screening it pays, else what the layer would run unscreened (`linear_forward`)."""
    active = _ACTIVE.get()
    screen = active.get(id(module)) if active else None
    rows = x.numel() // max(x.shape[-1], 1)
    if (screen is not None and module.weight is screen.weight and module.weight._version == screen.version
            and module.bias is None and not torch.is_grad_enabled() and x.dtype == torch.float32
            and x.device.type == "cpu" and not module._forward_hooks and not module._forward_pre_hooks
            and MIN_ROWS <= rows <= MAX_ROWS and _screen_pays(screen, rows)):
        return screen.logits(x)
    return linear_forward(module, x)


_SWAP = ForwardSwap(_dispatch)


@functools.cache
def kernel_ok() -> bool:
    """Whether this CPU's bfloat16 product stays within the bound (checked once per process on random rows whose
    scales span what output layers see); a kernel that accumulated in bfloat16 would fail it."""
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(512, 96, generator=generator) * torch.rand(512, 1, generator=generator)  # [V, d]
        x = torch.randn(8, 96, generator=generator) * torch.logspace(-2, 3, 8)[:, None]  # [n, d]
        screen = _Screen.of(weight)

        def within_bound(rows: torch.Tensor) -> bool:
            low = torch.mm(screen.low, rows.to(torch.bfloat16).T).T.double()  # [n, V]
            exact = rows.double() @ weight.double().T
            largest = low.abs().amax(dim=1, keepdim=True)
            u = _UNIT_ROUNDOFF
            bound = (screen.product_error * screen.max_row_norm * rows.double().norm(dim=1, keepdim=True)
                     + _SAFETY * u / (1 - u) * largest)
            return bool(((low - exact).abs() <= bound / _SAFETY).all())

        # A matrix product, and one row alone: a one-column product takes another kernel (matrix-vector).
        return within_bound(x) and all(within_bound(x[i:i + 1]) for i in range(x.shape[0]))
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def pays_here(rows: int = 16, n_in: int = 896, n_out: int = 32768, repeats: int = 5) -> bool:
    """Whether a bfloat16 product is at least 1.6× faster than the float32 one on this CPU (timed once per process,
    about 50 ms): with AMX or AVX512-BF16 it is 3-6× faster; without them bfloat16 is emulated and slower."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=generator)
    low = weight.to(torch.bfloat16)
    x = torch.randn(rows, n_in, generator=generator)
    plain_s, low_s = fastest_alternating(lambda: F.linear(x, weight),
                                         lambda: torch.mm(low, x.to(torch.bfloat16).T).T.contiguous(), repeats)
    return low_s * 1.6 < plain_s


def _switch() -> str:
    """``SSN_GREEDY_SCREEN``: "off", "on" (wherever the kernel works) or "auto" (where it pays)."""
    return env_switch(_ENV_SWITCH)


def enabled() -> bool:
    """Whether greedy generations in this process screen their output layer (see the module docstring). Run
    manifests record it, since it can change a near-tie's token."""
    switch = _switch()
    if switch == "off" or not kernel_ok():
        return False
    return switch == "on" or pays_here()


def screenable_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the screen can serve it: a plain float32, bias-free ``nn.Linear`` on the CPU
    whose forward nobody else replaced."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if _SWAP.replaced_by_another(head):
        return None
    return head


@contextmanager
def screened_head(model: nn.Module, active: bool = True) -> Iterator[bool]:
    """Greedy decoding steps inside the block get screened logits from ``model``'s output layer (see the module
    docstring); yields whether it did. Always restores the layer's forward on exit."""
    head = screenable_head(model) if active and _ACTIVE.get() is None and enabled() else None
    if head is None:
        yield False
        return
    try:
        with torch.no_grad():
            screen = _Screen.of(head.weight)
    except (RuntimeError, MemoryError):  # an optimisation: without the memory, run plain
        yield False
        return
    token = None
    try:
        _SWAP.install([head])
        token = _ACTIVE.set({id(head): screen})
        yield True
    finally:
        if token is not None:
            _ACTIVE.reset(token)
        _SWAP.uninstall([head])

