"""Bad input through the CLI, one table row per case (issue 12): the exit code, a specific message, and that no
file outside the output path changed (the folder the command runs in is hashed before and after).

Every case runs `ssn_core.cli.main` in this process on a tiny random model saved to disk. Rows marked
``no_model`` must fail before any model is loaded (`load_from_args` is made to fail loudly). The corrupt-cache
rows run on a tiny stand-in of the starter model in a private ``$SSN_CACHE`` (the real cache is never touched):
its "GGUF conversion" returns a tiny model, so a rebuild takes a fraction of a second.

Each row also says what the command did before this was fixed (``before``), so the table doubles as the
record of what changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssn_core import io as ssn_io
from ssn_core import loading
from ssn_core.cli import main
from ssn_core.cli import model as cli_model
from ssn_core.delta import NeuronDelta
from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.generation import GenerationSettings
from ssn_core.interventions import Intervention, intervene, reinforce
from ssn_core.neurons import NeuronSet
from ssn_core.testing import tiny_model

# ----------------------------------------------------------------------------------------------------------------
# Shared inputs: one tiny model on disk, an identify result, an evaluation, neuron files, a delta (built once)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    lm = tiny_model("qwen2")
    model_dir = root / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    model = ["--model", str(model_dir), "--device", "cpu"]
    ident = root / "ident"
    assert main(["identify", *model, "--langs", "zh", "--n", "1", "--sites", "mlp", "--out", str(ident)]) == 0
    evaluation = root / "eval"
    assert main(["evaluate", *model, "--langs", "en", "--n", "1", "--max-new-tokens", "2", "--out",
                 str(evaluation)]) == 0
    neurons = NeuronSet({(0, "mlp"): [1, 2, 3]}).with_model_meta(lm.sites)
    delta = NeuronDelta.zeros(lm.model, lm.sites, neurons)
    for piece in delta.slices.values():
        piece.weight.normal_()
    return SimpleNamespace(root=root, model_dir=model_dir, model=model, ident=ident, eval=evaluation, lm=lm,
                           neurons=neurons, delta=delta)


@dataclass
class Env:
    """What a case's setup and argv see: the working folder (the current directory) and the shared inputs."""

    ws: Path
    shared: SimpleNamespace
    monkeypatch: pytest.MonkeyPatch
    starter: SimpleNamespace | None = None

    @property
    def model(self) -> list[str]:
        return self.shared.model


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry under ``root`` (relative path -> content hash and mode), leaving out ``skip`` and below."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = path.relative_to(root).as_posix()
        mode = oct(stat.S_IMODE(path.lstat().st_mode))
        if path.is_symlink():
            entries[rel] = f"link {os.readlink(path)}"
        elif path.is_dir():
            entries[rel] = f"dir {mode}"
        else:
            entries[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {mode}"
    return entries


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``ssn ARGV``; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    code: int
    message: str  # regular expression searched in stderr
    before: str  # what happened before issue 12 was fixed
    out: str | None = None  # the output path, relative to the working folder (may change on success)
    setup: Callable[[Env], None] | None = None
    check: Callable[[Env], None] | None = None
    no_model: bool = False  # must fail before the model is loaded
    starter: bool = False  # runs on the tiny starter stand-in
    marks: list = field(default_factory=list)


def thesis_folder(env: Env) -> None:
    (env.ws / "mydir").mkdir()
    (env.ws / "mydir" / "thesis.tex").write_text("my thesis\n")


def text_file(env: Env) -> None:
    (env.ws / "some_file.txt").write_text("keep me\n")


def home_folder(env: Env) -> None:
    home = env.ws / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "cv.pdf").write_bytes(b"%PDF")
    env.monkeypatch.setenv("HOME", str(home))


def earlier_identify(env: Env) -> None:
    copy_tree(env.shared.ident, env.ws / "ident")


def earlier_identify_with_notes(env: Env) -> None:
    earlier_identify(env)
    (env.ws / "ident" / "notes.txt").write_text("my notes\n")


def earlier_evaluation(env: Env) -> None:
    copy_tree(env.shared.eval, env.ws / "ident")


def empty_folder(env: Env) -> None:
    (env.ws / "empty").mkdir()


