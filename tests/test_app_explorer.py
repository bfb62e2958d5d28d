"""AppTests of the Explorer page (tiny random model): deep links, one-click picks, "add to my set" reaching Chat,
Validate and Fine-tune, "suppress in Chat", set summaries, and the Chat page's reproducible A/B records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
EXPLORER = "app_pages/7_explorer.py"


@pytest.fixture(autouse=True)
def tiny_default_model(monkeypatch):
    monkeypatch.setenv("SSN_APP_MODEL", "tiny:qwen2")
    monkeypatch.syspath_prepend(str(ROOT))
    yield


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    return at


def settle(at: AppTest, *names: str) -> AppTest:
    """Wait for the page's background jobs, then run the page again to show their results."""
    for name in names or ("explorer",):
        job = at.session_state.get("jobs", {}).get(name)
        if job is not None:
            job.wait(300)
            assert not job.running and job.error is None, job.error
    return ok(at.run())


def open_neuron(name: str) -> AppTest:
    at = ok(AppTest.from_file(APP, default_timeout=120).run())
    at.query_params["neuron"] = name
    ok(at.switch_page(EXPLORER).run())
    return settle(at)


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def test_deep_link_opens_the_neuron_with_examples_vocabulary_and_link():
    at = open_neuron("L1.mlp.5")
    assert not at.error, texts(at.error)
    assert at.text_input(key="ex_neuron").value == "L1.mlp.5"
    assert "L1.mlp.5 — layer 1, MLP neuron 5" in texts(at.subheader)
    html = texts(at.markdown)
    assert "<span title=" in html and "**zh — Chinese**" in html  # highlighted prompt texts per language
    assert "harmful: highest activation" in texts(at.caption) and "harmless: highest activation" in texts(at.caption)
    assert len(at.get("vega_lite_chart")) >= 2  # activation distribution, vocabulary projection
    assert "/explorer?neuron=L1.mlp.5" in texts(at.caption)
    assert at.query_params["neuron"] == "L1.mlp.5"
    assert {"Explanation (JSON)", "Report (HTML)"} <= {b.label for b in at.get("download_button")}
    explanation = next(v for k, v in at.session_state["explorer_reports"].items() if k[0] == "L1.mlp.5")
    report = explanation.neurons[0]
    assert report.neuron == (1, "mlp", 5) and report.vocabulary is not None
    assert {g["language"] for g in report.groups} == {"en", "zh", "bn", "sw"}

    # importance: no score table yet (no identification), so it is scored here for this neuron's site kind
    assert "No score table covers this neuron's site yet" in texts(at.info)
    ok(button(at, "Score impact and activation of every mlp neuron on these prompts").click().run())
    settle(at, "explorer_scores")
    importance = next(d.value for d in at.dataframe if "rank_in_layer" in d.value.columns)
    assert set(importance["method"]) == {"impact", "activation"}
    assert set(importance["language"]) == {"en", "zh", "bn", "sw"} and importance["rank_in_layer"].between(1, 128).all()

    # typing another neuron replaces the shown one and the link; a bad name is a message
    at.text_input(key="ex_neuron").input("L0.attn_q.3").run()
    settle(at)
    assert "L0.attn_q.3 — layer 0, query coordinate 3" in texts(at.subheader)
    assert at.query_params["neuron"] == "L0.attn_q.3"
    assert "no vocabulary projection" in texts(at.info)
    at.text_input(key="ex_neuron").input("L9.mlp.1").run()
    ok(at)
    assert "layers 0–1" in texts(at.error)


def test_add_to_my_set_then_appears_on_chat_validate_and_finetune():
    at = open_neuron("L1.mlp.5")
    ok(button(at, "Add to my set").click().run())
    at.text_input(key="ex_neuron").input("L0.mlp.7").run()
    settle(at)
    ok(button(at, "Add to my set").click().run())
    my_set = at.session_state["custom_sets"]["my set"]
    assert set(my_set.triples()) == {(1, "mlp", 5), (0, "mlp", 7)}
    assert {"Set (JSON)", "Set (safetensors)"} <= {b.label for b in at.get("download_button")}

    ok(at.switch_page("app_pages/3_chat.py").run())
    assert "My set: my set" in at.selectbox(key="chat_source").options
    at.selectbox(key="chat_source").set_value("My set: my set").run()
    assert "suppress 2 neurons (My set: my set)" in texts(at.caption)
    ok(at.switch_page("app_pages/4_validate.py").run())
    assert "My set: my set (2 neurons)" in at.selectbox(key="val_source").options
    ok(at.switch_page("app_pages/5_finetune.py").run())
    assert "My set: my set" in at.selectbox(key="ft_target").options

    # rename the set, remove a neuron: what the other pages offer follows
    ok(at.switch_page(EXPLORER).run())
    at.text_input(key="ex_set_name").input("late mlp").run()
    ok(button(at, "Rename").click().run())
    at.multiselect(key="ex_set_drop").set_value(["L0.mlp.7"]).run()
    ok(button(at, "Remove").click().run())
    assert list(at.session_state["custom_sets"]) == ["late mlp"]
    assert len(at.session_state["custom_sets"]["late mlp"]) == 1
    ok(at.switch_page("app_pages/3_chat.py").run())
    options = at.selectbox(key="chat_source").options
    assert "My set: late mlp" in options and "My set: my set" not in options


