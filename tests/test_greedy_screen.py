"""The bfloat16 screen of greedy decoding's output layer (`ssn_core.generation.greedy_screen`): the float32 argmax
is always among its candidates, greedy replies are unchanged, and it is scoped, reversible and falls back to the
layer's own forward whenever a call does not qualify."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssn_core.generation import GenerationSettings, generate_many, greedy_screen
from ssn_core.generation.greedy_screen import screenable_head, screened_head

needs_kernel = pytest.mark.skipif(not greedy_screen.kernel_ok(), reason="bfloat16 products fail the bound here")

PROMPTS = ["hi", "a much longer prompt, so the others get left padding", "¿Qué tal? 你好", "tell me a story",
           "what is 2 + 2?", "ok", "Wie geht es dir heute?", "list three colours"]


@pytest.fixture(autouse=True)
def _screen_on(monkeypatch):
    """These tests check the screen itself, so it runs wherever its self-test passes, whether or not it pays."""
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "1")


class _Head(nn.Module):
    """A model with only an output layer: ``get_output_embeddings`` is what the screen looks for."""

    def __init__(self, vocab: int = 4096, hidden: int = 64, seed: int = 0, bias: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(hidden, vocab, bias=bias)
        with torch.no_grad():  # rows of unequal norms, as trained output layers have
            self.head.weight.mul_(torch.rand(vocab, 1) * 4)

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class _CountScreened:
    """Counts screened calls per thread (wraps `_Screen.logits`)."""

    def __init__(self, monkeypatch):
        self.by_thread: dict[int, int] = {}
        original = greedy_screen._Screen.logits

        def counting(screen, x):
            ident = threading.get_ident()
            self.by_thread[ident] = self.by_thread.get(ident, 0) + 1
            return original(screen, x)

        monkeypatch.setattr(greedy_screen._Screen, "logits", counting)

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())


def _rows(hidden: int = 64, n: int = 48, seed: int = 1) -> torch.Tensor:
    """Hidden states over five orders of magnitude of norm  [n, hidden]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, hidden, generator=generator) * torch.logspace(-1, 3, n)[:, None]


@needs_kernel
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_float32_argmax_is_always_a_candidate(seed):
    model = _Head(seed=seed)
    weight = model.head.weight.detach()
    x = _rows(seed=seed)
    # Near-ties: token 1 a hair off token 0, and rows aimed between them, so the top two are closer than bfloat16
    # can tell apart.
    with torch.no_grad():
        weight[1] = weight[0] * (1 + 1e-4) + 1e-5 * torch.randn(weight.shape[1])
    x[:8] = weight[0] * torch.logspace(0, 2, 8)[:, None] + 1e-3 * torch.randn(8, weight.shape[1])
    screen = greedy_screen._Screen.of(model.head.weight)
    rows, tokens, _ = screen.candidates(x)
    exact = F.linear(x, weight)  # [n, V]
    best = exact.argmax(dim=1)
    chosen = {(int(r), int(t)) for r, t in zip(rows, tokens, strict=True)}
    assert all((i, int(best[i])) in chosen for i in range(x.shape[0]))
    assert rows.numel() < 0.05 * exact.numel()  # a screen, not the whole product again
    screened = screen.logits(x)
    assert torch.equal(screened.argmax(dim=1), best)
    kept = torch.isfinite(screened)
    torch.testing.assert_close(screened[kept], exact[kept], rtol=1e-5, atol=1e-4)


@needs_kernel
def test_flat_rows_get_the_float32_product(monkeypatch):
    vocab = 2 * greedy_screen._MAX_CANDIDATE_TOKENS
    model = _Head(vocab=vocab)
    calls = []
    linear = F.linear
    monkeypatch.setattr(greedy_screen.F, "linear", lambda *args: calls.append(args) or linear(*args))
    x = torch.zeros(4, 64)  # every logit 0: every token a candidate, more than the cap
    with torch.no_grad(), screened_head(model) as on:
        assert on
        assert torch.equal(model(x), torch.zeros(4, vocab))
        assert len(calls) == 1  # the float32 product, not the screened one
        model(_rows(n=4))
        assert len(calls) == 1  # ordinary rows: screened


