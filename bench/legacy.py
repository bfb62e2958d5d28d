"""Yesterday's paths, kept here (and only here) so a benchmark can time the new path beside the old one in one run.

- `generate`: one batch through transformers' own `generate` (greedy; what `ssn_core.generation.generate` did before
  it ran its own decoding loop).
- `run_packed`: validation's packed conditions as fixed batches of ``batch_size`` rows in text-major order, each
  batch generated to the end of its longest reply (what `ssn_core.validation.run_packed` did).
- `evaluate_replies`: the evaluation loop's generation: the prompts in input order, in chunks of ``batch_size``.
- `qk_impact` / `old_qk`: exact q/k importance as `ssn_core.scoring.qk._qk_impact` computed it before issue 17 (a
  softmax per shifted score tensor, then A' - A, in chunks of up to 256 MB).

Nothing in `ssn_core` imports this module.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch

from ssn_core._conventions import pad_id
from ssn_core.errors import SSNError
from ssn_core.scoring import (
    _aggregate,
    _chunk_size,
    _LayerAttention,
    _prep,
    _rope_pairs,
    _shifted_softmax,
    _softmax_scores,
    _take_rows,
    _weighted_rows,
)


def _config(lm, settings):
    from transformers import GenerationConfig

    stop_ids = lm.stop_token_ids
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                            eos_token_id=stop_ids or None, pad_token_id=pad_id(lm))


def generate(lm, user_texts: list[str], settings) -> list[str]:
    """Greedy replies of one left-padded batch via `transformers` `generate` (sampling is not reproduced here)."""
    if settings.do_sample:
        raise ValueError("bench.legacy.generate reproduces greedy decoding only")
    prompts = lm.prompt_texts(user_texts, chat=settings.chat, system=settings.system)
    inputs = lm.tokenize_prompts(prompts, chat_formatted=settings.chat, padding_side="left")  # [B, T]
    with torch.no_grad():
        sequences = lm.model.generate(**inputs, generation_config=_config(lm, settings))  # [B, T + new]
    stop_ids = lm.stop_token_ids
    out = []
    for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(lm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


def condition_interventions(conditions: Sequence, rows_of: list[int]) -> list:
    """One intervention per condition with neurons (or a direction), masked to the rows in ``rows_of``."""
    from ssn_core.direction import DirectionAblation
    from ssn_core.interventions import Intervention

    interventions = []
    for j, condition in enumerate(conditions):
        rows = [cj == j for cj in rows_of]
        if not any(rows):
            continue
        if condition.direction is not None:
            interventions.append(DirectionAblation(condition.direction, rows=rows, label=condition.key))
        elif condition.neurons is not None and len(condition.neurons):
            interventions.append(Intervention(condition.neurons, scale=condition.scale, rows=rows,
                                              label=condition.key))
    return interventions


def run_packed(lm, texts: Sequence[str], conditions: Sequence, settings, batch_size: int = 8) -> list[list[str]]:
    """``result[i][j]`` = text i under condition j, as fixed text-major batches (the path before issue 17)."""
    from ssn_core.interventions import intervene

    pairs = [(i, j) for i in range(len(texts)) for j in range(len(conditions))]
    replies: list[list[str]] = [[""] * len(conditions) for _ in texts]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        with intervene(lm, *condition_interventions(conditions, [j for _, j in chunk])):
            outputs = generate(lm, [texts[i] for i, _ in chunk], settings)
        for (i, j), reply in zip(chunk, outputs, strict=True):
            replies[i][j] = reply
    return replies


def evaluate_replies(lm, texts: Sequence[str], settings, batch_size: int = 8) -> list[str]:
    """The evaluation loop's replies: input order, chunks of ``batch_size``."""
    replies: list[str] = []
    for start in range(0, len(texts), batch_size):
        replies.extend(generate(lm, list(texts[start:start + batch_size]), settings))
    return replies


def n_batches(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size)


@contextlib.contextmanager
def old_qk() -> Iterator[None]:
    """`ssn_core.scoring.score_batch` computes q/k importance the old way inside the block."""
    from ssn_core.scoring import forward  # score_batch looks _qk_impact up there

    new = forward._qk_impact
    forward._qk_impact = qk_impact
    try:
        yield
    finally:
        forward._qk_impact = new


# ----- copied from ssn_core/scoring.py (now ssn_core/scoring/qk.py) before issue 17 (unchanged but for the name) ------


def qk_impact(geo: _LayerAttention, q_raw, k_raw, v, z_obs, cos, sin, bias, weights, kinds, check_tol):
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
        vf_k = torch.einsum("bksd,krgd->bkgsr", vh, geo.k_factors.view(K, -1, G, D))  # [B,K,G,S,r]
        pairs = _rope_pairs(key_cos, key_sin, B, S, D, q_raw.device) if geo.k_norm is None else None
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
