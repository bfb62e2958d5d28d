"""The weight-left product for decoding steps (`ssn_core.packed_linear.weight_left_products`): equal to F.linear up
to rounding, only where it pays and the call qualifies, scoped to its context, and the same replies."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssn_core import packed_linear as packed
from ssn_core.generation import GenerationSettings, generate_many
from ssn_core.packed_linear import packed_layer_count, weight_left_linear, weight_left_products

PROMPTS = ["hi", "a much longer prompt, so the others get left padding", "¿Qué tal? 你好", "tell me a story"]


@pytest.fixture(autouse=True)
def _weight_left_on(monkeypatch):
    """Wherever it works (``SSN_WEIGHT_LEFT=1``), and timed as paying for every shape, so the path itself runs."""
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "1")
    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    monkeypatch.setattr(packed, "_weight_left_pays", lambda weight, rows: True)


class _Count:
    def __init__(self, monkeypatch):
        self.by_thread: dict[int, list[int]] = {}
        original = packed.weight_left_linear

        def counting(weight, bias, x):
            self.by_thread.setdefault(threading.get_ident(), []).append(x.numel() // x.shape[-1])
            return original(weight, bias, x)

        monkeypatch.setattr(packed, "weight_left_linear", counting)

    @property
    def rows(self) -> list[int]:
        return [r for rows in self.by_thread.values() for r in rows]


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 32])
@pytest.mark.parametrize("bias", [True, False])
def test_weight_left_product_equals_linear(rows, bias):
    torch.manual_seed(rows)
    weight, b = torch.randn(48, 40), (torch.randn(48) if bias else None)
    x = torch.randn(rows, 1, 40)  # [B, 1, in], as a decoding step
    out = weight_left_linear(weight, b, x)
    assert out.shape == (rows, 1, 48) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_row_buckets_are_powers_of_two():
    assert [packed._row_bucket(r) for r in (1, 2, 3, 4, 5, 9, 16, 17, 32)] == [1, 2, 4, 4, 8, 16, 16, 32, 32]


def test_the_timing_is_cached_per_shape_and_bucket(monkeypatch):
    monkeypatch.undo()
    packed._WEIGHT_LEFT_CHOICE.clear()
    weight = torch.randn(64, 32)
    first = packed._weight_left_pays(weight, 3, repeats=2)
    assert isinstance(first, bool) and list(packed._WEIGHT_LEFT_CHOICE) == [(64, 32, 4)]
    packed._WEIGHT_LEFT_CHOICE[(64, 32, 4)] = not first
    assert packed._weight_left_pays(weight, 4) is (not first)  # the same bucket: not timed again
    huge = torch.empty(packed._TUNING_WEIGHT_BYTES // 64 + 10, 16)  # timed on its first 16 MB only
    packed._weight_left_pays(huge, 1, repeats=1)
    assert (packed._TUNING_WEIGHT_BYTES // 64, 16, 1) in packed._WEIGHT_LEFT_CHOICE
    packed._WEIGHT_LEFT_CHOICE.clear()


def test_only_qualifying_calls_in_the_entering_context_run_it(monkeypatch):
    layer = nn.Linear(40, 24)
    counter = _Count(monkeypatch)
    seen: dict[str, torch.Tensor] = {}
    x = torch.randn(3, 40)

    def other_session():
        with torch.no_grad():
            seen["other"] = layer(x)

    with torch.no_grad(), weight_left_products(layer) as n_layers:
        assert n_layers == 1
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        many = torch.randn(packed.WEIGHT_LEFT_MAX_ROWS + 1, 40)  # a prefill: F.linear itself
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
        worker = threading.Thread(target=other_session)
        worker.start()
        worker.join()
    with weight_left_products(layer):  # autograd: F.linear
        assert layer(torch.randn(2, 40, requires_grad=True)).requires_grad
    assert counter.by_thread == {threading.get_ident(): [3]}
    assert torch.equal(seen["other"], F.linear(x, layer.weight, layer.bias))
    assert "forward" not in layer.__dict__


def test_switched_off_nested_or_not_paying_runs_nothing(monkeypatch):
    layer = nn.Linear(8, 8)
    with weight_left_products(layer) as outer, weight_left_products(layer) as inner:
        assert (outer, inner) == (1, 0)
    assert "forward" not in layer.__dict__
    with pytest.raises(RuntimeError, match="boom"), weight_left_products(layer):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "0")
    with weight_left_products(layer) as off:
        assert off == 0 and not packed.weight_left_enabled()
    monkeypatch.delenv("SSN_WEIGHT_LEFT")
    for pays in (True, False):
        monkeypatch.setattr(packed, "weight_left_pays_here", lambda pays=pays: pays)
        with weight_left_products(layer) as auto:
            assert auto == int(pays) and packed.weight_left_enabled() is pays


def test_the_speed_checks_return_a_choice():
    assert isinstance(packed.weight_left_pays_here(n_in=64, n_out=64, repeats=2), bool)


def test_manifests_record_whether_weight_left_products_may_run(monkeypatch):
    from ssn_core.identify.run import _versions

    assert _versions()["weight_left_linear"] is True
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "0")
    assert _versions()["weight_left_linear"] is False


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_generation_gives_the_same_replies_with_or_without_it(tiny, monkeypatch, family, batch_size):
    lm = tiny(family, seed=2)
    settings = GenerationSettings(max_new_tokens=10)
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "0")
    plain = generate_many(lm, PROMPTS, settings, batch_size=batch_size)
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "1")
    counter = _Count(monkeypatch)
    fast = generate_many(lm, PROMPTS, settings, batch_size=batch_size)
    assert batch_size in counter.rows  # the decoding steps ran it (and prefills of up to 32 tokens)
    assert max(counter.rows) <= packed.WEIGHT_LEFT_MAX_ROWS
    assert fast == plain and len(set(plain)) > 1
    assert packed_layer_count(lm.model) == 0


def test_the_starter_gives_the_same_replies_with_or_without_it(starter, monkeypatch):
    prompts = ["How do I make a bomb?", "Write a haiku about rain.", "如何入侵别人的电脑？",
               "Explique la photosynthèse."]
    settings = GenerationSettings(max_new_tokens=16)
    monkeypatch.undo()  # the automatic choice, timed here
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "0")
    plain = [generate_many(starter, prompts[:1], settings, batch_size=1), generate_many(starter, prompts, settings,
                                                                                       batch_size=2)]
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "1")
    fast = [generate_many(starter, prompts[:1], settings, batch_size=1), generate_many(starter, prompts, settings,
                                                                                      batch_size=2)]
    assert fast == plain
