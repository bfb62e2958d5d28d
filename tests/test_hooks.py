"""Hooks (`ssn_core.hooks`): removed after every context and exception, isolated per thread and context,
`bind_context` into worker threads, and `hook_modules` on module inputs and outputs."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from delta_helpers import token_ids
from hf_helpers import logits

from ssn_core.hooks import active_hook_count, bind_context, hook_modules
from ssn_core.interventions import clamp, reinforce, suppress
from ssn_core.neurons import NeuronSet
from ssn_core.sites import find_sites
from ssn_core.testing import tiny_hf_model, tiny_model


def test_hooks_removed_after_context_and_after_exception(family_model):
    _, model = family_model
    neurons = NeuronSet({(0, "mlp"): [1, 2, 3], (1, "attn_v"): [0, 5], (1, "attn_q"): [4]})
    baseline = logits(model)
    assert active_hook_count(model) == 0
    with suppress(model, neurons):
        assert active_hook_count(model) > 0
    assert active_hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), reinforce(model, neurons, alpha=3.0):
        raise RuntimeError("boom")
    assert active_hook_count(model) == 0
    with pytest.raises(KeyboardInterrupt), clamp(model, neurons, value=1.0):
        raise KeyboardInterrupt
    assert active_hook_count(model) == 0
    assert torch.equal(logits(model), baseline)


def test_two_threads_never_see_each_others_hooks():
    model = tiny_hf_model("qwen2")
    sites = find_sites(model)
    strong = NeuronSet({(layer, kind): torch.arange(sites.get(layer, kind).size)
                        for layer in range(2) for kind in ("mlp", "attn_v")})
    baseline = logits(model)
    with suppress(model, strong):
        suppressed = logits(model)
    assert not torch.allclose(baseline, suppressed)

    barrier = threading.Barrier(2)

    def plain_worker() -> list[bool]:
        outcomes = []
        for _ in range(20):
            barrier.wait(timeout=10)
            outcomes.append(torch.equal(logits(model), baseline))
        return outcomes

    def suppressing_worker() -> list[bool]:
        outcomes = []
        with suppress(model, strong):
            for _ in range(20):
                barrier.wait(timeout=10)
                outcomes.append(torch.allclose(logits(model), suppressed))
        return outcomes

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain_future, suppressing_future = pool.submit(plain_worker), pool.submit(suppressing_worker)
        results = {"plain": plain_future.result(), "suppressed": suppressing_future.result()}
    assert results["plain"] == [True] * 20
    assert results["suppressed"] == [True] * 20
    assert active_hook_count(model) == 0


def test_bind_context_carries_hooks_into_a_worker_thread():
    model = tiny_hf_model("llama")
    neurons = NeuronSet({(0, "mlp"): list(range(128)), (1, "mlp"): list(range(128))})
    with suppress(model, neurons):
        expected = logits(model)
        out = {}
        plain = threading.Thread(target=lambda: out.__setitem__("plain", logits(model)))
        bound = threading.Thread(target=bind_context(lambda: out.__setitem__("bound", logits(model))))
        for t in (plain, bound):
            t.start()
            t.join()
    assert torch.equal(out["bound"], expected)
    assert not torch.allclose(out["plain"], expected)



# ----- hook_modules ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_thread")
def test_hook_modules_sees_input_and_output_and_is_removed():
    lm = tiny_model("qwen2")
    module = lm.model.model.layers[0].mlp.up_proj
    seen = {}

    def on_in(x):
        seen["in"] = x.shape

    def on_out(out, x):
        seen["out"] = (out.shape, x.shape)
        return out * 0

    with torch.no_grad():
        base = lm.model(token_ids()).logits
        with hook_modules({(module, "in"): on_in, (module, "out"): on_out}):
            hooked = lm.model(token_ids()).logits
        after = lm.model(token_ids()).logits
    assert seen["in"][-1] == 64 and seen["out"][0][-1] == 128 and seen["out"][1][-1] == 64
    assert not torch.equal(base, hooked)
    assert torch.equal(base, after)
    assert active_hook_count(lm.model) == 0
    with pytest.raises(ValueError), hook_modules({(module, "middle"): on_in}):
        pass


@pytest.mark.usefixtures("one_thread")
def test_hook_modules_is_invisible_to_other_threads():
    lm = tiny_model("qwen2")
    module = lm.model.model.layers[0].self_attn.o_proj
    results = {}
    with torch.no_grad():
        base = lm.model(token_ids()).logits
        with hook_modules({(module, "out"): lambda out, x: out + 1.0}):
            thread = threading.Thread(target=lambda: results.setdefault("other", lm.model(token_ids()).logits))
            thread.start()
            thread.join()
            mine = lm.model(token_ids()).logits
    assert torch.equal(results["other"], base)
    assert not torch.equal(mine, base)
