"""`ssn explain` on a saved tiny model: the result folder, its JSON and reports, set summaries, errors."""

from __future__ import annotations

import json

from ssn_core.cli import main
from ssn_core.identify import identify
from ssn_core.loading import load_model
from ssn_core.prompts import load_builtin


def test_explain_writes_json_markdown_and_html(tiny_dir, tmp_path, capsys):
    model = tiny_dir("qwen2", seed=1)
    out = tmp_path / "explain"
    args = ["explain", "--model", str(model), "--device", "cpu", "--neuron", "L1.mlp.3", "--neuron", "L0.attn_q.2",
            "--langs", "en,zh", "--n", "2", "--k", "2", "--top-tokens", "5", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "L1.mlp.3: fires most on" in printed and "wrote" in printed
    assert {p.name for p in out.iterdir()} == {"explanation.json", "report.md", "report.html", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ssn-lab/neuron-explanation" and manifest["neurons"] == ["L1.mlp.3", "L0.attn_q.2"]
    data = json.loads((out / "explanation.json").read_text())
    mlp, q = data["neurons"]
    assert mlp["neuron"] == "L1.mlp.3" and set(mlp["examples"]) == {"en/harmful", "en/harmless", "zh/harmful",
                                                                      "zh/harmless"}
    top = mlp["examples"]["zh/harmful"]["top"]
    assert len(top) == 2 and len(top[0]["tokens"]) == len(top[0]["activations"])
    assert {r["method"] for r in mlp["importance"]} == {"impact", "activation"}
    assert len(mlp["vocabulary"]["promoted"]) == 5 and "han" in mlp["vocabulary"]["by_script"]
    assert q["vocabulary"] is None and "no vocabulary projection" in q["vocabulary_note"]
    assert "## L1.mlp.3" in (out / "report.md").read_text()
    assert "<span title=" in (out / "report.html").read_text()
    assert main(args) == 0  # an earlier explanation may be replaced


def test_explain_a_set_from_an_identify_result(tiny_dir, tmp_path, capsys):
    model = tiny_dir("qwen2", seed=1)
    lm = load_model(str(model), device_map="cpu")
    result = identify(lm, load_builtin(["en", "zh"], n=4), ["zh"], method="activation", p=0.3, kinds=("mlp",))
    folder = result.save(tmp_path / "identify")
    base = ["explain", "--model", str(model), "--device", "cpu", "--langs", "en,zh", "--n", "2", "--k", "1",
            "--methods", ""]
    if len(result.ss_all) == 0:  # a random tiny model shares almost nothing: the folder's SS union is empty
        assert main(base + ["--set", str(folder), "--out", str(tmp_path / "none")]) == 2
        assert "has no SS-Neurons" in capsys.readouterr().err
    chosen = (result.ms["en"] | result.ms["zh"]).save(tmp_path / "ms_union.json")
    out = tmp_path / "set"
    assert main(base + ["--set", str(chosen), "--neurons", str(folder), "--out", str(out)]) == 0
    data = json.loads((out / "explanation.json").read_text())
    assert data["neurons"] == [] and data["set"]["size"] == len(result.ms["en"] | result.ms["zh"])
    assert data["set"]["name"] == "ms_union.json"
    assert sum(row["neurons"] for row in data["set"]["sharing"]) == data["set"]["size"]
    assert {row["method"] for row in data["set"]["importance"]} == {"activation"}  # the result's own table
    assert "Set: ms_union.json" in (out / "report.md").read_text()


def test_explain_errors_exit_2_without_traceback(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("qwen2"))
    base = ["explain", "--model", model, "--device", "cpu", "--n", "1", "--out", str(tmp_path / "x")]
    assert main(base + ["--neuron", "neuron five"]) == 2
    assert "L<layer>.<site>.<index>" in capsys.readouterr().err
    assert main(base) == 2
    assert "give --neuron" in capsys.readouterr().err
    assert main(base + ["--neuron", "L9.mlp.1"]) == 2
    assert "layers 0–1" in capsys.readouterr().err
    assert main(base + ["--neuron", "L0.mlp.1", "--k", "0"]) == 2
    assert main(base + ["--neuron", "L0.mlp.1", "--methods", "global"]) == 2
    assert "--scores" in capsys.readouterr().err
    assert main(base + ["--neuron", "L0.mlp.1", "--set", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    assert main(base[:-1] + [str(tmp_path / "occupied"), "--neuron", "L0.mlp.1"]) == 2
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"
