"""Bundled neuron sets: a small identify result shipped with SSN Lab, so that the app works from the first second.

A bundle is an identify result folder (same manifest format: `IdentifyResult.load` reads it, and so does every
command that takes ``--neurons``) without what is too big for git or only needed to recompute it:

- kept: ``sets/*.json`` (MS / SS per language, all SS, shared SS), ``counts.csv``, ``overlap.csv``,
  ``direction.safetensors`` (the refusal direction: the positive control), and ``activations.safetensors`` with only
  the high-resource language's signed mean activations on harmful prompts (what `validation.shift_offsets`, the
  additive reinforcement, reads);
- left out: ``scores.safetensors`` (the score table: [layers, neurons] per language and label, megabytes for the
  starter), ``pairs.json`` and every other activation mean;
- ``manifest.json``: the identify manifest (item ids included, so validation stays held out) plus
  ``"bundle": {model_source, model_fingerprint, origin, left_out, ...}``.

Two optional files may sit beside them and are kept when a bundle is rewritten: ``walkthrough.json`` (the Learn
page's guided walkthrough: its language and prompts) and ``delta.safetensors`` (a targeted fine-tune's delta for
the walkthrough's last step).

`find_bundle(lm)` looks in ``assets/starter_neurons/`` (or ``$SSN_STARTER_NEURONS``) for the bundle made on the
loaded model: same model source and same neuron-geometry fingerprint. ``ssn bundle --neurons RUN --out DIR`` writes
one; ``make starter-neurons`` regenerates the starter's.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.identify import MANIFEST_FORMAT, IdentifyResult
from ssn_core.io import read_manifest, writing_result_dir
from ssn_core.scoring import ScoreTable

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

BUNDLE_ROOT = Path(__file__).resolve().parent.parent / "assets" / "starter_neurons"
ROOT_ENV = "SSN_STARTER_NEURONS"  # another folder of bundles (tests, or a lab's own)
BUNDLE_VERSION = 1
WALKTHROUGH_FILE = "walkthrough.json"
DELTA_FILE = "delta.safetensors"
EXTRA_FILES = (WALKTHROUGH_FILE, DELTA_FILE)
LEFT_OUT = ["scores.safetensors (the score table)", "pairs.json (the scored prompt-reply pairs)",
            "activation means other than the high-resource language's harmful ones"]


def bundle_root() -> Path:
    """The folder holding one sub-folder per bundled model: ``$SSN_STARTER_NEURONS``, else
    ``assets/starter_neurons``."""
    value = os.environ.get(ROOT_ENV, "").strip()
    return Path(value).expanduser() if value else BUNDLE_ROOT


def folder_name(model_source: str) -> str:
    """``starter:qwen2.5-coder-0.5b`` -> ``qwen2.5-coder-0.5b`` (the bundle's folder under `bundle_root`)."""
    name = str(model_source).strip().split(":", 1)[-1].rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name) or "model"


