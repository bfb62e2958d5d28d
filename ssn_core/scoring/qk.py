"""Exact attn_q / attn_k importance: the layer's attention recomputed with one q (or k) dim zeroed, for a chunk of
dims at once (`_qk_impact`).

Only the query rows that count are recomputed, in blocks (`_row_blocks`) against the keys up to a block's last
row and for the prompts with a counted row in it (`_over_blocks`); without q/k norms a zeroed
dim moves the scores by a rank-2 product (`ssn_core.scoring.attention._rope_pairs`), so a chunk costs one small
matmul and one in-place softmax per score (`_shifted_probs`, used by `_q_shift_impact` and `_k_shift_impact`); with
q/k norms or soft-capping the softmax is taken per chunk after re-projecting. The derivation is in
`ssn_core.scoring`'s docstring. Tests and benchmarks that replace a kernel (``_row_blocks``, ``_K_TWO_STAGE``)
patch it here, where `_qk_impact` looks it up.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from functools import partial

import torch

from ssn_core.errors import SSNError
from ssn_core.scoring.attention import (
    _chunk_size,
    _prep,
    _rope_pairs,
    _row_blocks,
    _shifted_softmax,
    _softmax_scores,
    _take_rows,
    _weighted_rows,
)
from ssn_core.scoring.batch import _aggregate
from ssn_core.scoring.constants import _LayerAttention


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
_K_TWO_STAGE: bool | None = None  # attn_k contraction: None = whichever takes fewer flops (tests force each)
_TRIANGLE_BLOCKS = 4  # column blocks of the triangular kv-group factor (measured: 1.15x faster than 2 at 448 wide)


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


def _shifted_probs(scores: torch.Tensor, row_factors: torch.Tensor, key_factors: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """A′ = softmax(s − Δ) in ``out``, with Δ = row_factors @ key_factors the (scaled) score shift of zeroing a dim.

    One small matmul, one subtraction and one in-place softmax per score. The softmax subtracts each row's maximum,
    so nothing over- or underflows however large the shift, and exp never sees the masked scores' −3.4·10³⁸ (a slow
    path on CPUs) nor produces the tiny values whose products with V go subnormal: an earlier form, exp(log A − Δ)
    normalised afterwards, left values near 1e-38 that made every later matmul 4-5× slower on the real starter,
    whose attention is peaked (random weights, whose attention is flat, never showed it).
    """
    _bmm_into(row_factors, key_factors, out)
    torch.sub(scores, out, out=out)
    return torch.softmax(out, dim=-1, out=out)


def _q_shift_impact(row_factors: torch.Tensor, key_factors: torch.Tensor, scores: torch.Tensor,
                    vf: torch.Tensor, zf: torch.Tensor, row_weights: torch.Tensor) -> torch.Tensor:
    """attn_q impact of every (head, dim) from rank-2 score shifts: [B, K, G, D].

    row_factors [B,K,G,D,R,2] and key_factors [B,K,1,D,2,S] give the shift of zeroing each dim; scores [B,K,G,R,S]
    are the scaled, masked scores s; vf [B,K,G,S,r] = V F_hᵀ; zf [B,K,G,R,r] = A V F_hᵀ.
    ‖Δout‖ = ‖A′ V F_hᵀ − A V F_hᵀ‖.
    """
    B, K, G, D, R, _ = row_factors.shape
    S, r = key_factors.shape[-1], vf.shape[-1]
    impact = torch.zeros(B, K, G, D, dtype=vf.dtype, device=vf.device)
    block, chunk = _blocks(B, D, K * G * R * S)
    for b0 in range(0, B, block):
        b1 = min(B, b0 + block)
        nb = b1 - b0
        scores_b = scores[b0:b1, :, :, None]
        for d0 in range(0, D, chunk):
            d1 = min(D, d0 + chunk)
            c = d1 - d0
            buffer = _WORK.get("qk_scores", (nb, K, G, c, R, S), vf)
            heads = _WORK.get("qk_heads", (nb, K, G, c * R, r), vf)
            probs = _shifted_probs(scores_b, row_factors[b0:b1, :, :, d0:d1], key_factors[b0:b1, :, :, d0:d1], buffer)
            _bmm_into(probs.view(nb, K, G, c * R, S), vf[b0:b1], heads)
            heads = heads.view(nb, K, G, c, R, r).sub_(zf[b0:b1, :, :, None])  # A′VFᵀ − AVFᵀ
            impact[b0:b1, :, :, d0:d1] = torch.einsum("bkgct,bt->bkgc", heads.norm(dim=-1), row_weights[b0:b1])
    return impact


def _factor_blocks(G: int, D: int, r: int, triangular: bool
                   ) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Column blocks (first input coordinate read, c0, c1) of the kv-group factor for the two attn_k contractions.

    A QR factor is upper triangular: output coordinates [c0, c1) of F y only read y's coordinates from c0 on. The
    two-stage product reads y itself, so its blocks start where they like; the one-stage product reads y's heads
    through V F_gᵀ, so it takes one block per head, and head g's block reads heads g..G−1: Σ_g (G − g)·S·D flops
    a row, (G + 1)/2G of the full G·S·G·D. A factor that is not triangular is one block reading everything.
    """
    if not triangular:
        return [(0, 0, r)], [(0, 0, r)]
    width = G * D
    n = min(_TRIANGLE_BLOCKS, width)
    two_stage = [(c0, c0, c1) for c0, c1 in itertools.pairwise(round(i * width / n) for i in range(n + 1))]
    return two_stage, [(g * D, g * D, (g + 1) * D) for g in range(G)]  # one block per head


