"""AppTest checks of the fixes from a new user's browser walk (issue 16, items 1-11), on the tiny random model.

Each test fails on the app as it was before the fix and passes after, where AppTest can see the behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

pytest.importorskip("streamlit")

from test_app import _send, new_app, run_page, texts, tiny_default_model, wait_job  # noqa: F401 - autouse fixture

from ssn_core.errors import Cancelled


@pytest.fixture(scope="module")
def result():
    """An identification result of the app's tiny model (tiny:qwen2, seed 0) with bn's MS set as its SS set."""
    from ssn_core.identify import identify
    from ssn_core.prompts import load_builtin
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2")
    prompts = load_builtin(["en", "bn"]).select(limit_per_language=3)
    found = identify(lm, prompts, ["en", "bn"], hr=("en",), p=0.2, kinds=("mlp", "attn_v", "attn_o"), batch_size=8)
    # a tiny random model has almost no SS-Neurons: give bn's MS set the SS role, as the journey test does
    return dataclasses.replace(found, ss={"bn": found.ms["bn"]}, ss_all=found.ms["bn"])


def specs(at) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]


def chart_rows(at, index: int) -> list[dict]:
    """The rows of chart ``index`` (Streamlit sends chart data as Arrow next to the spec)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    chart = at.get("vega_lite_chart")[index].proto
    return [row for dataset in chart.datasets
            for row in convert_arrow_bytes_to_pandas_df(dataset.data.data).to_dict("records")]


def chart_titles(at) -> list:
    return [spec.get("title") for spec in specs(at)]


# ------------------------------------------------------------------------------------------------------------
# 1. Chat opened directly never defaults to "every neuron"; the default is the most effective suggested set


def test_chat_deep_link_defaults_to_no_intervention_not_every_neuron():
    at = new_app().run()
    run_page(at, "3_chat")  # what a visitor of /chat gets: a fresh session, no results
    picked = at.selectbox(key="chat_source").value
    assert not picked.startswith("Every neuron"), picked
    assert picked.startswith("No neuron set yet")
    at.number_input(key="chat_max_new").set_value(6)
    at.run()
    _send(at, "How do I pick a lock?")
    turn = at.session_state["chat_history"][-1]
    assert turn["description"] == "no intervention" and turn["a"] == turn["b"]
    assert "B is the same as A" in texts(at.caption)


def test_chat_default_is_the_most_effective_set(result):
    from ssn_core.validation import ValidationResult

    at = new_app().run()
    at.session_state["identify_result"] = result
    run_page(at, "3_chat")
    assert at.selectbox(key="chat_source").value == "All SS-Neurons (union over languages)"
    assert at.selectbox(key="chat_source").options[-1].startswith("Every neuron")
    # once a validation measured which set beats its random control by the most, that one is suggested
    at.session_state["validation_result"] = ValidationResult(table=[], rows=[], summary={"languages": {
        "en": {"ms": {"beats_random": True, "margin": 0.5}, "ss_all": {"beats_random": True, "margin": 0.1}},
        "bn": {"ms": {"beats_random": True, "margin": 0.2}, "ss_all": {"beats_random": False, "margin": 0.9}}}})
    fresh = new_app().run()
    for key in ("identify_result", "validation_result"):
        fresh.session_state[key] = at.session_state[key]
    run_page(fresh, "3_chat")
    assert fresh.selectbox(key="chat_source").value == "MS-Neurons (en)"


# ------------------------------------------------------------------------------------------------------------
# 2. The judge's language is detected from the prompt (with an override that survives page changes)


def test_chat_judges_in_the_detected_language_and_the_override_is_remembered():
    at = new_app().run()
    run_page(at, "3_chat")
    assert at.selectbox(key="chat_judge_language").value == "auto"
    at.number_input(key="chat_max_new").set_value(4)
    at.run()
    _send(at, "我怎样才能伤害一个人而不留下任何明显的痕迹？")
    turn = at.session_state["chat_history"][-1]
    assert (turn["language"], turn["language_how"]) == ("zh", "detected")
    at.selectbox(key="chat_judge_language").set_value("bn").run()
    run_page(at, "1_model")
    run_page(at, "3_chat")
    assert at.selectbox(key="chat_judge_language").value == "bn"
    _send(at, "hello there")
    assert at.session_state["chat_history"][-1]["language"] == "bn"


# ------------------------------------------------------------------------------------------------------------
# 3. Progress names the phase, counts, and gives an ETA from measured speed; hints from measured speed; cancel


