"""Neuron importance scores, computed for every site in one forward pass per batch.

Importance of neuron N on prompt x (the paper's deactivation effect ΔLLM, made layer-local as in
PLND, Zhao et al. 2024): how much the output of N's own layer component changes when N is zeroed.
The component output is the module right after the site: ``down_proj`` output for ``mlp`` neurons,
``o_proj`` output for the four attention kinds. Per token t:

- ``mlp`` neuron k:    ‖Δout_t‖ = |a_tk| · ‖W_down[:, k]‖                    (exact, closed form)
- ``attn_o`` neuron k: ‖Δout_t‖ = |z_tk| · ‖W_O[:, k]‖                       (exact, closed form)
- ``attn_v`` neuron (kv head g, dim j): zeroing it zeroes z_thj for every query head h of group g, so
  Δout_t = Σ_h z_thj W_O[:, hD+j] and ‖Δout_t‖² = z_gj^T G_gj z_gj with the Gram matrix
  G_gj[h, h'] = <W_O[:, hD+j], W_O[:, h'D+j]>                                  (exact, closed form)
- ``attn_q`` / ``attn_k`` dim j: the effect passes through q/k norms (Qwen3, Gemma3), RoPE (zeroing a
  pre-RoPE coordinate moves its rotation partner too; GPT-NeoX rotates only the first dims), soft-capping
  and the softmax. We recompute the layer's attention from the captured q, k, v carriers with dim j
  zeroed, for a chunk of dims at once along a new axis (memory bounded by ``_chunk_size``), respecting
  the causal, padding and sliding-window masks. This is EXACT, not first-order:
  Δout_t = Σ_h W_O,h (A'_h - A_h)_t V, and its norm is computed as ‖(A' - A)(V F^T)‖ with F the R factor
  of W_O's head (q) or kv-group (k) columns, so no [hidden]-sized tensor is formed per dim. The
  recomputation is checked against the model's own attention output on every batch, so a family whose
  attention we do not reproduce fails loudly instead of producing wrong scores. A first-order estimate
  is not offered: its per-dim Jacobian needs the same T² · D work per head as the exact softmax, so it
  would save little and be less correct. Cost per token and layer ~ 2 · T · H · D² (q) and
  T · H · D · r (k): it grows with the prompt length T; leave q/k out with ``kinds`` / ``--sites``
  when that is too slow (see the measured per-site costs in the report / ``bench``).

Per prompt the per-token values are averaged over the user's own tokens (``aggregate="content"``,
default: the chat template's fixed tokens are the same for every prompt and would dilute the
harmful/harmless contrast), the ``last`` token, or ``all`` tokens. Hooks reduce each carrier to a
per-prompt vector [B, N] inside the forward pass and drop the activation; statistics are running
sums per (language, label), so memory does not grow with the number of prompts.

Other methods: ``activation`` (mean |activation| and mean signed activation per neuron, the cheap
LAPE / safety-neuron contrast) and ``ablation`` (exact: zero one neuron at a time with
`ssn_core.interventions` and measure the change of the final-layer hidden state; slow, run on a sample
of neurons to validate the fast scores; with ``aggregate="last"`` it is the paper's literal ΔLLM).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ssn_core import distributed
from ssn_core.errors import Cancelled, NeuronFileError, SSNError
from ssn_core.hooks import hook_sites
from ssn_core.interventions import Intervention, intervene
from ssn_core.io import atomic_save_safetensors, read_safetensors
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SITE_KINDS, NeuronSite, SiteMap

METHODS: tuple[str, ...] = ("impact", "activation", "ablation", "global", "attribution", "direction")
AGGREGATES: tuple[str, ...] = ("content", "last", "all", "reply")
TEMPLATES: tuple[str, ...] = ("chat", "raw")
FORMAT = "ssn-lab/score-table"
FORMAT_VERSION = 1

Progress = Callable[[int, int, str], None]
Group = tuple[str, str]  # (language, label)


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass
class ScoreTable:
    """Mean importance per neuron for each (language, label) group.

    ``groups[(language, label)][kind]`` is a float32 tensor [n_layers, N]. For ``ablation`` neurons that
    were not in the sample are NaN. ``signed`` (activation method only) holds the mean signed activation
    in the same layout; ``groups`` then holds the mean |activation|.
    """

    method: str
    aggregate: str
    groups: dict[Group, dict[str, torch.Tensor]]
    counts: dict[Group, int]
    meta: dict = field(default_factory=dict)  # model_fingerprint, model_type, n_layers, sizes, template, ...
    signed: dict[Group, dict[str, torch.Tensor]] | None = None

    @property
    def kinds(self) -> tuple[str, ...]:
        present = {kind for per_kind in self.groups.values() for kind in per_kind}
        return tuple(k for k in SITE_KINDS if k in present)

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(language for language, _ in self.groups))

    def get(self, language: str, label: str, kind: str) -> torch.Tensor:
        try:
            return self.groups[(language, label)][kind]
        except KeyError:
            raise SSNError(f"no {kind} scores for ({language}, {label}) in this score table") from None

    def validate(self, sites: SiteMap) -> None:
        recorded = self.meta.get("model_fingerprint")
        if recorded and recorded != sites.fingerprint():
            raise NeuronFileError(
                f"these scores were computed on a different model (fingerprint {recorded}, "
                f"{ {k: self.meta.get(k) for k in ('model_type', 'n_layers', 'sizes')} }); the loaded model is "
                f"{sites.shape_signature()} (fingerprint {sites.fingerprint()})"
            )
        sizes = sites.sizes()
        for group, per_kind in self.groups.items():
            for kind, tensor in per_kind.items():
                expected = (sites.n_layers, sizes.get(kind, -1))
                if tuple(tensor.shape) != expected:
                    raise NeuronFileError(
                        f"scores for {group} {kind} have shape {tuple(tensor.shape)}, but the model has {expected}"
                    )

    # ----- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as safetensors (atomic): one tensor per (language, label, kind), metadata as JSON."""

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for (language, label), per_kind in self.groups.items():
            for kind, tensor in per_kind.items():
                tensors[f"mean|{language}|{label}|{kind}"] = tensor.float()
        for (language, label), per_kind in (self.signed or {}).items():
            for kind, tensor in per_kind.items():
                tensors[f"signed|{language}|{label}|{kind}"] = tensor.float()
        header = {
            "format": FORMAT,
            "version": str(FORMAT_VERSION),
            "method": self.method,
            "aggregate": self.aggregate,
            "counts": json.dumps([[lang, label, n] for (lang, label), n in self.counts.items()]),
            "meta": json.dumps(self.meta),
        }
        atomic_save_safetensors(path, tensors, header)
        return path

    @classmethod
    def load(cls, path: str | Path, sites: SiteMap | None = None) -> ScoreTable:
        path = Path(path)
        header, tensors = read_safetensors(path, FORMAT, "score table")
        try:
            counts = {(str(lang), str(label)): int(n) for lang, label, n in json.loads(header.get("counts", "[]"))}
            meta = json.loads(header.get("meta", "{}"))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise NeuronFileError(f"{path}: malformed score-table metadata ({exc})") from None
        groups: dict[Group, dict[str, torch.Tensor]] = {}
        signed: dict[Group, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            parts = name.split("|")
            if len(parts) != 4 or parts[0] not in ("mean", "signed") or parts[3] not in SITE_KINDS:
                raise NeuronFileError(f"{path}: unexpected tensor {name!r}")
            target = groups if parts[0] == "mean" else signed
            target.setdefault((parts[1], parts[2]), {})[parts[3]] = tensor.float()
        table = cls(
            method=header.get("method", "?"), aggregate=header.get("aggregate", "?"), groups=groups,
            counts=counts, meta=meta, signed=signed or None,
        )
        if sites is not None:
            table.validate(sites)
        return table


# ---------------------------------------------------------------------------------------------------
# Encoding: chat template, left padding, per-token aggregation weights
# ---------------------------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    position_ids: torch.Tensor  # [B, T] 0.. for real tokens (so padding does not shift positions)
    weights: torch.Tensor  # [B, T] float32, rows sum to 1: how each token counts in the prompt's score


def _token_weights(n_tokens: int, content: list[int], aggregate: str, reply_start: int | None = None) -> list[float]:
    """How each token counts in a prompt's score (rows sum to 1).

    With a teacher-forced reply appended (``reply_start`` = index of its first token), ``last`` is still the last
    *prompt* token (where the model decides how to open its reply) and ``reply`` is every position that predicts a
    reply token: the last prompt token and the reply's own tokens but its last.
    """
    weights = [0.0] * n_tokens
    prompt_end = n_tokens if reply_start is None else reply_start  # tokens before this are the prompt
    if aggregate == "reply":
        if reply_start is None or reply_start >= n_tokens:
            raise SSNError("aggregate 'reply' scores (prompt, reply) pairs; this prompt has no reply "
                           "(build pairs with ssn_core.pairs.build_pairs)")
        chosen = list(range(reply_start - 1, n_tokens - 1))
    elif aggregate == "last" or prompt_end == 0:
        chosen = [max(prompt_end - 1, 0)]
    elif aggregate == "all" or not content:  # no user tokens (empty prompt): fall back to all tokens
        chosen = list(range(n_tokens))
    else:
        chosen = content
    for i in chosen:
        weights[i] = 1.0 / len(chosen)
    return weights


def _content_token_indices(tokenizer, text: str, span: tuple[int, int], add_special: bool) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and the indices of the tokens that overlap the character span."""
    start, end = span
    try:
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        content = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        return ids, content
    except (NotImplementedError, KeyError, TypeError, ValueError):
        # Slow tokenizers have no offset mapping: count the tokens of the text before and through the span.
        ids = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        n_before = len(tokenizer(text[:start], add_special_tokens=add_special)["input_ids"])
        n_through = len(tokenizer(text[:end], add_special_tokens=add_special)["input_ids"])
        return ids, list(range(min(n_before, len(ids)), min(n_through, len(ids))))


def encode_prompt(lm, text: str, template: str = "chat", reply: str | None = None
                  ) -> tuple[list[int], list[int]] | tuple[list[int], list[int], int]:
    """(token ids, indices of the user-content tokens) for one prompt; with a ``reply``, the reply's tokens are
    appended as the chat template renders an assistant turn and the index of its first token comes third."""
    if template == "chat":
        formatted, span = lm.format_chat_with_span(text)
        ids, content = _content_token_indices(lm.tokenizer, formatted, span, add_special=False)
    elif template == "raw":
        formatted = text
        ids, content = _content_token_indices(lm.tokenizer, text, (0, len(text)), add_special=True)
    else:
        raise SSNError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")
    if reply is None:
        return ids, content
    from ssn_core.pairs import completion_text

    reply_ids = list(lm.tokenizer(completion_text(lm, text, reply, formatted if template == "chat" else None),
                                  add_special_tokens=False)["input_ids"])
    return ids + reply_ids, content, len(ids)


def make_batch(encoded: Sequence[tuple], aggregate: str, pad_id: int,
               device: torch.device | str = "cpu") -> EncodedBatch:
    """Left-pad encoded prompts ((ids, content) or (ids, content, reply_start)) into one batch with per-token
    aggregation weights."""
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    width = max(len(item[0]) for item in encoded)
    ids_rows, mask_rows, weight_rows = [], [], []
    for item in encoded:
        ids, content = item[0], item[1]
        reply_start = item[2] if len(item) > 2 else None
        pad = width - len(ids)
        ids_rows.append([pad_id] * pad + list(ids))
        mask_rows.append([0] * pad + [1] * len(ids))
        weight_rows.append([0.0] * pad + _token_weights(len(ids), content, aggregate, reply_start))
    mask = torch.tensor(mask_rows, dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return EncodedBatch(
        input_ids=torch.tensor(ids_rows, dtype=torch.long, device=device),
        attention_mask=mask.to(device),
        position_ids=position_ids.to(device),
        weights=torch.tensor(weight_rows, dtype=torch.float32, device=device),
    )


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _aggregate(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean over tokens: values [B, T, ...] -> [B, ...]; zero-weight (padding) tokens never count.

    Fast path: one batched matmul. Padding rows of some attention kernels can hold NaN/inf, and
    0 · NaN = NaN, so a non-finite result is recomputed with the padded tokens masked out explicitly.
    """
    weights = weights.to(device=values.device, dtype=values.dtype)  # layers may sit on different devices
    B, T = weights.shape
    flat = values.reshape(B, T, -1)
    out = torch.bmm(weights[:, None, :], flat)[:, 0]
    if not bool(torch.isfinite(out).all()):
        flat = torch.where((weights > 0)[..., None], flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
        out = torch.bmm(weights[:, None, :], flat)[:, 0]
    return out.reshape(B, *values.shape[2:])


# ---------------------------------------------------------------------------------------------------
# Per-model constants: weight norms, Gram matrices, attention geometry
# ---------------------------------------------------------------------------------------------------
def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as a float32 [out, in] matrix (GPT-2 Conv1D stores [in, out]); bitsandbytes 4-/8-bit
    layers dequantized and offloaded layers loaded for the moment (`ssn_core.quantized.dense_weight`)."""
    from ssn_core.quantized import dense_weight

    return dense_weight(module)


def _qr_factor(matrix: torch.Tensor) -> torch.Tensor:
    """R with ‖R y‖ = ‖matrix y‖ for every y, and at most min(rows, cols) rows (cheaper norms)."""
    return torch.linalg.qr(matrix, mode="r")[1] if matrix.shape[0] > matrix.shape[1] else matrix


@dataclass
class _LayerAttention:
    """What the exact attention recomputation needs for one layer."""

    module: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    sliding_window: int | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    rotary: nn.Module | None
    rotary_layer_type: str | None
    o_norms: torch.Tensor  # [H*D] column norms of W_O
    v_gram: torch.Tensor  # [K, D, G, G]
    q_factors: torch.Tensor  # [H, r, D]: ‖W_O[:, head h] y‖ = ‖q_factors[h] y‖
    k_factors: torch.Tensor  # [K, r, G*D]: same for a whole kv group


class _ModelConstants:
    """Weight-derived constants, computed once per layer and model and reused across batches. Only what is derived
    (norms, factors, Gram matrices: O(N) or O(H·D²) per layer) is kept, never a dense copy of a weight, so a 4-bit
    model's constants cost one transient dequantized matrix per layer."""

    def __init__(self, model: nn.Module, sites: SiteMap):
        self.model = model
        self.sites = sites
        self.mlp_norms: dict[int, torch.Tensor] = {}
        self.attention: dict[int, _LayerAttention] = {}
        self.along: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary, self.base_model = _find_rotary(model)

    def writes_along(self, layer: int, kind: str, direction: torch.Tensor) -> torch.Tensor:
        """W[:, coords]^T r: what each coordinate of the mlp (W_down) or attn_o (W_O) carrier writes along the
        residual direction r [hidden], on the layer's device; kept per layer for the last r asked for."""
        cached = self.along.get((layer, kind))
        r = direction.detach().float().cpu()
        if cached is not None and torch.equal(cached[0], r):
            return cached[1]
        site = self.sites.get(layer, kind)
        weight = _weight_out_in(site.module)  # [hidden, C]
        value = site.read(weight).T @ r.to(weight.device)  # [N]; read: the carrier's columns (a view when contiguous)
        self.along[(layer, kind)] = (r, value)
        return value

    def mlp(self, layer: int) -> torch.Tensor:
        if layer not in self.mlp_norms:
            site = self.sites.get(layer, "mlp")
            weight = _weight_out_in(site.module)  # [hidden, I]
            self.mlp_norms[layer] = site.read(weight).norm(dim=0)  # no copy of the columns when they are contiguous
        return self.mlp_norms[layer]

    def attn(self, layer: int) -> _LayerAttention:
        if layer in self.attention:
            return self.attention[layer]
        site = self.sites.get(layer, "attn_o")
        H, K, D = site.n_heads, site.n_kv_heads, site.head_dim
        G = H // K
        w_o = site.read(_weight_out_in(site.module)).contiguous()  # [hidden, H*D] (a copy only for GPT-2's Conv1D)
        per_head = w_o.view(w_o.shape[0], K, G, D)
        v_gram = torch.einsum("okgd,okhd->kdgh", per_head, per_head)
        q_factors = torch.stack([_qr_factor(w_o[:, h * D:(h + 1) * D]) for h in range(H)])
        k_factors = torch.stack([_qr_factor(w_o[:, g * G * D:(g + 1) * G * D]) for g in range(K)])
        attn = self.model.get_submodule(site.module_name.rsplit(".", 1)[0])
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else \
            self.model.config
        if hasattr(attn, "sliding_window"):
            sliding = attn.sliding_window
        elif self.sites.model_type in ("mistral", "phi3"):
            sliding = getattr(config, "sliding_window", None)
        else:
            sliding = None
        scaling = getattr(attn, "scaling", None)
        if scaling is None:
            scaling = D ** -0.5
        layer_type = getattr(attn, "layer_type", None)
        rotary = self.rotary
        if rotary is not None and "layer_type" not in inspect.signature(rotary.forward).parameters:
            layer_type = None
        self.attention[layer] = _LayerAttention(
            module=attn, n_heads=H, n_kv_heads=K, head_dim=D, scaling=float(scaling),
            softcap=getattr(attn, "attn_logit_softcapping", None), sliding_window=sliding,
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
            rotary=rotary, rotary_layer_type=layer_type, o_norms=w_o.norm(dim=0),
            v_gram=v_gram, q_factors=q_factors, k_factors=k_factors,
        )
        return self.attention[layer]


def _find_rotary(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    base = getattr(model, "base_model", model)
    for candidate in (base, getattr(base, "language_model", None), getattr(model, "model", None)):
        rotary = getattr(candidate, "rotary_emb", None) if candidate is not None else None
        if rotary is not None:
            return rotary, base
    return None, base


_CONSTANTS: dict[int, tuple[nn.Module, _ModelConstants]] = {}


def _constants(model: nn.Module, sites: SiteMap) -> _ModelConstants:
    entry = _CONSTANTS.get(id(model))
    if entry is None or entry[0] is not model or entry[1].sites is not sites:
        _CONSTANTS.clear()  # one model at a time: do not keep old models alive
        entry = _CONSTANTS[id(model)] = (model, _ModelConstants(model, sites))
    return entry[1]


# ---------------------------------------------------------------------------------------------------
# Exact attention recomputation for q / k importance
# ---------------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, ..., D]; cos/sin [B, T, R] with R <= D rotary dims (GPT-NeoX rotates only the first R)."""
    if cos is None:
        return x
    shape = (cos.shape[0], cos.shape[1], *([1] * (x.dim() - 3)), cos.shape[-1])
    cos, sin = cos.view(shape), sin.view(shape)
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _prep(x: torch.Tensor, norm: nn.Module | None, cos, sin) -> torch.Tensor:
    """Projection output per head [B, T, ..., D] -> what enters the attention scores (norm, then RoPE)."""
    if norm is not None:
        x = norm(x).float()
    return _apply_rope(x, cos, sin)


def _attention_bias(valid: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Additive mask [B, 1, T, T]: causal, no padded keys, optional sliding window."""
    T = valid.shape[1]
    position = torch.arange(T, device=valid.device)
    allowed = position[None, :] <= position[:, None]  # [t, s]: s <= t
    if sliding_window is not None:
        allowed = allowed & (position[None, :] > position[:, None] - sliding_window)
    allowed = allowed[None] & valid[:, None, :].bool()  # [B, T, T]
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def _softmax_scores(scores: torch.Tensor, geo: _LayerAttention, bias: torch.Tensor) -> torch.Tensor:
    scores = scores * geo.scaling
    if geo.softcap is not None:
        scores = torch.tanh(scores / geo.softcap) * geo.softcap
    return torch.softmax(scores + bias, dim=-1)


def _chunk_size(n_rows: int, T: int, S: int, width: int, budget_bytes: int = 256 * 2**20) -> int:
    per_dim = n_rows * T * max(S, width) * 4 * 3  # scores, probabilities, outputs
    return max(1, budget_bytes // max(per_dim, 1))


def _weighted_rows(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, the token positions that count in its aggregate: (index [B, R], weights [B, R]).

    Only these query rows reach the score, so the recomputation can skip every other row exactly. The counted
    positions come last, in order; prompts with fewer are filled in front with their first counted position at
    weight 0. (Left-padded prompts end alike, so row j then sits at about the same position in every prompt, and a
    block of rows needs keys only up to its last position: attention is causal.)
    """
    counted = weights > 0  # [B, T]
    n_rows = max(int(counted.sum(-1).max()), 1)
    T = weights.shape[1]
    position = torch.arange(T, device=weights.device).expand_as(weights)
    # The others first, then the counted positions (in order): the last n_rows columns are what we need.
    order = torch.argsort(torch.where(counted, position + T, position), dim=-1)[:, T - n_rows:]
    kept = torch.gather(counted, 1, order)
    first = torch.where(counted, position, T).min(-1, keepdim=True).values.clamp(max=T - 1)
    index = torch.where(kept, order, first)
    return index, torch.where(kept, torch.gather(weights, 1, index), 0.0)


def _row_blocks(rows: torch.Tensor, min_rows: int = 16, most: int = 4) -> list[tuple[int, int, int]]:
    """(first row, end row, keys) blocks of the recomputed rows: a block's rows attend to keys < its last position + 1
    in every prompt, so the keys after it are skipped (they are masked for those rows: exactly zero weight)."""
    R = rows.shape[1]
    n = max(1, min(most, R // min_rows))
    bounds = [round(i * R / n) for i in range(n + 1)]
    return [(j0, j1, int(rows[:, j1 - 1].max()) + 1) for j0, j1 in itertools.pairwise(bounds) if j1 > j0]


def _take_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, index[b], ...] along ``dim`` (index [B, R])."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    expanded = index.view(shape).expand(*[r if i == dim else s for i, (s, r) in enumerate(zip(x.shape, shape))])
    return torch.gather(x, dim, expanded)


def _rope_pairs(cos: torch.Tensor | None, sin: torch.Tensor | None, B: int, T: int, D: int, device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """RoPE maps the basis vector e_d to own[b, t, d] e_d + other[b, t, d] e_partner[d]: (own, other, partner).

    Zeroing dim d of a query (key) therefore moves each attention score by two products, O(T*S) per dim instead
    of a full O(T*S*D) recomputation. None if RoPE here does not have that two-coordinate form.
    """
    partner = torch.arange(D, device=device)
    if cos is None:
        return torch.ones(B, T, D, device=device), torch.zeros(B, T, D, device=device), partner
    rot = cos.shape[-1]
    half = rot // 2
    partner[:half] += half
    partner[half:rot] -= half
    rotated = _apply_rope(torch.eye(D, device=device).expand(B, T, D, D), cos, sin)  # [B, T, d, j] = rope(e_d)_j
    own = rotated.diagonal(dim1=-2, dim2=-1)
    other = torch.gather(rotated, 3, partner.view(1, 1, D, 1).expand(B, T, D, 1))[..., 0]
    other = torch.where(partner == torch.arange(D, device=device), 0.0, other)
    if not torch.allclose(rotated.abs().sum(-1), own.abs() + other.abs(), atol=1e-5):
        return None
    return own, other, partner


def _shifted_softmax(base: torch.Tensor, shift: torch.Tensor, geo: _LayerAttention, bias: torch.Tensor) -> torch.Tensor:
    """Attention probabilities for the scores ``base - shift`` (``shift`` already scaled; reused as the buffer).

    ``base`` is the scaled score, and already carries the mask unless soft-capping has to come first.
    """
    logits = torch.sub(base, shift, out=shift)
    if geo.softcap is not None:
        logits.div_(geo.softcap).tanh_().mul_(geo.softcap).add_(bias)
    return torch.softmax(logits, dim=-1)


class _Workspace(threading.local):
    """Scratch buffers reused from chunk to chunk and layer to layer (one set per thread).

    A fresh tensor of tens of MB per chunk costs its page faults on first touch, which on a CPU can take longer than
    the arithmetic done in it; a reused buffer is already mapped (and, at chunk size, still in cache).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self.buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


_WORK = _Workspace()
_CHUNK_ELEMENTS = 2**21  # one chunk's [.., R, S] score tensor: 8 MB of float32, cache-sized
_EXP_FLOOR = -87.0
_MIN_TOTAL = 1e-20  # S * exp(_EXP_FLOOR) / _MIN_TOTAL < 1e-14: the floor cannot show in a row's normalised values
_K_TWO_STAGE: bool | None = None  # attn_k contraction: None = whichever takes fewer flops (tests force each)


def _blocks(B: int, D: int, per_prompt_dim: int) -> tuple[int, int]:
    """(prompts, dims) per chunk so that a chunk's score tensor holds about `_CHUNK_ELEMENTS` values."""
    if B * per_prompt_dim <= _CHUNK_ELEMENTS:
        return B, max(1, min(D, _CHUNK_ELEMENTS // (B * per_prompt_dim)))
    return max(1, _CHUNK_ELEMENTS // max(per_prompt_dim, 1)), 1


def _bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` for [..., n, k] @ [..., k, m] with broadcast batch dims, written straight into ``out``
    (``torch.matmul(out=)`` may compute into a temporary first)."""
    batch = out.shape[:-2]
    n, k, m = a.shape[-2], a.shape[-1], b.shape[-1]
    torch.bmm(a.expand(*batch, n, k).reshape(-1, n, k), b.expand(*batch, k, m).reshape(-1, k, m),
              out=out.view(-1, n, m))
    return out


def _unnormalised_shifted(log_probs: torch.Tensor, row_factors: torch.Tensor, key_factors: torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor:
    """A ∘ exp(−Δ) in ``out``, with Δ = row_factors @ key_factors the (scaled) score shift of zeroing a dim.

    softmax(s − Δ) = A ∘ exp(−Δ) / Σ_s A ∘ exp(−Δ), and log A = log_softmax(s): one matmul, one subtraction and one
    exp per score, instead of a softmax and a subtraction of A. The normaliser is summed later (a column of ones in
    the value matmul), so a [.., R, S] tensor is never divided.
    """
    _bmm_into(row_factors, key_factors, out)
    # Clamped at -87 (exp = 1.6e-38, still a normal float): exp of more negative numbers, such as masked scores,
    # takes a slow path on CPUs (15-50 ns instead of 0.3 ns a value). What that adds to a row is below float
    # resolution as long as the row's total stays >= _MIN_TOTAL, which the callers check.
    return torch.sub(log_probs, out, out=out).clamp_(min=_EXP_FLOOR).exp_()


def _totals_ok(totals: torch.Tensor) -> bool:
    """Every row's Σ_s A ∘ exp(−Δ) finite and far above what the exp floor adds (else use `_stable_shifted`)."""
    return bool(torch.isfinite(totals).all()) and bool((totals >= _MIN_TOTAL).all())


def _stable_shifted(log_probs: torch.Tensor, row_factors: torch.Tensor, key_factors: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """softmax(log A − Δ) = A′ itself (normaliser 1): the fallback when exp(log A − Δ) over- or underflows."""
    _bmm_into(row_factors, key_factors, out)
    torch.sub(log_probs, out, out=out)
    return out.copy_(torch.softmax(out, dim=-1))


def _q_shift_impact(row_factors: torch.Tensor, key_factors: torch.Tensor, log_probs: torch.Tensor,
                    vf: torch.Tensor, zf: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """attn_q impact of every (head, dim) from rank-2 score shifts: [B, K, G, D].

    row_factors [B,K,G,D,R,2] and key_factors [B,K,1,D,2,S] give the shift of zeroing each dim; log_probs
    [B,K,G,R,S] = log A; vf [B,K,G,S,r] = V F_hᵀ; zf [B,K,G,R,r] = A V F_hᵀ. ‖Δout‖ = ‖A′ V F_hᵀ − A V F_hᵀ‖.
    """
    B, K, G, D, R, _ = row_factors.shape
    S, r = key_factors.shape[-1], vf.shape[-1]
    vf1 = torch.cat([vf, vf.new_ones((B, K, G, S, 1))], dim=-1)  # the ones column sums A′ (the normaliser)
    scores = torch.zeros(B, K, G, D, dtype=vf.dtype, device=vf.device)
    block, chunk = _blocks(B, D, K * G * R * S)
    for b0 in range(0, B, block):
        b1 = min(B, b0 + block)
        nb = b1 - b0
        log_b = log_probs[b0:b1, :, :, None]
        for d0 in range(0, D, chunk):
            d1 = min(D, d0 + chunk)
            c = d1 - d0
            buffer = _WORK.get("qk_scores", (nb, K, G, c, R, S), vf)
            y = _WORK.get("qk_values", (nb, K, G, c * R, r + 1), vf)
            heads = _WORK.get("qk_heads", (nb, K, G, c, R, r), vf)
            for shifted in (_unnormalised_shifted, _stable_shifted):
                u = shifted(log_b, row_factors[b0:b1, :, :, d0:d1], key_factors[b0:b1, :, :, d0:d1], buffer)
                _bmm_into(u.view(nb, K, G, c * R, S), vf1[b0:b1], y)
                out = y.view(nb, K, G, c, R, r + 1)
                if _totals_ok(out[..., r]):
                    break
            torch.div(out[..., :r], out[..., r:], out=heads).sub_(zf[b0:b1, :, :, None])  # A′VFᵀ − AVFᵀ
            scores[b0:b1, :, :, d0:d1] = torch.einsum("bkgct,bt->bkgc", heads.norm(dim=-1), row_weights[b0:b1])
    return scores


def _k_shift_impact(row_factors: torch.Tensor, key_factors: torch.Tensor, log_probs: torch.Tensor,
                    vh: torch.Tensor, z: torch.Tensor, factors: torch.Tensor, row_weights: torch.Tensor
                    ) -> torch.Tensor:
    """attn_k impact of every (kv head, dim) from rank-2 score shifts: [B, K, D].

    row_factors [B,K,D,R*G,2], key_factors [B,K,D,2,S]; log_probs [B,K,R,G,S] = log A; vh [B,K,S,D] values;
    z [B,K,G,R,D] = A V per head; factors [K, r, G*D] with ‖W_O,group y‖ = ‖factors y‖. Zeroing a key dim moves the
    scores of the group's G heads at once, and Δout = W_O,group [(A′_g − A_g) V]_g: per head the value matmul of
    A′ (with a ones column for its normaliser), then one matmul with the group's factor for the norm; when the keys
    are few, V F_gᵀ is contracted over (g, s) at once instead (whichever takes fewer flops).
    """
    B, K, D, RG, _ = row_factors.shape
    S = key_factors.shape[-1]
    G = z.shape[2]
    R = RG // G
    r = factors.shape[1]
    # A QR factor is upper triangular: Y Rᵀ's second half of columns only needs Y's second half (1/4 fewer flops).
    half = (G * D) // 2
    triangular = r == G * D and half > 0 and not bool(factors[:, half:, :half].any())
    flops_per_row = {True: G * S * (D + 1) + G * D * r * (0.75 if triangular else 1.0), False: G * S * r}
    two_stage = flops_per_row[True] < flops_per_row[False] if _K_TWO_STAGE is None else _K_TWO_STAGE
    if two_stage:
        v1 = torch.cat([vh, vh.new_ones((B, K, S, 1))], dim=-1)  # [B,K,S,D+1]
        zk = z.permute(0, 1, 3, 2, 4)  # [B,K,R,G,D]
        factors_t = factors.transpose(1, 2)  # [K, G*D, r]
        if triangular:
            first_cols = factors_t[:, :, :half].contiguous()  # [K, G*D, half]
            last_cols = factors_t[:, half:, half:].contiguous()  # [K, G*D - half, r - half]
    else:
        vf = torch.einsum("bksd,krgd->bkgsr", vh, factors.view(K, r, G, D)).reshape(B, K, G * S, r)
        zf = torch.einsum("bkgtd,krgd->bktr", z, factors.view(K, r, G, D))  # [B,K,R,r]
    scores = torch.zeros(B, K, D, dtype=vh.dtype, device=vh.device)
    block, chunk = _blocks(B, D, K * G * R * S)
    for b0 in range(0, B, block):
        b1 = min(B, b0 + block)
        nb = b1 - b0
        log_b = log_probs[b0:b1, :, None].reshape(nb, K, 1, RG, S)
        for d0 in range(0, D, chunk):
            d1 = min(D, d0 + chunk)
            c = d1 - d0
            buffer = _WORK.get("qk_scores", (nb, K, c, RG, S), vh)
            for shifted in (_unnormalised_shifted, _stable_shifted):
                u = shifted(log_b, row_factors[b0:b1, :, d0:d1], key_factors[b0:b1, :, d0:d1], buffer)
                if two_stage:
                    y = _WORK.get("qk_values", (nb, K, c * RG, D + 1), vh)
                    _bmm_into(u.view(nb, K, c * RG, S), v1[b0:b1], y)
                    totals = y[..., D]
                else:
                    totals = u.sum(dim=-1)  # [nb, K, c, RG]
                if _totals_ok(totals):
                    break
            if two_stage:
                y = y.view(nb, K, c, R, G, D + 1)
                heads = _WORK.get("qk_heads", (K, nb, c, R, G, D), vh)  # kv head first: one bmm with its factor
                torch.div(y[..., :D], y[..., D:], out=heads.transpose(0, 1)).transpose(0, 1).sub_(
                    zk[b0:b1, :, None].transpose(0, 1))  # (A′_g − A_g) V per head
                flat = heads.view(K, nb * c * R, G * D)
                if triangular:
                    first = _WORK.get("qk_projected", (K, nb * c * R, half), vh)
                    last = _WORK.get("qk_projected_last", (K, nb * c * R, r - half), vh)
                    torch.bmm(flat, first_cols, out=first)
                    torch.bmm(flat[:, :, half:], last_cols, out=last)
                    delta = torch.hypot(first.norm(dim=-1), last.norm(dim=-1))
                else:
                    projected = _WORK.get("qk_projected", (K, nb * c * R, r), vh)
                    torch.bmm(flat, factors_t, out=projected)
                    delta = projected.norm(dim=-1)
                delta = delta.view(K, nb, c, R).transpose(0, 1)
            else:
                u.div_(totals[..., None])
                y = _WORK.get("qk_values", (nb, K, c * R, r), vh)
                _bmm_into(u.view(nb, K, c * R, G * S), vf[b0:b1], y)
                delta = y.view(nb, K, c, R, r).sub_(zf[b0:b1, :, None]).norm(dim=-1)
            scores[b0:b1, :, d0:d1] = torch.einsum("bkct,bt->bkc", delta.view(nb, K, c, R), row_weights[b0:b1])
    return scores


def _qk_impact(geo: _LayerAttention, q_raw, k_raw, v, z_obs, cos, sin, bias, weights, kinds, check_tol):
    """Exact ‖Δ o_proj output‖ when one q (or k) dim is zeroed, aggregated over tokens.

    q_raw [B, T, H, D], k_raw / v [B, T, K, D], z_obs [B, T, H, D] (the model's own attention output).
    Returns {kind: [B, N]}.

    Only the query rows that count in a prompt's aggregate are recomputed (R of T), against the keys up to the
    last such row (S of T, attention is causal). Without q/k norms, the score change of zeroing one dim is two
    products (see ``_rope_pairs``); with them (Qwen3, Gemma 3) the normed and rotated q/k are recomputed per dim.
    """
    B, _, H, D = q_raw.shape
    K = k_raw.shape[2]
    G = H // K
    rows, row_weights = _weighted_rows(weights)  # [B, R]
    R = rows.shape[1]
    S = int(rows.max()) + 1
    k_raw, v = k_raw[:, :S], v[:, :S]
    key_cos, key_sin = (cos[:, :S], sin[:, :S]) if cos is not None else (None, None)
    row_cos, row_sin = (_take_rows(cos, rows), _take_rows(sin, rows)) if cos is not None else (None, None)
    q_rows = _take_rows(q_raw, rows)  # [B, R, H, D]
    bias = _take_rows(bias[..., :S], rows, dim=2)  # [B, 1, R, S]
    qp = _prep(q_rows, geo.q_norm, row_cos, row_sin).permute(0, 2, 1, 3).reshape(B, K, G, R, D)  # [B,K,G,R,D]
    kp = _prep(k_raw, geo.k_norm, key_cos, key_sin).permute(0, 2, 1, 3)  # [B,K,S,D]
    vh = v.permute(0, 2, 1, 3)  # [B,K,S,D]
    raw_scores = torch.einsum("bkgtd,bksd->bkgts", qp, kp)  # [B,K,G,R,S] before scaling / softcap / mask
    probs = _softmax_scores(raw_scores, geo, bias[:, None])
    z = torch.einsum("bkgts,bksd->bkgtd", probs, vh)  # [B,K,G,R,D]
    # Safety net: our recomputation must reproduce the model's attention on the rows that count.
    z_model = _take_rows(z_obs, rows).permute(0, 2, 1, 3).reshape(B, K, G, R, D)
    real = (row_weights > 0)[:, None, None, :, None]
    error = ((z - z_model) * real).norm() / ((z_model * real).norm() + 1e-12)
    if not bool(error <= check_tol):
        raise SSNError(
            f"exact q/k scoring could not reproduce this model's attention (relative error {float(error):.2e}); "
            "leave attn_q and attn_k out of the sites for this model"
        )
    out: dict[str, torch.Tensor] = {}
    eye = torch.eye(D, device=q_raw.device)
    # Scaled scores (plus the mask when no soft-capping sits in between): what a score shift is subtracted from.
    base = raw_scores * geo.scaling if geo.softcap is not None else raw_scores * geo.scaling + bias[:, None]
    if "attn_q" in kinds:
        vf_q = torch.einsum("bksd,kgrd->bkgsr", vh, geo.q_factors.view(K, G, -1, D))  # [B,K,G,S,r]
        pairs = _rope_pairs(row_cos, row_sin, B, R, D, q_raw.device) if geo.q_norm is None else None
        if pairs is not None:
            # Zeroing q_d shifts score (t, s) by q_d(t) (own_d(t) k_d(s) + other_d(t) k_partner(d)(s)): a rank-2
            # product per (head, dim), one small matmul for a chunk of dims.
            own, other, partner = pairs  # [B, R, D] x2, [D]
            row_factors = torch.stack((q_rows * own[:, :, None], q_rows * other[:, :, None]), dim=-1)  # [B,R,H,D,2]
            row_factors = (row_factors * geo.scaling).permute(0, 2, 3, 1, 4).reshape(B, K, G, D, R, 2)
            k_cols = kp.transpose(2, 3)  # [B,K,D,S]
            key_factors = torch.stack((k_cols, k_cols[:, :, partner]), dim=3)[:, :, None]  # [B,K,1,D,2,S]
        if pairs is not None and geo.softcap is None:
            # exp(log A − Δ) with the normaliser from the value matmul, in cache-sized chunks (`_q_shift_impact`).
            zf_q = torch.einsum("bkgtd,kgrd->bkgtr", z, geo.q_factors.view(K, G, -1, D))  # [B,K,G,R,r] = A V F_hᵀ
            log_probs = torch.log_softmax(base, dim=-1)  # [B,K,G,R,S] = log A (−inf-like where masked)
            out["attn_q"] = sum(
                _q_shift_impact(row_factors[..., j0:j1, :], key_factors[..., :keys],
                                log_probs[..., j0:j1, :keys], vf_q[..., :keys, :], zf_q[..., j0:j1, :],
                                row_weights[:, j0:j1]) for j0, j1, keys in _row_blocks(rows)).reshape(B, H * D)
        else:  # soft-capping (the shift goes through tanh) or q norms: softmax per chunk, as before
            scores = torch.zeros(B, H, D, device=q_raw.device)
            chunk = min(D, _chunk_size(B * H, R, S, vf_q.shape[-1]))
            for start in range(0, D, chunk):
                end = min(start + chunk, D)
                if pairs is not None:
                    shift = torch.matmul(row_factors[:, :, :, start:end], key_factors[:, :, :, start:end])  # [B,K,G,c,R,S]
                    p_mod = _shifted_softmax(base[:, :, :, None], shift, geo, bias[:, None, None])
                else:
                    keep = 1.0 - eye[start:end]  # [c, D]
                    q_mod = q_rows[:, :, :, None, :] * keep  # [B,R,H,c,D]
                    q_mod = _prep(q_mod, geo.q_norm, row_cos, row_sin).permute(0, 2, 3, 1, 4)  # [B,H,c,R,D]
                    q_mod = q_mod.reshape(B, K, G, end - start, R, D)
                    p_mod = _softmax_scores(torch.einsum("bkgctd,bksd->bkgcts", q_mod, kp), geo, bias[:, None, None])
                # Δout = W_O,h (A' - A) V = F_h-rotated: ‖(A' - A) (V F_h^T)‖, one matmul per dim.
                c = end - start
                p_mod.sub_(probs[:, :, :, None])
                delta = torch.matmul(p_mod.view(B, K, G, c * R, S), vf_q).norm(dim=-1).view(B, K, G, c, R)
                scores[:, :, start:end] = _aggregate(delta.permute(0, 4, 1, 2, 3), row_weights).reshape(B, H, c)
            out["attn_q"] = scores.reshape(B, H * D)
    if "attn_k" in kinds:
        pairs = _rope_pairs(key_cos, key_sin, B, S, D, q_raw.device) if geo.k_norm is None else None
        if pairs is not None and geo.softcap is None:
            own, other, partner = pairs  # [B, S, D] x2, [D]
            q_cols = (qp * geo.scaling).permute(0, 1, 4, 3, 2)  # [B,K,D,R,G]
            row_factors = torch.stack((q_cols, q_cols[:, :, partner]), dim=-1).reshape(B, K, D, R * G, 2)
            key_factors = torch.stack(((k_raw * own[:, :, None]).permute(0, 2, 3, 1),
                                       (k_raw * other[:, :, None]).permute(0, 2, 3, 1)), dim=3)  # [B,K,D,2,S]
            log_probs = torch.log_softmax(base, dim=-1).permute(0, 1, 3, 2, 4).contiguous()  # [B,K,R,G,S]
            factors = geo.k_factors.to(vh.device)
            out["attn_k"] = sum(
                _k_shift_impact(row_factors[..., j0 * G:j1 * G, :], key_factors[..., :keys],
                                log_probs[:, :, j0:j1, :, :keys], vh[:, :, :keys], z[:, :, :, j0:j1], factors,
                                row_weights[:, j0:j1]) for j0, j1, keys in _row_blocks(rows)).reshape(B, K * D)
        else:  # soft-capping or k norms
            vf_k = torch.einsum("bksd,krgd->bkgsr", vh, geo.k_factors.view(K, -1, G, D))  # [B,K,G,S,r]
            scores = torch.zeros(B, K, D, device=q_raw.device)
            chunk = min(D, _chunk_size(B * H, R, S, vf_k.shape[-1]))
            if pairs is not None:
                # Zeroing k_d shifts score (t, g, s) by k_d(s) (own_d(s) q_d(t, g) + other_d(s) q_partner(d)(t, g)).
                # Layout [B, K, dim, R, G, S] puts a group's heads next to the keys: Σ_h W_O,h (A'_h - A_h) V_g is then
                # one matmul over (G, S) without copying the big tensor.
                own, other, partner = pairs  # [B, S, D] x2, [D]
                q_cols = (qp * geo.scaling).permute(0, 1, 4, 3, 2)  # [B,K,D,R,G]
                row_factors = torch.stack((q_cols, q_cols[:, :, partner]), dim=-1).reshape(B, K, D, R * G, 2)
                key_factors = torch.stack(((k_raw * own[:, :, None]).permute(0, 2, 3, 1),
                                           (k_raw * other[:, :, None]).permute(0, 2, 3, 1)), dim=3)  # [B,K,D,2,S]
                base_k = base.permute(0, 1, 3, 2, 4)[:, :, None]  # [B,K,1,R,G,S]
                probs_k = probs.permute(0, 1, 3, 2, 4)[:, :, None]
                bias_k = bias[:, :, None, :, None]  # [B,1,1,R,1,S]
                vf_k_flat = vf_k.reshape(B, K, G * S, -1)  # [B,K,G*S,r]
                for start in range(0, D, chunk):
                    end, c = min(start + chunk, D), min(start + chunk, D) - start
                    shift = torch.matmul(row_factors[:, :, start:end], key_factors[:, :, start:end]).view(B, K, c, R, G, S)
                    p_mod = _shifted_softmax(base_k, shift, geo, bias_k).sub_(probs_k)
                    delta = torch.matmul(p_mod.view(B, K, c * R, G * S), vf_k_flat).norm(dim=-1).view(B, K, c, R)
                    scores[:, :, start:end] = _aggregate(delta.permute(0, 3, 1, 2), row_weights)
            else:
                for start in range(0, D, chunk):
                    end = min(start + chunk, D)
                    keep = 1.0 - eye[start:end]
                    k_mod = k_raw[:, :, :, None, :] * keep  # [B,S,K,c,D]
                    k_mod = _prep(k_mod, geo.k_norm, key_cos, key_sin).permute(0, 2, 3, 1, 4)  # [B,K,c,S,D]
                    p_mod = _softmax_scores(torch.einsum("bkgtd,bkcsd->bkgcts", qp, k_mod), geo, bias[:, None, None])
                    # Δout = Σ_h W_O,h (A'_h - A_h) V_g: the whole group's heads in one contraction.
                    delta = torch.einsum("bkgcts,bkgsr->bkctr", p_mod - probs[:, :, :, None], vf_k).norm(dim=-1)
                    scores[:, :, start:end] = _aggregate(delta.permute(0, 3, 1, 2), row_weights)
            out["attn_k"] = scores.reshape(B, K * D)
    return out


# ---------------------------------------------------------------------------------------------------
# One batch, all sites, one forward pass
# ---------------------------------------------------------------------------------------------------
def _check_kinds(kinds: Iterable[str], sites: SiteMap) -> tuple[str, ...]:
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in SITE_KINDS:
            raise SSNError(f"unknown site kind {kind!r}; expected some of {', '.join(SITE_KINDS)}")
        if kind not in sites.kinds:
            raise SSNError(f"this model has no {kind!r} sites")
    if not kinds:
        raise SSNError("no site kinds selected")
    return tuple(k for k in SITE_KINDS if k in kinds)


def _forward(model: nn.Module, batch: EncodedBatch) -> torch.Tensor:
    """Run the base model (no LM head: scores are layer-local) and return the final hidden states."""
    base = getattr(model, "base_model", model)
    output = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _rope_tables(consts: _ModelConstants, geo: _LayerAttention, batch: EncodedBatch, cache: dict):
    if geo.rotary is None:
        return None, None
    key = geo.rotary_layer_type
    if key not in cache:
        dummy = torch.zeros(1, dtype=torch.float32, device=batch.position_ids.device)
        args = (dummy, batch.position_ids) if key is None else (dummy, batch.position_ids, key)
        cos, sin = geo.rotary(*args)
        cache[key] = (cos.float(), sin.float())
    return cache[key]


@torch.no_grad()
def score_batch(lm, batch: EncodedBatch, method: str = "impact", kinds: Sequence[str] = SITE_KINDS,
                layers: Iterable[int] | None = None) -> dict[tuple[int, str], torch.Tensor | tuple]:
    """Per-prompt scores [B, N] for every (layer, kind) from one forward pass.

    ``method="impact"`` returns tensors; ``method="activation"`` returns (mean |a|, mean a) pairs.
    """
    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    layers = range(sites.n_layers) if layers is None else list(layers)
    model = lm.model
    device = batch.input_ids.device
    weights = batch.weights.to(device)
    results: dict[tuple[int, str], torch.Tensor | tuple] = {}
    pairs: list[tuple[NeuronSite, Callable]] = []

    if method == "activation":
        def activation_hook(site: NeuronSite):
            def fn(carrier):
                values = site.read(carrier).float()  # [B, T, N]
                results[site.key] = (_aggregate(values.abs(), weights), _aggregate(values, weights))
            return fn

        for layer in layers:
            for kind in kinds:
                site = sites.get(layer, kind)
                pairs.append((site, activation_hook(site)))
        with hook_sites(pairs):
            _forward(model, batch)
        return results

    if method != "impact":
        raise SSNError(f"score_batch supports 'impact' and 'activation', not {method!r}")
    consts = _constants(model, sites)
    attn_kinds = [k for k in kinds if k != "mlp"]
    needs_recompute = any(k in kinds for k in ("attn_q", "attn_k"))
    rope_cache: dict = {}
    bias_cache: dict = {}
    check_tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 5e-2

    def mlp_hook(site: NeuronSite):
        def fn(carrier):
            values = site.read(carrier).float().abs()  # [B, T, N]
            results[site.key] = _aggregate(values, weights) * consts.mlp(site.layer).to(values.device)
        return fn

    def capture_hook(site: NeuronSite, store: dict):
        def fn(carrier):
            store[site.kind] = site.read(carrier).float()
        return fn

    def o_hook(site: NeuronSite, store: dict):
        def fn(carrier):
            geo = consts.attn(site.layer)
            H, K, D = geo.n_heads, geo.n_kv_heads, geo.head_dim
            z = site.read(carrier).float()  # [B, T, H*D]
            B, T = z.shape[:2]
            if "attn_o" in kinds:
                results[(site.layer, "attn_o")] = _aggregate(z.abs(), weights) * geo.o_norms.to(z.device)
            if "attn_v" in kinds:
                zg = z.view(B, T, K, H // K, D)
                squared = torch.einsum("btkgd,kdgh,btkhd->btkd", zg, geo.v_gram.to(z.device), zg)
                results[(site.layer, "attn_v")] = _aggregate(squared.clamp(min=0).sqrt(), weights).reshape(B, K * D)
            if needs_recompute:
                cos, sin = _rope_tables(consts, geo, batch, rope_cache)
                if cos is not None:
                    cos, sin = cos.to(z.device), sin.to(z.device)
                if geo.sliding_window not in bias_cache:
                    bias_cache[geo.sliding_window] = _attention_bias(batch.attention_mask, geo.sliding_window)
                qk = _qk_impact(
                    geo, store.pop("attn_q").view(B, T, H, D), store.pop("attn_k").view(B, T, K, D),
                    store.pop("attn_v").view(B, T, K, D), z.view(B, T, H, D), cos, sin,
                    bias_cache[geo.sliding_window].to(z.device), weights.to(z.device), kinds, check_tol,
                )
                for kind, value in qk.items():
                    results[(site.layer, kind)] = value
            store.clear()
        return fn

    for layer in layers:
        if "mlp" in kinds:
            site = sites.get(layer, "mlp")
            pairs.append((site, mlp_hook(site)))
        if attn_kinds:
            store: dict[str, torch.Tensor] = {}
            if needs_recompute:
                for kind in ("attn_q", "attn_k", "attn_v"):
                    pairs.append((sites.get(layer, kind), capture_hook(sites.get(layer, kind), store)))
            pairs.append((sites.get(layer, "attn_o"), o_hook(sites.get(layer, "attn_o"), store)))
    with hook_sites(pairs):
        _forward(model, batch)
    return results


# ---------------------------------------------------------------------------------------------------
# Exact ablation (slow reference)
# ---------------------------------------------------------------------------------------------------
Triple = tuple[int, str, int]


def sample_neurons(sites: SiteMap, kinds: Sequence[str], count: int, seed: int = 0, per: str = "site") -> list[Triple]:
    """Random neurons, reproducibly: ``count`` from every (layer, kind) site (``per="site"``), or ``count``
    per kind spread uniformly over all layers (``per="kind"``, what `compare-methods` uses)."""
    if count < 1:
        raise SSNError(f"the neuron sample must have at least 1 neuron, got {count}")
    rng = random.Random(seed)
    triples: list[Triple] = []
    for kind in kinds:
        size = sites.get(0, kind).size
        if per == "kind":
            flat = rng.sample(range(sites.n_layers * size), min(count, sites.n_layers * size))
            triples += [(i // size, kind, i % size) for i in flat]
        elif per == "site":
            for layer in range(sites.n_layers):
                triples += [(layer, kind, i) for i in rng.sample(range(size), min(count, size))]
        else:
            raise SSNError(f"per must be 'site' or 'kind', got {per!r}")
    return sorted(triples, key=lambda t: (t[0], SITE_KINDS.index(t[1]), t[2]))


@torch.no_grad()
def ablation_batch(lm, batch: EncodedBatch, neurons: Sequence[Triple], chunk: int = 8) -> torch.Tensor:
    """Exact effect of zeroing each neuron on the final hidden states: [B, len(neurons)].

    Per token: ‖h_final(suppressed) - h_final(baseline)‖, aggregated with the batch weights (with
    ``aggregate="last"`` this is the paper's literal ΔLLM). ``chunk`` neurons share one forward pass:
    the batch is repeated and each copy gets its own row-masked suppression.
    """
    model = lm.model
    baseline = _forward(model, batch).float()  # [B, T, hidden]
    B = batch.input_ids.shape[0]
    out = torch.zeros(B, len(neurons))
    for start in range(0, len(neurons), chunk):
        group = list(neurons[start:start + chunk])
        m = len(group)
        repeated = EncodedBatch(*(t.repeat(m, *([1] * (t.dim() - 1))) for t in
                                  (batch.input_ids, batch.attention_mask, batch.position_ids, batch.weights)))
        interventions = []
        for i, (layer, kind, index) in enumerate(group):
            rows = torch.zeros(m * B, dtype=torch.bool)
            rows[i * B:(i + 1) * B] = True
            interventions.append(Intervention(NeuronSet({(layer, kind): [index]}), scale=0.0, rows=rows))
        with intervene(lm.sites, *interventions):
            hidden = _forward(model, repeated).float().view(m, B, *baseline.shape[1:])
        delta = (hidden - baseline[None]).norm(dim=-1)  # [m, B, T]
        for i in range(m):
            out[:, start + i] = _aggregate(delta[i], batch.weights).cpu()
    return out


# ---------------------------------------------------------------------------------------------------
# Streaming statistics and the public entry point
# ---------------------------------------------------------------------------------------------------
class _Accumulator:
    """Running sums per (language, label) and (layer, kind); memory independent of the prompt count."""

    def __init__(self, sites: SiteMap, kinds: Sequence[str], groups: Sequence[Group], signed: bool):
        sizes = sites.sizes()
        self.n_layers = sites.n_layers
        self.sums = {g: {k: torch.zeros(sites.n_layers, sizes[k], dtype=torch.float64) for k in kinds} for g in groups}
        self.signed = ({g: {k: torch.zeros(sites.n_layers, sizes[k], dtype=torch.float64) for k in kinds}
                        for g in groups} if signed else None)
        self.counts = {g: 0 for g in groups}

    def add(self, row_groups: Sequence[Group], results: dict) -> None:
        for group in dict.fromkeys(row_groups):
            rows = torch.tensor([i for i, g in enumerate(row_groups) if g == group])
            for (layer, kind), value in results.items():
                if isinstance(value, tuple):
                    magnitude, signed = value
                    self.sums[group][kind][layer] += magnitude.index_select(0, rows.to(magnitude.device)).sum(0).cpu()
                    self.signed[group][kind][layer] += signed.index_select(0, rows.to(signed.device)).sum(0).cpu()
                else:
                    self.sums[group][kind][layer] += value.index_select(0, rows.to(value.device)).sum(0).double().cpu()
            self.counts[group] += len(rows)

    def all_reduce(self) -> None:
        """Add up every process's sums and counts (`ssn_core.distributed`, one message); no-op with one process."""
        from ssn_core.distributed import all_reduce_

        groups = list(self.sums)
        counts = torch.tensor([float(self.counts[g]) for g in groups], dtype=torch.float64)
        stores = [self.sums] + ([self.signed] if self.signed is not None else [])
        all_reduce_([t for store in stores for g in groups for t in store[g].values()] + [counts],
                    "adding up the scores")
        self.counts = {g: round(c) for g, c in zip(groups, counts.tolist(), strict=True)}

    def means(self, store) -> dict[Group, dict[str, torch.Tensor]]:
        return {g: {k: (s / max(self.counts[g], 1)).float() for k, s in per_kind.items()} for g, per_kind in
                store.items() if self.counts[g] > 0}


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def score(lm, prompts, method: str = "impact", aggregate: str = "content", kinds: Sequence[str] = SITE_KINDS,
          batch_size: int = 8, template: str = "chat", sample: Sequence[Triple] | int | None = None, seed: int = 0,
          projections: int = 8, directions: torch.Tensor | None = None,
          progress: Progress | None = None, cancel: threading.Event | None = None) -> ScoreTable:
    """Mean importance per neuron for every (language, label) group of ``prompts``.

    ``prompts``: a PromptSet or any iterable of objects with ``.text``, ``.language`` and ``.label`` (and ``.reply``
    for ``aggregate="reply"``: `ssn_core.pairs.PromptPair`). ``sample`` (ablation only): explicit (layer, kind,
    index) triples, or a count per site (drawn with ``seed``); unsampled neurons get NaN. ``projections``: random
    projections of the ``global`` estimate. ``directions`` ([L, hidden], ``direction`` only): the refusal direction of
    every layer; by default the difference of means of these prompts' harmful and harmless groups.
    Method notes: `ssn_core.attribution` (global, attribution), `ssn_core.direction` (direction).
    """
    if method not in METHODS:
        raise SSNError(f"unknown scoring method {method!r}; expected one of {', '.join(METHODS)}")
    if aggregate not in AGGREGATES:
        raise SSNError(f"unknown aggregate {aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    if method == "attribution" and aggregate != "all":
        raise SSNError("attribution sums a · ∂margin/∂a over every position (the estimate of zeroing the neuron "
                       f"everywhere); use aggregate 'all', not {aggregate!r}")
    if batch_size < 1:
        raise SSNError(f"batch size must be at least 1, got {batch_size}")
    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    items = list(getattr(prompts, "prompts", prompts))
    if not items:
        raise SSNError("no prompts to score")
    if aggregate == "reply":
        missing = [p for p in items if not getattr(p, "reply", None)]
        if missing:
            raise SSNError(f"aggregate 'reply' scores (prompt, reply) pairs, but {len(missing)} prompt(s) have no reply "
                           f"(e.g. {missing[0].id!r}); build them with ssn_core.pairs.build_pairs")
    if method == "direction" and directions is None:
        from ssn_core.direction import difference_of_means

        directions, _ = difference_of_means(lm, items, batch_size=batch_size, cancel=cancel)
    groups = list(dict.fromkeys((p.language, p.label) for p in items))
    device = _model_device(lm.model)
    pad_id = _pad_id(lm.tokenizer)
    if method == "ablation":
        if sample is None:
            raise SSNError("ablation scores one neuron at a time: give a sample (neuron triples or a count per site)")
        triples = sample_neurons(sites, kinds, sample, seed) if isinstance(sample, int) else \
            [(int(layer), str(kind), int(index)) for layer, kind, index in sample]
        for layer, kind, index in triples:
            if kind not in kinds or not 0 <= index < sites.get(layer, kind).size:
                raise SSNError(f"sampled neuron ({layer}, {kind}, {index}) is not a scored neuron of this model")
    accumulator = _Accumulator(sites, kinds, groups, signed=(method == "activation"))

    # Encode everything first (cheap), then batch by length so little compute is wasted on padding.
    encoded = [encode_prompt(lm, p.text, template, p.reply if aggregate == "reply" else None) for p in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]))
    total = len(items)
    distributed.check_enough(total, "prompts to score")
    if progress:
        progress(0, total, f"scoring {total} prompts ({method})")

    def run_batch(b: int) -> None:  # batch b of the one-process order; under a launch each process runs its share
        if cancel is not None and cancel.is_set():
            raise Cancelled("scoring was cancelled; nothing was written")
        start = b * batch_size
        rows = order[start:start + batch_size]
        batch = make_batch([encoded[i] for i in rows], aggregate, pad_id, device)
        row_groups = [(items[i].language, items[i].label) for i in rows]
        if method == "ablation":
            values = ablation_batch(lm, batch, triples)  # [B, S]
            results = {}
            for column, (layer, kind, index) in enumerate(triples):
                dense = results.setdefault((layer, kind), torch.zeros(len(rows), sites.get(layer, kind).size))
                dense[:, index] = values[:, column]
        elif method == "global":
            from ssn_core.attribution import global_batch

            results = global_batch(lm, batch, kinds, projections=projections, seed=seed + start)
        elif method == "attribution":
            from ssn_core.attribution import attribution_batch

            results = attribution_batch(lm, [items[i] for i in rows], kinds)
        elif method == "direction":
            from ssn_core.direction import direction_batch

            results = direction_batch(lm, batch, kinds, directions)
        else:
            results = score_batch(lm, batch, method, kinds)
        accumulator.add(row_groups, results)

    def report(done_batches: int) -> None:
        if progress:
            done = min(total, done_batches * batch_size)
            progress(done, total, f"scored {done}/{total} prompts")

    distributed.run_batches(math.ceil(total / batch_size), run_batch, after=report, gather=False,
                            what=f"scoring prompts ({method})")
    accumulator.all_reduce()  # the running sums of every process, added once
    means = accumulator.means(accumulator.sums)
    if method == "ablation":
        sampled = {}
        for layer, kind, index in triples:
            sampled.setdefault(kind, torch.zeros(sites.n_layers, sites.get(0, kind).size, dtype=torch.bool))[layer,
                                                                                                              index] = True
        for per_kind in means.values():
            for kind, tensor in per_kind.items():
                tensor[~sampled.get(kind, torch.zeros_like(tensor, dtype=torch.bool))] = math.nan
    meta = {"model_fingerprint": sites.fingerprint(), **sites.shape_signature(), "template": template,
            "kinds": list(kinds)}
    if method == "ablation":
        meta["sample"] = [list(t) for t in triples]
    if method == "global":
        meta["projections"] = int(projections)
    return ScoreTable(method=method, aggregate=aggregate, groups=means, counts=dict(accumulator.counts), meta=meta,
                      signed=accumulator.means(accumulator.signed) if accumulator.signed is not None else None)


# ---------------------------------------------------------------------------------------------------
# Validating the fast scores against exact ablation
# ---------------------------------------------------------------------------------------------------
COMPARISON_KIND = "ssn-lab/method-comparison"  # manifest kind of an `ssn compare-methods --out` folder


@dataclass
class MethodComparison:
    """Fast scores vs exact ablation on the same sampled neurons and prompts."""

    tables: dict[str, ScoreTable]  # method -> scores (ablation: NaN outside the sample)
    sample: list[Triple]
    agreement: object  # pandas DataFrame: method, kind, n, spearman, top_overlap
    top: float
    seconds: dict[str, float]

    def save(self, directory: str | Path) -> Path:
        """scores_<method>.safetensors, agreement.csv, comparison.json and manifest.json as one folder, replaced as
        a whole (an existing folder only when it is an earlier comparison: `ssn_core.io.check_out_dir`)."""
        from ssn_core.io import atomic_write_json, atomic_write_text, writing_result_dir

        with writing_result_dir(directory, COMPARISON_KIND) as tmp:
            for method, table in self.tables.items():
                table.save(tmp / f"scores_{method}.safetensors")
            atomic_write_text(tmp / "agreement.csv", self.agreement.to_csv(index=False))
            atomic_write_json(tmp / "comparison.json", {
                "sample": [list(t) for t in self.sample], "top": self.top, "seconds": self.seconds,
                "agreement": self.agreement.to_dict(orient="records"),
            })
        return Path(directory).expanduser()


def _mean_over_groups(table: ScoreTable, kind: str) -> torch.Tensor:
    """Prompt-weighted mean score over all (language, label) groups: [L, N]."""
    total = sum(table.counts[g] for g in table.groups)
    return sum(per_kind[kind] * table.counts[g] for g, per_kind in table.groups.items()) / max(total, 1)


def parse_method_spec(spec: str) -> tuple[str, int]:
    """'impact' -> ('impact', 8); 'global:16' -> ('global', 16): a method and its number of random projections."""
    name, _, count = spec.partition(":")
    if name not in METHODS or name == "ablation":
        raise SSNError(f"unknown method {spec!r} to compare; expected some of "
                       f"{', '.join(m for m in METHODS if m != 'ablation')} (global:K for K projections)")
    if count and name != "global":
        raise SSNError(f"{spec!r}: only global takes a number of projections (global:K)")
    try:
        projections = int(count) if count else 8
    except ValueError:
        raise SSNError(f"{spec!r}: the number of projections must be an integer") from None
    if projections < 1:
        raise SSNError(f"{spec!r}: at least 1 projection")
    return name, projections


def compare_methods(lm, prompts, sample: Sequence[Triple] | int = 64, methods: Sequence[str] = ("impact",
                    "activation"), aggregate: str = "content", kinds: Sequence[str] = SITE_KINDS,
                    batch_size: int = 8, template: str = "chat", top: float = 0.1, seed: int = 0,
                    progress: Progress | None = None, cancel: threading.Event | None = None) -> MethodComparison:
    """Spearman rank correlation and top-``top`` overlap of each fast method with exact ablation, per kind.

    ``sample`` is a neuron list or a count per kind (spread over layers). Scores are averaged over all
    prompts (every language and label) before ranking. ``methods``: names, or ``global:K`` for the global ΔLLM
    estimate with K random projections (its agreement grows with K: run several K side by side).
    """
    import time

    import pandas as pd
    from scipy.stats import spearmanr

    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    triples = sample_neurons(sites, kinds, sample, seed, per="kind") if isinstance(sample, int) else list(sample)
    tables: dict[str, ScoreTable] = {}
    seconds: dict[str, float] = {}
    for spec in ("ablation", *methods):
        method, projections = ("ablation", 8) if spec == "ablation" else parse_method_spec(spec)
        start = time.perf_counter()
        tables[spec] = score(lm, prompts, method=method, aggregate=aggregate, kinds=kinds, batch_size=batch_size,
                             template=template, sample=triples if method == "ablation" else None, seed=seed,
                             projections=projections, progress=progress, cancel=cancel)
        seconds[spec] = round(time.perf_counter() - start, 3)
    rows = []
    for method in methods:
        for kind in kinds:
            chosen = [(layer, index) for layer, k, index in triples if k == kind]
            if not chosen:
                continue
            layers = torch.tensor([c[0] for c in chosen])
            indices = torch.tensor([c[1] for c in chosen])
            exact = _mean_over_groups(tables["ablation"], kind)[layers, indices].double()
            fast = _mean_over_groups(tables[method], kind)[layers, indices].double()
            rho = float(spearmanr(exact.numpy(), fast.numpy()).statistic) if len(chosen) > 2 else math.nan
            k = max(1, math.floor(top * len(chosen)))
            top_exact = set(torch.argsort(-exact, stable=True)[:k].tolist())
            top_fast = set(torch.argsort(-fast, stable=True)[:k].tolist())
            rows.append({"method": method, "kind": kind, "n": len(chosen), "spearman": rho,
                         "top_overlap": len(top_exact & top_fast) / k})
    agreement = pd.DataFrame(rows, columns=["method", "kind", "n", "spearman", "top_overlap"])
    return MethodComparison(tables=tables, sample=triples, agreement=agreement, top=top, seconds=seconds)