def _k_shift_impact(row_factors: torch.Tensor, key_factors: torch.Tensor, scores: torch.Tensor,
                    vh: torch.Tensor, z: torch.Tensor, row_weights: torch.Tensor, factors: torch.Tensor
                    ) -> torch.Tensor:
    """attn_k impact of every (kv head, dim) from rank-2 score shifts: [B, K, D].

    row_factors [B,K,D,R*G,2], key_factors [B,K,D,2,S]; scores [B,K,R,G,S] the scaled, masked scores; vh [B,K,S,D]
    values; z [B,K,G,R,D] = A V per head; factors [K, r, G*D] with ‖W_O,group y‖ = ‖factors y‖. Zeroing a key dim
    moves the scores of the group's G heads at once, and Δout = W_O,group [(A′_g − A_g) V]_g: per head the value
    matmul of A′, then one matmul with the group's factor for the norm (two-stage); or, when the keys are few,
    A′ over (g, s) times V F_gᵀ at once (one-stage). Whichever takes fewer flops, both in the triangular factor's
    column blocks (`_factor_blocks`).
    """
    B, K, D, RG, _ = row_factors.shape
    S = key_factors.shape[-1]
    G = z.shape[2]
    R = RG // G
    r = factors.shape[1]
    width = G * D
    triangular = r == width and bool(torch.equal(factors, factors.triu()))
    two_stage_blocks, one_stage_blocks = _factor_blocks(G, D, r, triangular)
    flops_per_row = {True: G * S * D + sum((width - c_in) * (c1 - c0) for c_in, c0, c1 in two_stage_blocks),
                     False: sum((G - c_in // D) * S * (c1 - c0) for c_in, c0, c1 in one_stage_blocks)}
    two_stage = flops_per_row[True] < flops_per_row[False] if _K_TWO_STAGE is None else _K_TWO_STAGE
    if two_stage:
        zk = z.permute(0, 1, 3, 2, 4)  # [B,K,R,G,D]
        factors_t = factors.transpose(1, 2)  # [K, G*D, r]
        column_blocks = [factors_t[:, c_in:, c0:c1].contiguous()  # [K, G*D - c_in, c1 - c0]
                         for c_in, c0, c1 in two_stage_blocks]
    else:
        # V F_gᵀ over (g, s) for the heads a column block reads (from its own on): [B, K, (G - g0)*S, c1 - c0],
        # written contiguous by matmul (an einsum's output would be copied again by the reshape).
        per_head = factors.view(K, r, G, D).permute(0, 2, 3, 1)  # [K, G, D, r]
        column_blocks = [torch.matmul(vh[:, :, None], per_head[:, c_in // D:, :, c0:c1]).view(B, K, -1, c1 - c0)
                         for c_in, c0, c1 in one_stage_blocks]
        zf = torch.einsum("bkgtd,krgd->bktr", z, factors.view(K, r, G, D))  # [B,K,R,r]
        zf_blocks = [zf[..., c0:c1] for _, c0, c1 in one_stage_blocks]
    n_blocks = len(column_blocks)
    impact = torch.zeros(B, K, D, dtype=vh.dtype, device=vh.device)
    block, chunk = _blocks(B, D, K * G * R * S)
    for b0 in range(0, B, block):
        b1 = min(B, b0 + block)
        nb = b1 - b0
        scores_b = scores[b0:b1, :, None].reshape(nb, K, 1, RG, S)
        for d0 in range(0, D, chunk):
            d1 = min(D, d0 + chunk)
            c = d1 - d0
            buffer = _WORK.get("qk_scores", (nb, K, c, RG, S), vh)
            probs = _shifted_probs(scores_b, row_factors[b0:b1, :, d0:d1], key_factors[b0:b1, :, d0:d1], buffer)
            if two_stage:
                y = _WORK.get("qk_values", (nb, K, c * RG, D), vh)
                _bmm_into(probs.view(nb, K, c * RG, S), vh[b0:b1], y)
                heads = _WORK.get("qk_heads", (K, nb, c, R, G, D), vh)  # kv head first: one bmm with its factor
                torch.sub(y.view(nb, K, c, R, G, D), zk[b0:b1, :, None], out=heads.transpose(0, 1))  # (A′_g − A_g) V
                flat = heads.view(K, nb * c * R, G * D)
                block_norms = _WORK.get("qk_block_norms", (n_blocks, K, nb * c * R), vh)
                for i, ((c_in, _, _), columns) in enumerate(zip(two_stage_blocks, column_blocks, strict=True)):
                    projected = _WORK.get(f"qk_projected_{i}", (K, nb * c * R, columns.shape[-1]), vh)
                    torch.bmm(flat[:, :, c_in:], columns, out=projected)
                    torch.linalg.vector_norm(projected, dim=-1, out=block_norms[i])
                delta = torch.linalg.vector_norm(block_norms, dim=0)
                delta = delta.view(K, nb, c, R).transpose(0, 1)
            else:
                # A′ over (g, s) for each row, times the block's V F_gᵀ rows, minus A V F_gᵀ: that block's Δout.
                flat = probs.view(nb * K, c * R, G * S)
                block_norms = _WORK.get("qk_block_norms", (n_blocks, nb, K, c, R), vh)
                for i, ((c_in, _, _), columns, zf_i) in enumerate(zip(one_stage_blocks, column_blocks, zf_blocks,
                                                                     strict=True)):
                    w = columns.shape[-1]
                    projected = _WORK.get(f"qk_projected_{i}", (nb, K, c, R, w), vh)
                    torch.bmm(flat[:, :, c_in // D * S:], columns[b0:b1].view(nb * K, -1, w),
                              out=projected.view(nb * K, c * R, w))
                    projected.sub_(zf_i[b0:b1, :, None])
                    torch.linalg.vector_norm(projected, dim=-1, out=block_norms[i])
                delta = torch.linalg.vector_norm(block_norms, dim=0)
            impact[b0:b1, :, d0:d1] = torch.einsum("bkct,bt->bkc", delta.view(nb, K, c, R), row_weights[b0:b1])
    return impact


def _over_blocks(blocks: list[tuple[int, int, int, torch.Tensor | None]], batch: int,
                 inputs: Callable[[int, int, int], list[torch.Tensor]],
                 kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Σ over the row blocks of ``kernel(*inputs(j0, j1, keys))``, each block run on its own prompts only.

    ``inputs`` slices the per-prompt tensors (batch first) for a block; a block that leaves prompts out
    (`_row_blocks`) gets those tensors' selected rows, and its result is added back to those prompts.
    There are rows to recompute, so at least one block.
    """
    total: torch.Tensor | None = None
    for j0, j1, keys, prompts in blocks:
        tensors = inputs(j0, j1, keys)
        if prompts is not None:
            tensors = [t.index_select(0, prompts) for t in tensors]
        part = kernel(*tensors)
        if total is None:
            total = part.new_zeros(batch, *part.shape[1:])
        if prompts is None:
            total.add_(part)
        else:
            total.index_add_(0, prompts, part)
    assert total is not None, "every batch has a row that counts"
    return total


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
    vh = v.permute(0, 2, 1, 3).contiguous()  # [B,K,S,D]; contiguous, so a row block's keys batch as one bmm
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
    blocks = _row_blocks(rows, row_weights)  # which rows, keys and prompts each kernel call recomputes
    eye = torch.eye(D, device=q_raw.device)
    # Scaled scores (plus the mask when no soft-capping sits in between): what a score shift is subtracted from.
    base = raw_scores * geo.scaling if geo.softcap is not None else raw_scores * geo.scaling + bias[:, None]
    if "attn_q" in kinds:
        # [B,K,G,S,r] = V F_hᵀ, contiguous (by matmul), so a row block's keys batch without a copy
        vf_q = torch.matmul(vh[:, :, None], geo.q_factors.view(K, G, -1, D).transpose(-1, -2))
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
            # softmax(s − Δ) in place, in cache-sized chunks (`_q_shift_impact`).
            zf_q = torch.einsum("bkgtd,kgrd->bkgtr", z, geo.q_factors.view(K, G, -1, D))  # [B,K,G,R,r] = A V F_hᵀ
            out["attn_q"] = _over_blocks(blocks, B, lambda j0, j1, keys: [
                row_factors[..., j0:j1, :], key_factors[..., :keys], base[..., j0:j1, :keys], vf_q[..., :keys, :],
                zf_q[..., j0:j1, :], row_weights[:, j0:j1]], _q_shift_impact).reshape(B, H * D)
        else:  # soft-capping (the shift goes through tanh) or q norms: softmax per chunk, as before
            scores = torch.zeros(B, H, D, device=q_raw.device)
            chunk = min(D, _chunk_size(B * H, R, S, vf_q.shape[-1]))
            for start in range(0, D, chunk):
                end = min(start + chunk, D)
                if pairs is not None:
                    # [B,K,G,c,R,S]
                    shift = torch.matmul(row_factors[:, :, :, start:end], key_factors[:, :, :, start:end])
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
            base_k = base.permute(0, 1, 3, 2, 4).contiguous()  # [B,K,R,G,S]
            factors = geo.k_factors.to(vh.device)
            out["attn_k"] = _over_blocks(blocks, B, lambda j0, j1, keys: [
                row_factors[..., j0 * G:j1 * G, :], key_factors[..., :keys], base_k[:, :, j0:j1, :, :keys],
                vh[:, :, :keys], z[:, :, :, j0:j1], row_weights[:, j0:j1]],
                partial(_k_shift_impact, factors=factors)).reshape(B, K * D)
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
                    shift = torch.matmul(row_factors[:, :, start:end], key_factors[:, :, start:end])
                    shift = shift.view(B, K, c, R, G, S)
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