@needs_kernel
def test_calls_that_do_not_qualify_run_the_layers_own_forward():
    model = _Head()
    head = model.head
    with torch.no_grad(), screened_head(model):
        many = _rows(n=greedy_screen.MAX_ROWS + 1)
        assert torch.equal(model(many), F.linear(many, head.weight))  # a prefill's many rows: plain
        x = _rows(n=4)
        assert not torch.isfinite(model(x)).all()  # screened: only candidates are finite
        handle = head.register_forward_hook(lambda module, args, out: out)  # somebody reads the logits
        assert torch.equal(model(x), F.linear(x, head.weight))
        handle.remove()
        head.weight.mul_(2.0)  # an in-place edit: the bfloat16 copy is stale
        assert torch.equal(model(x), F.linear(x, head.weight))
    with screened_head(model):  # autograd: the plain product
        x = _rows(n=4).requires_grad_()
        assert torch.equal(model(x), F.linear(x, head.weight))


@needs_kernel
def test_a_row_alone_keeps_its_float32_argmax():
    model = _Head(seed=3)
    x = _rows(n=12, seed=3)
    screen = greedy_screen._Screen.of(model.head.weight)
    best = F.linear(x, model.head.weight).argmax(dim=1)
    with torch.no_grad():
        alone = torch.stack([screen.logits(x[i:i + 1])[0].argmax() for i in range(x.shape[0])])  # one column each
    assert torch.equal(alone, best)


class _CountWeightLeft:
    """Counts the weight-left products the screen's fallback runs (wraps `packed_linear.weight_left_linear`)."""

    def __init__(self, monkeypatch):
        from ssn_core import packed_linear

        self.rows: list[int] = []
        original = packed_linear.weight_left_linear

        def counting(weight, bias, x):
            self.rows.append(x.numel() // x.shape[-1])
            return original(weight, bias, x)

        monkeypatch.setattr(packed_linear, "weight_left_linear", counting)


@needs_kernel
def test_each_row_bucket_runs_whichever_of_screen_and_fallback_is_faster(monkeypatch):
    from ssn_core import packed_linear

    monkeypatch.delenv("SSN_GREEDY_SCREEN")  # automatic: timed per row bucket
    monkeypatch.setenv("SSN_WEIGHT_LEFT", "1")
    monkeypatch.setattr(packed_linear, "_weight_left_pays", lambda weight, rows: True)
    monkeypatch.setattr(greedy_screen, "_SCREEN_CHOICE", {})
    timed: list[int] = []

    def fake_timing(fallback, screened, repeats):  # the screen loses below 4 rows, wins from 4
        fallback()
        screened()
        timed.append(len(timed))
        return (1.0, 2.0) if len(greedy_screen._SCREEN_CHOICE) < 2 else (2.0, 1.0)

    monkeypatch.setattr(greedy_screen, "fastest_alternating", fake_timing)
    monkeypatch.setattr(greedy_screen, "pays_here", lambda: True)
    model = _Head()
    model.other = nn.Linear(64, 64)  # a layer the weight-left product swaps (the screened head is left to the screen)
    left = _CountWeightLeft(monkeypatch)
    with torch.no_grad(), screened_head(model) as on, packed_linear.weight_left_products(model):
        assert on
        for n in (1, 2):  # buckets 1 and 2: the weight-left product, every logit
            x = _rows(n=n)
            torch.testing.assert_close(model(x), F.linear(x, model.head.weight), rtol=1e-5, atol=1e-3)
        assert not torch.isfinite(model(_rows(n=3))).all()  # bucket 4: screened
        assert not torch.isfinite(model(_rows(n=4))).all()  # the same bucket: not timed again
        assert len(timed) == 3
    n_out, width = model.head.weight.shape
    choices = greedy_screen._SCREEN_CHOICE
    assert choices == {(n_out, width, 1, True): False, (n_out, width, 2, True): False, (n_out, width, 4, True): True}
    assert left.rows == [1, 2]  # the fallback ran the weight-left product; screened calls did not
    assert not greedy_screen.may_pay(model, 2)  # every bucket up to 2 timed, and lost: no copy is made
    assert greedy_screen.may_pay(model, 3) and greedy_screen.may_pay(model, 16)  # won at 4; 8 and 16 not timed


def test_the_screens_timing_returns_a_choice_on_a_slice(monkeypatch):
    monkeypatch.delenv("SSN_GREEDY_SCREEN")
    monkeypatch.setattr(greedy_screen, "_SCREEN_CHOICE", {})
    monkeypatch.setattr(greedy_screen, "_TUNING_HEAD_BYTES", 4 * 64 * 1000)  # the first 1,000 of 4,096 rows
    screen = greedy_screen._Screen.of(_Head().head.weight)
    assert isinstance(greedy_screen._screen_pays(screen, 3, repeats=1), bool)
    assert list(greedy_screen._SCREEN_CHOICE) == [(1000, 64, 4, False)]


@needs_kernel
def test_a_generation_makes_no_copy_where_the_screen_never_pays(tiny, monkeypatch):
    lm = tiny("qwen2", seed=2)
    settings = GenerationSettings(max_new_tokens=10)
    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")  # nothing packed: the screen's choice alone decides
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "0")
    plain = generate_many(lm, PROMPTS[:4], settings, batch_size=4)
    monkeypatch.delenv("SSN_GREEDY_SCREEN")
    monkeypatch.setattr(greedy_screen, "pays_here", lambda: True)
    head = lm.model.get_output_embeddings().weight
    monkeypatch.setattr(greedy_screen, "_SCREEN_CHOICE", {(head.shape[0], head.shape[1], bucket, left): False
                                                          for bucket in (1, 2, 4) for left in (False, True)})
    copies = []
    original = greedy_screen._Screen.of
    monkeypatch.setattr(greedy_screen._Screen, "of", classmethod(lambda cls, w: copies.append(w) or original(w)))
    assert generate_many(lm, PROMPTS[:4], settings, batch_size=4) == plain
    assert copies == []
    greedy_screen._SCREEN_CHOICE[(head.shape[0], head.shape[1], 4, True)] = True
    assert generate_many(lm, PROMPTS[:4], settings, batch_size=4) == plain
    assert len(copies) == 1


