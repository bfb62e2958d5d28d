"""Faster kernels for the linear layers of a batch's decoding steps on the CPU: MKL's or oneDNN's packed product,
and the weight-left product.

Why: a decoding step sends a few rows (one new token per reply) through every weight matrix, and on the CPU 87% of
a 16-row step is `aten::mm` (bench/README.md, issue 17). MKL's kernel for a short, wide product reads the weight in
its stored layout. MKL can also reorder a weight once into the layout its kernel reads (``cblas_sgemm_pack``). PyTorch
exposes that as ``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``; Inductor's CPU freezing uses the
same two ops. On the starter each later product is then 1.5-2× faster for 8-32 rows, and a whole 16-row step is
1.44× faster (`python -m bench --only step-cost`).

How it is used: `packed_linears(model, rows)` around a generation packs every float32 ``nn.Linear`` weight for
products of ``rows`` rows. Inside it, in the current contextvars context only (as for hooks.py's hooks), a layer
whose input has between ``rows / 4`` and ``rows`` rows runs the packed product. Its input is padded with zero rows
up to ``rows``, because a packed weight serves only the row count it was packed for. Any other call runs
``nn.Linear.forward`` unchanged: a prefill's many rows, autograd, another thread, a layer whose weight changed in
place since it was packed (its tensor version moved). A layer keeps its forward hooks; only the kernel under its
forward changes.

What changes in the results: float rounding only. A packed product differs from ``F.linear`` by about 1e-6
relative, as ``F.linear``'s own rows differ between batch sizes. Under greedy decoding that can flip a near-tie,
and so can a change of batch. A packed row does not depend on the other rows of its product (padding included);
tests check this bit for bit.

The cost: a packed copy of every weight for the context's duration (the starter: about 2 GB, 0.3-0.5 s to
pack). Where touching fresh memory is slow (the project's VM), the first prefills after packing pay for it: see
bench/README.md, issue 17 third pass. It is skipped where that memory is not available, where the MKL ops are
missing (non-x86 builds) or fail a self-test, where they are not faster on this CPU (`pays_here`: on an AMD EPYC
they were slower), and when ``SSN_PACKED_LINEAR=0`` is set in the environment (``=1``: wherever the kernel works).

The second packed kernel is oneDNN's (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what
Inductor's freezing uses with oneDNN): its reordered weight serves any row count up to the one it was reordered for,
without padding, so a packed context runs it for 1 to ``rows`` rows. On the AMD EPYC where MKL's packed product
loses, oneDNN's is 1.5-2× faster than the weight-left product for 4-16 rows of the starter's weights, and greedy
generation of 4 / 8 / 16 rows 1.37× / 1.39× / 1.10× faster (issue 17, eighth pass). Where both kernels work,
packing uses the faster at the model-sized check (`packing_kernel`); ``SSN_PACKED_KERNEL=mkl|onednn`` picks one.

The weight-left product: ``F.linear(x, W)`` is ``x · Wᵀ``, and MKL's kernel for that short, wide product can be
slow on some CPUs. On an AMD EPYC (issue 17, seventh pass) a 2-row ``F.linear`` costs twice one row (it does not read
the weight once for both), while the same product computed as ``(W · xᵀ)ᵀ`` costs 0.2-0.6× ``F.linear``'s for 1 to
32 rows on the starter's tall weights (the MLP's gate and up, the output layer); one row goes through it as two (a
one-column product takes the matrix-vector kernel, as slow as ``F.linear``). `weight_left_products(model)` around
a generation runs it, in the current contextvars context only, for each layer and row count where it is at least
10% faster here: timed once per process on the layer's weight (its first 16 MB) for rows in powers of two
(`_weight_left_pays`), and not at all where a model-sized check says it never pays (`weight_left_pays_here`) or
``SSN_WEIGHT_LEFT=0``. It needs no copy of any weight. Its results differ from ``F.linear``'s by float rounding
only, as ``F.linear``'s own rows differ between batch sizes (both are equal from 16 rows on the starter's shapes).
Where both kernels apply, the packed product runs for its rows and the weight-left product below them, and packing
is only used where it beats the better of the two unpacked products.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssn_core.forward_swap import ForwardSwap, env_switch, fastest_alternating

# Outside this band of rows a step is better served by F.linear: at 1-2 rows MKL's plain kernel is already
# memory-bound and cheaper than a padded packed product, and from 64 rows packing gained 1.05× on the starter.
MIN_PACK_ROWS = 4
MAX_PACK_ROWS = 32
_MEMORY_MARGIN_BYTES = 1 << 30  # free memory to leave after the packed copies are made

_ENV_SWITCH = "SSN_PACKED_LINEAR"
_WEIGHT_LEFT_SWITCH = "SSN_WEIGHT_LEFT"
WEIGHT_LEFT_MAX_ROWS = MAX_PACK_ROWS  # more rows (a prefill): F.linear, whose kernel suits tall inputs
_TUNING_WEIGHT_BYTES = 16 << 20  # a weight's first rows up to this size time the two products for its shape


@dataclass
class _PackedWeight:
    """One layer's weight reordered for products of ``rows`` rows (valid while the weight tensor is unchanged)."""

    weight: torch.Tensor  # the module's weight, as packed  [out, in]
    version: int  # its tensor version then; an in-place edit moves it
    packed: torch.Tensor  # MKL's opaque packed layout
    rows: int  # the product's row count (MKL: inputs are padded up to it; oneDNN: the most rows it serves)
    min_rows: int  # fewer rows than this: F.linear is cheaper than the padded product
    kernel: str = "mkl"  # "mkl" (cblas_sgemm_pack) or "onednn" (oneDNN's reordered weight: any row count, no padding)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])  # [rows, in]
        if self.kernel == "onednn":
            # One row goes through as two: alone it takes another kernel, whose rounding differs from the row's in
            # a product of more rows (checked by `_kernel_works`); from two rows on a row's result is the same.
            both = flat.repeat(2, 1) if rows == 1 else flat  # [max(rows, 2), in]
            out = torch.ops.mkldnn._linear_pointwise(both, self.packed, bias, "none", [], "")[:rows]  # [rows, out]
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if rows < self.rows:
            flat = torch.cat([flat, flat.new_zeros(self.rows - rows, flat.shape[1])])  # [self.rows, in]
        out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, bias, self.rows)  # [self.rows, out]
        return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def weight_left_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight · xᵀ)ᵀ`` (equal up to float rounding)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])  # [rows, in]
    if rows == 1:  # a one-column product takes the matrix-vector kernel: two columns are faster
        flat = flat.repeat(2, 1)  # [2, in]
    out = torch.mm(weight, flat.T)[:, :rows].T.contiguous()  # [rows, out]
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _row_bucket(rows: int) -> int:
    """The power of two at or above ``rows``: the row counts the weight-left product is timed at."""
    return 1 << max(rows - 1, 0).bit_length()


