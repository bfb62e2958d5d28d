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
from ui.common import show_error

st.set_page_config(page_title="SSN Lab", page_icon=":material/shield:", layout="wide")
state.keep_widget_state()  # forms and settings remember their values when you switch pages

# The pages live in app_pages/, not pages/: with a pages/ folder Streamlit runs a deep link (/chat) as an
# old-style page, skipping this script (no navigation, no model) until someone opens the root URL.
pages = [
    st.Page("app_pages/1_model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("app_pages/2_neurons.py", title="Neurons", icon=":material/biotech:", url_path="neurons"),
    st.Page("app_pages/7_explorer.py", title="Explorer", icon=":material/travel_explore:", url_path="explorer"),
    st.Page("app_pages/3_chat.py", title="Chat (A/B)", icon=":material/forum:", url_path="chat"),
    st.Page("app_pages/4_validate.py", title="Validate", icon=":material/bar_chart:", url_path="validate"),
    st.Page("app_pages/5_finetune.py", title="Fine-tune", icon=":material/tune:", url_path="finetune"),
    st.Page("app_pages/6_learn.py", title="Learn", icon=":material/school:", url_path="learn"),
]
navigation = st.navigation(pages)

# First visit of a session: load the default model (shared cache, so only the first session waits).
if state.current_key() is None and state.autoload_enabled() and not st.session_state.get("autoload_tried"):
    st.session_state["autoload_tried"] = True
    key = state.SpecKey(state.default_source())
    with st.spinner(f"Loading {key.source} (first time only)…"):
        try:
            state.load(key)
        except Exception as exc:  # noqa: BLE001 - the Model page lets the user pick another model
            st.session_state["autoload_error"] = exc

with st.sidebar:
    key = state.current_key()
    st.caption(f"Model: `{key.label()}`" if key else "No model loaded")
    if st.session_state.get("autoload_error") is not None and key is None:
        show_error(st.session_state["autoload_error"])

navigation.run()
