"""Which settings produced a result: one line under each result, and what differs from the form now."""

from __future__ import annotations

from collections.abc import Mapping


def _langs(values) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


def identify_settings(result) -> dict[str, str]:
    """The settings an identification result was computed with, read from its manifest."""
    manifest = result.manifest
    counts = manifest.get("prompt_counts") or {}
    per_group = sorted(set(counts.values()))
    prompts = (f"{per_group[0]}" if len(per_group) == 1 else f"{per_group[0]}–{per_group[-1]}") if per_group else "?"
    p = manifest.get("p")
    return {
        "languages": _langs(manifest.get("languages") or list(result.ms)),
        "reference": _langs(manifest.get("hr") or result.hr),
        "importance": str(manifest.get("method", "?")),
        "top p": f"{100 * float(p):g}%" if p is not None else "?",
        "prompts per language and label": prompts,
        "sites": _langs(manifest.get("kinds")),
        "prompts": str(manifest.get("prompt_source") or "?"),
    }


def describe(settings: Mapping[str, str]) -> str:
    return " · ".join(f"{name}: **{value}**" for name, value in settings.items())


def differences(produced: Mapping[str, str], form: Mapping[str, str]) -> list[str]:
    """'top p: 20% (form: 3%)' for every setting the form now sets differently."""
    def same(a: str, b: str) -> bool:  # lists compare as sets: "en, bn" == "bn, en"
        return sorted(x.strip() for x in str(a).split(",")) == sorted(x.strip() for x in str(b).split(","))

    return [f"{name}: {produced[name]} (form: {value})" for name, value in form.items()
            if name in produced and not same(produced[name], value)]


def validation_settings(vres) -> dict[str, str]:
    manifest = vres.manifest
    extra = manifest.get("extra", manifest)  # `metrics.Manifest.to_dict`: the validation's own fields are "extra"
    summary = vres.summary
    per_language = (extra.get("prompts") or {}).get("n_per_language") or summary.get("prompts_per_language") or {}
    counts = sorted(set(per_language.values()))
    generation = manifest.get("generation") or {}
    neurons = extra.get("neurons") or {}
    return {
        "neurons": f"imported {neurons['imported']}" if neurons.get("imported") else "identification result",
        "languages": _langs(extra.get("languages")),
        "prompts per language": _langs(counts),
        "random seeds": str(len(extra.get("seeds") or [])),
        "reinforce α": _langs([f"{a:g}" for a in extra.get("alphas") or []]),
        "max new tokens": str(generation.get("max_new_tokens", "?")),
    }


def validation_neurons(vres) -> dict:
    """The neuron manifest a validation recorded (``{"imported": name, ...}`` for an imported set)."""
    manifest = vres.manifest
    return dict(manifest.get("extra", manifest).get("neurons") or {})


def train_settings(settings: Mapping) -> dict[str, str]:
    """The Fine-tune form's settings of a run (lists as 'a, b')."""
    return {name: (_langs(value) if isinstance(value, list | tuple) else str(value))
            for name, value in settings.items()}
