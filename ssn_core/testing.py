"""Tiny randomly initialised models of every supported family, built from configs (no downloads).

Used by the tests, the benchmarks' smoke mode and the app tests. Sizes are chosen so that a forward
pass takes milliseconds while keeping every structural feature of the family: grouped-query
attention (4 query heads over 2 KV heads where the family has it), gated MLPs, fused projections.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

TINY_FAMILIES: tuple[str, ...] = (
    "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
)

TINY_VOCAB = 320  # byte-level tokenizer (256 bytes + specials) fits


def tiny_config(family: str, **overrides):
    """A small config of the given model_type: 2 layers, hidden 64, 4 heads (2 KV heads), MLP 128."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(TINY_FAMILIES)}")
    common = {"vocab_size": TINY_VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              "tie_word_embeddings": False}
    if family == "gpt2":
        kwargs = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, **common)
    elif family == "gpt_neox":
        kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=512, **common)
    else:
        kwargs = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=512, **common)
        if family in ("gemma", "gemma2", "gemma3_text", "qwen3"):
            kwargs["head_dim"] = 16
        if family == "qwen2":
            kwargs["attention_bias"] = True  # real Qwen2 has q/k/v biases
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def tiny_hf_model(family: str = "qwen2", seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides) -> PreTrainedModel:
    """A tiny randomly initialised causal LM in eval mode, with eager attention for exact comparisons."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    # Random init leaves norms at 1 and biases at 0; perturb them so tests see every parameter's effect.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()
