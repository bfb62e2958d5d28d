"""The README's commands work after `make` (issue 16, item 10): the set-up installs the project into its venv,
so `.venv/bin/ssn` exists and `import ssn_core` works from any folder.

The shared development venv is never modified: the install runs into a throwaway venv that sees this
environment's packages (pip, setuptools, torch, ...) through a .pth file, with the same pip command the Makefile
runs (plus --no-build-isolation --no-index, so nothing is downloaded), from a copy of the project's packaging
files (so no egg-info lands in the work tree).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_make_setup_installs_the_project_editable():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"\$\(PY\) -m pip install .*--no-deps -e \.", recipe), recipe
    assert "pyproject.toml" in makefile.split("INSTALL_KEY :=", 1)[1].splitlines()[0]  # editing it reinstalls
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'ssn = "ssn_core.cli:main"' in pyproject


def _python_block(markdown: str, heading: str) -> str:
    section = markdown.split(f"## {heading}\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_ssn_command_and_readme_example_work_from_another_folder(tmp_path, tiny_dir):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md", "LICENSE"):  # pyproject reads requirements.txt
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "ssn_core", project / "ssn_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "assets", project / "assets")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_outer_env.pth").write_text("\n".join(sorted(outer)) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    def run(*cmd, cwd=tmp_path, timeout=300) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)

    install = run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-e",
                  project)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    help_run = run(venv / "bin" / "ssn", "--help", cwd=elsewhere)
    assert help_run.returncode == 0, help_run.stderr[-2000:]
    assert "identify" in help_run.stdout and "train" in help_run.stdout

    # The README's Python API example, with a tiny local model and a neuron file of it in place of the starter
    from ssn_core.neurons import NeuronSet
    from ssn_core.testing import tiny_model

    model_dir = tiny_dir("qwen2")
    neurons = elsewhere / "ss_neurons.json"
    NeuronSet({(0, "mlp"): [1, 2, 3], (1, "attn_v"): [0]}).with_model_meta(tiny_model("qwen2").sites).save(neurons)
    example = _python_block((ROOT / "README.md").read_text(encoding="utf-8"), "Python API")
    assert 'load_model("starter:qwen2.5-coder-0.5b")' in example
    example = example.replace("starter:qwen2.5-coder-0.5b", str(model_dir))
    example = example.replace("GenerationSettings(max_new_tokens=64)", "GenerationSettings(max_new_tokens=4)")
    script = elsewhere / "example.py"
    script.write_text(example + "\nprint('EXAMPLE OK', len(baseline), len(suppressed))\n", encoding="utf-8")
    example_run = run(python, script, cwd=elsewhere)
    assert example_run.returncode == 0, example_run.stderr[-3000:]
    assert "EXAMPLE OK" in example_run.stdout
    # and it really used the installed project, not a copy on the path by accident
    where = run(python, "-c", "import ssn_core; print(ssn_core.__file__)", cwd=elsewhere)
    assert where.stdout.strip().startswith(str(project)), where.stdout
