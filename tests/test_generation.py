"""Batched generation: left padding, streaming, seeded sampling, and interventions in the streaming worker."""

from __future__ import annotations

import itertools
import threading

import pytest
import torch

from ssn_core.errors import Cancelled, SSNError
from ssn_core.generation import GenerationSettings, generate, generate_many, stream_generate
from ssn_core.hooks import active_hook_count
from ssn_core.interventions import Intervention, intervene, suppress
from ssn_core.neurons import NeuronSet

PROMPTS = ["hi", "a much longer prompt, so the others get left padding", "¿Qué tal? 你好"]
SEED = 2  # a tiny model whose replies depend on the prompt (some random inits answer everything alike)


def _all_mlp(lm) -> NeuronSet:
    size = lm.sites.sizes()["mlp"]
    return NeuronSet({(layer, "mlp"): list(range(size)) for layer in range(lm.sites.n_layers)})


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_batched_left_padded_generation_equals_one_by_one(tiny, family):
    lm = tiny(family, seed=SEED)
    settings = GenerationSettings(max_new_tokens=8)
    lengths = [len(lm.tokenize_prompts([p])["input_ids"][0]) for p in lm.prompt_texts(PROMPTS)]
    assert len(set(lengths)) == len(PROMPTS)  # rows really are padded differently
    batched = generate(lm, PROMPTS, settings)
    single = [generate(lm, [p], settings)[0] for p in PROMPTS]
    assert batched == single
    assert len(set(batched)) > 1, "the tiny model should answer different prompts differently"


def test_left_padding_puts_pad_tokens_first(tiny):
    lm = tiny()
    batch = lm.tokenize_prompts(lm.prompt_texts(["x", "longer text"]))
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["input_ids"][0, 0] == lm.tokenizer.pad_token_id


def test_reply_excludes_prompt_and_stops_at_max_new_tokens(tiny):
    lm = tiny()
    settings = GenerationSettings(max_new_tokens=6)
    (reply,) = generate(lm, ["hello"], settings)
    assert "<|im_start|>" not in reply and "hello" not in reply
    assert 0 < len(reply) <= 6  # one byte token decodes to at most one character
    assert generate(lm, [], settings) == []


def test_stream_final_text_equals_generate_and_grows(tiny):
    lm = tiny(seed=SEED)
    settings = GenerationSettings(max_new_tokens=8)
    expected = generate(lm, PROMPTS, settings)
    steps = list(stream_generate(lm, PROMPTS, settings))
    assert steps[-1] == expected
    assert len(steps) > 2
    for before, after in itertools.pairwise(steps):
        assert all(len(b) <= len(a) for b, a in zip(before, after, strict=True))


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    lm = tiny(seed=SEED)
    settings = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, seed=7)
    first = generate(lm, PROMPTS, settings)
    assert generate(lm, PROMPTS, settings) == first
    assert generate(lm, [PROMPTS[1]], settings) == [first[1]]  # same row, other batch: same sample
    assert generate(lm, PROMPTS, GenerationSettings(max_new_tokens=8)) != first  # not greedy
    other_seed = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, seed=8)
    assert generate(lm, PROMPTS, other_seed) != first


def test_intervention_row_mask_follows_batch_order(tiny):
    lm = tiny(seed=SEED)
    neurons = _all_mlp(lm)
    settings = GenerationSettings(max_new_tokens=6)
    (baseline,) = generate(lm, ["hello"], settings)
    with suppress(lm, neurons):
        (suppressed,) = generate(lm, ["hello"], settings)
    assert suppressed != baseline
    with suppress(lm, neurons, rows=[False, True]):
        assert generate(lm, ["hello", "hello"], settings) == [baseline, suppressed]
    assert active_hook_count(lm.model) == 0


def test_stream_worker_thread_sees_the_callers_intervention_only(tiny):
    lm = tiny(seed=SEED)
    neurons = _all_mlp(lm)
    settings = GenerationSettings(max_new_tokens=6)
    (baseline,) = generate(lm, ["hello"], settings)
    with suppress(lm, neurons):
        (suppressed,) = generate(lm, ["hello"], settings)
        *_, (streamed,) = stream_generate(lm, ["hello"], settings)
    assert streamed == suppressed != baseline
    # A thread that did not enter the context is untouched while the caller's intervention is active.
    other: list[str] = []
    with suppress(lm, neurons):
        thread = threading.Thread(target=lambda: other.extend(generate(lm, ["hello"], settings)))
        thread.start()
        thread.join()
    assert other == [baseline]


