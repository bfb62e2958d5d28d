"""Opening a neuron in the Explorer: a neuron table whose row click picks that neuron, and the deep link."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.neurons import format_neuron
from ui.common import PAGE_PATHS


def neuron_picker_table(table: pd.DataFrame, key: str, **kwargs) -> str | None:
    """``st.dataframe`` of neurons (columns layer, site, index) where a click selects a row: the neuron of a row
    clicked since the last run (once; selecting it again after a deselect counts again), else None."""
    event = st.dataframe(table, key=key, on_select="rerun", selection_mode="single-row", hide_index=True, **kwargs)
    rows = list(event.selection.rows)
    if not rows or rows[0] >= len(table):
        st.session_state.pop(f"{key}:seen", None)
        return None
    row = table.iloc[rows[0]]
    name = format_neuron((int(row["layer"]), str(row["site"]), int(row["index"])))
    if st.session_state.get(f"{key}:seen") == name:
        return None
    st.session_state[f"{key}:seen"] = name
    return name


def open_in_explorer(name: str) -> None:
    """Go to the Explorer page showing ``name`` (the URL becomes /explorer?neuron=<name>, a shareable link)."""
    st.switch_page(PAGE_PATHS["explorer"], query_params={"neuron": name})
