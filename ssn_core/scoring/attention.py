"""The pieces of a layer's attention that the exact q/k recomputation rebuilds: RoPE, q/k norms, the causal /
padding / sliding-window mask, the (soft-capped) softmax, and which query rows count in a prompt's aggregate.

Kept apart from the kernels in `ssn_core.scoring.qk` because they are the model's attention, re-derived (and
checked against the model's own output on every batch), while the kernels are our arithmetic on top of it.
"""

from __future__ import annotations

import torch
from torch import nn

from ssn_core.scoring.constants import _LayerAttention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, ..., D]; cos/sin [B, T, R] with R <= D rotary dims (GPT-NeoX rotates only the first R)."""
    if cos is None:
        return x
    assert sin is not None, "the rotary tables come in pairs (cos, sin)"
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


def _row_blocks(rows: torch.Tensor, row_weights: torch.Tensor, step: int = 8, block_cost: int = 8
                ) -> list[tuple[int, int, int, torch.Tensor | None]]:
    """(first row, end row, keys, prompts) blocks of the recomputed rows; ``prompts`` the batch rows that have a
    counted row in the block (None: all of them).

    Two kinds of work are skipped exactly. A prompt with fewer counted rows than the batch's most has weight-0
    filler rows in front (`_weighted_rows`); a block where a prompt has only filler leaves that prompt out (the
    filler adds 0 to its aggregate). And a block's rows attend to keys < its last position + 1, so the keys after
    it are left out (they are masked for those rows: exactly zero weight). Block bounds are chosen among the
    multiples of ``step`` and the prompts' first counted rows to minimise Σ (prompts × rows × keys) plus
    ``block_cost`` rows of every prompt at full keys per block (a block's fixed cost), by dynamic programming.
    """
    B, R = rows.shape
    firsts = (R - (row_weights > 0).sum(-1)).tolist()  # per prompt: its counted rows are its last ones
    bounds = sorted({0, R, *range(step, R, step), *(j for j in firsts if 0 < j < R)})
    positions = rows.tolist()
    fixed = block_cost * B * (max(max(p) for p in positions) + 1)

    def block(i: int, j: int) -> tuple[float, int, list[int]]:
        j0, j1 = bounds[i], bounds[j]
        active = [b for b in range(B) if firsts[b] < j1]
        if not active:  # only filler rows here (no prompt has a counted row at all): nothing to compute
            return 0.0, 0, active
        keys = max(positions[b][j1 - 1] for b in active) + 1
        return len(active) * (j1 - j0) * keys + fixed, keys, active

    n = len(bounds)
    best = [0.0] + [float("inf")] * (n - 1)
    choice = [0] * n
    for j in range(1, n):
        for i in range(j):
            cost = best[i] + block(i, j)[0]
            if cost < best[j]:
                best[j], choice[j] = cost, i
    blocks = []
    j = n - 1
    while j > 0:
        i = choice[j]
        _cost, keys, active = block(i, j)
        if active:
            prompts = None if len(active) == B else torch.tensor(active, dtype=torch.long, device=rows.device)
            blocks.append((bounds[i], bounds[j], keys, prompts))
        j = i
    return blocks[::-1]


def _take_rows(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x[b, index[b], ...] along ``dim`` (index [B, R])."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    sizes = [r if i == dim else s for i, (s, r) in enumerate(zip(x.shape, shape, strict=True))]
    expanded = index.view(shape).expand(*sizes)
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
