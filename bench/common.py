"""Shared benchmark machinery: the run context, side-by-side timing, machine description, result rows.

Why it is built this way: on a shared 2-core machine absolute times drift by 2-4x from minute to
minute (other processes, thermal state). A ratio is only meaningful when both sides see the same
conditions, so every ratio here comes from *alternating* runs in one process (A, B, B, A, A, B, ...)
and is the median of the per-round ratios. Memory is the exception: peak RSS only grows within a
process, so memory benchmarks use one fresh subprocess per measured configuration.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
STARTER = "starter:qwen2.5-coder-0.5b"
GPU_MODEL = "starter:qwen2.5-coder-1.5b"  # the --gpu profile's default: larger model, 4-bit on CUDA


class Skipped(Exception):
    """A benchmark cannot run here (engine part missing, no CUDA, ...); the message says why."""


@dataclass
class BenchConfig:
    model: str = STARTER
    quick: bool = False
    smoke: bool = False  # tiny random model, tiny sizes: seconds; used by tests so the suite cannot rot
    gpu: bool = False
    quantization: str = "4bit-nf4"  # --gpu: bitsandbytes quantization of the model ("none": bfloat16 weights)
    results_dir: Path = RESULTS_DIR
    repeats: int | None = None  # alternating rounds; default depends on the mode
    command: str = ""

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else ("quick" if self.quick else "full")

    def pick(self, smoke, quick, full):
        """Size parameter for the current mode."""
        return smoke if self.smoke else (quick if self.quick else full)

    @property
    def rounds(self) -> int:
        return self.repeats or self.pick(1, 2, 5)


@dataclass
class BenchResult:
    """What one benchmark measured. ``ratios`` are the headline figures compared against ``goals``."""

    name: str
    ratios: dict[str, float]
    goals: dict[str, str]  # ratio name -> ">= 0.85" / "<= 1.05"
    summary: str  # the benchmark's last printed line
    batch: int | None = None
    seq_len: int | None = None
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def met(self) -> dict[str, bool | None]:
        return {name: goal_met(self.ratios.get(name), goal) for name, goal in self.goals.items()}


def goal_met(value: float | None, goal: str) -> bool | None:
    if value is None or not math.isfinite(value):
        return None
    op, threshold = goal.split()
    return value >= float(threshold) if op == ">=" else value <= float(threshold)


class BenchContext:
    """Holds the configuration and the loaded model (loaded once, on first use)."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self._lm = None

    @property
    def lm(self):
        if self._lm is None:
            self._lm = load_bench_model(self.config)
        return self._lm

    def log(self, message: str) -> None:
        print(f"  {message}", flush=True)


def require(module: str):
    """Import an engine module or raise Skipped("<module> not available yet")."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module or module.startswith(exc.name)):
            raise Skipped(f"{module} not available yet") from None
        raise


def load_bench_model(config: BenchConfig):
    """The LoadedModel a benchmark runs on: tiny random (smoke), the --gpu profile, or ``--model``."""
    if config.smoke:
        testing = require("ssn_core.testing")
        if not hasattr(testing, "tiny_model"):
            raise Skipped("ssn_core.testing.tiny_model not available yet")
        if config.gpu and config.quantization != "none":  # the GPU profile's code path, on the CPU
            return _tiny_quantized(config.quantization)
        return testing.tiny_model("qwen2")
    loading = require("ssn_core.loading")
    if config.gpu:
        if not torch.cuda.is_available():
            raise Skipped("--gpu needs CUDA, and torch sees no CUDA device here")
        return loading.load_model(gpu_spec(loading, config.model, config.quantization))
    return loading.load_model(config.model)


def gpu_spec(loading, source: str, quantization: str = "4bit-nf4"):
    """The --gpu profile: bfloat16 weights, or bitsandbytes ``quantization`` with bfloat16 compute; the first GPU."""
    return loading.ModelSpec(source=source, dtype="bfloat16", quantization=quantization, device_map="cuda")


def _tiny_quantized(quantization: str):
    """The tiny model saved to a temporary folder and loaded quantized on the CPU (smoke mode of the GPU profile)."""
    import tempfile

    from ssn_core.loading import ModelSpec, load_model
    from ssn_core.testing import tiny_model

    lm = tiny_model("qwen2")
    with tempfile.TemporaryDirectory(prefix="ssn-bench-tiny-") as folder:
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        return load_model(ModelSpec(folder, quantization=quantization, device_map="cpu"))


# ----- timing -------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
              warm: list[str] | None = None,
              on_time: Callable[[int, str, float], None] | None = None) -> dict[str, list[float]]:
    """Time each fn ``rounds`` times, interleaved; the order rotates each round so drift hits all alike.

    ``warm``: the fns to run untimed first (default all); one call that fills every cache is enough.
    ``on_time(round, name, seconds)``: called after each timed call (progress for long benchmarks).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in (warm if warm is not None else names):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if on_time is not None:
                on_time(r, name, times[name][-1])
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-round ratios numerator[i] / denominator[i] (both timed in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True) if d > 0)