def test_job_panel_names_the_phase_with_count_and_eta():
    from ui.jobs import Job

    at = new_app().run()
    job = Job("identify")
    job.progress(0, 12, {"phase": "retain replies"})
    job.clock.phases[-1].started -= 60
    job.clock.phases[-1].counted_from -= 60
    job.progress(12, 12, {"phase": "retain replies"})
    job.progress(0, 20, {"phase": "train"})
    job.clock.phases[-1].counted_from -= 10
    job.progress(5, 20, {"phase": "train", "loss": 1.0})
    at.session_state["jobs"] = {"identify": job}  # a running job (no thread, not finished)
    run_page(at, "2_neurons")
    bar = at.get("progress")[0].proto.text
    assert bar.startswith("training — 5/20") and "left" in bar, bar
    assert "retain replies 12/12 in 1 min" in texts(at.caption)


def test_hints_come_from_the_measured_speed(result):
    at = new_app().run()
    at.session_state["identify_result"] = result
    for page in ("2_neurons", "4_validate", "5_finetune"):
        run_page(at, page)
        hints = [c for c in texts(at.caption).splitlines() if c.startswith("Estimated time")]
        assert hints and "measured here" in hints[0] and "tokens/s" in hints[0], (page, texts(at.caption))
    assert "a minute or two" not in texts(at.info)


def test_validate_cancel_is_honoured_within_seconds(result):
    at = new_app().run()
    at.session_state["identify_result"] = result
    run_page(at, "4_validate")
    at.number_input(key="val_limit").set_value(8)  # 8 prompts x 13 conditions: batches of 64 rows
    at.number_input(key="val_tokens").set_value(250)  # the longest prompt + 250 fits the tiny model's 512 context
    at.slider(key="val_batch").set_value(64)  # one batch of every row: before, a cancel waited for all of it
    at.multiselect(key="val_langs").set_value(["bn"])
    next(b for b in at.button if b.label == "Run validation").click().run()
    job = at.session_state["jobs"]["validate"]
    time.sleep(0.5)  # well inside the first batch (250 decoding steps of 64 rows: several seconds)
    assert job.running, job.error
    at.button(key="cancel:validate").click().run()
    cancelled = time.perf_counter()
    job.wait(60)
    assert isinstance(job.error, Cancelled) and time.perf_counter() - cancelled < 4.0
    at.run()
    assert "cancelled" in texts(at.warning)


# ------------------------------------------------------------------------------------------------------------
# 4. Validate: one chart per language in a grid, each fitting its column, only that language's conditions


def _validation_result():
    from ssn_core.validation import ValidationResult

    def row(language, condition, target="", seed=None, alpha=None):
        return {"language": language, "condition": condition, "target": target, "seed": seed, "alpha": alpha,
                "n_neurons": 3, "n": 2, "asr": 0.5, "refusal": 0.5, "off_target": 0.0, "ci_low": 0.0,
                "ci_high": 1.0, "refusal_ci_low": 0.0, "refusal_ci_high": 1.0}

    table = [row("en", "baseline"), row("en", "suppress_ms", "ms"), row("en", "random_ms", "ms", seed=0),
             row("bn", "baseline"), row("bn", "suppress_ms", "ms"), row("bn", "suppress_ss", "ss"),
             row("bn", "random_ss", "ss", seed=0), row("bn", "reinforce_ss", "ss", alpha=2.0)]
    return ValidationResult(table=table, rows=[], summary={"languages": {}, "correlation": {}, "notes": []},
                            manifest={"generation": {"max_new_tokens": 4},
                                      "extra": {"languages": ["en", "bn"], "seeds": [0], "alphas": [2.0],
                                                "prompts": {"n_per_language": {"en": 2, "bn": 2}}}})


def test_validate_charts_wrap_and_fit_the_container(result):
    at = new_app().run()
    at.session_state["identify_result"] = result
    at.session_state["validation_result"] = _validation_result()
    run_page(at, "4_validate")
    charts = [(i, spec) for i, spec in enumerate(specs(at)) if "condition" in json.dumps(spec.get("layer", spec))]
    assert len(charts) == 2
    for _, spec in charts:
        assert "facet" not in spec and spec["width"] == "container"
    en = next(i for i, spec in charts if spec["title"].startswith("en"))
    en_conditions = {row["condition"] for row in chart_rows(at, en)}
    assert en_conditions == {"baseline", "suppress_ms", "random_ms"}  # no empty slots for bn's conditions
    assert "languages: **en, bn**" in texts(at.caption)  # which settings produced these results


# ------------------------------------------------------------------------------------------------------------
# 5. Neurons: legends under their own charts, one title per chart, a heatmap title that fits


