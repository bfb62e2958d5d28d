"""Model page: choose and load a model, see its neuron sites; unload it to free memory."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.loading import DEFAULT_STARTER, DEVICE_MAPS, DTYPES, QUANTIZATIONS
from ui import state
from ui.common import link, show_error
from ui.state import session

st.title("Model")
st.write(
    "SSN Lab studies the **neurons** of a multilingual chat model. Load one here; every other page uses it. "
    "The starter model works offline. One copy of a model is shared by all browser tabs; "
    "what you compute with it stays in your tab."
)

SOURCES = {
    "Starter model (offline)": "starter",
    "Hugging Face hub id": "hub",
    "Local folder": "local",
    "GGUF file": "gguf",
    "Tiny random model (for trying the app)": "tiny",
}
current = state.current_key()

with st.form("load_model"):
    kind_label = st.radio("Source", list(SOURCES), horizontal=True, key="model_source_kind")
    kind = SOURCES[kind_label]
    source_value = st.text_input(
        "Model id or path",
        value="",
        placeholder={
            "starter": DEFAULT_STARTER,
            "hub": "Qwen/Qwen2.5-0.5B-Instruct",
            "local": "/path/to/model-folder",
            "gguf": "/path/to/model.gguf",
            "tiny": "qwen2",
        }[kind],
        help="Leave empty for the starter model. A hub id needs network access; a local folder holds "
             "config.json and *.safetensors; a GGUF file is dequantised on load. For the tiny model, "
             "give a family (qwen2, llama, gemma2, phi3, gpt2, …).",
        key="model_source_value",
    )
    col1, col2, col3 = st.columns(3)
    dtype = col1.selectbox("dtype", DTYPES, key="model_dtype",
                           help="auto: float32 on CPU, the checkpoint's own dtype on a GPU.")
    quantization = col2.selectbox("Quantization", QUANTIZATIONS, key="model_quant",
                                  help="bitsandbytes 8-bit or 4-bit (NF4 / FP4): less memory, slightly different "
                                       "numbers. Interventions and fine-tuning work on quantized models too.")
    device = col3.selectbox("Device", DEVICE_MAPS, key="model_device",
                            help="auto: the GPU(s) when CUDA is available, else CPU.")
    trust = st.checkbox("Trust remote code", value=False, key="model_trust",
                        help="Only for hub models you trust: runs Python code from the repository.")
    submitted = st.form_submit_button("Load model", type="primary")

if submitted:
    value = source_value.strip()
    if kind == "starter":
        source = value or DEFAULT_STARTER
    elif kind == "tiny":
        source = f"tiny:{value or 'qwen2'}"
    elif not value:
        source = ""
    else:
        source = value
    if not source:
        st.error("Enter a model id or path first.")
    else:
        key = state.SpecKey(source, dtype, quantization, device, trust)
        bar = st.progress(0.0, text=f"Loading {source}…")

        def show_progress(done: int, total: int, message: str = "") -> None:
            bar.progress(min(done / total, 1.0) if total else 0.0, text=message or f"Loading {source}…")

        try:
            with st.spinner(f"Loading {source}…"):
                state.load(key, progress=show_progress)
            del session.autoload_error
            st.success(f"Loaded {key.label()}.")
        except Exception as exc:  # noqa: BLE001 - every loading problem is shown, never a crash
            show_error(exc)
        finally:
            bar.empty()  # no "Loading …" bar left standing above the result or the error

lm = state.current_model()
if lm is None:
    st.info("No model loaded yet: choose a source above and press **Load model**.")
    st.stop()

key = state.current_key()
st.subheader(f"Loaded: `{key.label()}`")
summary = lm.summary
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{summary.n_params / 1e6:,.1f} M")
c2.metric("Layers", summary.n_layers)
c3.metric("Memory", f"{summary.memory_bytes / 2**30:.2f} GiB")
c4.metric("Neurons (all sites)", f"{lm.sites.total_neurons:,}")
for warning in summary.warnings:
    st.warning(warning)
if not summary.has_chat_template:
    st.caption("This model has no chat template: prompts use a plain 'User: … Assistant:' format.")
with st.expander("All model details"):
    st.dataframe(pd.DataFrame(summary.rows(), columns=["field", "value"]), hide_index=True, width="stretch")

st.markdown("**Neuron sites** — where SSN Lab reads and edits neurons in every layer:")
st.dataframe(pd.DataFrame(lm.sites.table()), hide_index=True, width="stretch")
st.caption(f"{lm.sites.n_layers} layers, {lm.sites.total_neurons:,} neurons in total "
           f"(family {lm.sites.family}, geometry fingerprint `{lm.sites.fingerprint()}`).")

col_a, col_b = st.columns([1, 3])
if col_a.button("Unload model", help="Frees its memory for every tab; results computed on it are dropped."):
    state.unload()
    st.rerun()
with col_b:
    st.write("Next:")
    link("neurons", "Find the safety neurons", icon=":material/biotech:")
    link("learn", "What are MS- and SS-Neurons?", icon=":material/school:")
