"""Data-parallel runs (`ssn_core.distributed`) with two CPU processes on tiny models, against a one-process run.

Every entry point is run by two processes under torchrun (gloo) and compared with the same code in this process:
scores to float tolerance, replies and verdicts exactly (greedy decoding, identical batches), the training delta to
float tolerance. The CLI is launched with ``accelerate launch`` (identify, train): process 0 writes one result
folder whose manifest records the two processes. Bad input: more processes than prompts, differing command lines
or models, a process that fails, hangs or dies (the other stops within the timeout instead of waiting forever).
``accelerate launch --cpu`` starts one process on one machine (accelerate's multi-CPU launcher is mpirun), so the
two-process CPU launch here is ``accelerate launch --multi_gpu --num_processes 2``, which falls back to gloo
without CUDA (README, "Running bigger").
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", **extra}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(_free_port()), str(WORKER), *args]
    return subprocess.run(command, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _accelerate(*cli_args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "ssn_core", *cli_args]
    return subprocess.run(command, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _close(a, b, path: str = "") -> None:
    """Equal structures; floats to float tolerance (scores are sums added in another order), all else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), (path, a, b)
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for key in a:
            _close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_one_process_is_a_plain_loop():
    from ssn_core import distributed

    assert distributed.world().size == 1 and distributed.is_main()
    seen = []
    assert distributed.run_batches(3, lambda b: b * 10, after=seen.append) == [0, 10, 20]
    assert seen == [1, 2, 3]
    assert distributed.run_batches(2, lambda b: None, gather=False) is None
    assert distributed.map_chunks(list(range(5)), 2, lambda chunk: [x + 1 for x in chunk]) == [1, 2, 3, 4, 5]
    distributed.check_enough(1, "prompts")
    distributed.check_same("anything", {"a": 1})
    t = torch.ones(3)
    distributed.all_reduce_([t])
    assert torch.equal(t, torch.ones(3)) and distributed.gather_json({"x": [1]}) == [{"x": [1]}]
    value = {"t": torch.arange(6, dtype=torch.bfloat16).view(2, 3), "k": {(1, "mlp"): (torch.zeros(0), "s")}}
    back = distributed._decode(json.loads(json.dumps(distributed._encode(value))))
    assert back["t"].dtype == torch.bfloat16 and torch.equal(back["t"], value["t"]) and back["k"][(1, "mlp")][1] == "s"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(one-process record made here, [process 0's record, process 1's record] from a two-process torchrun)."""
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker

    out = tmp_path_factory.mktemp("engine")
    started = time.perf_counter()
    launch = _torchrun("engine", str(out))
    two_seconds = time.perf_counter() - started
    assert launch.returncode == 0, launch.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        one = json.loads(json.dumps(distributed_worker.run_engine()))
        one_seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    print(f"engine: two processes {two_seconds:.1f} s (with start-up), one process {one_seconds:.1f} s")
    return one, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("part", ["impact", "paper", "compare", "evaluate", "validate", "faithfulness", "train"])
def test_two_processes_equal_one(engine, part):
    one, (rank0, rank1) = engine
    if part == "impact":
        assert rank0[part].pop("processes") == 2 and one[part].pop("processes") == 1
        rank1[part].pop("processes")
    _close(rank0[part], one[part], part)
    _close(rank1[part], rank0[part], part)  # every process ends with the whole result


def test_one_progress_bar_counts_both_processes(engine):
    one, (rank0, _) = engine
    scored = [c for c in rank0["progress"] if c[2].startswith("scored")]
    total = scored[-1][1]
    assert total == 12 and scored[-1][0] == total
    # Batches of 2 prompts, one per process per round: after each round 4 more prompts are done (identify scores
    # twice: the impact scores, then the activation means).
    assert [c[0] for c in scored] == [4, 8, 12] * 2
    assert [c[0] for c in one["progress"] if c[2].startswith("scored")] == [2, 4, 6, 8, 10, 12] * 2


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from ssn_core.testing import tiny_model

    dirs = []
    for seed in (0, 1):
        lm = tiny_model("qwen2", seed=seed)
        path = tmp_path_factory.mktemp(f"tiny{seed}")
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_identify_under_accelerate_launch(tmp_path, model_dirs):
    from ssn_core.cli import main
    from ssn_core.identify import IdentifyResult

    args = ["identify", "--model", str(model_dirs[0]), "--device", "cpu", "--langs", "zh", "--n", "3",
            "--recipe", "plnd", "--p", "0.1", "--batch-size", "2"]
    launch = _accelerate(*args, "--out", str(tmp_path / "two"))
    assert launch.returncode == 0, launch.stderr[-3000:]
    assert "all SS (union)" in launch.stdout and launch.stdout.count("all SS (union)") == 1  # printed once
    assert [p.name for p in tmp_path.iterdir()] == ["two"]  # one folder, no temporary leftovers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one, two = IdentifyResult.load(tmp_path / "one"), IdentifyResult.load(tmp_path / "two")
    assert two.manifest["processes"] == 2 and one.manifest["processes"] == 1
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    for group, per_kind in one.scores.groups.items():
        for kind, tensor in per_kind.items():
            torch.testing.assert_close(two.scores.groups[group][kind], tensor, rtol=1e-5, atol=1e-6)
    assert one.scores.counts == two.scores.counts
    for lang in one.ms:
        assert one.ms[lang].neurons.keys() == two.ms[lang].neurons.keys()
        assert all(torch.equal(one.ms[lang].neurons[k], two.ms[lang].neurons[k]) for k in one.ms[lang].neurons)
    assert one.direction.layer == two.direction.layer
    torch.testing.assert_close(two.direction.directions, one.direction.directions, rtol=1e-5, atol=1e-6)


def test_cli_train_under_accelerate_launch(tmp_path, model_dirs):
    from ssn_core.cli import main
    from ssn_core.neurons import NeuronSet

    neurons = NeuronSet({(0, "mlp"): [1, 5, 7], (1, "attn_o"): [1, 2, 40], (0, "attn_v"): [4, 9]})
    neuron_file = neurons.save(tmp_path / "neurons.json")
    args = ["train", "--model", str(model_dirs[0]), "--device", "cpu", "--target", str(neuron_file), "--langs",
            "en,zh", "--n", "4", "--steps", "3", "--batch-size", "4", "--lr", "0.01", "--max-length", "64",
            "--eval-tokens", "4"]
    launch = _accelerate(*args, "--out", str(tmp_path / "two"))
    assert launch.returncode == 0, launch.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    one, two = (json.loads((tmp_path / d / "train_result.json").read_text()) for d in ("one", "two"))
    _close(two["losses"], one["losses"], "losses")
    _close(two["before"], one["before"], "before")
    _close(two["after"], one["after"], "after")
    assert (tmp_path / "two" / "safety_data.json").read_text() == (tmp_path / "one" / "safety_data.json").read_text()
    deltas = [load_file(tmp_path / d / "delta.safetensors") for d in ("one", "two")]
    assert deltas[0].keys() == deltas[1].keys()
    for name in deltas[0]:
        torch.testing.assert_close(deltas[1][name], deltas[0][name], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2


def test_bad_launches_stop_with_clear_errors(tmp_path, model_dirs):
    launch = _torchrun("bad", str(tmp_path), *map(str, model_dirs))
    assert launch.returncode == 0, launch.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, seen in enumerate(ranks):
        prefix = "" if rank == 0 else "process 1 of 2: "
        code, message = seen["too_few"]
        assert code == 2 and f"{prefix}error: prompts to evaluate: 1, fewer than the 2 processes" in message, message
        code, message = seen["command"]
        assert code == 2 and "differ in the command line (dtype: process 0 'auto', process 1 'bfloat16')" in message
        code, message = seen["model"]
        assert code == 2 and "differ in the loaded model (weights: process 0" in message, message
        code, message = seen["info"]
        assert code == 2 and "ssn info runs in one process" in message, message
    assert not any((tmp_path / name).exists() for name in ("too_few", "command", "model"))


def _spawn_two(scenario: str, out: Path, timeout_s: float) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Two worker processes with the environment a launcher sets, but no launcher: it would stop the survivor as soon
    as one process ends, and what the survivor does on its own is the point here."""
    port = str(_free_port())
    return tuple(subprocess.Popen(
        [sys.executable, str(WORKER), scenario, str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, SSN_DIST_TIMEOUT=str(timeout_s))) for r in (0, 1))


