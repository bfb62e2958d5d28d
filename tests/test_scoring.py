"""Importance scores: closed forms and exact q/k recomputation against brute-force ablation, padding, statistics."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
from types import SimpleNamespace

import pytest
import torch
from scoring_helpers import tiny_lm

from ssn_core.errors import Cancelled, NeuronFileError, SSNError
from ssn_core.hooks import active_hook_count, hook_sites
from ssn_core.interventions import Intervention, intervene
from ssn_core.neurons import NeuronSet
from ssn_core.scoring import (
    SITE_KINDS,
    ScoreTable,
    ablation_batch,
    encode_prompt,
    make_batch,
    score,
    score_batch,
)
from ssn_core.sites import find_sites

PROMPTS = ["hello there, friend", "how do I make a dangerous thing at home?", "hi"]


def prompt(text, language="en", label="harmful"):
    return SimpleNamespace(text=text, language=language, label=label)


def _batch(lm, texts=PROMPTS, aggregate="content"):
    return make_batch([encode_prompt(lm, t) for t in texts], aggregate, pad_id=0)


def _component_output_site(lm, layer, kind):
    """A pseudo-site whose carrier is the output of the module right after the neuron's site."""
    site = lm.sites.get(layer, "mlp" if kind == "mlp" else "attn_o")
    return dataclasses.replace(site, where="out")


@torch.no_grad()
def brute_force(lm, batch, layer, kind, indices=None, chunk=16):
    """Zero each neuron in turn (suppress via row-masked interventions) and measure ‖Δ component output‖.

    Returns [B, len(indices)] (all neurons of the site when ``indices`` is None).
    """
    out_site = _component_output_site(lm, layer, kind)
    captured = {}

    def capture(carrier):
        captured["out"] = carrier.detach().float().clone()

    base = lm.model.base_model
    kwargs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids, "use_cache": False}
    with hook_sites({out_site: capture}):
        base(input_ids=batch.input_ids, **kwargs)
    baseline = captured["out"]  # [B, T, hidden]
    B = batch.input_ids.shape[0]
    if indices is None:
        indices = list(range(lm.sites.get(layer, kind).size))
    result = torch.zeros(B, len(indices))
    for start in range(0, len(indices), chunk):
        part = indices[start:start + chunk]
        m = len(part)
        interventions = []
        for i, index in enumerate(part):
            rows = torch.zeros(m * B, dtype=torch.bool)
            rows[i * B:(i + 1) * B] = True
            interventions.append(Intervention(NeuronSet({(layer, kind): [index]}), rows=rows))
        rep = {k: v.repeat(m, 1) for k, v in kwargs.items() if torch.is_tensor(v)}
        with intervene(lm.sites, *interventions), hook_sites({out_site: capture}):
            base(input_ids=batch.input_ids.repeat(m, 1), use_cache=False, **rep)
        delta = (captured["out"].view(m, B, *baseline.shape[1:]) - baseline[None]).norm(dim=-1)  # [m, B, T]
        weights = batch.weights
        real = weights > 0
        for i in range(m):
            result[:, start + i] = (torch.where(real, delta[i], 0.0) * weights).sum(-1)
    return result


# Every kind on the structurally different families (GQA, biases, Conv1D + fused qkv, interleaved fused qkv,
# fused qkv + gate_up); q/k only where the attention itself differs (q/k norms, soft-capping, sliding layers).
FAMILY_KINDS = [
    ("llama", SITE_KINDS), ("qwen2", SITE_KINDS), ("gpt2", SITE_KINDS), ("gpt_neox", SITE_KINDS), ("phi3", SITE_KINDS),
    ("qwen3", ("attn_q", "attn_k")), ("gemma2", ("attn_q", "attn_k")), ("gemma3_text", ("attn_q", "attn_k")),
]


