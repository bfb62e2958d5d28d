"""Vocabulary projection: which tokens a neuron's output direction promotes and suppresses.

A neuron writes ``a · d`` into the residual stream, with ``d`` its output direction:

- ``mlp`` neuron i: column i of the MLP's output projection (W_down[:, i]);
- ``attn_o`` coordinate j: column j of the attention output projection (W_O[:, j]);
- ``attn_v`` coordinate (kv group g, dim j): every query head h of group g reads it and writes it through
  W_O[:, hD + j]; the direction is their sum (exact when the heads attend alike, a summary otherwise);
- ``attn_q`` / ``attn_k``: they move attention patterns and write nothing themselves, so there is no direction.

The projection is the logit-lens reading of ``d``: ``logits = W_U (norm(d) - norm(0))``, with the model's own
final norm (RMSNorm: γ ⊙ d / rms(d); LayerNorm also centres d, and its bias cancels) and unembedding W_U. The
norm's scale is one positive number, so the ranking is that of adding ``d`` to the last residual stream.
Tokens are grouped by script (`ssn_core.judges.char_script`) so the promoted Chinese, Bengali, ... tokens are
shown next to the English ones; byte pieces of a character that the tokenizer split have no script ("bytes").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssn_core.errors import SSNError
from ssn_core.sites import SiteMap

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ssn_core.loading import LoadedModel

Triple = tuple[int, str, int]


@dataclass
class VocabProjection:
    neuron: Triple
    direction: str  # how the direction was formed
    promoted: list[dict]  # token_id, token, logit, script (highest logits first)
    suppressed: list[dict]  # lowest logits first
    by_script: dict[str, dict]  # script -> {"languages": [...], "promoted": [...], "suppressed": [...]}

    def to_dict(self) -> dict:
        return {"neuron": list(self.neuron), "direction": self.direction, "promoted": self.promoted,
                "suppressed": self.suppressed, "by_script": self.by_script}


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    from ssn_core.scoring import _weight_out_in as weight

    return weight(module)


def output_direction(lm: LoadedModel, neuron: Triple) -> tuple[torch.Tensor | None, str]:
    """(direction [hidden] float32, description), or (None, why there is none)."""
    layer, kind, index = neuron
    sites: SiteMap = lm.sites
    if kind in ("attn_q", "attn_k"):
        return None, (f"{kind} coordinates change where attention looks; they write nothing to the residual stream "
                      "themselves, so they have no vocabulary projection")
    if kind == "mlp":
        site = sites.get(layer, "mlp")
        column = int(site.coords[index])
        return _weight_out_in(site.module)[:, column].float(), "column of the MLP output projection (W_down)"
    site = sites.get(layer, "attn_o")
    w_o = _weight_out_in(site.module)  # [hidden, C]
    if kind == "attn_o":
        return w_o[:, int(site.coords[index])].float(), "column of the attention output projection (W_O)"
    D, H, K = site.head_dim, site.n_heads, site.n_kv_heads
    group, dim = divmod(index, D)
    heads = range(group * (H // K), (group + 1) * (H // K))
    columns = site.coords[torch.tensor([h * D + dim for h in heads])]
    return (w_o.index_select(1, columns.to(w_o.device)).sum(1).float(),
            f"sum of the W_O columns of the {len(heads)} query head(s) that read this value coordinate")


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    for holder in (base, getattr(base, "language_model", None), getattr(model, "model", None)):
        for name in ("norm", "ln_f", "final_layer_norm"):
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, nn.Module):
                return module
    raise SSNError("could not find the model's final norm, so the vocabulary projection is not available")


def unembedding(model: PreTrainedModel) -> torch.Tensor:
    """W_U [V, hidden] (the output embedding; tied models share it with the input embedding)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or not torch.is_floating_point(weight):
        raise SSNError("the output layer is quantized or missing, so the vocabulary projection is not available")
    return weight.detach()


