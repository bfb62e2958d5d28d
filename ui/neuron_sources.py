"""The neuron sets a session can point an intervention at: the bundled starter set, identified MS/SS sets, imports,
the user's own sets built on the Explorer page ("my sets"), one neuron sent from the Explorer, controls (the refusal
direction, every neuron)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import streamlit as st
import torch

from ssn_core.neurons import NeuronSet, format_neuron, parse_neuron
from ui.state import session

DEFAULT_CUSTOM_SET = "my set"
BUNDLE_TARGET = "Bundled starter set (MS / SS per language)"


@dataclass(frozen=True)
class Choice:
    """One entry of the neuron-set picker: ``kind`` bundle | ms | ss | ss_all | imported | custom | neuron | direction
    | none | everything (``name``: the imported file, the user's set, or the neuron as L<layer>.<site>.<index>).
    ``bundle`` is the bundled starter set's union of SS-Neurons; ``direction`` is not a neuron set but the refusal
    direction projected out of the residual stream (the positive control)."""

    kind: str
    language: str = ""
    name: str = ""

    def label(self) -> str:
        return {
            "bundle": "Bundled starter set: all SS-Neurons (union over languages)",
            "direction": "Refusal direction ablated (positive control)",
            "ms": f"MS-Neurons ({self.language})",
            "ss": f"SS-Neurons ({self.language})",
            "ss_all": "All SS-Neurons (union over languages)",
            "imported": f"Imported: {self.name}",
            "custom": f"My set: {self.name}",
            "neuron": f"Neuron {self.name} (from the Explorer)",
            "none": "No neuron set yet (identify or import one on the Neurons page)",
            "everything": "Every neuron of the chosen layers and sites (extreme demo)",
        }[self.kind]


def bundled():
    """The bundled starter result of this session (`ui.bundle`), or None."""
    return session.starter_bundle


def available_choices(with_direction: bool = False) -> list[Choice]:
    """Every set this session can use, the suggested one (`default_choice`) first; "every neuron" last.

    ``with_direction``: also offer the refusal direction (Chat; not a neuron set, so not for training or summaries).
    """
    choices: list[Choice] = []
    result = session.identify_result
    bundle = bundled()
    if bundle is not None and len(bundle.ss_all):
        choices.append(Choice("bundle"))
    if result is not None:
        if len(result.ss_all) and result is not bundle:  # the bundle's union is offered as "bundle" above
            choices.append(Choice("ss_all"))
        choices += [Choice("ss", lang) for lang, s in result.ss.items() if len(s)]
        choices += [Choice("ms", lang) for lang, s in result.ms.items() if len(s)]
    for name in session.neuron_sets_imported:
        choices.append(Choice("imported", name=name))
    choices += [Choice("custom", name=name) for name, s in custom_sets().items() if len(s)]
    if session.explorer_chat_neuron:
        choices.append(Choice("neuron", name=session.explorer_chat_neuron))
    if not choices:
        choices.append(Choice("none"))
    suggested = default_choice(choices)
    controls = [Choice("direction")] if with_direction and refusal_direction() is not None else []
    return [suggested] + [c for c in choices if c != suggested] + controls + [Choice("everything")]


def refusal_direction():
    """The refusal direction (`ssn_core.direction.RefusalDirection`) of this session's result, else of the bundle."""
    for result in (session.identify_result, bundled()):
        if result is not None and result.direction is not None:
            return result.direction
    return None


def additive_offsets(neurons: NeuronSet, beta: float) -> tuple[dict, str]:
    """(offsets, HR language) of the additive reinforcement: β times each neuron's mean activation on the HR
    language's harmful prompts (`validation.shift_offsets`). SSNError when no result kept those means or they do not
    cover the set's site kinds."""
    from ssn_core.errors import SSNError
    from ssn_core.validation import shift_offsets

    means = activation_means()
    if means is None:
        raise SSNError("the additive reinforcement needs mean activations, which this result did not keep; identify "
                       "the neurons again (the Neurons page and `ssn identify` keep them)")
    table, hr = means
    covered = table.signed[(hr, "harmful")]
    missing = sorted({kind for _, kind in neurons.neurons} - set(covered))
    if missing:
        raise SSNError(f"the mean activations cover the sites {', '.join(covered)}, not {', '.join(missing)}: leave "
                       f"{', '.join(missing)} out of the Sites")
    return shift_offsets(neurons, table, hr, beta), hr


def activation_means():
    """(activation `ScoreTable`, HR language) for the additive reinforcement: this session's result's, else the
    bundle's; None when neither kept the HR language's mean activations on harmful prompts."""
    for result in (session.identify_result, bundled()):
        if result is None or result.activations is None:
            continue
        hr = (result.hr or ("en",))[0]
        if (hr, "harmful") in (result.activations.signed or {}):
            return result.activations, hr
    return None


def _measured_margins() -> dict[Choice, float]:
    """From this session's validation result: how much more suppressing each target lowered refusal than its
    random control did (refusal-drop margin, averaged over languages), for targets that beat the control."""
    vres = session.validation_result
    comparisons = vres.summary.get("languages", {}) if vres is not None else {}
    from ui.provenance import validation_neurons

    imported = validation_neurons(vres).get("imported") if vres is not None else None
    margins: dict[Choice, list[float]] = {}
    for language, targets in comparisons.items():
        for target, cmp in targets.items():
            if not cmp.get("beats_random"):
                continue
            if target == "ss_all":  # an imported (or own) set is validated as the "all SS" target
                own = imported in custom_sets() and imported not in session.neuron_sets_imported
                choice = Choice("custom" if own else "imported", name=imported) if imported else (
                    Choice("bundle") if validation_neurons(vres).get("bundle") else Choice("ss_all"))
            else:
                choice = Choice(target, language)
            margins.setdefault(choice, []).append(float(cmp.get("margin", 0.0)))
    return {choice: sum(values) / len(values) for choice, values in margins.items()}


def default_choice(choices: list[Choice]) -> Choice:
    """THE rule for the set a page suggests first (Chat's default intervention): the most effective set.

    1. measured: the set whose suppression beat its random control by the largest margin in this session's
       validation (Validate page);
    1.5. else the bundled starter set's union of SS-Neurons (computed with the default recipe on many prompts, and
       checked by the lead on held-out prompts: `make starter-neurons`);
    2. else the union of all SS-Neurons (the paper's target: suppressing it breaks safety across NHR languages);
    3. else the largest per-language SS set, then an imported set, then one of the user's own sets, then the
       largest MS set, then a neuron sent from the Explorer;
    4. else "no set yet". Never "every neuron": that only breaks the model; never the refusal direction, which is
       a control and not a neuron set.
    """
    usable = [c for c in choices if c.kind not in ("everything", "none")]
    margins = {c: m for c, m in _measured_margins().items() if c in usable}
    if margins:
        return max(margins, key=margins.get)
    result = session.identify_result
    size = {c: len(resolve(c, None)) for c in usable if c.kind in ("ss", "ms") and result is not None}
    for kind in ("bundle", "ss_all", "ss", "imported", "custom", "ms", "neuron"):
        of_kind = [c for c in usable if c.kind == kind]
        if of_kind:
            return max(of_kind, key=lambda c: size.get(c, 0))
    return next((c for c in choices if c.kind == "none"), Choice("none"))


def everything(sites) -> NeuronSet:
    """All neurons of every site (restricted later by layer range and kinds)."""
    return NeuronSet({site.key: torch.arange(site.size) for site in sites}, {"name": "everything"})


def resolve(choice: Choice, sites) -> NeuronSet:
    result = session.identify_result
    if choice.kind == "bundle":
        return bundled().ss_all
    if choice.kind == "direction":  # not a neuron set: the page ablates `refusal_direction()` instead
        return NeuronSet()
    if choice.kind == "ms":
        return result.ms[choice.language]
    if choice.kind == "ss":
        return result.ss[choice.language]
    if choice.kind == "ss_all":
        return result.ss_all
    if choice.kind == "imported":
        return session.neuron_sets_imported[choice.name]
    if choice.kind == "custom":
        return custom_sets()[choice.name]
    if choice.kind == "neuron":
        return NeuronSet.from_triples([parse_neuron(choice.name)], {"name": choice.name, "set": "neuron"})
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

    # What an identification result also has and a bare set has not (so pages read every target alike).
    @property
    def item_ids(self) -> frozenset[str]:
        return frozenset()

    @property
    def direction(self) -> None:
        return None

    @property
    def activations(self) -> None:
        return None

    @property
    def is_bundle(self) -> bool:
        return False

    @property
    def manifest(self) -> dict:
        return {"imported": self.name, "neurons": len(self.neuron_set), **{
            k: v for k, v in self.neuron_set.meta.items() if isinstance(v, str | int | float | list)}}


def validation_targets() -> dict[str, object]:
    """What the Validate page can validate: the identification result and each imported set (label -> target)."""
    targets: dict[str, object] = {}
    result = session.identify_result
    bundle = bundled()
    if result is not None and result is not bundle:  # this session's own identification first
        targets["Identification result (MS / SS per language)"] = result
    if bundle is not None:
        targets[BUNDLE_TARGET] = bundle
    for name, neuron_set in session.neuron_sets_imported.items():
        targets[f"Imported: {name} ({len(neuron_set):,} neurons)"] = SetAsResult(neuron_set, name)
    for name, neuron_set in custom_sets().items():
        if len(neuron_set):
            targets[f"My set: {name} ({len(neuron_set):,} neurons)"] = SetAsResult(neuron_set, name)
    return targets


def add_imported(name: str, neuron_set: NeuronSet) -> None:
    imported = dict(session.neuron_sets_imported)
    imported[name] = neuron_set
    session.neuron_sets_imported = imported


# ----- the user's own sets (built on the Explorer page) ---------------------------------------------------
def custom_sets() -> dict[str, NeuronSet]:
    return dict(session.custom_sets)


def active_custom_set() -> str:
    """The set "add to my set" adds to (created on first use)."""
    return session.custom_set_active or DEFAULT_CUSTOM_SET


def _store(name: str, neuron_set: NeuronSet) -> NeuronSet:
    sets = custom_sets()
    sets[name] = NeuronSet(neuron_set.neurons, {**neuron_set.meta, "name": name, "set": "custom"})
    session.custom_sets = sets
    return sets[name]


def add_to_custom_set(neurons: Iterable[tuple[int, str, int]], name: str | None = None) -> NeuronSet:
    name = name or active_custom_set()
    session.custom_set_active = name
    return _store(name, custom_sets().get(name, NeuronSet()) | NeuronSet.from_triples(neurons))


def remove_from_custom_set(name: str, neurons: Iterable[tuple[int, str, int]]) -> NeuronSet:
    return _store(name, custom_sets().get(name, NeuronSet()) - NeuronSet.from_triples(neurons))


def rename_custom_set(old: str, new: str) -> None:
    sets = custom_sets()
    if old in sets and new and new != old:
        neuron_set = sets.pop(old)
        session.custom_sets = sets
        _store(new, neuron_set)
    if active_custom_set() == old:
        session.custom_set_active = new


def delete_custom_set(name: str) -> None:
    sets = custom_sets()
    sets.pop(name, None)
    session.custom_sets = sets
    if active_custom_set() == name:
        session.custom_set_active = next(iter(sets), DEFAULT_CUSTOM_SET)


def send_neuron_to_chat(neuron: tuple[int, str, int]) -> None:
    """Chat's column B suppresses this one neuron next time the Chat page runs (every layer and site kept)."""
    name = format_neuron(neuron)
    session.explorer_chat_neuron = name
    st.session_state["chat_source"] = Choice("neuron", name=name).label()
    st.session_state["chat_action"] = "Suppress (×0)"
    st.session_state["chat_random"] = False
    for key in ("chat_layers", "chat_kinds"):  # a narrowed layer range or site list could hide the neuron
        st.session_state.pop(key, None)
