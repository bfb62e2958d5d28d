"""The neuron sets a session can point an intervention at: identified MS/SS sets, imports, controls."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
import torch

from ssn_core.neurons import NeuronSet


@dataclass(frozen=True)
class Choice:
    """One entry of the neuron-set picker: ``kind`` ms | ss | ss_all | imported | none | everything."""

    kind: str
    language: str = ""
    name: str = ""

    def label(self) -> str:
        return {
            "ms": f"MS-Neurons ({self.language})",
            "ss": f"SS-Neurons ({self.language})",
            "ss_all": "All SS-Neurons (union over languages)",
            "imported": f"Imported: {self.name}",
            "none": "No neuron set yet (identify or import one on the Neurons page)",
            "everything": "Every neuron of the chosen layers and sites (extreme demo)",
        }[self.kind]


def available_choices() -> list[Choice]:
    """Every set this session can use, the suggested one (`default_choice`) first; "every neuron" last."""
    choices: list[Choice] = []
    result = st.session_state.get("identify_result")
    if result is not None:
        if len(result.ss_all):
            choices.append(Choice("ss_all"))
        choices += [Choice("ss", lang) for lang, s in result.ss.items() if len(s)]
        choices += [Choice("ms", lang) for lang, s in result.ms.items() if len(s)]
    for name in st.session_state.get("neuron_sets_imported", {}):
        choices.append(Choice("imported", name=name))
    if not choices:
        choices.append(Choice("none"))
    suggested = default_choice(choices)
    return [suggested] + [c for c in choices if c != suggested] + [Choice("everything")]


def _measured_margins() -> dict[Choice, float]:
    """From this session's validation result: how much more suppressing each target lowered refusal than its
    random control did (refusal-drop margin, averaged over languages), for targets that beat the control."""
    vres = st.session_state.get("validation_result")
    comparisons = getattr(vres, "summary", {}).get("languages", {}) if vres is not None else {}
    from ui.provenance import validation_neurons

    imported = validation_neurons(vres).get("imported") if vres is not None else None
    margins: dict[Choice, list[float]] = {}
    for language, targets in comparisons.items():
        for target, cmp in targets.items():
            if not cmp.get("beats_random"):
                continue
            if target == "ss_all":  # an imported set is validated as the "all SS" target
                choice = Choice("imported", name=imported) if imported else Choice("ss_all")
            else:
                choice = Choice(target, language)
            margins.setdefault(choice, []).append(float(cmp.get("margin", 0.0)))
    return {choice: sum(values) / len(values) for choice, values in margins.items()}


def default_choice(choices: list[Choice]) -> Choice:
    """THE rule for the set a page suggests first (Chat's default intervention): the most effective set.

    1. measured: the set whose suppression beat its random control by the largest margin in this session's
       validation (Validate page);
    2. else the union of all SS-Neurons (the paper's target: suppressing it breaks safety across NHR languages);
    3. else the largest per-language SS set, then an imported set, then the largest MS set;
    4. else "no set yet". Never "every neuron": that only breaks the model.
    (A bundled starter set, once there is one, goes in as rule 1.5: before the SS union, after measured sets.)
    """
    usable = [c for c in choices if c.kind not in ("everything", "none")]
    margins = {c: m for c, m in _measured_margins().items() if c in usable}
    if margins:
        return max(margins, key=margins.get)
    result = st.session_state.get("identify_result")
    size = {c: len(resolve(c, None)) for c in usable if c.kind in ("ss", "ms") and result is not None}
    for kind in ("ss_all", "ss", "imported", "ms"):
        of_kind = [c for c in usable if c.kind == kind]
        if of_kind:
            return max(of_kind, key=lambda c: size.get(c, 0))
    return next((c for c in choices if c.kind == "none"), Choice("none"))


def everything(sites) -> NeuronSet:
    """All neurons of every site (restricted later by layer range and kinds)."""
    return NeuronSet({site.key: torch.arange(site.size) for site in sites}, {"name": "everything"})


def resolve(choice: Choice, sites) -> NeuronSet:
    result = st.session_state.get("identify_result")
    if choice.kind == "ms":
        return result.ms[choice.language]
    if choice.kind == "ss":
        return result.ss[choice.language]
    if choice.kind == "ss_all":
        return result.ss_all
    if choice.kind == "imported":
        return st.session_state["neuron_sets_imported"][choice.name]
    if choice.kind == "none":
        return NeuronSet()
    return everything(sites)


@dataclass
class SetAsResult:
    """One neuron set in the shape `validation.validate` reads (``ms`` / ``ss`` / ``ss_all``): the set is the
    "all SS" target, so Validate suppresses it against matched random controls and reinforces it."""

    neuron_set: NeuronSet
    name: str

    @property
    def ms(self) -> dict:
        return {}

    @property
    def ss(self) -> dict:
        return {}

    @property
    def ss_all(self) -> NeuronSet:
        return self.neuron_set

    @property
    def hr(self) -> tuple[str, ...]:
        return ("en",)

    @property
    def manifest(self) -> dict:
        return {"imported": self.name, "neurons": len(self.neuron_set), **{
            k: v for k, v in self.neuron_set.meta.items() if isinstance(v, str | int | float | list)}}


def validation_targets() -> dict[str, object]:
    """What the Validate page can validate: the identification result and each imported set (label -> target)."""
    targets: dict[str, object] = {}
    result = st.session_state.get("identify_result")
    if result is not None:
        targets["Identification result (MS / SS per language)"] = result
    for name, neuron_set in st.session_state.get("neuron_sets_imported", {}).items():
        targets[f"Imported: {name} ({len(neuron_set):,} neurons)"] = SetAsResult(neuron_set, name)
    return targets


def add_imported(name: str, neuron_set: NeuronSet) -> None:
    imported = dict(st.session_state.get("neuron_sets_imported", {}))
    imported[name] = neuron_set
    st.session_state["neuron_sets_imported"] = imported