@torch.no_grad()
def project_direction(lm: LoadedModel, direction: torch.Tensor) -> torch.Tensor:
    """logits [V] float32 on the CPU: W_U (norm(d) - norm(0))."""
    norm = final_norm(lm.model)
    w_u = unembedding(lm.model)
    reference = next((p for p in norm.parameters()), w_u)
    d = direction.to(device=reference.device, dtype=reference.dtype)[None, None]  # [1, 1, hidden]
    normed = (norm(d) - norm(torch.zeros_like(d)))[0, 0]
    return (w_u @ normed.to(device=w_u.device, dtype=w_u.dtype)).float().cpu()


_SCRIPTS: dict[int, tuple] = {}


def token_texts(tokenizer) -> tuple[list[str], list[str], torch.Tensor, dict[str, int]]:
    """(decoded text, script, script code tensor [V], script -> code) of every token id of the tokenizer, computed
    once per tokenizer."""
    from ssn_core.judges import script_counts

    entry = _SCRIPTS.get(id(tokenizer))
    if entry is not None and entry[0] is tokenizer:
        return entry[1:]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    scripts = []
    for text in texts:
        if "\ufffd" in text:
            scripts.append("bytes")
            continue
        counts = script_counts(text)
        scripts.append(max(counts, key=counts.__getitem__) if counts else "none")
    codes = {name: i for i, name in enumerate(sorted(set(scripts)))}
    code_of = torch.tensor([codes[s] for s in scripts], dtype=torch.long)
    if len(_SCRIPTS) >= 2:
        _SCRIPTS.clear()
    _SCRIPTS[id(tokenizer)] = (tokenizer, texts, scripts, code_of, codes)
    return texts, scripts, code_of, codes


def _rows(order: torch.Tensor, logits: torch.Tensor, texts: list[str], scripts: list[str]) -> list[dict]:
    return [{"token_id": int(i), "token": texts[int(i)], "logit": float(logits[int(i)]), "script": scripts[int(i)]}
            for i in order.tolist()]


def vocabulary_projection(lm: LoadedModel, neuron: Triple, top: int = 20, languages: Sequence[str] = ()
                          ) -> tuple[VocabProjection | None, str]:
    """(projection, "") or (None, why not): the ``top`` promoted and suppressed tokens, overall and per script of
    ``languages`` (and of the scripts among the overall top tokens)."""
    from ssn_core.judges import LANGUAGE_SCRIPTS

    try:
        direction, how = output_direction(lm, neuron)
        if direction is None:
            return None, how
        logits = project_direction(lm, direction)
    except SSNError as exc:
        return None, str(exc)
    texts, scripts, code_of, codes = token_texts(lm.tokenizer)
    logits = logits[: len(texts)]  # rows past the tokenizer's vocabulary are padding, never produced
    top = max(1, min(int(top), logits.numel()))
    promoted = _rows(logits.topk(top).indices, logits, texts, scripts)
    suppressed = _rows((-logits).topk(top).indices, logits, texts, scripts)
    wanted: dict[str, list[str]] = {}
    for language in languages:
        for script in sorted(LANGUAGE_SCRIPTS.get(language, ())):
            wanted.setdefault(script, []).append(language)
    for row in promoted + suppressed:
        if row["script"] not in ("none", "bytes"):
            wanted.setdefault(row["script"], [])
    by_script = {}
    for script, script_languages in wanted.items():
        if script in codes:
            members = (code_of == codes[script]).nonzero().flatten()
        else:
            members = torch.empty(0, dtype=torch.long)
        if members.numel() == 0:
            by_script[script] = {"languages": script_languages, "tokens": 0, "promoted": [], "suppressed": []}
            continue
        values = logits[members]
        n = min(top, members.numel())
        by_script[script] = {"languages": script_languages, "tokens": int(members.numel()),
                             "promoted": _rows(members[values.topk(n).indices], logits, texts, scripts),
                             "suppressed": _rows(members[(-values).topk(n).indices], logits, texts, scripts)}
    layer, kind, index = neuron
    return VocabProjection(neuron=(layer, kind, index), direction=how, promoted=promoted, suppressed=suppressed,
                           by_script=by_script), ""