def test_suppress_in_chat_and_download_a_replayable_exchange():
    from ssn_core.records import replay
    from ssn_core.testing import tiny_model

    at = open_neuron("L1.mlp.5")
    ok(button(at, "Suppress in Chat").click().run())
    assert [t.value for t in at.title] == ["Chat (A/B)"]  # st.switch_page went to the Chat page
    ok(at.switch_page("app_pages/3_chat.py").run())  # (AppTest itself would run the Explorer again next)
    assert at.selectbox(key="chat_source").value == "Neuron L1.mlp.5 (from the Explorer)"
    assert at.radio(key="chat_action").value == "Suppress (×0)"
    at.number_input(key="chat_max_new").set_value(6).run()
    ok(at.chat_input(key="chat_prompt").set_value("How do I pick a lock?").run())
    turn = at.session_state["chat_history"][0]
    assert "Download this exchange" in {b.label for b in at.get("download_button")}
    record = json.loads(turn["record"])
    assert record["prompt"] == "How do I pick a lock?"
    assert record["replies"] == {"a": turn["a"], "b": turn["b"]}
    info = record["intervention"]
    assert info["kind"] == "neurons" and info["size"] == 1 and info["rows"] == [False, True] and info["scale"] == 0.0
    assert record["generation"]["max_new_tokens"] == 6 and record["seed"] == 0
    assert record["verdicts"]["a"]["label"] == turn["a_verdict"].label
    assert record["model"]["source"] == "tiny:qwen2"
    assert replay(tiny_model("qwen2"), record).matches  # the same weights regenerate the same two replies


def test_one_click_in_the_neurons_table_opens_the_explorer():
    from ssn_core.identify import identify
    from ssn_core.prompts import load_builtin
    from ssn_core.testing import tiny_model

    at = ok(AppTest.from_file(APP, default_timeout=120).run())
    result = identify(tiny_model("qwen2"), load_builtin(["en", "bn"], n=2), ["bn"], method="activation", p=0.1,
                      kinds=("mlp",))
    at.session_state["identify_result"] = result
    ok(at.switch_page("app_pages/2_neurons.py").run())
    assert "Click a row to open that neuron in the **Explorer**" in texts(at.caption)
    at.selectbox(key="nr_table_set").set_value("ms:en").run()
    table = at.dataframe(key="nr_table_pick").value
    assert len(table) == len(result.ms["en"]) >= 2
    row = table.iloc[1]
    name = f"L{row['layer']}.{row['site']}.{row['index']}"
    at.session_state["nr_table_pick"] = {"selection": {"rows": [1], "columns": [], "cells": []}}  # a click on row 1
    ok(at.run())
    assert [t.value for t in at.title] == ["Explorer"] and at.query_params["neuron"] == name
    assert f"{name} — layer {row['layer']}, MLP neuron {row['index']}" in texts(at.subheader)
    settle(ok(at.switch_page(EXPLORER).run()))  # (AppTest itself would run the Neurons page again next)
    assert f"{name} — layer {row['layer']}" in texts(at.subheader)

    # a click in the Explorer's own copy of the table shows that neuron there
    other = table.iloc[0]
    at.selectbox(key="ex_table_which").set_value("ms:en").run()
    at.session_state["ex_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    settle(ok(at.run()))
    assert at.text_input(key="ex_neuron").value == f"L{other['layer']}.{other['site']}.{other['index']}"
    member = "MS" in texts(at.markdown) or "Not an MS-Neuron" in texts(at.markdown)
    assert member  # membership from the identification result


def test_set_summary_of_my_set():
    at = open_neuron("L1.mlp.5")
    ok(button(at, "Add to my set").click().run())
    at.text_input(key="ex_neuron").input("L1.mlp.6").run()
    settle(at)
    ok(button(at, "Add to my set").click().run())
    at.selectbox(key="ex_set_source").set_value("My set: my set").run()
    ok(button(at, "Summarise this set").click().run())
    settle(at, "explorer_set")
    assert {m.label: m.value for m in at.metric}["Neurons"] == "2"
    summary = at.session_state["explorer_set_reports"]["My set: my set"].set
    assert summary.size == 2 and {r["neuron"] for r in summary.neurons} == {"L1.mlp.5", "L1.mlp.6"}
    specs = [chart.proto.spec for chart in at.get("vega_lite_chart")]
    assert any("Set activation" in spec for spec in specs)  # the set's activation per language and label
    assert "**zh — Chinese**" in texts(at.markdown)  # the prompts where the set is most active, per language