def evaluation_with_utility(env: Env) -> None:
    assert main(["evaluate", *env.model, "--langs", "en", "--n", "1", "--max-new-tokens", "2", "--ppl", "1",
                 "--out", str(env.ws / "ev")]) == 0
    assert (env.ws / "ev" / "utility.json").is_file()


def check_no_utility(env: Env) -> None:
    out = env.ws / "ev"
    manifest = json.loads((out / "manifest.json").read_text())
    assert not (out / "utility.json").exists()
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir())
    assert manifest["format"] == "ssn-lab/evaluation"


def check_replaced_identify(env: Env) -> None:
    out = env.ws / "ident"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["languages"] == ["en", "bn"]  # the new run, not the copied one (en, zh)
    assert not (out / "sets" / "ms_zh.json").exists()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == manifest["files"]


def rename_fails(env: Env) -> None:
    earlier_identify(env)

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")

    env.monkeypatch.setattr(ssn_io, "_rename", refuse)


def folder_not_writable(env: Env) -> None:
    (env.ws / "ro").mkdir()
    real_access = os.access
    target = str(env.ws / "ro")
    env.monkeypatch.setattr(ssn_io.os, "access",
                            lambda path, mode, **kw: False if str(path) == target else real_access(path, mode, **kw))


def read_only_folder(env: Env) -> None:
    (env.ws / "ro").mkdir()
    os.chmod(env.ws / "ro", 0o555)


def interrupt_between_renames(env: Env) -> None:
    """SIGINT arrives right after the earlier result was moved aside: the swap still completes."""
    earlier_identify(env)
    # Python's own Ctrl-C handler (an earlier test in the session, e.g. Streamlit's AppTest, may have replaced it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real = ssn_io._rename
    calls = []

    def rename_then_interrupt(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)

    env.monkeypatch.setattr(ssn_io, "_rename", rename_then_interrupt)


def truncated_model_copy(env: Env, name: str) -> Path:
    folder = copy_tree(env.shared.model_dir, env.ws / name)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def neuron_json(indices=None, meta=None, raw: str | None = None) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        data = {"format": "ssn-lab/neuron-set", "version": 1,
                "neurons": [{"layer": 0, "kind": "mlp", "indices": indices if indices is not None else [1]}]}
        if meta is not None:
            data["meta"] = meta
        (env.ws / "bad.json").write_text(raw if raw is not None else json.dumps(data))

    return setup


def good_neurons(env: Env) -> None:
    env.shared.neurons.save(env.ws / "ss.json")