def test_a_failing_hanging_or_dead_process_stops_the_other(tmp_path):
    (tmp_path / "hang").mkdir()
    (tmp_path / "die").mkdir()
    hang = _spawn_two("fail-then-hang", tmp_path / "hang", timeout_s=4)
    die = _spawn_two("die", tmp_path / "die", timeout_s=60)
    try:
        assert hang[0].wait(timeout=120) == 0, hang[0].stdout.read().decode()[-3000:]
        assert die[0].wait(timeout=120) == 0, die[0].stdout.read().decode()[-3000:]
        assert die[1].wait(timeout=30) == 3
    finally:
        for process in (*hang, *die):
            if process.poll() is None:
                process.kill()  # process 1 of the hang case sleeps for an hour otherwise
                process.wait()
    seen = json.loads((tmp_path / "hang" / "rank0.json").read_text())
    message, seconds = seen["fail"]
    assert "process 1 of 2 stopped with an error while running the fail test" in message and seconds < 10
    message, seconds = seen["hang"]
    assert "another process did not answer within 4 s" in message and "without writing anything" in message
    assert 3 < seconds < 30  # the timeout, not forever
    message, seconds = json.loads((tmp_path / "die" / "rank0.json").read_text())["die"]
    assert message.startswith("process 0 of 2: another process ") and "--dist-timeout" in message
    assert seconds < 50  # noticed before its own 60 s timeout ran out: the connection closed
    shutil.rmtree(tmp_path / "hang", ignore_errors=True)
