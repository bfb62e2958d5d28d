"""`LoadedModel`: a model ready for analysis, and the chat formatting every other module uses.

Every analysis takes a `LoadedModel`. It holds the transformers model (eval mode), its tokenizer and its
`ModelSummary`, builds the neuron `SiteMap` once on first use, and owns how a user turn becomes a prompt
(`format_chat`, `format_chat_with_span`, the plain ``User:/Assistant:`` fallback for tokenizers without a chat
template) and how prompts become tensors (`tokenize_prompts`). It is kept apart from the loaders because every
engine module imports it, and none of them needs to know how a model was found, converted or cached.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from ssn_core._conventions import input_device
from ssn_core.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

    from ssn_core.loading.spec import ModelSummary
    from ssn_core.sites import SiteMap

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What ``AutoModelForCausalLM`` loads: a transformers model that also generates (a type, never built)."""

FALLBACK_CHAT_TEMPLATE = "User: {user}\nAssistant:"
_SPAN_SENTINEL = "\u2063SSN-USER-TEXT\u2063"  # invisible separator: never in real prompts


@dataclass(eq=False)
class LoadedModel:
    """A model ready for analysis: never modified in place (interventions are context-scoped hooks)."""

    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    summary: ModelSummary
    _sites: SiteMap | None = field(default=None, init=False, repr=False)
    _sites_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def sites(self) -> SiteMap:
        """Neuron sites, built once on first access (raises UnsupportedArchitectureError)."""
        if self._sites is None:
            with self._sites_lock:
                if self._sites is None:
                    from ssn_core.sites import find_sites

                    self._sites = find_sites(self.model)
        return self._sites

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device under a multi-device map): `input_device` of the model."""
        return input_device(self.model)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, user_text: str, system: str | None = None) -> str:
        """The prompt for one user turn, ending where the assistant's reply starts.

        system=None keeps the chat template's default behaviour, which is what users of the model get
        (Qwen2.5's template then adds "You are Qwen, created by Alibaba Cloud. You are a helpful
        assistant."). system="" means no system prompt: no system turn where the template allows it
        (for ChatML templates such as Qwen's, the turn the template would add is removed), or an empty
        system turn otherwise. Any other string is passed as the system turn.
        """
        return self.format_chat_with_span(user_text, system)[0]

    def format_chat_with_span(self, user_text: str, system: str | None = None) -> tuple[str, tuple[int, int]]:
        """The formatted prompt and the character span (start, end) of the user text inside it.

        ``text[start:end]`` is the user text as the template rendered it (templates that trim the
        content give the trimmed text). Scoring uses the span to find the user-content tokens via
        the tokenizer's offset mapping.
        """
        real = self._render(user_text, system)
        probe = self._render(_SPAN_SENTINEL, system)
        start = probe.find(_SPAN_SENTINEL)
        suffix_len = len(probe) - start - len(_SPAN_SENTINEL)
        end = len(real) - suffix_len
        if start >= 0 and real[:start] == probe[:start] and real[end:] == probe[len(probe) - suffix_len:]:
            return real, (start, end)
        # The template transformed the content in a way the probe could not follow: search for it.
        needle = user_text.strip()
        found = real.rfind(needle)
        if found < 0:
            raise ModelLoadError("the chat template does not include the user text verbatim; cannot locate it")
        return real, (found, found + len(needle))

    def _render(self, user_text: str, system: str | None) -> str:
        if not self.has_chat_template:
            prefix = f"{system}\n\n" if system else ""
            return prefix + FALLBACK_CHAT_TEMPLATE.format(user=user_text)
        user_turn = {"role": "user", "content": user_text}
        if system:
            return self._apply_template([{"role": "system", "content": system}, user_turn])
        text = self._apply_template([user_turn])
        if system == "":
            text = self._without_default_system(text, user_turn)
        return text

    def _apply_template(self, messages: list[dict]) -> str:
        try:
            # tokenize=False returns the text (transformers types every form the call can return)
            return cast(str, self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except Exception as exc:  # jinja errors, templates without a system role, ...
            raise ModelLoadError(f"the model's chat template failed on this conversation: {exc}") from exc

    def _without_default_system(self, text: str, user_turn: dict) -> str:
        """Remove a system turn the template added by itself (see `format_chat`)."""
        marker = "\u2063SSN-SYSTEM\u2063"
        try:
            probe = self._apply_template([{"role": "system", "content": marker}, user_turn])
        except ModelLoadError:
            return text  # the template has no system role at all: nothing was injected
        cut = probe.find(marker)
        head, tail = probe[:cut], probe[cut + len(marker):]
        injected = cut >= 0 and text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail)
        if not injected:
            return text
        chatml_open, chatml_close = "<|im_start|>system\n", "<|im_end|>\n"
        if head.endswith(chatml_open) and tail.startswith(chatml_close):
            # head = <bos?> + "<|im_start|>system\n"; tail = "<|im_end|>\n" + user turn + generation prompt
            return head[: -len(chatml_open)] + tail[len(chatml_close):]
        return self._apply_template([{"role": "system", "content": ""}, user_turn])

    def prompt_texts(self, user_texts: list[str], *, chat: bool = True, system: str | None = None) -> list[str]:
        """The prompt strings for a batch (chat-formatted, or the raw texts when chat=False)."""
        return [self.format_chat(text, system) if chat else text for text in user_texts]

    def tokenize_prompts(
        self, prompts: list[str], *, chat_formatted: bool = True, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask [B, T] on the model's device.

        Chat templates add their own special tokens (BOS where the model wants one), so special tokens
        are only added to texts that did not go through a real template.
        """
        add_special = not (chat_formatted and self.has_chat_template)
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side=padding_side, add_special_tokens=add_special
        )
        return {"input_ids": encoded["input_ids"].to(self.device),
                "attention_mask": encoded["attention_mask"].to(self.device)}

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply: the generation config's eos ids and the tokenizer's eos."""
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            for token_id in value if isinstance(value, list | tuple) else [value]:
                if token_id is not None and int(token_id) not in ids:
                    ids.append(int(token_id))
        return ids