def _same_source(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.strip().lower() == b.strip().lower()


# ----------------------------------------------------------------------------------------------------------------
# Making a bundle


def _hr_harmful_activations(result: IdentifyResult) -> ScoreTable | None:
    """Only the signed mean activations of the HR language's harmful prompts (the additive reinforcement's input)."""
    table = result.activations
    hr = (result.hr or ("en",))[0]
    if table is None:
        return None
    signed = (table.signed or {}).get((hr, "harmful"))
    if signed is None:
        return None
    counts = {(hr, "harmful"): table.counts.get((hr, "harmful"), 0)}
    meta = {**table.meta, "bundle": f"signed means of {hr} harmful prompts only"}
    return ScoreTable(method=table.method, aggregate=table.aggregate, groups={}, counts=counts, meta=meta,
                      signed={(hr, "harmful"): dict(signed)})


def make_bundle(result: IdentifyResult, model_source: str | None = None, origin: str | None = None) -> IdentifyResult:
    """The bundle of ``result``: the same sets, counts, overlap and direction, no scores or pairs, and only the HR
    language's harmful activation means; its manifest says so (``"bundle"``) and names the model source."""
    source = model_source or result.manifest.get("model_source")
    if not source:
        raise SSNError("the identify result does not record its model source; give the source the bundle is for "
                       "(--model-source starter:qwen2.5-coder-0.5b)")
    fingerprint = result.manifest.get("model_fingerprint")
    if not fingerprint:
        raise SSNError("the identify result does not record its model's fingerprint, so a bundle of it could not be "
                       "checked against the loaded model; identify again with this version of SSN Lab")
    activations = _hr_harmful_activations(result)
    hr = (result.hr or ("en",))[0]
    info = {"version": BUNDLE_VERSION, "model_source": source, "model_fingerprint": fingerprint,
            "origin": origin, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "left_out": list(LEFT_OUT),
            "activations": None if activations is None else f"signed means of {hr} harmful prompts",
            "direction_layer": None if result.direction is None else result.direction.layer,
            "regenerate": "make starter-neurons (ssn identify with the default recipe, then ssn bundle)"}
    manifest = {k: v for k, v in result.manifest.items() if k not in ("format", "files")}
    manifest.update(model_source=source, bundle=info)
    return replace(result, scores=None, pairs=None, activations=activations, manifest=manifest)


def _read_extra(path: Path, name: str, fingerprint: str | None) -> bytes:
    """The bytes of an extra file, checked: the walkthrough is a JSON object, the delta an SSN Lab delta of the same
    model geometry."""
    if not path.is_file():
        raise SSNError(f"{path} does not exist (the {name} to put into the bundle)")
    if name == WALKTHROUGH_FILE:
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NeuronFileError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise NeuronFileError(f"{path} must hold a JSON object (the walkthrough's settings)")
    else:
        from ssn_core.delta import NeuronDelta

        delta = NeuronDelta.load(path)
        recorded = delta.meta.get("model_fingerprint")
        if fingerprint and recorded and recorded != fingerprint:
            raise NeuronFileError(f"{path} was trained on another model (fingerprint {recorded}); the bundle's model "
                                  f"has {fingerprint}")
    return path.read_bytes()


def save_bundle(result: IdentifyResult, out: str | os.PathLike, *, model_source: str | None = None,
                origin: str | None = None, walkthrough: str | os.PathLike | None = None,
                delta: str | os.PathLike | None = None) -> Path:
    """Write the bundle of ``result`` to ``out`` as one result folder (replaced as a whole).

    ``walkthrough`` / ``delta``: files to put beside it as ``walkthrough.json`` / ``delta.safetensors``; when not
    given, those of an earlier bundle at ``out`` are kept.
    """
    bundle = make_bundle(result, model_source, origin or (result.manifest.get("bundle") or {}).get("origin"))
    fingerprint = bundle.manifest.get("model_fingerprint")
    out = Path(out).expanduser()
    extras: dict[str, bytes] = {}
    earlier = read_manifest(out) if out.is_dir() else None
    for name, given in ((WALKTHROUGH_FILE, walkthrough), (DELTA_FILE, delta)):
        if given is not None:
            extras[name] = _read_extra(Path(given).expanduser(), name, fingerprint)
        elif earlier is not None and earlier.get("bundle") and (out / name).is_file():
            extras[name] = _read_extra(out / name, name, fingerprint)
    with writing_result_dir(out, MANIFEST_FORMAT) as tmp:
        bundle.write_files(tmp)
        for name, data in extras.items():
            (tmp / name).write_bytes(data)
    return out


def bundle_size(folder: str | os.PathLike) -> int:
    """Bytes of every file in a bundle folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------------------------------
# Finding and loading the bundle of a loaded model


def _model_identity(lm: LoadedModel) -> tuple[str | None, str]:
    return getattr(getattr(lm, "summary", None), "source", None), lm.sites.fingerprint()


def bundle_problem(folder: str | os.PathLike, lm: LoadedModel) -> str | None:
    """Why the bundle in ``folder`` is not for ``lm`` (None when its model source and fingerprint match)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    info = (manifest or {}).get("bundle")
    if manifest is None or manifest.get("format") != MANIFEST_FORMAT or not isinstance(info, dict):
        return f"{folder} is not an SSN Lab neuron bundle (no bundle manifest.json)"
    source, fingerprint = _model_identity(lm)
    if not _same_source(info.get("model_source"), source):
        return (f"{folder} is the bundle of {info.get('model_source')}; the loaded model is {source or 'unnamed'}, so "
                "its neurons would not mean anything here")
    if manifest.get("model_fingerprint") != fingerprint:
        return (f"{folder} was made on a model with neuron-geometry fingerprint {manifest.get('model_fingerprint')}; "
                f"the loaded {source} has {fingerprint}")
    return None


def find_bundle(lm: LoadedModel, root: str | os.PathLike | None = None) -> Path | None:
    """The bundle folder under ``root`` (default `bundle_root`) made on ``lm``: same source and fingerprint; None when
    there is none (no asset folder, or no bundle for this model)."""
    root = Path(root) if root is not None else bundle_root()
    if not root.is_dir():
        return None
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return None
    return next((folder for folder in folders if bundle_problem(folder, lm) is None), None)


def load_bundle(folder: str | os.PathLike, lm: LoadedModel) -> IdentifyResult:
    """The bundle in ``folder`` as an `IdentifyResult` (``scores`` None), checked against the loaded model."""
    problem = bundle_problem(folder, lm)
    if problem is not None:
        raise NeuronFileError(problem)
    return IdentifyResult.load(folder, lm.sites)


def extra_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``walkthrough.json`` / ``delta.safetensors`` of a bundle folder, if present."""
    path = Path(folder) / name
    return path if path.is_file() else None