@pytest.mark.parametrize(("family", "kinds"), FAMILY_KINDS, ids=[f for f, _ in FAMILY_KINDS])
def test_impact_equals_layer_local_ablation(family, kinds):
    lm = tiny_lm(family)
    batch = _batch(lm, PROMPTS[1:])
    fast = score_batch(lm, batch, "impact", kinds)
    generator = torch.Generator().manual_seed(0)
    for layer in (0, 1):
        for kind in kinds:
            # A random sample of neurons per site (all heads are hit with high probability), plus the first and last.
            size = lm.sites.get(layer, kind).size
            indices = sorted({0, size - 1, *torch.randperm(size, generator=generator)[:8].tolist()})
            exact = brute_force(lm, batch, layer, kind, indices)
            assert exact.abs().max() > 0
            torch.testing.assert_close(fast[(layer, kind)][:, indices], exact, rtol=1e-4,
                                       atol=max(1e-6, 1e-5 * exact.abs().max().item()))
    assert active_hook_count(lm.model) == 0


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])  # full and partial rotary
@pytest.mark.parametrize("two_stage", [True, False])
@pytest.mark.parametrize("peaked", [False, True])
def test_qk_shift_scores_equal_ablation_on_both_contractions_and_peaked_attention(family, two_stage, peaked,
                                                                                   monkeypatch):
    """attn_k has two exact contractions (per-head values then the group's factor, or V F_gᵀ over (g, s)), chosen by
    flop count; rows go in blocks that skip the keys after them and the prompts that have only filler rows there.
    ``peaked``: q and k weights ×60, so scores span
    hundreds of nats and zeroing a dim shifts them by far more than exp's range (88) — the shifted softmax must stay
    exact where exp(s − Δ) unnormalised would overflow or underflow."""
    from ssn_core.scoring import qk  # the kernels look these up in their own module

    lm = tiny_lm(family)
    if peaked:
        with torch.no_grad():
            for name, param in lm.model.named_parameters():
                if any(part in name for part in ("q_proj", "k_proj", "query_key_value")):
                    param.mul_(60.0)
    batch = _batch(lm, PROMPTS[1:])  # a long and a short prompt: different padding, different counted rows
    monkeypatch.setattr(qk, "_K_TWO_STAGE", two_stage)
    row_blocks = qk._row_blocks
    blocks = []
    monkeypatch.setattr(qk, "_row_blocks", lambda rows, weights: blocks.append(
        row_blocks(rows, weights, step=3, block_cost=0)) or blocks[-1])
    shifts = []
    shifted_probs = qk._shifted_probs
    monkeypatch.setattr(qk, "_shifted_probs", lambda s, rf, kf, out: shifts.append(
        float(torch.matmul(rf, kf).abs().max())) or shifted_probs(s, rf, kf, out))
    indices = [0, 3, 17, 31]
    fast = score_batch(lm, batch, "impact", ("attn_q", "attn_k"))
    assert shifts and (max(shifts) > 100 if peaked else max(shifts) < 88)  # the peaked model really is out of range
    assert all(len(b) > 1 for b in blocks) and any(keys < b[-1][2] for b in blocks for _, _, keys, _ in b[:-1])
    # The short prompt's filler rows sit in blocks of the long prompt alone.
    assert any(prompts is not None and len(prompts) == 1 for b in blocks for *_, prompts in b)
    for layer in (0, 1):
        for kind in ("attn_q", "attn_k"):
            exact = brute_force(lm, batch, layer, kind, indices)
            assert bool(torch.isfinite(fast[(layer, kind)]).all())
            torch.testing.assert_close(fast[(layer, kind)][:, indices], exact, rtol=1e-4,
                                       atol=max(1e-6, 1e-5 * exact.abs().max().item()))


@pytest.mark.parametrize("block_cost", [0, 8, 1000])
def test_row_blocks_cover_every_counted_row_once_with_its_keys(block_cost):
    """Whatever the blocks' fixed cost, every counted (prompt, row) is recomputed in exactly one block that includes
    its prompt and all keys up to its position; a prompt left out of a block has only filler rows there."""
    from ssn_core.scoring.attention import _row_blocks, _weighted_rows

    generator = torch.Generator().manual_seed(0)
    T = 70
    weights = torch.zeros(6, T)
    for b, (pad, n) in enumerate([(0, 60), (10, 7), (30, 1), (5, 33), (40, 12), (59, 8)]):
        weights[b, pad + 3:pad + 3 + n] = torch.rand(n, generator=generator) + 0.1
    rows, row_weights = _weighted_rows(weights)
    blocks = _row_blocks(rows, row_weights, block_cost=block_cost)
    covered = torch.zeros_like(row_weights, dtype=torch.long)
    assert blocks[0][0] == 0 and blocks[-1][1] == rows.shape[1]
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))  # in order, back to back
    for j0, j1, keys, prompts in blocks:
        active = list(range(6)) if prompts is None else prompts.tolist()
        for b in range(6):
            if b in active:
                covered[b, j0:j1] += 1
                assert int(rows[b, j1 - 1]) < keys
            else:
                assert not bool((row_weights[b, j0:j1] > 0).any())
    assert bool((covered[row_weights > 0] == 1).all())
    if block_cost == 1000:  # blocks are dear: one block, everything in it
        assert len(blocks) == 1 and blocks[0][3] is None
    if block_cost == 0:  # blocks are free: nothing but counted rows is recomputed
        assert int(covered.sum()) == int((row_weights > 0).sum())