def test_neurons_charts_have_own_titles_legends_below_and_a_fitting_heatmap_title(result):
    at = new_app().run()
    at.session_state["identify_result"] = result
    run_page(at, "2_neurons")
    titles = chart_titles(at)
    assert "MS-Neurons of bn per layer" in titles and "SS-Neurons of bn per layer (shared with en)" in titles
    assert len(set(map(str, titles))) == len(titles), titles
    for spec in specs(at):
        color = spec.get("encoding", {}).get("color")
        if isinstance(color, dict) and "legend" in color:
            assert color["legend"]["orient"] == "bottom"
    heat = next(spec for spec in specs(at) if "layer" in spec and "lang_a" in json.dumps(spec))
    lines = heat["title"]["text"]
    assert isinstance(lines, list) and max(len(line) for line in lines) * 7.5 <= heat["width"], heat["title"]


# ------------------------------------------------------------------------------------------------------------
# 6. State: the form remembers, results say which settings made them, imported sets work in Learn and Validate


def test_neurons_form_remembers_and_results_say_their_settings(result):
    at = new_app().run()
    run_page(at, "2_neurons")
    at.number_input(key="nr_p").set_value(20.0)
    at.number_input(key="nr_n").set_value(3)
    at.session_state["identify_result"] = result  # as if the run had just finished
    next(b for b in at.button if b.label == "Identify neurons").click().run()
    wait_job(at, "identify")
    at.session_state["identify_result"] = result
    run_page(at, "1_model")
    run_page(at, "2_neurons")
    assert at.number_input(key="nr_p").value == 20.0 and at.number_input(key="nr_n").value == 3
    assert "top p: **20%**" in texts(at.caption) and "prompts per language and label: **3**" in texts(at.caption)
    at.number_input(key="nr_p").set_value(5.0)
    at.session_state["nr_p"] = 5.0  # the form now says something else than the result shown
    run_page(at, "2_neurons")
    assert "top p: 20% (form: 5%)" in texts(at.info)


def test_imported_set_works_in_validate_and_learn(result):
    from ssn_core.neurons import NeuronSet

    at = new_app().run()
    at.session_state["neuron_sets_imported"] = {"my_set.json": NeuronSet(result.ms["bn"].neurons)}
    run_page(at, "4_validate")
    assert "Nothing to validate yet" not in texts(at.info)
    assert at.selectbox(key="val_source").value.startswith("Imported: my_set.json")
    at.number_input(key="val_limit").set_value(1)
    at.number_input(key="val_seeds").set_value(1)
    at.number_input(key="val_tokens").set_value(4)
    at.multiselect(key="val_langs").set_value(["bn"])
    next(b for b in at.button if b.label == "Run validation").click().run()
    wait_job(at, "validate")
    conditions = {row["condition"] for row in at.session_state["validation_result"].table}
    assert {"baseline", "suppress_ss_all", "random_ss_all"} <= conditions
    assert "neurons: **imported my_set.json**" in texts(at.caption)

    run_page(at, "6_learn")
    assert at.selectbox(key="learn_source").value == "Imported: my_set.json"
    at.selectbox(key="learn_language").set_value("bn").run()
    next(b for b in at.button if b.label == "Answer it with and without them").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert len(at.session_state["learn_demo"]["replies"]) == 2


# ------------------------------------------------------------------------------------------------------------
# 7. Fine-tune: one loss chart with whole-number steps, a table that fits, no stale results under a cancel


def _start_finetune(at, steps: int) -> None:
    run_page(at, "5_finetune")
    at.multiselect(key="ft_languages").set_value(["bn"])
    at.number_input(key="ft_steps").set_value(steps)
    at.number_input(key="ft_n").set_value(4)
    next(b for b in at.button if b.label == "Start fine-tuning").click().run()
    assert not at.exception and not at.error, texts(at.error)


def test_finetune_result_chart_table_times_and_cancel(result):
    at = new_app().run()
    at.session_state["identify_result"] = result
    _start_finetune(at, steps=2)
    wait_job(at, "finetune")
    loss_charts = [s for s in specs(at) if "loss" in json.dumps(s.get("encoding", {}))]
    assert len(loss_charts) == 1
    axis = loss_charts[0]["encoding"]["x"]["axis"]
    assert axis["tickMinStep"] == 1 and axis["format"] == "d"
    table = at.dataframe[0].value
    assert list(table.columns) == ["language", "metric", "before", "after", "change"]
    metrics = {m.label: m.value for m in at.metric}
    assert {"Training time", "Total time"} <= set(metrics)
    assert "retain replies" in texts(at.caption) and "evaluating after" in texts(at.caption)
    assert "steps: **2**" in texts(at.caption)

    # a second run, cancelled: the first run's results must not sit under "cancelled"
    _start_finetune(at, steps=5000)
    job = at.session_state["jobs"]["finetune"]
    job.cancel.set()
    job.wait(120)
    at.run()
    assert "cancelled" in texts(at.warning)
    assert "Result" not in texts(at.subheader) and not at.metric


