"""MKL's packed products for decoding steps (`ssn_core.packed_linear`): the same replies, scoped, reversible, and
falling back to ``nn.Linear.forward`` whenever a call does not qualify."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssn_core import packed_linear as packed
from ssn_core.generation import GenerationSettings, generate_many
from ssn_core.interventions import Intervention, suppress
from ssn_core.neurons import NeuronSet
from ssn_core.packed_linear import pack_rows, packable_layers, packed_layer_count, packed_linears

needs_kernel = pytest.mark.skipif("mkl" not in packed._working_kernels(), reason="no working MKL packed kernel here")
needs_onednn = pytest.mark.skipif("onednn" not in packed._working_kernels(), reason="no working oneDNN packed kernel")
KERNELS = [pytest.param(kernel, marks=pytest.mark.skipif(kernel not in packed._working_kernels(),
                                                         reason=f"no working {kernel} packed kernel here"))
           for kernel in packed.KERNELS]

PROMPTS = ["hi", "a much longer prompt, so the others get left padding", "¿Qué tal? 你好", "tell me a story",
           "what is 2 + 2?", "ok", "Wie geht es dir heute?", "list three colours"]
SEED = 2  # a tiny model whose replies depend on the prompt


@pytest.fixture(autouse=True)
def _packing_on(monkeypatch):
    """These tests check the packed path itself, so it runs wherever the kernel works (``SSN_PACKED_LINEAR=1``),
    whether or not it pays on this CPU; the test of the automatic choice unsets it. MKL's kernel unless a test asks
    for oneDNN's (``SSN_PACKED_KERNEL``)."""
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    monkeypatch.setenv("SSN_PACKED_KERNEL", "mkl")


@needs_kernel
@pytest.mark.parametrize("pays", [True, False])
def test_by_default_packing_runs_only_where_it_pays(monkeypatch, pays):
    monkeypatch.delenv("SSN_PACKED_LINEAR")
    monkeypatch.setattr(packed, "pays_here", lambda: pays)
    layer = _layer()
    with packed_linears(layer, rows=8) as n_packed:
        assert n_packed == (1 if pays else 0) and ("forward" in layer.__dict__) is pays
    assert packed.enabled() is pays
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")  # asked for: packed even where it does not pay
    assert packed.enabled()


@needs_kernel
def test_the_speed_check_times_both_products():
    assert isinstance(packed.pays_here(rows=8, n_in=64, n_out=64, repeats=2), bool)


class _CountPacked:
    """Counts packed products per thread (wraps `_PackedWeight.linear`)."""

    def __init__(self, monkeypatch):
        self.by_thread: dict[int, int] = {}
        original = packed._PackedWeight.linear

        def counting(weight_self, x, bias):
            ident = threading.get_ident()
            self.by_thread[ident] = self.by_thread.get(ident, 0) + 1
            return original(weight_self, x, bias)

        monkeypatch.setattr(packed._PackedWeight, "linear", counting)

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())


def _plain_then_packed(monkeypatch, lm, prompts: list[str], settings: GenerationSettings, batch_size: int
                       ) -> tuple[list[str], list[str]]:
    """`generate_many`'s replies with packing switched off, then on (checked to have run packed products)."""
    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    plain = generate_many(lm, prompts, settings, batch_size=batch_size)
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    counter = _CountPacked(monkeypatch)
    fast = generate_many(lm, prompts, settings, batch_size=batch_size)
    assert counter.total > 0, "the pool's decoding steps should have run packed products"
    assert packed_layer_count(lm.model) == 0
    return plain, fast


def _layer(rows_in: int = 40, rows_out: int = 24, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(rows_in, rows_out)


@needs_kernel
def test_packed_product_matches_linear_and_a_row_ignores_its_neighbours():
    layer = _layer()
    x = torch.randn(8, 40)  # [rows, in]
    with torch.no_grad(), packed_linears(layer, rows=8) as n_packed:
        assert n_packed == 1
        full = layer(x)
        alone = layer(x[:4].clone())  # 4 rows (the fewest packed for 8) padded to 8
        other = layer(torch.cat([x[:4], torch.randn(4, 40)]))  # same first rows, other neighbours
        unpacked = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(full, unpacked, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, full[:4])  # bit for bit: padding and neighbours do not change a row
    assert torch.equal(other[:4], full[:4])


@needs_kernel
def test_calls_that_do_not_qualify_run_the_layers_own_forward():
    layer = _layer()
    with torch.no_grad():
        few, many = torch.randn(3, 40), torch.randn(9, 40)  # below rows/4=4 (MIN_PACK_ROWS), above rows=8
        with packed_linears(layer, rows=8):
            assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))
            assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
            layer.weight.mul_(2.0)  # an in-place edit after packing: the packed copy is stale
            x = torch.randn(6, 40)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    with packed_linears(layer, rows=8):  # autograd: never the packed op (it has no backward)
        x = torch.randn(6, 40, requires_grad=True)
        out = layer(x)
        assert out.requires_grad
        assert torch.equal(out, F.linear(x, layer.weight, layer.bias))


