"""Opening a neuron in the Explorer: a neuron table whose row click picks that neuron, and the deep link."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.neurons import format_neuron
from ui.common import PAGE_PATHS
from ui.state import session


def neuron_picker_table(table: pd.DataFrame, key: str, **kwargs) -> str | None:
    """``st.dataframe`` of neurons (columns layer, site, index) where a click selects a row: the neuron of a row
    clicked since the last run (once; selecting it again after a deselect counts again), else None."""
    event = st.dataframe(table, key=key, on_select="rerun", selection_mode="single-row", hide_index=True, **kwargs)
    rows = list(event.selection.rows)
    if not rows or rows[0] >= len(table):
        session.picked_rows.pop(key, None)
        return None
    row = table.iloc[rows[0]]
    name = format_neuron((int(row["layer"]), str(row["site"]), int(row["index"])))
    if session.picked_rows.get(key) == name:
        return None
    session.picked_rows[key] = name
    return name


def open_in_explorer(name: str) -> None:
    """Go to the Explorer page showing ``name`` (the URL becomes /explorer?neuron=<name>, a shareable link)."""
    st.switch_page(PAGE_PATHS["explorer"], query_params={"neuron": name})