def delta_file(poison: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        delta = env.shared.delta
        path = delta.save(env.ws / "delta.safetensors")
        header, tensors = ssn_io.read_safetensors(path, "ssn-lab/neuron-delta", "delta")
        key = next(name for name in tensors if name.endswith(".delta"))
        if poison == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")
        else:  # negative coordinates
            coords = key[: -len(".delta")] + ".coords"
            tensors[coords] = tensors[coords] - 100
        ssn_io.atomic_save_safetensors(path, tensors, header)

    return setup


def prompts_without(label: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        other = "harmless" if label == "harmful" else "harmful"
        lines = [json.dumps({"text": f"question {i} in {lang}", "language": lang, "label": other})
                 for lang in ("en", "zh") for i in range(4)]
        (env.ws / "prompts.jsonl").write_text("\n".join(lines) + "\n")

    return setup


def no_api_key(env: Env) -> None:
    env.monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_key_nothing_listening(env: Env) -> None:
    env.monkeypatch.setenv("OPENAI_API_KEY", "sk-test")


def internal_bug(env: Env) -> None:
    def broken(args):
        raise RuntimeError("boom in a command")

    env.monkeypatch.setattr(cli_model, "cmd_info", broken)  # where the parser looks it up


def keyboard_interrupt(env: Env) -> None:
    def interrupted(args):
        import sys

        sys.stderr.write("progress: 50%|#####     |")  # a bar that did not end its line
        raise KeyboardInterrupt

    env.monkeypatch.setattr(cli_model, "cmd_info", interrupted)


def umask_027(env: Env) -> None:
    os.umask(0o027)  # the test restores the umask it found


def check_umask_modes(env: Env) -> None:
    out = env.ws / "ident"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "sets").stat().st_mode) == 0o750
    for path in [*out.glob("*.*"), *(out / "sets").glob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


# ----- the tiny starter stand-in ---------------------------------------------------------------------------------


def hf_dir(env: Env) -> Path:
    return env.starter.hf


def cache_weights(env: Env) -> Path:
    return hf_dir(env) / "model.safetensors"


def _first_tensor_offset(path: Path) -> int:
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    start = min(t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    return 8 + header_len + start


def truncated_cache(env: Env) -> None:
    path = cache_weights(env)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_in_cache(env: Env) -> None:
    path = cache_weights(env)
    data = bytearray(path.read_bytes())
    at = _first_tensor_offset(path)
    data[at:at + 8] = struct.pack("<ff", float("nan"), float("nan"))
    path.write_bytes(bytes(data))


def finite_change_in_cache(env: Env) -> None:
    path = cache_weights(env)
    data = bytearray(path.read_bytes())
    at = _first_tensor_offset(path)
    data[at:at + 4] = struct.pack("<f", 12.5)
    path.write_bytes(bytes(data))


def garbage_header_in_cache(env: Env) -> None:
    path = cache_weights(env)
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32
    path.write_bytes(bytes(data))


def legacy_cache_marker(env: Env) -> None:
    marker = hf_dir(env) / "ssn-cache.json"
    meta = json.loads(marker.read_text())
    del meta["files"]
    marker.write_text(json.dumps(meta))


def rebuilt(times: int) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        assert len(env.starter.conversions) == times  # 1 = prepared once in the fixture, 2 = rebuilt once
        ready, problem = loading.check_starter_cache("starter:tiny-standin", checksums=True)
        assert ready is not None and problem is None

    return check


# ----------------------------------------------------------------------------------------------------------------
# The table

CASES = [
    # --- data loss: --out -----------------------------------------------------------------------------------------
    Case("identify-out-user-folder", lambda e: ["identify", *e.model, "--langs", "zh", "--n", "1", "--sites", "mlp",
                                                "--out", "mydir"],
         2, r"mydir is not empty and is not an earlier identify result \(it has no SSN Lab manifest.json\)",
         "exit 0, thesis.tex deleted", setup=thesis_folder, no_model=True),
    Case("identify-out-file", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "some_file.txt"],
         2, r"some_file.txt exists and is not a folder; SSN Lab never replaces a file", "exit 0, the file deleted",
         setup=text_file, no_model=True),
    Case("identify-out-home", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "~"],
         2, r"refusing to write the identify result into .*home", "would replace the home folder",
         setup=home_folder, no_model=True),
    Case("identify-out-cwd", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "."],
         2, r"it is the current folder or one of its parents", "OSError traceback (Device or resource busy)",
         no_model=True),
    Case("identify-out-parent", lambda e: ["identify", *e.model, "--langs", "zh", "--out", ".."],
         2, r"it is the current folder or one of its parents", "moved the whole parent folder aside and deleted it",
         no_model=True),
    Case("identify-out-earlier-identify", lambda e: ["identify", *e.model, "--langs", "bn", "--n", "1", "--sites",
                                                     "mlp", "--out", "ident"],
         0, r"scored", "exit 0 (kept)", out="ident", setup=earlier_identify, check=check_replaced_identify),
    Case("identify-out-earlier-identify-plus-user-file",
         lambda e: ["identify", *e.model, "--langs", "zh", "--n", "1", "--sites", "mlp", "--out", "ident"],
         2, r"is an earlier identify result but also holds files it did not write \(notes.txt\)",
         "exit 0, notes.txt deleted", setup=earlier_identify_with_notes, no_model=True),
    Case("identify-out-evaluation-folder", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "ident"],
         2, r"is not an earlier identify result \(it is an SSN Lab evaluation\)", "exit 0, the evaluation deleted",
         setup=earlier_evaluation, no_model=True),
    Case("identify-out-empty-folder", lambda e: ["identify", *e.model, "--langs", "zh", "--n", "1", "--sites", "mlp",
                                                 "--out", "empty"],
         0, r"wrote empty", "exit 0", out="empty", setup=empty_folder),
    Case("evaluate-into-earlier-evaluation-is-one-run",
         lambda e: ["evaluate", *e.model, "--langs", "en", "--n", "1", "--max-new-tokens", "2", "--out", "ev"],
         0, r"wrote ev", "exit 0, utility.json of the --ppl run left beside the new manifest", out="ev",
         setup=evaluation_with_utility, check=check_no_utility),
    Case("evaluate-out-file", lambda e: ["evaluate", *e.model, "--langs", "en", "--n", "1", "--out", "some_file.txt"],
         2, r"some_file.txt exists and is not a folder", "error only after generating every reply",
         setup=text_file, no_model=True),
    Case("validate-out-user-folder", lambda e: ["validate", *e.model, "--neurons", str(e.shared.ident), "--langs",
                                                "en", "--n", "1", "--out", "mydir"],
         2, r"mydir is not empty and is not an earlier validation", "exit 0, thesis.tex deleted",
         setup=thesis_folder, no_model=True),
    Case("train-out-user-folder", lambda e: ["train", *e.model, "--target", "random", "--neurons",
                                             str(e.shared.ident), "--langs", "en", "--out", "mydir"],
         2, r"mydir is not empty and is not an earlier train result", "files written among the user's",
         setup=thesis_folder, no_model=True),
    Case("compare-methods-out-user-folder", lambda e: ["compare-methods", *e.model, "--out", "mydir"],
         2, r"mydir is not empty and is not an earlier method comparison", "files written among the user's",
         setup=thesis_folder, no_model=True),
    Case("out-rename-permission-error", lambda e: ["identify", *e.model, "--langs", "zh", "--n", "1", "--sites",
                                                   "mlp", "--out", "ident"],
         2, r"could not move the identify result into ident: Permission denied",
         "PermissionError traceback and an empty .rodir.*.old folder left behind", setup=rename_fails),
    Case("out-in-unwritable-folder", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "ro/result"],
         2, r"cannot create the output folder ro/result: .*ro is not writable",
         "PermissionError traceback after the work", setup=folder_not_writable, no_model=True),
    Case("out-in-read-only-folder", lambda e: ["identify", *e.model, "--langs", "zh", "--out", "ro/result"],
         2, r"ro is not writable", "PermissionError traceback after the work", setup=read_only_folder,
         no_model=True, marks=[pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")]),
    Case("ctrl-c-between-the-renames", lambda e: ["identify", *e.model, "--langs", "bn", "--n", "1", "--sites", "mlp",
                                                  "--out", "ident"],
         130, r"\ninterrupted\n$", "no result at the path, the earlier one in a hidden .old folder", out="ident",
         setup=interrupt_between_renames, check=check_replaced_identify),
    # --- non-finite and out-of-range numbers ----------------------------------------------------------------------
    Case("chat-alpha-nan", lambda e: ["chat", *e.model, "--reinforce", "ss.json", "--alpha", "nan", "hi"],
         2, r"argument --alpha: expected a finite number, got 'nan'", "exit 0, replied '!!!!'", setup=good_neurons),
    Case("chat-alpha-inf", lambda e: ["chat", *e.model, "--reinforce", "ss.json", "--alpha", "inf", "hi"],
         2, r"argument --alpha: expected a finite number, got 'inf'", "exit 0", setup=good_neurons),
    Case("chat-temperature-nan", lambda e: ["chat", *e.model, "--sample", "--temperature", "nan", "hi"],
         2, r"argument --temperature: expected a finite number", "RuntimeError traceback (probability tensor)"),
    Case("evaluate-alpha-nan", lambda e: ["evaluate", *e.model, "--reinforce", "ss.json", "--alpha", "nan",
                                          "--out", "ev"],
         2, r"argument --alpha: expected a finite number", "saved a row 'reinforce xnan'", setup=good_neurons),
    Case("validate-alphas-nan", lambda e: ["validate", *e.model, "--neurons", str(e.shared.ident), "--alphas",
                                           "2,nan", "--out", "val"],
         2, r"--alphas '2,nan': give one or more finite scales >= 0", "saved a row 'reinforce_ss xnan'",
         no_model=True),
    Case("validate-alphas-inf", lambda e: ["validate", *e.model, "--neurons", str(e.shared.ident), "--alphas", "inf",
                                           "--out", "val"],
         2, r"finite scales", "saved a row 'reinforce_ss xinf'", no_model=True),
    Case("identify-p-inf", lambda e: ["identify", *e.model, "--p", "inf", "--out", "x"],
         2, r"argument --p: expected a finite number", "error after the model load"),
    Case("identify-p-out-of-range", lambda e: ["identify", *e.model, "--p", "2", "--out", "x"],
         2, r"p \(the top fraction per layer\) must be in \(0, 1\], got 2(\.0)?$", "error after the model load",
         no_model=True),
    Case("train-lr-nan", lambda e: ["train", *e.model, "--lr", "nan", "--out", "x"],
         2, r"argument --lr: expected a finite number", "refused too (lr had a finite check; other floats did not)"),
    Case("train-heldout-out-of-range", lambda e: ["train", *e.model, "--heldout", "1.5", "--out", "x"],
         2, r"--heldout must be in \[0, 1\)", "ran, the share silently clamped", no_model=True),
    Case("evaluate-delta-nan-weights", lambda e: ["evaluate", *e.model, "--delta", "delta.safetensors", "--out", "ev"],
         2, r"delta .* holds non-finite values \(NaN or infinity\)", "saved polluted results",
         setup=delta_file("nan"), no_model=True),
    Case("evaluate-delta-negative-coords", lambda e: ["evaluate", *e.model, "--delta", "delta.safetensors",
                                                      "--out", "ev"],
         2, r"coords of .* are negative", "IndexError traceback mid-generation", setup=delta_file("negative"),
         no_model=True),
    Case("neurons-float-index", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"bad.json: neuron index must be a whole number >= 0, got 1.7", "silently truncated to 1",
         setup=neuron_json([1.7]), no_model=True),
    Case("neurons-bool-index", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"neuron index must be a whole number >= 0, got True", "silently read as 1", setup=neuron_json([True]),
         no_model=True),
    Case("neurons-infinity", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"neuron index must be a whole number >= 0, got inf", "OverflowError traceback",
         setup=neuron_json(raw='{"format": "ssn-lab/neuron-set", "neurons": [{"layer": 0, "kind": "mlp", '
                               '"indices": [Infinity]}]}'), no_model=True),
    Case("neurons-1e30", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"got 1e\+30", "ValueError traceback (Overflow when unpacking long)", setup=neuron_json([1e30]),
         no_model=True),
    Case("neurons-huge-int", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"neuron index 10{30} is out of range", "ValueError traceback", setup=neuron_json([10**30]),
         no_model=True),
    Case("neurons-negative-index", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"neuron index -1 is out of range|whole number >= 0", "error after the model load",
         setup=neuron_json([-1]), no_model=True),
    Case("neurons-meta-list", lambda e: ["chat", *e.model, "--suppress", "bad.json", "hi"],
         2, r"'meta' must be a JSON object, got list", "TypeError traceback", setup=neuron_json(meta=[1, 2]),
         no_model=True),
    Case("suppress-identify-folder", lambda e: ["chat", *e.model, "--suppress", str(e.shared.ident), "hi"],
         2, r"is a folder, not a neuron file; it holds an identify result: pass one of its sets, e\.g\. "
            r".*sets/ss_all\.json", "'neuron file not found' for a folder that exists", no_model=True),
    # --- unexpected exceptions ------------------------------------------------------------------------------------
    Case("internal-error-one-line", lambda e: ["info", *e.model],
         1, r"^internal error: RuntimeError: boom in a command; rerun with --debug for the traceback\n$",
         "a raw traceback, exit 1", setup=internal_bug),
    Case("internal-error-debug-traceback", lambda e: ["info", *e.model, "--debug"],
         1, r"Traceback \(most recent call last\)(.|\n)*internal error: RuntimeError: boom in a command; traceback "
            r"above", "a raw traceback, exit 1 (no --debug option)", setup=internal_bug),
    Case("interrupted-on-a-new-line", lambda e: ["info", *e.model],
         130, r"\|\ninterrupted\n$", "'interrupted' glued to the progress bar", setup=keyboard_interrupt),
    # --- fail before the work -------------------------------------------------------------------------------------
    Case("evaluate-api-judge-no-key", lambda e: ["evaluate", *e.model, "--judge", "api:http://127.0.0.1:9/v1,judge",
                                                 "--out", "ev"],
         2, r"the API judge needs an API key in the environment variable OPENAI_API_KEY",
         "error after generating every reply, nothing saved", setup=no_api_key, no_model=True),
    Case("evaluate-api-judge-unreachable",
         lambda e: ["evaluate", *e.model, "--judge", f"api:http://127.0.0.1:{closed_port()}/v1,judge", "--out", "ev"],
         2, r"API judge could not reach http://127\.0\.0\.1:\d+/v1/chat/completions",
         "error after generating every reply, nothing saved", setup=api_key_nothing_listening, no_model=True),
    Case("evaluate-mgsm-path-missing", lambda e: ["evaluate", *e.model, "--langs", "en", "--mgsm", "2",
                                                  "--mgsm-path", "no/such/mgsm", "--out", "ev"],
         2, r"MGSM file not found: no/such/mgsm", "error after generating every reply, nothing saved",
         no_model=True),
    Case("identify-no-harmful-prompts", lambda e: ["identify", *e.model, "--langs", "zh", "--prompts",
                                                   "prompts.jsonl", "--out", "x"],
         2, r"language en has no harmful prompts", "error after the model load", setup=prompts_without("harmful"),
         no_model=True),
    Case("validate-no-harmful-prompts", lambda e: ["validate", *e.model, "--neurons", str(e.shared.ident), "--langs",
                                                   "en,zh", "--prompts", "prompts.jsonl", "--out", "val"],
         2, r"the prompt set has no harmful prompts in language\(s\) en, zh", "error after the model load",
         setup=prompts_without("harmful"), no_model=True),
    Case("validate-neurons-not-a-result", lambda e: ["validate", *e.model, "--neurons", "mydir", "--out", "val"],
         2, r"mydir is not an SSN Lab identify result \(no manifest.json\)", "error after the model load",
         setup=thesis_folder, no_model=True),
    Case("local-model-truncated-weights", lambda e: ["info", "--model", "trunc", "--device", "cpu"],
         2, r"trunc: model.safetensors is cut short or damaged .*the model files are incomplete",
         "SafetensorError traceback", setup=lambda e: truncated_model_copy(e, "trunc")),
    # --- smaller --------------------------------------------------------------------------------------------------
    Case("chat-empty-prompt", lambda e: ["chat", *e.model, ""],
         2, r"the prompt is empty", "exit 0, a reply to nothing", no_model=True),
    Case("chat-prompt-longer-than-context", lambda e: ["chat", *e.model, "--max-new-tokens", "4", "x" * 600],
         2, r"the prompt is \d+ tokens long .* exceeds the model's context of 512 tokens",
         "exit 0 after a transformers warning"),
    Case("outputs-follow-the-umask", lambda e: ["identify", *e.model, "--langs", "zh", "--n", "1", "--sites", "mlp",
                                                "--out", "ident"],
         0, r"wrote ident", "files 0600 and folders 0700 whatever the umask", out="ident", setup=umask_027,
         check=check_umask_modes),
    # --- a damaged starter cache (tiny stand-in) ------------------------------------------------------------------
    Case("cache-truncated-info", lambda e: ["info", "--model", "starter:tiny-standin", "--device", "cpu"],
         0, r"warning: the starter cache .*hf was damaged \(model.safetensors has [\d,]+ bytes but [\d,]+ were "
            r"written\); rebuilt it from the pinned GGUF", "raw SafetensorError traceback", starter=True,
         setup=truncated_cache, check=rebuilt(2)),
    Case("cache-truncated-prepare", lambda e: ["prepare-starter", "--name", "starter:tiny-standin"],
         0, r"warning: the starter cache .* was damaged \(model.safetensors has", "'ready (0.0 s)', cache still broken",
         starter=True, setup=truncated_cache, check=rebuilt(2)),
    Case("cache-nan-info", lambda e: ["info", "--model", "starter:tiny-standin", "--device", "cpu"],
         0, r"was damaged \(model.safetensors does not match the checksum recorded when it was written\); rebuilt",
         "loaded silently, chat answered '!!!!!!!!'", starter=True, setup=nan_in_cache, check=rebuilt(2)),
    Case("cache-same-size-change-prepare", lambda e: ["prepare-starter", "--name", "starter:tiny-standin"],
         0, r"model.safetensors does not match the checksum recorded when it was written\); rebuilt",
         "'ready', the damage kept", starter=True, setup=finite_change_in_cache, check=rebuilt(2)),
    Case("cache-garbage-header-info", lambda e: ["info", "--model", "starter:tiny-standin", "--device", "cpu"],
         0, r"model.safetensors has a damaged header\); rebuilt", "raw SafetensorError traceback", starter=True,
         setup=garbage_header_in_cache, check=rebuilt(2)),
    Case("cache-intact-prepare", lambda e: ["prepare-starter", "--name", "starter:tiny-standin"],
         0, r"^(?!(.|\n)*warning)", "ready (never verified)", starter=True, check=rebuilt(1)),
    Case("cache-without-checksums-prepare", lambda e: ["prepare-starter", "--name", "starter:tiny-standin"],
         0, r"it records no checksums \(it was written by an older SSN Lab\)\); rebuilt",
         "ready (never verified)", starter=True, setup=legacy_cache_marker, check=rebuilt(2)),
]


@pytest.fixture
def tiny_starter(tmp_path, monkeypatch):
    """A stand-in for the starter model in a private $SSN_CACHE: one fake part package, a 'conversion' that returns
    a tiny model; prepared once (conversions == 1) before the case runs."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SSN_CACHE", str(cache))
    blob = b"GGUF" + os.urandom(2000)
    package = tmp_path / "site" / "ssn_standin_part1"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('part packages must never be imported')\n")
    (package / "data" / "part01.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    starter = loading.StarterModel(
        name="tiny-standin", display_name="tiny stand-in", packages=("ssn_standin_part1",),
        pip_specs=("ssn-standin-part1==1.0",), part_files=("data/part01.bin",), size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(loading.STARTERS, "tiny-standin", starter)
    conversions = []

    def convert(gguf_path, spec):
        conversions.append(gguf_path)
        lm = tiny_model("qwen2")
        return lm.model, lm.tokenizer

    for module in (loading.starter, loading.load):  # patched where they are called: prepare_starter, load_model
        monkeypatch.setattr(module, "_load_gguf", convert)
        monkeypatch.setattr(module, "inspect_gguf", lambda path: loading.GgufInfo(3, "qwen2", 1, 10_000, 0, 0))
    loading.prepare_starter("starter:tiny-standin")
    assert len(conversions) == 1
    return SimpleNamespace(cache=cache, hf=cache / "starter" / "tiny-standin" / "hf", conversions=conversions)


def cli_modules() -> list:
    """`ssn_core.cli` and every command module of it that looks up `load_from_args`."""
    return [module for name, module in sorted(sys.modules.items())
            if (name == "ssn_core.cli" or name.startswith("ssn_core.cli.")) and hasattr(module, "load_from_args")]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, shared, tmp_path, monkeypatch, capsys, request):
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    env = Env(ws=ws, shared=shared, monkeypatch=monkeypatch)
    if case.starter:
        env.starter = request.getfixturevalue("tiny_starter")
    if case.setup is not None:
        case.setup(env)
    capsys.readouterr()
    if case.no_model:
        def no_model(args):
            raise AssertionError("the model was loaded before the bad input was noticed")

        for module in cli_modules():  # each command module calls its own imported name
            monkeypatch.setattr(module, "load_from_args", no_model)
    before = snapshot(ws)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        code, out, err = run_cli(case.argv(env), capsys)
    finally:
        os.umask(umask)
    assert code == case.code, err
    text = err if code != 0 else out + err
    assert re.search(case.message, text), text
    if code != 1:
        assert "Traceback" not in err
    changed = ws / case.out if case.out and code in (0, 130) else None  # a finished run may replace its output
    assert snapshot(ws, skip=changed) == {k: v for k, v in before.items() if changed is None or not (
        k == case.out or k.startswith(f"{case.out}/"))}  # nothing else changed, no litter
    if case.check is not None:
        case.check(env)
    if (ws / "ro").exists():
        os.chmod(ws / "ro", 0o755)  # let pytest clean up


def test_every_issue_case_is_in_the_table():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------------------------
# The same refusals through the Python API (what the app calls)


def test_api_refuses_non_finite_numbers(tiny):
    lm = tiny()
    neurons = NeuronSet({(0, "mlp"): [1, 2]})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SSNError, match="finite"), intervene(lm, Intervention(neurons, scale=bad)):
            pass
        with pytest.raises(SSNError, match="finite"), intervene(lm, Intervention(neurons, value=bad)):
            pass
        with pytest.raises(SSNError, match="finite"):
            reinforce(lm, neurons, alpha=bad)
        with pytest.raises(SSNError, match="temperature must be a finite number"):
            GenerationSettings(do_sample=True, temperature=bad).validate()
        with pytest.raises(SSNError, match="top_p must be a finite number"):
            GenerationSettings(top_p=bad).validate()


@pytest.mark.parametrize("indices", [[1.5], [True], [-1], torch.tensor([0.5])], ids=["float", "bool", "neg", "ftensor"])
def test_api_neuron_sets_take_whole_numbers_only(indices):
    with pytest.raises(NeuronFileError):
        NeuronSet({(0, "mlp"): indices})
    with pytest.raises(NeuronFileError, match="layer must be a whole number"):
        NeuronSet({(0.5, "mlp"): [1]})
    assert NeuronSet({(0, "mlp"): []}).neurons == {}  # an empty index list is fine


def test_swap_leaves_the_old_folder_when_the_second_rename_fails(tmp_path, monkeypatch):
    """Between the two renames of a replace, a failure puts the earlier result back."""
    final, new = tmp_path / "result", tmp_path / "new"
    final.mkdir()
    (final / "a.txt").write_text("old")
    new.mkdir()
    (new / "a.txt").write_text("new")
    real = ssn_io._rename

    def second_fails(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(ssn_io, "_rename", second_fails)
    with pytest.raises(OSError, match="No space"):
        ssn_io.swap_dir(new, final)
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "result"]


# ----------------------------------------------------------------------------------------------------------------
# The app shows the same messages with st.error, never an exception box


def _app():
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parent.parent
    return AppTest.from_file(str(root / "app.py"), default_timeout=120)


def _errors(at) -> str:
    assert not at.exception, [e.value for e in at.exception]
    return "\n".join(str(e.value) for e in at.error)


def test_app_refuses_to_save_a_result_over_a_users_folder_and_a_broken_model(tmp_path, monkeypatch, shared):
    from ssn_core.identify import identify
    from ssn_core.prompts import load_builtin

    monkeypatch.setenv("SSN_APP_MODEL", "tiny:qwen2")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    lm = tiny_model("qwen2")
    result = identify(lm, load_builtin(["en", "zh"], n=1), ["zh"], kinds=("mlp",))
    folder = tmp_path / "mydir"
    folder.mkdir()
    (folder / "thesis.tex").write_text("my thesis\n")
    before = snapshot(tmp_path)

    at = _app().run()
    at.session_state["identify_result"] = result
    at.switch_page("app_pages/2_neurons.py").run()
    at.text_input(key="nr_save_dir").input(str(folder)).run()
    next(b for b in at.button if b.label == "Save result").click().run()
    assert "is not empty and is not an earlier identify result" in _errors(at)
    at.text_input(key="nr_import_dir").input(str(folder)).run()
    next(b for b in at.button if b.label == "Load result folder").click().run()
    assert "is not an SSN Lab identify result (no manifest.json)" in _errors(at)
    assert snapshot(tmp_path) == before

    env = Env(ws=tmp_path, shared=shared, monkeypatch=monkeypatch)
    broken = truncated_model_copy(env, "trunc")
    at.switch_page("app_pages/1_model.py").run()
    at.radio(key="model_source_kind").set_value("Local folder")
    at.text_input(key="model_source_value").input(str(broken))
    next(b for b in at.button if b.label == "Load model").click().run()
    assert "the model files are incomplete" in _errors(at)
