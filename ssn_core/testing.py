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


# ----------------------------------------------------------------------------------------------
# Tokenizer and LoadedModel wrappers for the tiny models

TINY_SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "<|im_end|>", "<|im_start|>")  # ids 0..3: pad, bos, eos, turn start
TINY_BYTE_OFFSET = 16  # byte b is token 16 + b
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_tokenizer(chat_template: bool = True):
    """An offline byte-level tokenizer matching the tiny models' special ids (pad 0, bos 1, eos 2).

    Every UTF-8 byte is one token, so any text (any script) round-trips. The chat template is
    ChatML-like (``<|im_start|>role\\n...<|im_end|>``), with ``<|im_end|>`` as eos as in Qwen.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TINY_SPECIALS)}
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = TINY_BYTE_OFFSET + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>"
    )
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model(family: str = "qwen2", seed: int = 0, chat_template: bool = True, **overrides):
    """A tiny random model of the family as a `LoadedModel` (tokenizer, summary, sites), in memory."""
    from ssn_core.loading import ModelSpec, finish_loaded

    model = tiny_hf_model(family, seed=seed, **overrides)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return finish_loaded(
        model, tiny_tokenizer(chat_template), name=f"tiny-{family}", source=f"tiny:{family}",
        spec=ModelSpec(f"tiny:{family}", device_map="cpu"), device="cpu", loaded_from="memory", load_seconds=0.0,
    )
