"""The neuron sets a session can point an intervention at: identified MS/SS sets, imports, controls."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st
import torch

from ssn_core.neurons import NeuronSet


@dataclass(frozen=True)
class Choice:
    """One entry of the neuron-set picker: ``kind`` ms | ss | ss_all | imported | everything."""

    kind: str
    language: str = ""
    name: str = ""

    def label(self) -> str:
        return {
            "ms": f"MS-Neurons ({self.language})",
            "ss": f"SS-Neurons ({self.language})",
            "ss_all": "All SS-Neurons (union over languages)",
            "imported": f"Imported: {self.name}",
            "everything": "Every neuron of the chosen layers and sites (extreme demo)",
        }[self.kind]


def available_choices() -> list[Choice]:
    choices: list[Choice] = []
    result = st.session_state.get("identify_result")
    if result is not None:
        if len(result.ss_all):
            choices.append(Choice("ss_all"))
        choices += [Choice("ss", lang) for lang, s in result.ss.items() if len(s)]
        choices += [Choice("ms", lang) for lang, s in result.ms.items() if len(s)]
    for name in st.session_state.get("neuron_sets_imported", {}):
        choices.append(Choice("imported", name=name))
    choices.append(Choice("everything"))
    return choices


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
    return everything(sites)


def add_imported(name: str, neuron_set: NeuronSet) -> None:
    imported = dict(st.session_state.get("neuron_sets_imported", {}))
    imported[name] = neuron_set
    st.session_state["neuron_sets_imported"] = imported
