"""The command line: `info` on a saved tiny model, `chat` with a neuron file, errors without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ssn_core.cli import main
from ssn_core.generation import GenerationSettings, generate
from ssn_core.interventions import suppress
from ssn_core.loading import load_model
from ssn_core.neurons import NeuronSet

REPO = Path(__file__).resolve().parents[1]


def test_info_prints_summary_and_site_table(tiny_dir, capsys):
    path = tiny_dir("qwen2")
    assert main(["info", "--model", str(path), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model type" in out and "qwen2 (llama-like)" in out and "parameters" in out
    table = {line.split()[0]: line.split()[1:4] for line in out.splitlines()
             if line.split() and line.split()[0] in ("mlp", "attn_q", "attn_k", "attn_v", "attn_o")}
    # kind -> [layers, neurons per layer, total] for the tiny qwen2 (2 layers, MLP 128, 4x16 q, 2x16 kv)
    assert table == {"mlp": ["2", "128", "256"], "attn_q": ["2", "64", "128"], "attn_k": ["2", "32", "64"],
                     "attn_v": ["2", "32", "64"], "attn_o": ["2", "64", "128"]}


def test_chat_with_suppressed_neurons_matches_the_engine(tiny_dir, tmp_path, capsys):
    path = tiny_dir("qwen2", seed=2)
    lm = load_model(str(path), device_map="cpu")
    neurons = NeuronSet({(0, "mlp"): list(range(128)), (1, "mlp"): list(range(64))})
    neuron_file = neurons.save(tmp_path / "ss.json")
    settings = GenerationSettings(max_new_tokens=6)
    with suppress(lm, neurons):
        (expected,) = generate(lm, ["hello"], settings)
    (baseline,) = generate(lm, ["hello"], settings)
    assert expected != baseline

    assert main(["chat", "--model", str(path), "--device", "cpu", "--suppress", str(neuron_file),
                 "--max-new-tokens", "6", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "suppressing 192 neurons" in captured.err


def test_bad_neuron_file_is_an_error_not_a_crash(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["chat", "--model", str(tiny_dir()), "--device", "cpu", "--suppress", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "not a valid JSON neuron file" in err
    assert "Traceback" not in err


def test_bad_model_path_exits_2_with_message_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "ssn_core", "info", "--model", str(tmp_path / "missing")],
                            check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no such file or directory")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_evaluate_batch_size_default_is_per_use(tiny_dir, tmp_path, monkeypatch):
    """Without --batch-size, replies are generated GENERATION_BATCH_SIZE rows at a time and MGSM / perplexity run
    UTILITY_BATCH_SIZE sequences at a time; --batch-size sets both."""
    import ssn_core.evaluation as evaluation
    from ssn_core.cli.evaluate import UTILITY_BATCH_SIZE
    from ssn_core.generation import GENERATION_BATCH_SIZE

    seen: list[tuple[str, int]] = []
    real_evaluate, real_utility = evaluation.evaluate, evaluation.evaluate_utility

    def spy_evaluate(*args, **kwargs):
        seen.append(("replies", kwargs["batch_size"]))
        return real_evaluate(*args, **kwargs)

    def spy_utility(*args, **kwargs):
        seen.append(("utility", kwargs["batch_size"]))
        return real_utility(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy_evaluate)
    monkeypatch.setattr(evaluation, "evaluate_utility", spy_utility)
    model = ["--model", str(tiny_dir("qwen2")), "--device", "cpu"]
    common = ["--langs", "en", "--n", "1", "--max-new-tokens", "2", "--ppl", "1"]
    assert main(["evaluate", *model, *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["evaluate", *model, *common, "--batch-size", "3", "--out", str(tmp_path / "b")]) == 0
    assert seen == [("replies", GENERATION_BATCH_SIZE), ("utility", UTILITY_BATCH_SIZE), ("replies", 3),
                    ("utility", 3)]
    assert GENERATION_BATCH_SIZE != UTILITY_BATCH_SIZE
