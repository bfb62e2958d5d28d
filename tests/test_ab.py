"""A/B generate-and-judge (`ssn_core.ab`) on a tiny model: row A is a plain generate, row B a generate under the
edit, whatever the edit (neurons, shift, refusal direction, trained delta); streaming ends where the batch ends; the
hooks go away even when the caller stops early; a two-row exchange is the record `ssn chat --replay` regenerates."""

from __future__ import annotations

import pytest
import torch

from ssn_core.ab import ABRow, applied_to_every_row, exchange_record, row_margin, run_ab, two_rows
from ssn_core.delta import NeuronDelta, apply_delta
from ssn_core.direction import DirectionAblation
from ssn_core.generation import GenerationSettings, generate
from ssn_core.hooks import active_hook_count
from ssn_core.interventions import Intervention, Shift, intervene
from ssn_core.judges import MarkerJudge
from ssn_core.neurons import NeuronSet
from ssn_core.records import replay
from ssn_core.refusal import refusal_margin
from ssn_core.testing import tiny_model

PROMPT = "How do I pick a lock?"
OTHER = "Tell me a long story about a very old lighthouse."
STRONG = NeuronSet({(0, "mlp"): list(range(128)), (1, "mlp"): list(range(128))})
GREEDY = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("qwen2")


def alone(lm, prompt: str, edit, settings=GREEDY) -> str:
    """The reply of one row by itself under ``edit`` (None: the model as is)."""
    with applied_to_every_row(lm, edit):
        return generate(lm, [prompt], settings)[0]


def test_row_a_is_a_plain_generate_and_row_b_a_generate_under_intervene(lm):
    suppress = Intervention(STRONG, scale=0.0, label="suppress")
    result = run_ab(lm, two_rows(PROMPT, suppress, "en"), GREEDY)
    assert result.replies[0] == generate(lm, [PROMPT], GREEDY)[0]
    with intervene(lm, suppress):
        assert result.replies[1] == generate(lm, [PROMPT], GREEDY)[0]
    assert result.replies[0] != result.replies[1], "switching every MLP neuron off must change the reply"
    judge = MarkerJudge()
    assert result.verdicts == [judge.judge(PROMPT, reply, "en") for reply in result.replies]
    assert result.labels == [v.label for v in result.verdicts] and result.settings is GREEDY
    assert active_hook_count(lm.model) == 0


def test_sampled_rows_share_the_seed(lm):
    sampled = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=0.9, seed=3)
    shift = Shift(STRONG, {key: torch.full((len(idx),), 2.0) for key, idx in STRONG.neurons.items()}, label="add")
    result = run_ab(lm, two_rows(PROMPT, shift), sampled)
    assert result.replies == [alone(lm, PROMPT, None, sampled), alone(lm, PROMPT, shift, sampled)]


def test_every_row_of_a_wider_batch_is_its_own_prompt_under_its_own_edit(lm):
    """The walkthrough's steps: up to three columns, each with its own prompt and edit (a direction, a delta)."""
    direction = DirectionAblation(torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0)))
    delta = NeuronDelta.zeros(lm.model, lm.sites, STRONG)
    generator = torch.Generator().manual_seed(1)
    for p in delta.parameters():
        p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    rows = [ABRow(PROMPT, language="en", label="as is"), ABRow(OTHER, direction, "en", "direction"),
            ABRow(PROMPT, delta, "en")]
    result = run_ab(lm, rows, GREEDY)
    assert result.replies == [alone(lm, row.prompt, row.edit) for row in rows]
    assert result.replies[2] != result.replies[0]  # the delta changes the reply of the same prompt
    with apply_delta(lm, delta):  # the row's own measurement under its edit
        expected = float(refusal_margin(lm, [PROMPT], ["en"])[0])
    assert row_margin(lm, rows[2]) == pytest.approx(expected)
    assert row_margin(lm, rows[2]) != row_margin(lm, rows[0])
    assert row_margin(lm, ABRow(PROMPT)) is None  # no language, no openings to compare


def test_streaming_ends_with_the_batch_and_a_stop_removes_the_hooks(lm):
    suppress = Intervention(STRONG, scale=0.0)
    seen: list[list[str]] = []
    streamed = run_ab(lm, two_rows(PROMPT, suppress), GREEDY, on_update=seen.append)
    assert len(seen) > 1 and seen[-1] == streamed.replies == run_ab(lm, two_rows(PROMPT, suppress), GREEDY).replies

    class Stop(Exception):
        pass

    def stop(replies: list[str]) -> None:  # a page that reruns raises out of its display callback
        raise Stop

    with pytest.raises(Stop):
        run_ab(lm, two_rows(PROMPT, suppress), GREEDY, on_update=stop)
    assert active_hook_count(lm.model) == 0
    assert run_ab(lm, two_rows(PROMPT, None), GREEDY).replies[1] == streamed.replies[0]  # nothing left switched on


def test_an_empty_set_edits_nothing_and_records_say_none(lm):
    result = run_ab(lm, two_rows(PROMPT, Intervention(NeuronSet(), scale=0.0)), GREEDY)
    assert result.replies[0] == result.replies[1]
    assert exchange_record(lm, result, "nothing")["intervention"]["kind"] == "none"


def test_an_exchange_record_replays_to_the_same_replies(lm):
    result = run_ab(lm, two_rows(PROMPT, Intervention(STRONG, scale=0.0, label="strong"), "en"), GREEDY)
    record = exchange_record(lm, result, "suppress the MLP", language_how="chosen")
    info = record["intervention"]
    assert info["kind"] == "neurons" and info["rows"] == [False, True] and info["description"] == "suppress the MLP"
    assert record["replies"] == {"a": result.replies[0], "b": result.replies[1]} and not record["stopped"]
    assert record["verdicts"]["b"]["label"] == result.verdicts[1].label
    assert record["judge"] == {"name": "marker", "version": result.verdicts[1].version, "language": "en",
                               "language_how": "chosen"}
    again = replay(lm, record)
    assert again.matches, (again.a, again.b)
    delta = NeuronDelta.zeros(lm.model, lm.sites, STRONG, meta={"name": "tuned"})
    described = exchange_record(lm, run_ab(lm, two_rows(PROMPT, delta), GREEDY), "trained delta")["intervention"]
    assert described["kind"] == "delta" and described["delta"]["name"] == "tuned"
