"""Opening a neuron in the Explorer: a neuron table whose row click picks that neuron, and the deep link."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.neurons import format_neuron
from ui.common import PAGE_PATHS


def neuron_picker_table(table: pd.DataFrame, key: str, **kwargs) -> None:
    """``st.dataframe`` of neurons (columns layer, site, index): clicking a row stores it for `take_pick`."""

    def picked() -> None:
        rows = st.session_state[key].selection.rows
        if rows and rows[0] < len(table):
            row = table.iloc[rows[0]]
            st.session_state[f"{key}:picked"] = format_neuron((int(row["layer"]), str(row["site"]), int(row["index"])))

    st.dataframe(table, key=key, on_select=picked, selection_mode="single-row", hide_index=True, **kwargs)


def take_pick(key: str) -> str | None:
    """The neuron clicked in the picker table ``key`` since the last run (once)."""
    return st.session_state.pop(f"{key}:picked", None)


def open_in_explorer(name: str) -> None:
    """Go to the Explorer page showing ``name`` (the URL becomes /explorer?neuron=<name>, a shareable link)."""
    st.switch_page(PAGE_PATHS["explorer"], query_params={"neuron": name})