@pytest.mark.parametrize(("G", "D"), [(1, 5), (3, 4), (7, 8)])
def test_factor_blocks_partition_the_columns_and_skip_only_zeros(G, D):
    """Both attn_k contractions' column blocks of the kv-group factor cover every output coordinate once, and what a
    block does not read (input coordinates before its start; for the one-stage, whole heads) is zero in a triangular
    factor, so ‖F y‖² = Σ_blocks ‖F[c0:c1, c_in:] y[c_in:]‖² exactly; a dense factor is read whole."""
    from ssn_core.scoring.qk import _factor_blocks

    width = G * D
    factor = torch.linalg.qr(torch.randn(3 * width, width, generator=torch.Generator().manual_seed(G))).R
    y = torch.randn(width)
    for triangular, matrix in ((True, factor), (False, torch.randn(width, width))):
        for blocks in _factor_blocks(G, D, width, triangular):
            assert [c0 for _, c0, _ in blocks] == [0, *[c1 for _, _, c1 in blocks[:-1]]] and blocks[-1][2] == width
            assert all(c_in <= c0 for c_in, c0, _ in blocks)
            for c_in, c0, c1 in blocks:
                assert bool((matrix[c0:c1, :c_in] == 0).all())
            by_blocks = sum(float((matrix[c0:c1, c_in:] @ y[c_in:]).square().sum()) for c_in, c0, c1 in blocks)
            assert math.isclose(by_blocks, float((matrix @ y).square().sum()), rel_tol=1e-5)
    two_stage, one_stage = _factor_blocks(G, D, width, True)
    assert all(c_in % D == 0 for c_in, _, _ in one_stage)  # the one-stage reads heads whole
    assert len(one_stage) == G and (G == 1 or any(c_in > 0 for c_in, _, _ in two_stage))


@pytest.mark.parametrize("aggregate", ["last", "all"])
def test_impact_other_aggregates_equal_ablation(aggregate):
    lm = tiny_lm("llama")
    batch = _batch(lm, aggregate=aggregate)
    fast = score_batch(lm, batch, "impact", kinds=("attn_k", "attn_v", "mlp"))
    indices = [0, 5, 17, 31]
    for kind in ("attn_k", "attn_v", "mlp"):
        torch.testing.assert_close(fast[(0, kind)][:, indices], brute_force(lm, batch, 0, kind, indices), rtol=1e-4,
                                   atol=1e-6)


def test_content_weights_cover_exactly_the_user_tokens():
    lm = tiny_lm("qwen2")
    text = "tell me"
    ids, content = encode_prompt(lm, text, "chat")
    assert len(content) > 0 and len(ids) > len(content)  # template tokens exist and are excluded
    batch = make_batch([(ids, content), encode_prompt(lm, "a much longer user message here")], "content", 0)
    row = batch.weights[0]
    pad = batch.input_ids.shape[1] - len(ids)
    assert torch.all(row[:pad] == 0) and batch.attention_mask[0, :pad].sum() == 0
    nonzero = (row > 0).nonzero().flatten() - pad
    assert nonzero.tolist() == content
    torch.testing.assert_close(batch.weights.sum(-1), torch.ones(2))
    last = make_batch([(ids, content)], "last", 0).weights[0]
    assert last[-1] == 1 and last[:-1].sum() == 0
    _raw_ids, raw_content = encode_prompt(lm, text, "raw")
    assert len(raw_content) == len(text)  # raw text: every non-special token is content


def test_padding_never_leaks_batch_equals_one_by_one():
    lm = tiny_lm("llama")
    prompts = [prompt(t, label=lab) for t in PROMPTS for lab in ("harmful", "harmless")]
    batched = score(lm, prompts, batch_size=4)
    single = score(lm, prompts, batch_size=1)
    for group, per_kind in single.groups.items():
        for kind, tensor in per_kind.items():
            torch.testing.assert_close(batched.groups[group][kind], tensor, rtol=1e-5, atol=1e-7)
    assert batched.counts == {("en", "harmful"): 3, ("en", "harmless"): 3}


def test_online_statistics_equal_offline_means():
    lm = tiny_lm("gpt2")
    prompts = [prompt(t, language=lang) for t in PROMPTS for lang in ("en", "zh")] + [prompt("x y", "zh")]
    table = score(lm, prompts, kinds=("mlp", "attn_o"), batch_size=2)
    for language in ("en", "zh"):
        rows = [p for p in prompts if p.language == language]
        per_prompt = [score_batch(lm, _batch(lm, [p.text]), "impact", ("mlp", "attn_o")) for p in rows]
        for kind in ("mlp", "attn_o"):
            offline = torch.stack([torch.cat([r[(layer, kind)] for layer in range(2)]) for r in per_prompt]).mean(0)
            torch.testing.assert_close(table.get(language, "harmful", kind), offline, rtol=1e-5, atol=1e-7)
    assert table.counts[("zh", "harmful")] == 4