# (tuning weight rows, columns, row bucket) -> whether the weight-left product is at least 10% faster there.
_WEIGHT_LEFT_CHOICE: dict[tuple[int, int, int], bool] = {}
_WEIGHT_LEFT_LOCK = threading.Lock()


def _weight_left_pays(weight: torch.Tensor, rows: int, repeats: int = 5) -> bool:
    """Whether the weight-left product of ``rows`` rows beats ``F.linear`` by 10% on ``weight``'s shape here: timed
    once per process and shape (on at most the weight's first `_TUNING_WEIGHT_BYTES`, about 10-40 ms)."""
    n_out = min(weight.shape[0], max(1, _TUNING_WEIGHT_BYTES // (4 * weight.shape[1])))
    key = (n_out, weight.shape[1], _row_bucket(rows))
    choice = _WEIGHT_LEFT_CHOICE.get(key)
    if choice is None:
        sample = weight.detach()[:n_out]  # [n_out, in], a view
        x = torch.randn(key[2], weight.shape[1], generator=torch.Generator().manual_seed(0))
        plain_s, left_s = fastest_alternating(lambda: F.linear(x, sample),
                                              lambda: weight_left_linear(sample, None, x), repeats)
        with _WEIGHT_LEFT_LOCK:
            choice = _WEIGHT_LEFT_CHOICE.setdefault(key, left_s < 0.9 * plain_s)
    return choice


# The packed weights active in the current context (thread / task): id(module) -> its packed weight.
_ACTIVE: ContextVar[dict[int, _PackedWeight] | None] = ContextVar("ssn_packed_linears", default=None)
# Whether the current context runs weight-left products where they pay.
_WEIGHT_LEFT: ContextVar[bool] = ContextVar("ssn_weight_left", default=False)


def linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a layer while some context swaps it: the packed product when this context packs the layer
    and the call qualifies, else the weight-left product where this context runs it and it pays, else the layer's
    own forward. (The greedy screen's output layer falls back to it: what that layer would run unscreened.)"""
    if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu":
        rows = x.numel() // max(x.shape[-1], 1)
        active = _ACTIVE.get()
        packed = active.get(id(module)) if active else None
        if (packed is not None and module.weight is packed.weight and module.weight._version == packed.version
                and packed.min_rows <= rows <= packed.rows):
            return packed.linear(x, module.bias)
        if _WEIGHT_LEFT.get() and weight_left_would_run(module.weight, rows):
            return weight_left_linear(module.weight, module.bias, x)
    return nn.Linear.forward(module, x)


_SWAP = ForwardSwap(linear_forward)


def weight_left_active() -> bool:
    """Whether the current context runs weight-left products (inside `weight_left_products`)."""
    return _WEIGHT_LEFT.get()


def weight_left_would_run(weight: torch.Tensor, rows: int) -> bool:
    """Whether `linear_forward` would run the weight-left product for ``rows`` rows of ``weight`` in a context
    that runs them (float32 on the CPU, 1 to `WEIGHT_LEFT_MAX_ROWS` rows, and it pays for the shape here)."""
    return (1 <= rows <= WEIGHT_LEFT_MAX_ROWS and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and _weight_left_pays(weight, rows))


KERNELS = ("mkl", "onednn")
_KERNEL_SWITCH = "SSN_PACKED_KERNEL"  # "mkl" or "onednn": that one only (where it works); else the faster here


def _pack(kernel: str, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` reordered by ``kernel`` for products of ``rows`` rows (a copy of the weight's size)."""
    if kernel == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def _packed(kernel: str, weight: torch.Tensor, rows: int, min_rows: int) -> _PackedWeight:
    return _PackedWeight(weight, weight._version, _pack(kernel, weight.detach(), rows), rows,
                         1 if kernel == "onednn" else min_rows, kernel)


def _min_rows(rows: int) -> int:
    """The fewest rows a product packed for ``rows`` runs packed (`pack_rows` keeps the pool's rows to 4-32)."""
    return min(rows, max(MIN_PACK_ROWS, -(-rows // 4)))


def packed_sample(kernel: str, weight: torch.Tensor, rows: int) -> _PackedWeight:
    """``weight`` packed by ``kernel`` for ``rows`` rows, as `packed_linears` packs a layer (to time it against
    another product: the greedy screen's check)."""
    return _packed(kernel, weight, rows, _min_rows(rows))


def _kernel_works(kernel: str) -> bool:
    """Whether ``kernel``'s ops exist in this torch build, agree with F.linear, and a row's result does not depend on
    the other rows of its product, padding or row count (on an AMD EPYC MKL's did: it is then off)."""
    ops = getattr(torch.ops, "mkldnn" if kernel == "onednn" else "mkl", None)
    available = torch.backends.mkldnn.is_available() if kernel == "onednn" else torch.backends.mkl.is_available()
    if not available or ops is None:
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator)  # [out, in]
        bias = torch.randn(24, generator=generator)
        x = torch.randn(8, 40, generator=generator)  # [rows, in]
        neighbours = torch.cat([x[:3], torch.randn(5, 40, generator=generator)])
        packed = _packed(kernel, weight, 8, 1)
        full = packed.linear(x, bias)
        return bool(torch.allclose(full, F.linear(x, weight, bias), rtol=1e-4, atol=1e-5)
                    and torch.equal(packed.linear(x[:3], bias), full[:3])
                    and torch.equal(packed.linear(x[:1], bias), full[:1])
                    and torch.equal(packed.linear(neighbours, bias)[:3], full[:3]))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def _working_kernels() -> tuple[str, ...]:
    return tuple(k for k in KERNELS if _kernel_works(k))


def available_kernels() -> tuple[str, ...]:
    """The packed kernels that work here (`_kernel_works`, checked once per process), narrowed to one by
    ``SSN_PACKED_KERNEL=mkl|onednn``."""
    wanted = os.environ.get(_KERNEL_SWITCH, "").strip().lower()
    return tuple(k for k in _working_kernels() if wanted not in KERNELS or k == wanted)


def kernel_available() -> bool:
    """Whether some packed kernel works in this torch build (`available_kernels`)."""
    return bool(available_kernels())


def _switch() -> str:
    """``SSN_PACKED_LINEAR``: "off", "on" (wherever the kernel works) or "auto" (where it pays)."""
    return env_switch(_ENV_SWITCH)


@functools.cache
def _kernel_timings(rows: int = 16, n_in: int = 1024, n_out: int = 4096, repeats: int = 9
                    ) -> tuple[float, dict[str, float]]:
    """(the better unpacked product's seconds, {kernel: packed seconds}) for a model-sized weight here, each the
    fastest of ``repeats`` calls alternating with the unpacked ones (timed once per process, about 50 ms a kernel).
    The unpacked side is ``F.linear`` and, where generations run it (`weight_left_enabled`), the weight-left
    product."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=generator)
    x = torch.randn(rows, n_in, generator=generator)
    left = weight_left_enabled()
    plain_best, packed_best = float("inf"), {}
    for kernel in available_kernels():
        product = functools.partial(_packed(kernel, weight, rows, 1).linear, x, None)
        plain_s, packed_s = fastest_alternating(lambda: F.linear(x, weight), product, repeats)
        if left:
            left_s, packed_again_s = fastest_alternating(lambda: weight_left_linear(weight, None, x), product, repeats)
            plain_s, packed_s = min(plain_s, left_s), min(packed_s, packed_again_s)
        plain_best, packed_best[kernel] = min(plain_best, plain_s), packed_s
    return plain_best, packed_best


def pays_here(rows: int = 16, n_in: int = 1024, n_out: int = 4096, repeats: int = 9) -> bool:
    """Whether a packed product beats the unpacked one generations would run on this CPU (`_kernel_timings`).

    MKL's packed kernel is 1.5-2× faster for 8-32 rows on the Intel Xeon the project measured first, but slower on
    an AMD EPYC (a 16-row step of the starter 0.87×: bench/README.md, issue 17 fourth pass), so packing is used only
    where a model-sized product here is at least 10% faster packed, with the faster kernel, than ``F.linear`` and,
    where generations run it (`weight_left_enabled`), the weight-left product. On that EPYC oneDNN's reordered
    weight is (issue 17, eighth pass).
    """
    plain_s, packed_s = _kernel_timings(rows, n_in, n_out, repeats)
    return bool(packed_s) and min(packed_s.values()) < 0.9 * plain_s


def packing_kernel() -> str | None:
    """The kernel `packed_linears` packs with: the only one available, or the faster one at the model-sized check;
    None where none works."""
    kernels = available_kernels()
    if len(kernels) <= 1:
        return kernels[0] if kernels else None
    timings = _kernel_timings(16, 1024, 4096, 9)[1]  # as `pays_here()` calls it: one cached timing for both
    return min(kernels, key=lambda k: timings.get(k, float("inf")))


@functools.cache
def weight_left_pays_here(n_in: int = 1024, n_out: int = 4096, repeats: int = 9) -> bool:
    """Whether the weight-left product is at least 10% faster than ``F.linear`` for 2 or 16 rows of a model-sized
    weight on this CPU (timed once per process, about 50 ms): where it is not, no layer is timed for it."""
    weight = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(0))
    def pays(x: torch.Tensor) -> bool:
        plain_s, left_s = fastest_alternating(lambda: F.linear(x, weight),
                                              lambda: weight_left_linear(weight, None, x), repeats)
        return left_s < 0.9 * plain_s

    return any(pays(torch.randn(rows, n_in, generator=torch.Generator().manual_seed(1))) for rows in (2, 16))


def weight_left_enabled() -> bool:
    """Whether generations in this process may run weight-left products: ``SSN_WEIGHT_LEFT`` is "1", or is unset
    and they pay on this CPU (`weight_left_pays_here`; each layer's shape is then timed at first use). Run manifests
    record it, since it changes float rounding."""
    switch = env_switch(_WEIGHT_LEFT_SWITCH)
    return switch == "on" or (switch == "auto" and weight_left_pays_here())


def enabled() -> bool:
    """Whether generations in this process run packed products: the kernel works, and ``SSN_PACKED_LINEAR`` is "1",
    or is unset and they pay on this CPU (`pays_here`). Run manifests record it beside the library versions, since
    it changes float rounding."""
    switch = _switch()
    if switch == "off" or not kernel_available():
        return False
    return switch == "on" or pays_here()


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def packable_layers(model: nn.Module) -> list[nn.Linear]:
    """The layers `packed_linears` would pack: plain float32 ``nn.Linear`` on the CPU, whose forward nobody else
    replaced (accelerate's offloading and quantized layers keep theirs)."""
    layers = []
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            continue
        if _SWAP.replaced_by_another(module):
            continue
        layers.append(module)
    return layers


def pack_rows(rows_in_flight: int, max_new_tokens: int) -> int | None:
    """The row count to pack for when a generation keeps ``rows_in_flight`` rows for up to ``max_new_tokens`` steps,
    or None when packing would not pay (too few or too many rows, or too few steps to repay 0.3-0.5 s of packing)."""
    if max_new_tokens < 8 or not MIN_PACK_ROWS <= rows_in_flight <= MAX_PACK_ROWS:
        return None
    return rows_in_flight


@contextmanager
def packed_linears(model: nn.Module, rows: int | None) -> Iterator[int]:
    """Decoding steps of up to ``rows`` rows inside the block use packed weights (see the module docstring).

    Yields how many layers were packed: 0 when ``rows`` is None, the kernel or the memory is missing, it is switched
    off, or an enclosing block of this context already packs. Always restores every layer's forward on exit.
    """
    if rows is None or _ACTIVE.get() is not None or not enabled():
        yield 0
        return
    layers = packable_layers(model)
    needed = sum(layer.weight.numel() * 4 for layer in layers)
    available = _available_memory_bytes()
    if not layers or (available is not None and available < needed + _MEMORY_MARGIN_BYTES):
        yield 0
        return
    min_rows = _min_rows(rows)
    kernel = packing_kernel()
    try:
        with torch.no_grad():
            packs = {id(layer): _packed(kernel, layer.weight, rows, min_rows) for layer in layers} if kernel else {}
    except (RuntimeError, MemoryError):  # packing is an optimisation: without the memory, run unpacked
        packs = {}
    if not packs:
        yield 0
        return
    token = None
    try:
        _SWAP.install(layers)
        token = _ACTIVE.set(packs)
        yield len(packs)
    finally:
        if token is not None:
            _ACTIVE.reset(token)
        _SWAP.uninstall(layers)


@contextmanager
def weight_left_products(model: nn.Module) -> Iterator[int]:
    """Calls of 1 to `WEIGHT_LEFT_MAX_ROWS` rows inside the block run the weight-left product where it pays (see the
    module docstring). Yields how many layers may run it: 0 when it is switched off or does not pay here, or an
    enclosing block of this context already runs it. Always restores every layer's forward on exit."""
    if _WEIGHT_LEFT.get() or not weight_left_enabled():
        yield 0
        return
    layers = packable_layers(model)
    if not layers:
        yield 0
        return
    token = None
    try:
        _SWAP.install(layers)
        token = _WEIGHT_LEFT.set(True)
        yield len(layers)
    finally:
        if token is not None:
            _WEIGHT_LEFT.reset(token)
        _SWAP.uninstall(layers)


def packed_layer_count(model: nn.Module) -> int:
    """Layers of ``model`` whose forward is currently the packed dispatch (0 once every context has exited)."""
    return sum(1 for module in model.modules() if _SWAP.installed(module))