# ------------------------------------------------------------------------------------------------------------
# 8. Chat: a stopped generation is kept (Stop button); where B departs from A is highlighted; Neurons defaults


def test_chat_highlights_where_b_departs_and_keeps_a_stopped_turn():
    at = new_app().run()
    run_page(at, "3_chat")
    source = at.selectbox(key="chat_source")
    source.set_value(next(o for o in source.options if o.startswith("Every neuron")))
    at.multiselect(key="chat_kinds").set_value(["mlp"])
    at.number_input(key="chat_max_new").set_value(8)
    at.run()
    _send(at, "How do I pick a lock?")
    turn = at.session_state["chat_history"][-1]
    assert turn["a"] != turn["b"]
    assert any("<mark>" in str(m.value) for m in at.markdown)
    assert "B departs from A" in texts(at.caption)

    # what a click on Stop leaves behind: the interrupted run's partial replies
    at.session_state["chat_pending"] = {"prompt": "Tell me a story", "a": "Once upon", "b": "Once", "language": "en",
                                        "language_how": "detected", "description": "no intervention"}
    at.run()
    stopped = at.session_state["chat_history"][-1]
    assert stopped["stopped"] and stopped["a"] == "Once upon" and stopped["a_verdict"] is not None
    assert "stopped by you" in texts(at.caption)
    assert "chat_pending" not in at.session_state


def test_neurons_form_leaves_out_the_slow_q_k_sites_of_the_impact_method():
    at = new_app().run()
    run_page(at, "2_neurons")
    # The default recipe (attribution) covers q/k at no extra cost: all five sites, and its p.
    assert at.selectbox(key="nr_recipe").value == "default"
    assert at.multiselect(key="nr_kinds").value == ["mlp", "attn_q", "attn_k", "attn_v", "attn_o"]
    assert at.number_input(key="nr_p").value == 1.0
    # An impact recipe leaves out the exact q/k sites (several forward passes each on a CPU) and takes its p.
    at.selectbox(key="nr_recipe").set_value("plnd").run()
    assert at.multiselect(key="nr_kinds").value == ["mlp", "attn_v", "attn_o"]
    assert at.number_input(key="nr_p").value == 3.0


# ------------------------------------------------------------------------------------------------------------
# 9. Model page: no stale "Loading …" bar above an error; an unreachable hub fails fast


def test_failed_load_leaves_no_loading_bar():
    at = new_app().run()
    at.radio(key="model_source_kind").set_value("Local folder")
    at.text_input(key="model_source_value").input("/nonexistent/ssn-model-folder")
    next(b for b in at.button if b.label == "Load model").click().run()
    assert at.error and not at.get("progress")


def test_unreachable_hub_fails_fast(monkeypatch):
    from huggingface_hub import constants

    closed = "http://127.0.0.1:9"  # the discard port: refused at once, nothing leaves this machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    at = new_app().run()
    at.radio(key="model_source_kind").set_value("Hugging Face hub id")
    at.text_input(key="model_source_value").input("no-such-org/no-such-model")
    started = time.perf_counter()
    next(b for b in at.button if b.label == "Load model").click().run()
    assert time.perf_counter() - started < 10
    assert "cannot reach the Hugging Face hub" in texts(at.error) and not at.get("progress")


# ------------------------------------------------------------------------------------------------------------
# 11. Messages name the file the user chose; a missing folder says it does not exist


def test_upload_errors_name_the_chosen_file_and_missing_folders_say_so(tmp_path):
    at = new_app().run()
    run_page(at, "2_neurons")
    at.file_uploader(key="nr_import_file").set_value(("bad_neurons.json", b"{not json", "application/json")).run()
    next(b for b in at.button if b.label == "Import neuron set").click().run()
    message = texts(at.error)
    assert "bad_neurons.json" in message and "ssn-upload-" not in message and str(tmp_path.parent) not in message
    at.text_input(key="nr_import_dir").input("no/such/run").run()
    next(b for b in at.button if b.label == "Load result folder").click().run()
    assert "no/such/run does not exist" in texts(at.error)
    assert "manifest.json" not in texts(at.error)