def test_activation_method_matches_captured_carriers():
    lm = tiny_lm("qwen2")
    batch = _batch(lm, PROMPTS[:1])
    result = score_batch(lm, batch, "activation", kinds=("mlp", "attn_k"))
    site = lm.sites.get(1, "attn_k")
    seen = {}
    with hook_sites({site: lambda c: seen.setdefault("x", site.read(c).clone())}):
        lm.model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids)
    weights = batch.weights[0][:, None]
    magnitude, signed = result[(1, "attn_k")]
    torch.testing.assert_close(magnitude[0], (seen["x"][0].abs() * weights).sum(0))
    torch.testing.assert_close(signed[0], (seen["x"][0] * weights).sum(0))
    table = score(lm, [prompt(t) for t in PROMPTS], method="activation", kinds=("mlp",))
    assert table.signed is not None and (table.signed[("en", "harmful")]["mlp"] < 0).any()
    assert (table.groups[("en", "harmful")]["mlp"] >= 0).all()


def test_ablation_batch_equals_single_suppressed_forward():
    lm = tiny_lm("phi3")
    batch = _batch(lm, PROMPTS[:2], aggregate="last")
    neurons = [(0, "mlp", 3), (1, "attn_q", 10), (0, "attn_v", 5)]
    fast = ablation_batch(lm, batch, neurons, chunk=2)
    base = lm.model.base_model
    kwargs = {"attention_mask": batch.attention_mask, "position_ids": batch.position_ids}
    with torch.no_grad():
        baseline = base(input_ids=batch.input_ids, **kwargs).last_hidden_state[:, -1]
        for column, (layer, kind, index) in enumerate(neurons):
            with intervene(lm.sites, Intervention(NeuronSet({(layer, kind): [index]}))):
                changed = base(input_ids=batch.input_ids, **kwargs).last_hidden_state[:, -1]
            torch.testing.assert_close(fast[:, column], (changed - baseline).norm(dim=-1), rtol=1e-4, atol=1e-6)
    table = score(lm, [prompt(t) for t in PROMPTS], method="ablation", sample=neurons, aggregate="last")
    mlp = table.get("en", "harmful", "mlp")
    assert not math.isnan(mlp[0, 3]) and torch.isnan(mlp[0, 4]) and torch.isnan(mlp[1]).all()


def test_score_table_round_trip_and_validation(tmp_path):
    lm = tiny_lm("llama")
    prompts = [prompt(t, label=lab) for t in PROMPTS[:2] for lab in ("harmful", "harmless")]
    table = score(lm, prompts, method="activation", kinds=("mlp", "attn_v"))
    path = table.save(tmp_path / "scores.safetensors")
    loaded = ScoreTable.load(path, lm.sites)
    assert loaded.method == "activation" and loaded.counts == table.counts and loaded.kinds == ("mlp", "attn_v")
    for group in table.groups:
        torch.testing.assert_close(loaded.groups[group]["mlp"], table.groups[group]["mlp"])
        torch.testing.assert_close(loaded.signed[group]["attn_v"], table.signed[group]["attn_v"])
    other = find_sites(tiny_lm("gpt2").model)
    with pytest.raises(NeuronFileError, match="different model"):
        ScoreTable.load(path, other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(NeuronFileError):
        ScoreTable.load(tmp_path / "junk.safetensors")


def test_bad_arguments_and_cancel():
    lm = tiny_lm("llama")
    prompts = [prompt(t) for t in PROMPTS]
    with pytest.raises(SSNError, match="unknown site kind 'attn_x'"):
        score(lm, prompts, kinds=("attn_x",))
    with pytest.raises(SSNError, match="unknown scoring method"):
        score(lm, prompts, method="gradient")
    with pytest.raises(SSNError, match="unknown aggregate"):
        score(lm, prompts, aggregate="mean")
    with pytest.raises(SSNError, match="give a sample"):
        score(lm, prompts, method="ablation")
    cancel = threading.Event()
    calls = []

    def progress(done, total, message):
        calls.append((done, total))
        if done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        score(lm, prompts, kinds=("mlp",), batch_size=1, progress=progress, cancel=cancel)
    assert calls[0] == (0, 3) and calls[-1] == (1, 3)
    assert active_hook_count(lm.model) == 0


def test_aggregate_ignores_non_finite_padding():
    from ssn_core.scoring import _aggregate

    values = torch.randn(3, 5, 4)
    weights = torch.rand(3, 5)
    weights[:, :2] = 0  # left padding
    values[:, 0] = float("nan")
    values[:, 1] = float("inf")
    expected = (values[:, 2:] * weights[:, 2:, None]).sum(1)
    torch.testing.assert_close(_aggregate(values, weights), expected)