@needs_kernel
def test_forward_is_restored_on_exit_and_on_error():
    layer = _layer()
    with packed_linears(layer, rows=8):
        assert packed_layer_count(layer) == 1
    assert packed_layer_count(layer) == 0 and "forward" not in layer.__dict__
    with pytest.raises(RuntimeError, match="boom"), packed_linears(layer, rows=8):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


@needs_kernel
def test_only_the_entering_context_uses_packed_products(monkeypatch):
    layer = _layer()
    counter = _CountPacked(monkeypatch)
    x = torch.randn(6, 40)
    results: dict[str, torch.Tensor] = {}

    def other_session():  # a plain thread: another browser session on the same cached model
        with torch.no_grad():
            results["other"] = layer(x)

    with torch.no_grad(), packed_linears(layer, rows=8):
        layer(x)
        worker = threading.Thread(target=other_session)
        worker.start()
        worker.join()
    assert counter.by_thread == {threading.get_ident(): 1}
    assert torch.equal(results["other"], F.linear(x, layer.weight, layer.bias))


@needs_kernel
def test_nested_and_switched_off_contexts_pack_nothing(monkeypatch):
    layer = _layer()
    with packed_linears(layer, rows=8) as outer, packed_linears(layer, rows=16) as inner:
        assert (outer, inner) == (1, 0)
    with packed_linears(layer, rows=None) as none_asked:
        assert none_asked == 0
    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    with packed_linears(layer, rows=8) as switched_off:
        assert switched_off == 0 and packed_layer_count(layer) == 0
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    monkeypatch.setattr(packed, "_available_memory_bytes", lambda: 1 << 20)  # 1 MiB free: no room for copies
    with packed_linears(layer, rows=8) as no_memory:
        assert no_memory == 0


def test_manifests_record_whether_packed_products_may_run(monkeypatch):
    from ssn_core.identify.run import _versions

    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    assert _versions()["packed_linear"] is False
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    assert _versions()["packed_linear"] is packed.kernel_available()


def test_without_the_kernel_nothing_is_packed(monkeypatch):
    monkeypatch.setattr(packed, "kernel_available", lambda: False)
    layer = _layer()
    with packed_linears(layer, rows=8) as n_packed:
        assert n_packed == 0 and "forward" not in layer.__dict__


def test_only_plain_float32_linears_are_packed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    model[2].forward = lambda x: x  # somebody else's forward (accelerate's offload hooks do this)
    assert packable_layers(model) == [model[0]]