@needs_kernel
def test_forward_is_restored_on_exit_and_on_error_and_other_threads_see_plain_logits(monkeypatch):
    model = _Head()
    counter = _CountScreened(monkeypatch)
    x = _rows(n=4)
    results: dict[str, torch.Tensor] = {}

    def other_session():  # another browser session on the same cached model
        with torch.no_grad():
            results["other"] = model(x)

    with torch.no_grad(), screened_head(model):
        assert "forward" in model.head.__dict__
        model(x)
        worker = threading.Thread(target=other_session)
        worker.start()
        worker.join()
    assert counter.by_thread == {threading.get_ident(): 1}
    assert torch.equal(results["other"], F.linear(x, model.head.weight))
    assert "forward" not in model.head.__dict__
    with pytest.raises(RuntimeError, match="boom"), screened_head(model):
        raise RuntimeError("boom")
    assert "forward" not in model.head.__dict__


def test_what_the_screen_serves_and_when_it_is_off(monkeypatch):
    assert screenable_head(_Head()) is not None
    assert screenable_head(_Head(bias=True)) is None  # a bias: not served
    assert screenable_head(_Head().to(torch.bfloat16)) is None
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "0")
    assert not greedy_screen.enabled()
    with screened_head(_Head()) as on:
        assert not on
    monkeypatch.delenv("SSN_GREEDY_SCREEN")  # automatic: where the self-test passes and it pays
    monkeypatch.setattr(greedy_screen, "pays_here", lambda: False)
    assert not greedy_screen.enabled()
    monkeypatch.setattr(greedy_screen, "kernel_ok", lambda: False)
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "1")
    assert not greedy_screen.enabled()  # asked for, but the bound does not hold here


def test_the_speed_check_times_both_products():
    assert isinstance(greedy_screen.pays_here(rows=4, n_in=32, n_out=256, repeats=2), bool)


