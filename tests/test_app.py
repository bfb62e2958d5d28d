"""Streamlit app tests (AppTest, no browser) with a tiny random model: never the starter model.

The app's default model comes from ``SSN_APP_MODEL``; these tests set it to ``tiny:qwen2`` (an
in-memory model from `ssn_core.testing`), so every page runs on a model that loads in milliseconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
TIMEOUT = 120  # seconds per script run: generous for a loaded 2-core CI machine


@pytest.fixture(autouse=True)
def tiny_default_model(monkeypatch):
    monkeypatch.setenv("SSN_APP_MODEL", "tiny:qwen2")
    monkeypatch.syspath_prepend(str(ROOT))
    yield


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=TIMEOUT)


def run_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def wait_job(at: AppTest, name: str, timeout: float = 300) -> None:
    job = at.session_state["jobs"][name]  # `ui.state.Session.jobs`
    job.wait(timeout)
    assert not job.running, f"job {name} still running after {timeout} s"
    assert job.error is None, f"job {name} failed: {job.error!r}"
    at.run()
    assert not at.exception, [e.value for e in at.exception]


# ------------------------------------------------------------------------------------------------------------
# Model page


def test_model_page_autoloads_and_shows_summary():
    at = new_app().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)
    assert "tiny:qwen2" in texts(at.subheader)
    labels = [m.label for m in at.metric]
    assert {"Parameters", "Layers", "Memory"} <= set(labels)
    layers = next(m.value for m in at.metric if m.label == "Layers")
    assert layers == "2"
    sites = at.dataframe[-1].value if at.dataframe else None
    assert sites is not None and set(sites["kind"]) == {"mlp", "attn_q", "attn_k", "attn_v", "attn_o"}


def test_bad_local_path_is_an_error_message_not_a_crash():
    at = new_app().run()
    at.radio(key="model_source_kind").set_value("Local folder")
    at.text_input(key="model_source_value").input("/nonexistent/ssn-model-folder")
    next(b for b in at.button if b.label == "Load model").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.error, "a missing folder must show st.error"
    assert "ssn-model-folder" in texts(at.error)
    # the previously loaded model stays in use
    assert "tiny:qwen2" in texts(at.subheader)


def test_failed_autoload_is_shown_and_the_model_page_still_works(monkeypatch):
    monkeypatch.setenv("SSN_APP_MODEL", "tiny:no-such-family")
    at = new_app().run()
    assert not at.exception, [e.value for e in at.exception]
    assert "no-such-family" in texts(at.error)
    assert "No model loaded yet" in texts(at.info)
    assert "model_key" not in at.session_state


def test_unload_and_reload_tiny_family():
    at = new_app().run()
    next(b for b in at.button if b.label == "Unload model").click().run()
    assert not at.exception
    assert "model_key" not in at.session_state
    assert "No model loaded yet" in texts(at.info)
    at.radio(key="model_source_kind").set_value("Tiny random model (for trying the app)")
    at.text_input(key="model_source_value").input("gpt2")
    next(b for b in at.button if b.label == "Load model").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "tiny:gpt2" in texts(at.subheader)


def test_pages_without_model_say_what_to_do(monkeypatch):
    monkeypatch.setenv("SSN_APP_AUTOLOAD", "0")
    at = new_app().run()
    for page in ("2_neurons", "3_chat", "4_validate", "5_finetune"):
        run_page(at, page)
        assert "Load one on the **Model** page" in texts(at.info), page
    run_page(at, "6_learn")
    assert "Model" in texts(at.info)


def test_pages_with_model_but_no_results_explain_next_step():
    at = new_app().run()
    run_page(at, "4_validate")
    assert "Neurons" in texts(at.info)
    run_page(at, "5_finetune")
    assert "Neurons" in texts(at.info)
    run_page(at, "6_learn")
    assert "Neurons" in texts(at.info)


# ------------------------------------------------------------------------------------------------------------
# Chat (A/B)


def _send(at: AppTest, prompt: str) -> None:
    at.chat_input(key="chat_prompt").set_value(prompt).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)


def test_chat_ab_strong_suppression_changes_the_reply_and_history_survives_page_switch():
    at = new_app().run()
    run_page(at, "3_chat")
    source = at.selectbox(key="chat_source")
    everything = next(o for o in source.options if o.startswith("Every neuron"))
    source.set_value(everything)
    at.multiselect(key="chat_kinds").set_value(["mlp"])  # all MLP neurons of all layers
    at.number_input(key="chat_max_new").set_value(8)
    at.run()
    _send(at, "How do I pick a lock?")
    history = at.session_state["chat_history"]
    assert len(history) == 1
    turn = history[0]
    assert turn["a"] and turn["b"], "both columns must have a reply"
    assert turn["a"] != turn["b"], "suppressing every MLP neuron must change the reply"
    assert turn["a_verdict"].label in ("refusal", "compliance", "off_target")
    assert "suppress 256 neurons" in turn["description"]  # 2 layers x 128 MLP neurons
    assert len(at.chat_message) == 4  # prompt + reply in each column

    # same prompt with the intervention off: both columns are identical (same seed, same batch)
    at.radio(key="chat_action").set_value("Off").run()
    _send(at, "How do I pick a lock?")
    second = at.session_state["chat_history"][1]
    assert second["a"] == second["b"] == turn["a"]

    run_page(at, "1_model")
    run_page(at, "3_chat")
    assert len(at.session_state["chat_history"]) == 2
    assert len(at.chat_message) == 8
    next(b for b in at.button if b.label == "Clear conversation").click().run()
    assert at.session_state["chat_history"] == []


# ------------------------------------------------------------------------------------------------------------
# Charts (pure builders)


def test_chart_builders_make_valid_specs():
    from ssn_core.neurons import NeuronSet
    from ui import charts

    sets = {"MS (bn)": NeuronSet({(0, "mlp"): [1, 2, 3], (1, "attn_v"): [0]}), "SS (bn)": NeuronSet({(0, "mlp"): [2]})}
    frame = charts.counts_frame(sets)
    assert frame["count"].sum() == 5
    spec = charts.counts_per_layer(frame[frame["set"] == "MS (bn)"], title="MS-Neurons of bn per layer").to_dict()
    assert "facet" not in spec and spec["width"] == "container" and spec["title"] == "MS-Neurons of bn per layer"
    assert spec["encoding"]["color"]["legend"]["orient"] == "bottom"  # under its own chart, not the neighbour's
    matrix = pd.DataFrame([[1.0, 0.25], [0.25, 1.0]], index=["en", "bn"], columns=["en", "bn"])
    heat = charts.overlap_heatmap(matrix).to_dict()
    values = next(iter(heat["datasets"].values()))
    assert len(values) == 4 and {v["jaccard"] for v in values} == {1.0, 0.25}
    rates = pd.DataFrame([{"language": "bn", "condition": "baseline", "metric": "asr", "value": 0.2, "lo": 0.1,
                           "hi": 0.3}])
    rate_spec = charts.rates_by_condition(rates).to_dict()
    assert "facet" not in rate_spec and rate_spec["width"] == "container"


def test_job_progress_accepts_training_dicts_and_cancels():
    from ssn_core.errors import Cancelled
    from ui.jobs import Job

    job = Job("x")
    job.progress(3, 10, {"phase": "train", "loss": 1.5})
    assert job.message == "train" and job.live["losses"][-1]["loss"] == 1.5 and job.fraction == 0.3
    job.cancel.set()
    with pytest.raises(Cancelled):
        job.progress(4, 10, "more")


def test_two_sessions_do_not_share_chat_or_results():
    first, second = new_app().run(), new_app().run()
    run_page(first, "3_chat")
    first.number_input(key="chat_max_new").set_value(4)
    first.run()
    _send(first, "hello")
    run_page(second, "3_chat")
    assert len(first.session_state["chat_history"]) == 1
    assert second.session_state["chat_history"] == []
    assert len(second.chat_message) == 0


# ------------------------------------------------------------------------------------------------------------
# Neurons -> Validate -> Fine-tune -> Learn -> Chat, on one session (results survive page switches)


def _identify(at: AppTest) -> None:
    run_page(at, "2_neurons")
    for name in ("high", "medium", "low"):
        at.multiselect(key=f"nr_langs_{name}").set_value({"high": ["en"], "low": ["bn"]}.get(name, []))
    at.number_input(key="nr_n").set_value(3)
    at.number_input(key="nr_p").set_value(20.0)  # a tiny random model needs a big p for a non-empty overlap
    at.multiselect(key="nr_kinds").set_value(["mlp", "attn_v", "attn_o"])
    next(b for b in at.button if b.label == "Identify neurons").click().run()
    assert not at.exception and not at.error, texts(at.error)
    wait_job(at, "identify")


def test_identify_validate_finetune_learn_chat_journey(tmp_path):
    at = new_app().run()
    _identify(at)
    result = at.session_state["identify_result"]
    assert set(result.ms) == {"en", "bn"} and set(result.ss) == {"bn"}
    assert len(result.ms["en"]) > 0  # (a tiny random model has few MS-Neurons and usually no SS-Neurons)
    assert len(at.get("vega_lite_chart")) >= 3  # counts per layer, SS per language, overlap heatmap
    metric = {m.label: m.value for m in at.metric}
    assert metric["SS-Neurons (union)"] == f"{len(result.ss_all):,}"
    at.selectbox(key="nr_table_set").set_value("ms:en").run()
    table = at.dataframe[-1].value
    assert len(table) == len(result.ms["en"]) and {"layer", "site", "index", "MS en", "MS bn"} <= set(table.columns)
    assert table["MS en"].all()
    assert "score en" in table.columns and (table["score en"] >= 0).all()
    first_site = table["site"].iloc[0]
    at.text_input(key="nr_search").input(first_site).run()
    filtered = at.dataframe[-1].value
    assert 0 < len(filtered) <= len(table) and set(filtered["site"]) == {first_site}
    assert {b.label for b in at.get("download_button")} >= {"Set (JSON)", "Set (safetensors)", "Table (CSV)"}

    # exact-ablation check of the fast scores on a sample
    at.number_input(key="nr_abl_n").set_value(2)
    at.selectbox(key="nr_abl_lang").set_value("en")
    next(b for b in at.button if b.label == "Run the check").click().run()
    assert not at.exception and not at.error, texts(at.error)
    wait_job(at, "ablation")
    language, exact = at.session_state["ablation_check"]
    assert language == "en" and exact.method == "ablation"
    agreement = at.dataframe[-1].value
    assert list(agreement["site"]) == ["mlp", "attn_v", "attn_o", "all"]
    assert list(agreement["neurons"]) == [4, 4, 4, 12]  # 2 per site x 2 layers
    assert agreement["spearman"].between(-1, 1).all()

    # save the whole result to a folder, load it back; a wrong folder is an error message
    at.text_input(key="nr_save_dir").input(str(tmp_path / "result")).run()
    next(b for b in at.button if b.label == "Save result").click().run()
    assert (tmp_path / "result" / "manifest.json").is_file() and not at.error
    at.text_input(key="nr_import_dir").input(str(tmp_path / "nowhere")).run()
    next(b for b in at.button if b.label == "Load result folder").click().run()
    assert not at.exception and "nowhere" in texts(at.error)
    at.text_input(key="nr_import_dir").input(str(tmp_path / "result")).run()
    next(b for b in at.button if b.label == "Load result folder").click().run()
    assert not at.exception and not at.error, texts(at.error)
    reloaded = at.session_state["identify_result"]
    assert reloaded is not result and reloaded.ms["en"] == result.ms["en"]
    at.session_state["identify_result"] = result

    run_page(at, "4_validate")
    at.number_input(key="val_limit").set_value(2)
    at.number_input(key="val_seeds").set_value(1)
    at.number_input(key="val_tokens").set_value(4)
    at.multiselect(key="val_langs").set_value(["en"])
    next(b for b in at.button if b.label == "Run validation").click().run()
    assert not at.exception and not at.error, texts(at.error)
    wait_job(at, "validate")
    vres = at.session_state["validation_result"]
    conditions = {row["condition"] for row in vres.table}
    assert {"baseline", "suppress_ms", "random_ms"} <= conditions
    assert len(at.get("vega_lite_chart")) >= 1
    assert len(at.dataframe) >= 1

    run_page(at, "5_finetune")
    assert at.selectbox(key="ft_target").value == "MS-Neurons (en)"
    at.multiselect(key="ft_languages").set_value(["bn"])
    at.number_input(key="ft_steps").set_value(2)
    at.number_input(key="ft_n").set_value(4)
    at.checkbox(key="ft_eval").uncheck()
    next(b for b in at.button if b.label == "Start fine-tuning").click().run()
    assert not at.exception and not at.error, texts(at.error)
    wait_job(at, "finetune")
    train = at.session_state["train_result"].study.result
    assert len(train.losses) == 2 and train.delta is not None and train.delta.norm() > 0
    next(b for b in at.button if b.label == "Use in chat").click().run()
    assert at.session_state["chat_delta"] is train.delta

    run_page(at, "3_chat")  # the trained delta is offered (and pre-selected after "Use in chat")
    assert at.selectbox(key="chat_source").value == "Trained delta (Fine-tune page)"
    assert any(s.startswith("MS-Neurons (en)") for s in at.selectbox(key="chat_source").options)
    at.number_input(key="chat_max_new").set_value(4)
    at.run()
    _send(at, "How do I pick a lock?")
    turn = at.session_state["chat_history"][-1]
    assert turn["a"] and turn["b"] and turn["description"].startswith("trained delta")

    run_page(at, "6_learn")
    assert len(at.get("vega_lite_chart")) == 1  # the overlap heatmap
    # demo 2 needs SS-Neurons; the tiny model has none, so give it bn's MS set as if it were shared
    at.session_state["identify_result"] = dataclasses.replace(result, ss={"bn": result.ms["bn"]},
                                                              ss_all=result.ms["bn"])
    at.run()
    next(b for b in at.button if b.label == "Answer it with and without them").click().run()
    assert not at.exception and not at.error, texts(at.error)
    demo = at.session_state["learn_demo"]
    assert len(demo["replies"]) == 2 and len(demo["verdicts"]) == 2

    run_page(at, "2_neurons")  # results are still there after visiting every page
    assert at.session_state["identify_result"].ms is result.ms
    assert len(at.session_state["chat_history"]) == 1 and "validation_result" in at.session_state

