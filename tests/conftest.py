"""Shared fixtures.

- ``starter``: the real starter model (Qwen2.5-Coder-0.5B-Instruct), loaded ONCE per test session on the CPU.
  Tests using it are marked ``starter`` automatically; they are skipped with the pip command to run when the
  part packages are not installed. The first load ever converts the GGUF (~85 s) and caches safetensors in
  ``$SSN_CACHE`` / ``~/.cache/ssn-lab``; later sessions load in seconds (``make test`` prepares it up front).
  Share it, keep its prompts few and short, and never modify it in place (interventions are context managers).
- ``tiny``: a factory for tiny random models, ``tiny(family="qwen2", seed=0, **kw) -> LoadedModel``.
- ``tiny_dir``: a factory saving a tiny model + tokenizer to a temp directory (what `load_model` reads).
- ``family_model``: (family, tiny transformers model) for every supported family, once per test module.
- ``one_thread``: torch on one thread for the test (tiny models run faster so, and far faster on a loaded machine);
  a no-op for starter tests.
"""

from __future__ import annotations

import pytest
import torch

from ssn_core.testing import TINY_FAMILIES, tiny_hf_model


def pytest_collection_modifyitems(config, items):
    """Every test that uses the starter fixture carries the `starter` marker (so -m 'not starter' works)."""
    for item in items:
        if "starter" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.starter)


def _missing_starter_parts() -> list[str]:
    from ssn_core.loading import DEFAULT_STARTER, _find_part, get_starter, starter_cache_ready

    starter = get_starter(DEFAULT_STARTER)
    if starter_cache_ready(starter) is not None:
        return []
    return [spec for pkg, rel, spec in zip(starter.packages, starter.part_files, starter.pip_specs, strict=True)
            if _find_part(pkg, rel) is None]


@pytest.fixture(scope="session")
def starter():
    """The starter model as a LoadedModel (CPU, float32), shared by the whole session."""
    from ssn_core.loading import DEFAULT_STARTER, load_model

    missing = _missing_starter_parts()
    if missing:
        pytest.skip(f"starter model part packages are not installed: pip install {' '.join(missing)}")
    return load_model(DEFAULT_STARTER, device_map="cpu")


@pytest.fixture
def tiny():
    """Factory: tiny(family="qwen2", seed=0, chat_template=True, **config_overrides) -> LoadedModel."""
    from ssn_core.testing import tiny_model

    return tiny_model


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: tiny_dir(family="qwen2", seed=0, chat_template=True) -> directory with a saved tiny model."""
    from ssn_core.testing import tiny_model

    def make(family: str = "qwen2", seed: int = 0, chat_template: bool = True, name: str | None = None):
        lm = tiny_model(family, seed=seed, chat_template=chat_template)
        path = tmp_path / (name or f"tiny-{family}-{seed}")
        lm.model.save_pretrained(path)
        lm.tokenizer.save_pretrained(path)
        return path

    return make


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request):
    return request.param, tiny_hf_model(request.param)


@pytest.fixture
def one_thread(request):
    """Tiny models run faster on one thread (and far faster when the CI machine is loaded); not the starter."""
    if "starter" in request.fixturenames:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
