"""Dense weights of quantized and offloaded layers, for the closed forms that need a layer's weight matrix.

The closed forms of `ssn_core.scoring` (column norms of W_down and W_O, W_O's per-head factors and Gram matrices),
the ``direction`` scores (each neuron's write along the refusal direction) and the vocabulary projection read a
layer's weight as a float matrix. bitsandbytes layers keep theirs packed:

- ``Linear4bit`` (NF4 / FP4): a ``Params4bit`` of packed uint8 plus its ``quant_state`` (block absmax, code);
- ``Linear8bitLt`` (LLM.int8()): int8 rows ``CB`` (the parameter's data) plus one float scale per row ``SCB``.

`dense_weight` dequantizes them with bitsandbytes' own functions (``functional.dequantize_4bit``,
``functional.int8_vectorwise_dequant``) on the layer's own device, one layer at a time. Callers keep what they derive
(norms, factors, one vector per neuron), computed once per layer and model (`scoring.constants._ModelConstants`),
never the dense matrices, so a 4-bit model's scores cost one transient dense copy of one layer's W_down / W_O at a time.

What the scores of a quantized model mean: its activations are computed through the quantized weights, and the closed
forms use the dequantized weights those activations actually meet, so they are the exact layer-local effects *of the
quantized model* (not estimates of the full-precision model's). How close they come to the full-precision model's is
measured, not assumed (tests/test_quantized.py reports the rank correlation on a tiny model).

A layer that accelerate offloaded (its weights on the meta device between forward passes: a ``device_map`` with
"cpu" or "disk" entries behind a GPU) is loaded for the moment with accelerate's ``align_module_device``.

This module also explains and silences two bitsandbytes messages that every CPU run printed (`quiet_bitsandbytes`).
"""

from __future__ import annotations

import logging

from ssn_core.errors import SSNError

# (logger, message start) of bitsandbytes messages that say nothing a user can act on; see quiet_bitsandbytes.
_QUIET = (
    # bitsandbytes >= 0.49 on a CPU with AVX-512 BF16 tries, at import, to fetch an optional fused 4-bit CPU kernel from
    # the Hugging Face hub through the ``kernels`` package ("kernels-community/quantization-bitsandbytes"). Without that
    # package it logs this and uses its own compiled kernels, which give the same results (the hub kernel is only a
    # faster single-row product). SSN Lab never downloads code, so there is nothing to do about it.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # The 8-bit CPU matmul casts float32 inputs to float16 and logs so on every call (every layer, every token).
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Drop the two bitsandbytes messages above (idempotent); every other bitsandbytes message passes. Runs when
    `ssn_core.loading` is imported, before bitsandbytes is: the loggers are created here first and keep the filters."""
    for name, prefix in _QUIET:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def quantization_of(module) -> str | None:
    """"4bit" (bitsandbytes Linear4bit), "8bit" (Linear8bitLt) or None (a plain floating-point layer)."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__
    if kind == "Params4bit" or type(module).__name__ == "Linear4bit":
        return "4bit"
    if kind == "Int8Params" or type(module).__name__ == "Linear8bitLt":
        return "8bit"
    return None


def keep_4bit_differentiable(model) -> int:
    """Keep bitsandbytes' 4-bit layers in their portable layout, so gradients pass through them on a CPU too.

    On a CPU with AVX-512 BF16, ``Linear4bit`` repacks its weight into a CPU-only layout at its first forward pass in
    eval mode without gradients, and from then on multiplies with a kernel that autograd cannot see: the input
    gradients that ``global``, ``attribution`` and training need would not pass (PyTorch stops with "a view of a leaf
    Variable ... in-place"), and the repacked data is no longer what ``dequantize_4bit`` reads. So SSN Lab turns the
    repacking off (``support_avx512bf16_for_cpu = False``; it then uses bitsandbytes' generic 4-bit matmul, with the
    same results) and restores a layer that was already repacked with bitsandbytes' own inverse (as bitsandbytes
    does when it saves a model). The weights' values do not change. Returns the number of layers touched; GPUs and
    plain models are left alone.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" and not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            changed += 1
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def _dequantize(module):
    """The module's weight as stored by nn.Linear ([out, in]) or GPT-2's Conv1D ([in, out]), float32, dequantized."""
    import torch

    weight = getattr(module, "weight", None)
    if weight is None:
        raise SSNError(f"{type(module).__name__} has no weight; the closed-form scores need one")
    kind = quantization_of(module)
    if kind == "4bit":
        from bitsandbytes import functional as bnb_functional

        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            keep_4bit_differentiable(module)  # repacked for the CPU kernel: back to the layout dequantize_4bit reads
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise SSNError(f"this 4-bit {type(module).__name__} has no quantization state (not quantized yet: move the "
                           "model to its device first)")
        return bnb_functional.dequantize_4bit(weight.data, state).float()
    if kind == "8bit":
        from bitsandbytes import functional as bnb_functional

        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if weight.dtype != torch.int8 or scales is None:  # has_fp16_weights=True keeps a float weight
            if torch.is_floating_point(weight):
                return weight.detach().float()
            raise SSNError(f"this 8-bit {type(module).__name__} has no row scales (SCB); cannot dequantize it")
        return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()
    if weight.device.type == "meta":
        raise SSNError(f"the weight of {type(module).__name__} is not loaded (meta device); the closed-form scores "
                       "need it: give the model more GPU/CPU memory, or load it in 4-bit")
    if not torch.is_floating_point(weight):
        raise SSNError(f"the closed-form scores need the weight of {type(module).__name__} as numbers; its "
                       f"{weight.dtype} weight is quantized in a way SSN Lab does not read (bitsandbytes 4-bit and "
                       "8-bit are supported; or use method 'activation', 'global' or 'attribution')")
    return weight.detach().float()


def dense_weight(module):
    """The layer's weight as a float32 [out, in] matrix on its own device: dequantized (bitsandbytes 4-/8-bit),
    loaded for the moment when accelerate offloaded it, transposed for GPT-2's Conv1D."""
    from ssn_core.sites import weight_axis

    try:
        from accelerate.utils import align_module_device
    except ImportError:  # accelerate is a requirement; without it nothing can be offloaded either
        from contextlib import nullcontext as align_module_device

    with align_module_device(module):
        weight = _dequantize(module)
    return weight if weight_axis(module, "in") == 1 else weight.T