def median(values: list[float]) -> float:
    return statistics.median(values)


# ----- memory ---------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_worker(module: str, args: list[str], timeout: float, in_process: bool = False) -> dict:
    """Run ``python -m module args...`` in a fresh process; it prints one JSON line last.

    ``in_process`` (smoke mode) calls ``module.worker(args)`` here instead: it exercises the same code in
    seconds, without a fresh interpreter (its memory figures then mean nothing).
    """
    import subprocess

    if in_process:
        import contextlib
        import importlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            importlib.import_module(module).worker(list(args))
        lines = [line for line in buffer.getvalue().splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"worker {module} printed no result")
        result = json.loads(lines[-1])
        if "skipped" in result:
            raise Skipped(result["skipped"])
        return result
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=root, env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"worker {module} {' '.join(args)} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    result = json.loads(lines[-1])
    if "skipped" in result:
        raise Skipped(result["skipped"])
    return result


# ----- machine and results ------------------------------------------------------------------------


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "gpu": None,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB) x{torch.cuda.device_count()}"
    return info


def versions() -> dict:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "nnsight", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages: record absence, never fail the benchmark
            found[name] = None
    return found


def model_description(ctx: BenchContext) -> tuple[str, str | None]:
    """(model name, dtype) without loading the model if the benchmark did not."""
    if ctx._lm is None:
        return ("tiny:qwen2" if ctx.config.smoke else ctx.config.model), None
    lm = ctx._lm
    summary = getattr(lm, "summary", None)
    name = getattr(summary, "name", None) or ("tiny:qwen2" if ctx.config.smoke else ctx.config.model)
    dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
    return name, dtype


def write_row(ctx: BenchContext, result: BenchResult, elapsed_s: float) -> Path:
    """Append one row to ``<results_dir>/<name>.json`` (a JSON list), atomically."""
    from ssn_core.io import atomic_write_json

    model, dtype = model_description(ctx)
    row = {
        "benchmark": result.name,
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": ctx.config.command,
        "mode": ctx.config.mode,
        "gpu_profile": ctx.config.gpu,
        "model": model,
        "dtype": dtype,
        "batch": result.batch,
        "seq_len": result.seq_len,
        "ratios": {k: (v if v is None or math.isfinite(v) else None) for k, v in result.ratios.items()},
        "goals": result.goals,
        "met": result.met(),
        "summary": result.summary,
        "details": result.details,
        "notes": result.notes,
        "elapsed_s": round(elapsed_s, 1),
        "machine": machine_info(),
        "versions": versions(),
    }
    path = Path(ctx.config.results_dir) / f"{result.name}.json"
    rows = []
    if os.path.lexists(path):  # append to an earlier result list; never replace a file that is something else
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            rows = None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "benchmark" in r for r in rows):
            raise SystemExit(f"bench: {path} exists and is not a list of benchmark rows; move it away or pass "
                             "another --results-dir")
    rows.append(row)
    atomic_write_json(path, rows)
    return path


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3g}x"


def goal_text(result: BenchResult, name: str) -> str:
    goal = result.goals.get(name)
    if goal is None:
        return ""
    met = result.met()[name]
    return f" (goal {goal}x: {'met' if met else 'MISSED' if met is False else 'n/a'})"
