"""SSN Lab: find, test and train the safety neurons that languages share in a multilingual LLM.

    streamlit run app.py                            # starter model (offline)
    SSN_APP_MODEL=tiny:qwen2 streamlit run app.py   # tiny random model (tests, demos without weights)

Every page is a thin layer over `ssn_core`; the model is shared by all browser sessions
(`st.cache_resource`), everything else (results, chat, interventions) is per session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # `streamlit run` from another directory
    sys.path.insert(0, str(ROOT))

from ui import state
from ui.common import navigation_pages, show_error
from ui.state import session

st.set_page_config(page_title="SSN Lab", page_icon=":material/shield:", layout="wide")
state.keep_widget_state()  # forms and settings remember their values when you switch pages

navigation = st.navigation(navigation_pages())  # the pages: `ui.common.PAGES`

# First visit of a session: load the default model (shared cache, so only the first session waits).
if state.current_key() is None and state.autoload_enabled() and not session.autoload_tried:
    session.autoload_tried = True
    key = state.SpecKey(state.default_source())
    with st.spinner(f"Loading {key.source} (first time only)…"):
        try:
            state.load(key)
        except Exception as exc:  # noqa: BLE001 - the Model page lets the user pick another model
            session.autoload_error = exc

with st.sidebar:
    key = state.current_key()
    st.caption(f"Model: `{key.label()}`" if key else "No model loaded")
    if session.autoload_error is not None and key is None:
        show_error(session.autoload_error)

navigation.run()
