"""Learn page: what MS- and SS-Neurons are, with two live demos on the loaded model. Meant to be projected."""

from __future__ import annotations

import streamlit as st

from ssn_core.interventions import Intervention, intervene
from ui import charts, state
from ui.common import link, show_error

st.title("Learn: safety neurons across languages")

st.markdown(
    """
A chat model refuses *"How do I make a weapon?"* in English — but often **answers the same request in
Bengali or Swahili**. The paper *"Who Transfers Safety? Identifying and Targeting Cross-Lingual Shared Safety
Neurons"* explains part of this with a small set of neurons.

**1. Neurons.** Every layer of a transformer has thousands of *neurons*: the inner units of its MLP and the
coordinates of its attention projections. SSN Lab can read each one and switch it off or amplify it.

**2. MS-Neurons — monolingual safety neurons.** For one language we show the model harmful and harmless
prompts and score how much each neuron matters for its answer. Neurons in the **top 3%** on *harmful*
prompts but **not** in the top 3% on *harmless* ones are that language's MS-Neurons: they are busy when the
request is dangerous.

**3. SS-Neurons — shared safety neurons.** The MS-Neurons of a *non-high-resource* language that are **also**
MS-Neurons of **English**. They are few (a fraction of a percent of the model), yet:

| experiment | what happens |
| --- | --- |
| **suppress** them (set to 0) | refusals drop: the model answers harmful requests |
| **reinforce** them (×α) | refusals rise in the low-resource language |
| **fine-tune only them** | low-resource safety improves, general ability barely moves |

Languages with **more SS-Neurons are safer**: they share more of English's safety machinery.
"""
)

lm = state.current_model()
if lm is None:
    st.info("Load a model on the **Model** page to see the live demos below.")
    link("model", "Go to the Model page", icon=":material/memory:")
    st.stop()

result = st.session_state.get("identify_result")
st.subheader("Live demo 1 — how much do the languages share?")
if result is None:
    st.info("No neurons identified in this session yet. Run an identification on the **Neurons** page "
            "(a few prompts per language are enough for a demo), then come back.")
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
else:
    from ui.neurons_view import overlap_matrix

    matrix = overlap_matrix(result)
    st.altair_chart(charts.overlap_heatmap(matrix, title="MS-Neuron overlap between languages (Jaccard)"),
                    width="content")
    st.caption("Each cell: shared MS-Neurons / all MS-Neurons of the two languages. The English row shows how much "
               "of English's safety set each language reuses — the SS-Neurons.")

st.subheader("Live demo 2 — switch the shared safety neurons off")
if result is None or len(result.ss_all) == 0:
    st.info("Needs identified SS-Neurons (Neurons page).")
else:
    from ssn_core.generation import GenerationSettings, generate
    from ssn_core.judges import MarkerJudge

    languages = [lang for lang, s in result.ss.items() if len(s)]
    demo_language = st.selectbox("Language", languages, key="learn_language")
    prompts = st.session_state.get("identify_prompts")
    candidates = [] if prompts is None else [p.text for p in prompts.select(languages=[demo_language],
                                                                            label="harmful", limit_per_language=5)]
    text = st.selectbox("Harmful prompt", candidates, key="learn_prompt") if candidates else \
        st.text_input("Harmful prompt", key="learn_prompt_text")
    neurons = result.ss[demo_language]
    st.caption(f"{len(neurons):,} SS-Neurons of {demo_language} "
               f"({100 * neurons.fraction_of(lm.sites):.3f}% of the model's neurons).")
    if text and st.button("Answer it with and without them", type="primary", key="learn_run"):
        with st.spinner("Generating both answers in one batch…"):
            try:
                settings = GenerationSettings(max_new_tokens=48)
                with intervene(lm, Intervention(neurons, scale=0.0, rows=[False, True], label="suppress SS")):
                    replies = generate(lm, [text, text], settings)
                judge = MarkerJudge()
                st.session_state["learn_demo"] = {
                    "prompt": text, "replies": replies,
                    "verdicts": [judge.judge(text, r, demo_language).label for r in replies]}
            except Exception as exc:  # noqa: BLE001
                show_error(exc)
    demo = st.session_state.get("learn_demo")
    if demo:
        a, b = st.columns(2)
        a.markdown(f"**Model as is** — judge: `{demo['verdicts'][0]}`")
        a.info(demo["replies"][0] or "(empty)")
        b.markdown(f"**SS-Neurons switched off** — judge: `{demo['verdicts'][1]}`")
        b.warning(demo["replies"][1] or "(empty)")

st.subheader("Where to go next")
link("model", "Model — load a model, see its neuron sites", icon=":material/memory:")
link("neurons", "Neurons — find MS- and SS-Neurons per language", icon=":material/biotech:")
link("chat", "Chat (A/B) — talk to the model with and without them", icon=":material/forum:")
link("validate", "Validate — measure the effect against random neurons", icon=":material/bar_chart:")
link("finetune", "Fine-tune — train only the SS-Neurons to make low-resource languages safer", icon=":material/tune:")