def test_closing_a_stream_early_stops_the_worker(tiny):
    lm = tiny()
    before = threading.active_count()
    stream = stream_generate(lm, ["hello", "world"], GenerationSettings(max_new_tokens=480))
    first = next(stream)
    assert len(first) == 2
    stream.close()
    assert threading.active_count() == before
    assert active_hook_count(lm.model) == 0


def test_errors_in_the_worker_reach_the_caller(tiny, monkeypatch):
    lm = tiny()

    def broken_generate(*args, **kwargs):
        raise RuntimeError("boom in worker")

    monkeypatch.setattr(lm.model, "forward", broken_generate)
    with pytest.raises(RuntimeError, match="boom in worker"):
        list(stream_generate(lm, ["hello"], GenerationSettings(max_new_tokens=4)))


def test_bad_settings_are_refused(tiny):
    lm = tiny()
    with pytest.raises(SSNError, match="max_new_tokens"):
        generate(lm, ["x"], GenerationSettings(max_new_tokens=0))
    with pytest.raises(SSNError, match="temperature"):
        generate(lm, ["x"], GenerationSettings(do_sample=True, temperature=0.0))


def test_chat_flag_selects_the_prompt_format(tiny):
    lm = tiny()
    for chat, prompt in ((False, "abc"), (True, lm.format_chat("abc"))):
        ids = lm.tokenize_prompts([prompt], chat_formatted=chat)["input_ids"]  # [1, T]
        with torch.no_grad():
            next_token = int(lm.model(ids).logits[0, -1].argmax())
        expected = lm.tokenizer.decode([next_token], skip_special_tokens=True)
        assert generate(lm, ["abc"], GenerationSettings(max_new_tokens=1, chat=chat)) == [expected]
    plain = lm.tokenize_prompts(["abc"], chat_formatted=False)
    assert plain["input_ids"].tolist() == [lm.tokenizer("abc")["input_ids"]]


# ----- our decoding loop vs transformers' generate; the pool of generate_many -------------------------------------


def _transformers_generate(lm, texts, max_new_tokens):
    """The reference: transformers' own greedy `generate` on the same left-padded batch (what `generate` used)."""
    from transformers import GenerationConfig

    prompts = lm.prompt_texts(texts)
    inputs = lm.tokenize_prompts(prompts)
    stop_ids = lm.stop_token_ids
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, min_new_tokens=0, eos_token_id=stop_ids,
                              pad_token_id=lm.tokenizer.pad_token_id)
    with torch.no_grad():
        sequences = lm.model.generate(**inputs, generation_config=config)
    out = []
    for row in sequences[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        out.append(lm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3",
                                    "gpt2", "gpt_neox"])
def test_greedy_replies_equal_transformers_generate(tiny, family):
    lm = tiny(family, seed=SEED)
    texts = [*PROMPTS, "x y z"]
    expected = _transformers_generate(lm, texts, 10)
    assert generate(lm, texts, GenerationSettings(max_new_tokens=10)) == expected
    assert generate_many(lm, texts, GenerationSettings(max_new_tokens=10), batch_size=2) == expected


MANY = ["hi", "a much longer prompt, so the others get left padding", "¿Qué tal? 你好", "x y z", "tell me something",
        "one more prompt of medium length", "q"]


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma3_text"])  # plain cache; learned positions; sliding layers
@pytest.mark.parametrize("system", [None, "You are a careful assistant."])  # with a long shared prefix
def test_generate_many_rows_equal_each_row_alone(tiny, family, system):
    """Rows leave (at different lengths, by `stop`) and join a running batch; some rows carry an intervention; the
    system prompt's tokens are run once per intervention group. Every reply equals that row generated alone."""
    lm = tiny(family, seed=SEED)
    neurons = _all_mlp(lm)
    rows = [i % 3 == 1 for i in range(len(MANY))]
    limits = [3 + (i * 5) % 9 for i in range(len(MANY))]  # the byte tokenizer: one token per byte
    settings = GenerationSettings(max_new_tokens=14, system=system)
    seen = []

    def stop(row, reply):
        seen.append(row)
        return len(reply.encode()) >= limits[row]

    got = generate_many(lm, MANY, settings, batch_size=3, interventions=[Intervention(neurons, rows=rows)], stop=stop)
    expected = []
    for text, masked, limit in zip(MANY, rows, limits, strict=True):
        with intervene(lm, *([Intervention(neurons)] if masked else [])):
            full = generate(lm, [text], settings)[0].encode()
        expected.append(full[:limit].decode(errors="replace"))
    assert got == expected
    assert set(seen) == set(range(len(MANY)))
    assert active_hook_count(lm.model) == 0


