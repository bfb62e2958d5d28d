"""`load_model(spec)`: which kind of source a spec names, and the load of each, ending in one common tail.

A spec's source is a starter name, a .gguf file (or ``gguf_file`` inside a directory), a local model directory
or a hub id, tried in that order. Local directories and hub ids go through `_load_pretrained` (config first,
then the checks of `ssn_core.loading.preflight`, then tokenizer and weights); GGUF files through
`ssn_core.loading.gguf`; starter models through their safetensors cache (`ssn_core.loading.starter`), converted
from the GGUF when it is missing or damaged. Every path ends in `finish_loaded`: pad token, `ModelSummary`, and
the neuron sites built at once, so that an architecture SSN Lab cannot map fails at load time.

Only safetensors weights are read (``use_safetensors=True``): pickled ``.bin`` checkpoints are refused, as
everywhere in SSN Lab. ``trust_remote_code`` is off unless asked for: it runs code from the model repository.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from ssn_core.errors import ModelLoadError
from ssn_core.loading.gguf import _GGUF_ARCH_TO_MODEL_TYPE, _load_gguf, _place, inspect_gguf
from ssn_core.loading.loaded import LoadedModel
from ssn_core.loading.preflight import (
    _check_architecture,
    _check_memory,
    _count_params_meta,
    _cuda_device,
    _first_line,
    _quantization_config,
    _resolve_device,
    _resolve_dtype,
    _safetensors_size_problem,
    _torch_dtype,
)
from ssn_core.loading.spec import ModelSpec, ModelSummary, Progress
from ssn_core.loading.starter import (
    STARTERS,
    _damaged_note,
    _nonfinite_weight,
    _rebuilding,
    _save_cache,
    assemble_starter,
    check_starter_cache,
    get_starter,
    starter_cache_ready,
)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "true", "yes", "on")


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
        device_map=(device if device != "auto"
                    else "auto (" + ", ".join(sorted({str(p.device) for p in lm_model.parameters()})) + ")"),
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
            raise ModelLoadError(
                f"GGUF file not found: {gguf_path} (downloading GGUF files from the hub is not supported)")
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
