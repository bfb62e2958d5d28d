"""The benchmark suite in --smoke mode on a tiny random model: every benchmark runs and writes a valid row.

No timing assertions: the figures of a tiny model on a shared CPU mean nothing. What must not rot is the
code path: each benchmark runs, prints its ratio on its last line and appends a complete JSON row.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench.run import BENCHMARKS, main

REQUIRED = ("benchmark", "timestamp", "command", "mode", "model", "dtype", "batch", "seq_len", "ratios", "goals",
            "met", "summary", "machine", "versions")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench-results")
    code = main(["--smoke", "--results-dir", str(results)])
    return code, results


def test_smoke_run_exits_cleanly(smoke_run):
    code, _ = smoke_run
    assert code == 0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_writes_a_complete_row(smoke_run, name):
    _, results = smoke_run
    path = results / f"{name}.json"
    assert path.is_file(), f"{name} wrote no result file (skipped or failed?)"
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    missing = [key for key in REQUIRED if key not in row]
    assert not missing, f"{name} row lacks {missing}"
    assert row["benchmark"] == name and row["mode"] == "smoke"
    assert row["machine"]["cores"] >= 1 and row["machine"]["ram_gib"] > 0
    assert row["versions"]["torch"] and row["versions"]["transformers"]
    assert row["ratios"], f"{name} reported no ratio"
    for key, value in row["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{name}: ratio {key}={value}"
    for key in row["goals"]:
        assert key in row["ratios"] and row["met"][key] in (True, False)
    assert row["summary"].startswith(f"{name}:")


def test_rows_append_and_unknown_names_are_rejected(tmp_path, capsys):
    assert main(["--smoke", "--only", "scoring-vs-peer", "--results-dir", str(tmp_path)]) == 0
    assert main(["--smoke", "--only", "scoring-vs-peer", "--results-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "scoring-vs-peer.json").read_text())
    assert len(rows) == 2 and rows[0]["timestamp"] <= rows[1]["timestamp"]
    last_line = capsys.readouterr().out.strip().splitlines()[-2]  # the line before "[bench] done"
    assert last_line.startswith("scoring-vs-peer:") and "x" in last_line
    assert main(["--only", "no-such-benchmark"]) == 2


def test_gpu_profile_skips_clearly_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--gpu", "--only", "hook-overhead", "--results-dir", str(tmp_path)]) == 0
    assert "skipped: --gpu needs CUDA" in capsys.readouterr().out
    assert not (tmp_path / "hook-overhead.json").exists()


def test_gpu_profile_code_path_in_smoke_mode(tmp_path, capsys):
    """`--gpu --smoke`: the GPU profile's loop (bfloat16 and 4-bit variants, in-process training methods, the final
    table) on the tiny model on the CPU, so the profile that has not met a GPU yet at least runs end to end."""
    assert main(["--gpu", "--smoke", "--only", "scoring-vs-forward,train-step,cold-start",
                 "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not part of the GPU profile, left out: cold-start" in out
    table = out[out.index("[gpu] ratios and absolute times"):].splitlines()
    assert table[1].startswith("| variant |") and table[3].startswith("| bf16 |") and table[4].startswith("| 4bit |")
    assert "full" in table[3] and "full" not in table[4]  # no full fine-tuning of a 4-bit model
    rows = json.loads((tmp_path / "train-step.json").read_text())
    assert [r["details"]["variant"] for r in rows] == ["bf16", "4bit"] and all(r["gpu_profile"] for r in rows)


def test_time_inside_hooks_counts_each_dispatch_and_restores_the_dispatcher():
    import torch

    from bench.hook_overhead import bare_hook_cost, time_inside_hooks
    from ssn_core import hooks
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2", seed=0)
    sites = [lm.sites.get(0, "mlp"), lm.sites.get(1, "attn_q")]
    original = hooks._ModuleDispatcher._apply
    ids = torch.tensor([[1, 2, 3]])

    def two_forwards():
        with hooks.hook_sites([(site, lambda carrier: None) for site in sites]), torch.no_grad():
            lm.model(ids)
            lm.model(ids)

    spent, calls = time_inside_hooks(two_forwards, hooks)
    assert calls == 4 and spent > 0  # two sites, two forwards
    assert hooks._ModuleDispatcher._apply is original
    assert time_inside_hooks(lambda: lm.model(ids), hooks)[1] == 0  # no hooks, no dispatch
    assert 0 <= bare_hook_cost(calls=200) < 1e-3