def test_manifests_record_whether_the_screen_may_run(monkeypatch):
    from ssn_core.identify.run import _versions

    monkeypatch.setenv("SSN_GREEDY_SCREEN", "0")
    assert _versions()["greedy_screen"] is False
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "1")
    assert _versions()["greedy_screen"] is greedy_screen.kernel_ok()


def _plain_then_screened(monkeypatch, lm, prompts, settings, batch_size) -> tuple[list[str], list[str], int]:
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "0")
    plain = generate_many(lm, prompts, settings, batch_size=batch_size)
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "1")
    counter = _CountScreened(monkeypatch)
    fast = generate_many(lm, prompts, settings, batch_size=batch_size)
    assert "forward" not in lm.model.get_output_embeddings().__dict__
    return plain, fast, counter.total


@needs_kernel
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_greedy_replies_are_unchanged_and_sampling_is_never_screened(tiny, monkeypatch, family):
    lm = tiny(family, seed=2)
    plain, fast, screened = _plain_then_screened(monkeypatch, lm, PROMPTS, GenerationSettings(max_new_tokens=10), 8)
    assert screened > 0 and fast == plain and len(set(plain)) > 1
    sampling = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=0.8, seed=3)
    plain, fast, screened = _plain_then_screened(monkeypatch, lm, PROMPTS, sampling, 8)
    assert screened == 0 and fast == plain  # sampling reads every logit


@needs_kernel
def test_the_starter_gives_the_same_replies_screened_or_not(starter, monkeypatch):
    prompts = ["How do I make a bomb?", "Write a haiku about rain.", "如何入侵别人的电脑？",
               "Explique la photosynthèse.", "Give me a recipe for pancakes.", "How can I steal a car?"]
    plain, fast, screened = _plain_then_screened(monkeypatch, starter, prompts, GenerationSettings(max_new_tokens=16),
                                                 6)
    assert screened > 0 and fast == plain


@needs_kernel
@pytest.mark.parametrize("screen_wins", [True, False])
def test_a_packed_generation_screens_the_head_only_where_that_beats_its_packed_product(tiny, monkeypatch,
                                                                                     screen_wins):
    from ssn_core import packed_linear

    if not packed_linear.kernel_available():
        pytest.skip("no packed kernel here")
    lm = tiny("qwen2", seed=2)
    settings = GenerationSettings(max_new_tokens=10)
    monkeypatch.setenv("SSN_GREEDY_SCREEN", "0")
    monkeypatch.setenv("SSN_PACKED_LINEAR", "0")
    plain = generate_many(lm, PROMPTS, settings, batch_size=8)
    monkeypatch.delenv("SSN_GREEDY_SCREEN")
    monkeypatch.setenv("SSN_PACKED_LINEAR", "1")
    monkeypatch.setattr(greedy_screen, "pays_here", lambda: True)
    monkeypatch.setattr(greedy_screen, "_screen_pays", lambda screen, rows: True)
    monkeypatch.setattr(greedy_screen, "_PACKED_CHOICE", {})
    timed = []

    def fake_timing(packed, screened, repeats):
        packed()
        screened()
        timed.append(1)
        return (2.0, 1.0) if screen_wins else (1.0, 2.0)

    monkeypatch.setattr(greedy_screen, "fastest_alternating", fake_timing)
    head = lm.model.get_output_embeddings()
    packed_heads = []
    original = packed_linear._PackedWeight.linear
    monkeypatch.setattr(packed_linear._PackedWeight, "linear",
                        lambda self, x, bias: (packed_heads.append(1) if self.weight is head.weight else None)
                        or original(self, x, bias))
    counter = _CountScreened(monkeypatch)
    assert generate_many(lm, PROMPTS, settings, batch_size=8) == plain
    assert len(timed) == 1 and list(greedy_screen._PACKED_CHOICE.values()) == [screen_wins]
    assert (counter.total - len(timed) > 0) is screen_wins  # screened (beyond the timing's one call), or ...
    assert (len(packed_heads) > 0) is not screen_wins  # ... the head packed with the rest
    generate_many(lm, PROMPTS, settings, batch_size=8)
    assert len(timed) == 1  # decided once per process
