"""Measured model speed and the time estimates built on it (issue 16, item 3: hints from measured speed)."""

from __future__ import annotations

import pytest

from ssn_core import packed_linear, speed
from ssn_core.testing import tiny_model


def test_measure_speed_on_a_tiny_model():
    measured = speed.measure_speed(tiny_model("qwen2"))
    assert measured.prefill_tokens_per_s > 0 and measured.decode_tokens_per_s > 0 and measured.batch == 2
    assert measured.wide_batch == 8 and measured.wide_step_ratio is not None and measured.wide_step_ratio > 0
    assert measured.generation_prefill_tokens_per_s is not None and measured.generation_prefill_tokens_per_s > 0
    assert "tokens/s" in measured.describe() and "a step of 8 rows" in measured.describe()
    assert speed.measure_speed(tiny_model("qwen2"), wide_batch=0).wide_step_ratio is None
    if packed_linear.enabled():  # the wide step is timed again as a generation of 8 rows runs it: packed
        assert measured.packed_step_ratio is not None and measured.packed_step_ratio > 0
        assert "packed weights" in measured.describe()


def test_steps_a_generation_runs_packed_are_estimated_at_the_packed_cost():
    """The starter: a step of 8 rows 234 ms, 147 ms packed (0.63×); `ssn_core.packed_linear` covers 4-32 rows."""
    plain = speed.ModelSpeed(prefill_tokens_per_s=300.0, decode_tokens_per_s=2 / 0.096, batch=2, seconds=1.0,
                             wide_batch=8, wide_step_ratio=0.234 / 0.096)
    fast = speed.ModelSpeed(prefill_tokens_per_s=300.0, decode_tokens_per_s=2 / 0.096, batch=2, seconds=1.0,
                            wide_batch=8, wide_step_ratio=0.234 / 0.096, packed_step_ratio=0.147 / 0.234)
    assert fast.step_seconds(8) == pytest.approx(0.147)
    assert fast.step_seconds(16) == pytest.approx(plain.step_seconds(16) * 0.147 / 0.234)
    assert fast.step_seconds(2) == plain.step_seconds(2)  # below packed_linear.MIN_PACK_ROWS: unpacked
    assert fast.step_seconds(64) == plain.step_seconds(64)  # above packed_linear.MAX_PACK_ROWS: unpacked


def test_a_step_grows_with_the_rows_as_measured_at_two_batches():
    """The starter on two CPU cores: a step of 2 rows 96 ms, of 8 rows 234 ms (bench/README.md); 16 and 32 rows
    measured 272 and 321 ms, which the log interpolation puts at 303 and 372 ms (the linear rule: 768 and 1536)."""
    measured = speed.ModelSpeed(prefill_tokens_per_s=300.0, decode_tokens_per_s=2 / 0.096, batch=2, seconds=1.0,
                                wide_batch=8, wide_step_ratio=0.234 / 0.096)
    assert measured.step_seconds(1) == pytest.approx(0.096)
    assert measured.step_seconds(8) == pytest.approx(0.234)
    assert measured.step_seconds(16) == pytest.approx(0.303, abs=0.001)
    assert measured.step_seconds(32) == pytest.approx(0.372, abs=0.001)
    linear = speed.ModelSpeed(prefill_tokens_per_s=300.0, decode_tokens_per_s=2 / 0.096, batch=2, seconds=1.0)
    assert linear.step_seconds(32) == pytest.approx(0.096 * 16)
    flat = speed.ModelSpeed(prefill_tokens_per_s=300.0, decode_tokens_per_s=2 / 0.01, batch=2, seconds=1.0,
                            wide_batch=8, wide_step_ratio=0.9)  # a GPU: no slower with more rows
    assert flat.step_seconds(64) == pytest.approx(0.01)
    rows_32 = speed.generation_seconds(measured, 64, 32, 32)
    assert rows_32 == pytest.approx(2 * (32 * 40 / 300 + 32 * measured.step_seconds(32)))


def test_estimates_scale_with_the_work_and_the_speed():
    fast = speed.ModelSpeed(prefill_tokens_per_s=1000.0, decode_tokens_per_s=20.0, batch=2, seconds=0.1)
    slow = speed.ModelSpeed(prefill_tokens_per_s=100.0, decode_tokens_per_s=2.0, batch=2, seconds=0.1)
    # 16 rows of 48 tokens in batches of 8: 2 batches x (8 x 40 prefill tokens + 48 steps of 8 rows)
    assert speed.generation_seconds(fast, 16, 48, 8) == pytest.approx(2 * (320 / 1000 + 48 * 8 / 20))
    assert speed.generation_seconds(slow, 16, 48, 8) == pytest.approx(10 * speed.generation_seconds(fast, 16, 48, 8))
    assert speed.generation_seconds(fast, 0, 48) == 0
    # a generation's prefill keeps one position's logits: its own measured rate, where there is one
    kept = speed.ModelSpeed(prefill_tokens_per_s=1000.0, decode_tokens_per_s=20.0, batch=2, seconds=0.1,
                            generation_prefill_tokens_per_s=4000.0)
    assert speed.generation_seconds(kept, 16, 48, 8) == pytest.approx(2 * (320 / 4000 + 48 * 8 / 20))
    quick = speed.scoring_seconds(fast, 48, ["mlp", "attn_v", "attn_o"])
    with_qk = speed.scoring_seconds(fast, 48, ["mlp", "attn_q", "attn_k"])
    assert with_qk > 4 * quick  # exact q/k scoring costs several forward passes (bench/README.md)
    plan = speed.fine_tune_plan(fast, languages=3, items_per_language=12, steps=20, batch_size=4, evaluate=True)
    assert [name for name, _ in plan] == ["retain replies", "evaluating before", "training", "evaluating after"]
    assert speed.total_seconds(plan) == pytest.approx(sum(s for _, s in plan))
    no_eval = speed.fine_tune_plan(fast, languages=3, items_per_language=12, steps=20, batch_size=4, evaluate=False)
    assert [name for name, _ in no_eval] == ["retain replies", "training"]