def test_length_groups_cut_where_padding_would_grow():
    from ssn_core.generation import pool

    lengths = [10, 116, 100, 54, 52, 46, 43, 39, 39, 34, 33, 25, 23, 22, 21]
    groups = pool._length_groups(list(range(1, len(lengths))), lengths)
    assert [[lengths[r] for r in g] for g in groups] == [[116, 100, 54], [52, 46, 43, 39, 39, 34, 33],
                                                         [25, 23, 22, 21]]
    assert pool._length_groups([3, 4], [0, 0, 0, 50, 50]) == [[3, 4]]  # same lengths: one forward
    assert pool._length_groups([], []) == [[]]


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma3_text"])  # plain cache; learned positions; sliding layers
def test_rows_prefilled_in_length_groups_equal_each_row_alone(tiny, family, monkeypatch):
    """Prompts of very different lengths joining at once are prefilled in several forwards (less left padding) and
    merged into one batch; with an intervention on some rows and a shared system prompt every reply still equals
    that row generated alone."""
    from ssn_core.generation import decoder, pool

    monkeypatch.setattr(pool, "_PREFILL_GROUP_TOKENS", 8)  # tiny prompts: groups of a few byte tokens
    prefills = []
    real_prefill = decoder._Decoder.prefill

    def counting_prefill(self, rows, prompts, prefix=None):
        prefills.append(len(rows))
        return real_prefill(self, rows, prompts, prefix)

    monkeypatch.setattr(decoder._Decoder, "prefill", counting_prefill)
    lm = tiny(family, seed=SEED)
    neurons = _all_mlp(lm)
    texts = ["a much longer prompt, so the others get left padding, and then some more words", "hi", "q",
             "one more prompt of medium length", "x y z", "tell me something longer than that"]
    rows = [i % 2 == 0 for i in range(len(texts))]
    settings = GenerationSettings(max_new_tokens=6, system="You are a careful assistant.")
    got = generate_many(lm, texts, settings, batch_size=len(texts), interventions=[Intervention(neurons, rows=rows)])
    pool_prefills = list(prefills)
    expected = []
    for text, masked in zip(texts, rows, strict=True):
        with intervene(lm, *([Intervention(neurons)] if masked else [])):
            expected.append(generate(lm, [text], settings)[0])
    assert got == expected
    plain = family != "gemma3_text"  # sliding-window layers: caches are not merged, so one prefill
    assert (len(pool_prefills) > 1) == plain and sum(pool_prefills) == len(texts)
    assert active_hook_count(lm.model) == 0


def test_generate_many_checks_masks_progress_and_cancel(tiny):
    lm = tiny(seed=SEED)
    neurons = _all_mlp(lm)
    settings = GenerationSettings(max_new_tokens=4)
    with pytest.raises(SSNError, match="row mask has 2 rows but there are 3 prompts"):
        generate_many(lm, MANY[:3], settings, interventions=[Intervention(neurons, rows=[True, False])])
    calls = []
    generate_many(lm, MANY, settings, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i + 1, len(MANY)) for i in range(len(MANY))]
    event = threading.Event()

    def cancel_after_two(done, total):
        if done == 2:
            event.set()

    with pytest.raises(Cancelled):
        generate_many(lm, MANY, settings, batch_size=2, progress=cancel_after_two, cancel=event,
                      interventions=[Intervention(neurons, rows=[True] * len(MANY))])
    assert active_hook_count(lm.model) == 0
    assert generate_many(lm, [], settings) == []