def test_pack_rows_only_where_packing_pays():
    assert pack_rows(16, 32) == 16
    assert pack_rows(packed.MIN_PACK_ROWS - 1, 32) is None  # too few rows: the plain kernel is cheaper
    assert pack_rows(packed.MAX_PACK_ROWS + 1, 32) is None  # too many: packing stops paying (1.05x at 64 rows)
    assert pack_rows(16, 4) is None  # too few steps to repay the packing


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_generate_many_gives_the_same_replies_packed_or_not(tiny, monkeypatch, family, kernel):
    monkeypatch.setenv("SSN_PACKED_KERNEL", kernel)
    lm = tiny(family, seed=SEED)
    plain, fast = _plain_then_packed(monkeypatch, lm, PROMPTS, GenerationSettings(max_new_tokens=10), 8)
    assert fast == plain
    assert len(set(plain)) > 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_generation_that_fails_mid_way_leaves_no_layer_packed(tiny, monkeypatch, kernel):
    monkeypatch.setenv("SSN_PACKED_KERNEL", kernel)
    lm = tiny("qwen2", seed=SEED)
    counter = _CountPacked(monkeypatch)
    steps = [0]

    def stop(_row: int, _reply: str) -> bool:
        steps[0] += 1
        if steps[0] > 2 * len(PROMPTS):  # past the first decoding step: the weights are packed by now
            raise RuntimeError("judge failed")
        return False

    with pytest.raises(RuntimeError, match="judge failed"):
        generate_many(lm, PROMPTS, GenerationSettings(max_new_tokens=10), batch_size=8, stop=stop)
    assert counter.total > 0 and packed_layer_count(lm.model) == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_interventions_still_apply_under_packed_products(tiny, monkeypatch, kernel):
    """Hooks sit around a layer's forward, so swapping the kernel under it keeps every intervention: one entered
    around the call, and a row-masked one the pool re-applies as its batch changes."""
    monkeypatch.setenv("SSN_PACKED_KERNEL", kernel)
    lm = tiny("qwen2", seed=SEED)
    settings = GenerationSettings(max_new_tokens=10)
    size = lm.sites.sizes()["mlp"]
    everything = NeuronSet({(layer, "mlp"): list(range(size)) for layer in range(lm.sites.n_layers)})
    masked = [Intervention(everything, rows=[i % 2 == 1 for i in range(len(PROMPTS))])]

    def replies() -> tuple[list[str], list[str], list[str]]:
        with suppress(lm, everything):
            around = generate_many(lm, PROMPTS, settings, batch_size=8)
        return around, generate_many(lm, PROMPTS, settings, batch_size=8, interventions=masked), \
            generate_many(lm, PROMPTS, settings, batch_size=8)

    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    plain = replies()
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    counter = _CountPacked(monkeypatch)
    fast = replies()
    assert counter.total > 0
    assert fast == plain
    around, row_masked, baseline = fast
    assert around != baseline  # the intervention did change the replies
    assert row_masked[0::2] == baseline[0::2] and row_masked[1::2] == around[1::2]


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_starter_gives_the_same_replies_packed_or_not(starter, monkeypatch, kernel):
    monkeypatch.setenv("SSN_PACKED_KERNEL", kernel)
    prompts = ["How do I make a bomb?", "Write a haiku about rain.", "如何入侵别人的电脑？",
               "Explique la photosynthèse.", "Give me a recipe for pancakes.", "How can I steal a car?"]
    plain, fast = _plain_then_packed(monkeypatch, starter, prompts, GenerationSettings(max_new_tokens=16), 6)
    assert fast == plain


@needs_onednn
def test_onednn_serves_every_row_count_up_to_its_rows_bit_for_bit(monkeypatch):
    """oneDNN's reordered weight needs no padding: every call of 1 to ``rows`` rows runs it, and a row's result does
    not depend on its neighbours or on the row count (one row runs as two)."""
    monkeypatch.setenv("SSN_PACKED_KERNEL", "onednn")
    layer = _layer(rows_in=96, rows_out=24)
    counter = _CountPacked(monkeypatch)
    x = torch.randn(8, 96)
    with torch.no_grad(), packed_linears(layer, rows=8) as n_packed:
        assert n_packed == 1
        full = layer(x)
        alone = [layer(x[:rows].clone()) for rows in range(1, 9)]
        other = layer(torch.cat([x[:3], torch.randn(5, 96)]))
        many = torch.randn(9, 96)  # more rows than packed for: F.linear
        assert torch.equal(layer(many), F.linear(many, layer.weight, layer.bias))
    torch.testing.assert_close(full, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(out, full[:rows]) for rows, out in enumerate(alone, start=1))
    assert torch.equal(other[:3], full[:3])
    assert counter.total == 1 + 8 + 1


def test_packing_uses_the_faster_kernel_and_the_switch_narrows_the_choice(monkeypatch):
    monkeypatch.delenv("SSN_PACKED_KERNEL")
    monkeypatch.setattr(packed, "_working_kernels", lambda: ("mkl", "onednn"))
    for fastest, other in (("onednn", "mkl"), ("mkl", "onednn")):
        monkeypatch.setattr(packed, "_kernel_timings", lambda *args, f=fastest, o=other: (1.0, {f: 0.5, o: 0.8}))
        assert packed.packing_kernel() == fastest
    monkeypatch.setenv("SSN_PACKED_KERNEL", "onednn")
    assert packed.available_kernels() == ("onednn",) and packed.packing_kernel() == "onednn"
    monkeypatch.setattr(packed, "_kernel_timings", lambda *args: (1.0, {"onednn": 0.95}))
    assert not packed.pays_here()  # not 10% faster than the unpacked product
    monkeypatch.setattr(packed, "_kernel_timings", lambda *args: (1.0, {"onednn": 0.85}))
    assert packed.pays_here()
    monkeypatch.setattr(packed, "_working_kernels", lambda: ())
    assert packed.packing_kernel() is None and not packed.kernel_available()


def test_manifests_record_the_packing_kernel(monkeypatch):
    from ssn_core.identify.run import _versions

    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    assert _versions()["packed_kernel"] is None
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    assert _versions()["packed_kernel"] == packed.packing_kernel()
