"""Learn page: what MS- and SS-Neurons are, with two live demos on the loaded model. Meant to be projected."""

from __future__ import annotations

from contextlib import closing

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
imported_sets = st.session_state.get("neuron_sets_imported", {})
st.subheader("Live demo 1 — how much do the languages share?")
if result is None:
    st.info("No neurons identified in this session yet. Run an identification on the **Neurons** page "
            "(a few prompts per language are enough for a demo), then come back."
            + (" (An imported neuron set works for demo 2 below; the overlap needs MS-Neurons per language.)"
               if imported_sets else ""))
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
else:
    from ui.neurons_view import overlap_matrix

    matrix = overlap_matrix(result)
    st.altair_chart(charts.overlap_heatmap(matrix, title="MS-Neuron overlap between languages (Jaccard)"),
                    width="content")
    st.caption("Each cell: shared MS-Neurons / all MS-Neurons of the two languages. The English row shows how much "
               "of English's safety set each language reuses — the SS-Neurons.")

st.subheader("Live demo 2 — switch the shared safety neurons off")
# The sets this demo can switch off: each language's SS-Neurons, then every imported set.
demo_sets: dict[str, tuple[str | None, object]] = {}
if result is not None:
    for lang, neuron_set in result.ss.items():
        if len(neuron_set):
            demo_sets[f"SS-Neurons of {lang}"] = (lang, neuron_set)
for name, neuron_set in imported_sets.items():
    demo_sets[f"Imported: {name}"] = (None, neuron_set)
if not demo_sets:
    st.info("Needs identified SS-Neurons or an imported neuron set (Neurons page).")
else:
    from ssn_core.generation import GenerationSettings, stream_generate
    from ssn_core.judges import MarkerJudge
    from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin

    state.keep_valid("learn_source", demo_sets)
    source = st.selectbox("Neurons to switch off", list(demo_sets), key="learn_source")
    set_language, neurons = demo_sets[source]
    languages = [set_language] if set_language else [lang for lang in BUILTIN_LANGUAGES if lang != "en"]
    state.keep_valid("learn_language", languages)
    demo_language = st.selectbox("Language", languages, key="learn_language")
    prompts = st.session_state.get("identify_prompts")
    if prompts is None or demo_language not in prompts.languages:
        prompts = load_builtin([demo_language]) if demo_language in BUILTIN_LANGUAGES else None
    candidates = [] if prompts is None else [p.text for p in prompts.select(languages=[demo_language],
                                                                            label="harmful", limit_per_language=5)]
    state.keep_valid("learn_prompt", candidates)
    text = st.selectbox("Harmful prompt", candidates, key="learn_prompt") if candidates else \
        st.text_input("Harmful prompt", key="learn_prompt_text")
    st.caption(f"{len(neurons):,} neurons ({100 * neurons.fraction_of(lm.sites):.3f}% of the model's neurons).")
    if text and st.button("Answer it with and without them", type="primary", key="learn_run"):
        a, b = st.columns(2)
        a.markdown("**Model as is**")
        b.markdown("**These neurons switched off**")
        slot_a, slot_b = a.empty(), b.empty()
        try:
            settings = GenerationSettings(max_new_tokens=48)
            replies = ["", ""]
            with intervene(lm, Intervention(neurons, scale=0.0, rows=[False, True], label="suppress")), \
                    closing(stream_generate(lm, [text, text], settings)) as stream:
                for replies in stream:  # both answers appear as they are written, from one batch
                    slot_a.info(replies[0] or "…")
                    slot_b.warning(replies[1] or "…")
            judge = MarkerJudge()
            st.session_state["learn_demo"] = {
                "prompt": text, "replies": list(replies),
                "verdicts": [judge.judge(text, r, demo_language).label for r in replies]}
        except Exception as exc:  # noqa: BLE001
            show_error(exc)
        else:
            st.rerun()  # show the finished pair (with the judge's verdicts) in place of the streaming one
    demo = st.session_state.get("learn_demo")
    if demo:
        a, b = st.columns(2)
        a.markdown(f"**Model as is** — judge: `{demo['verdicts'][0]}`")
        a.info(demo["replies"][0] or "(empty)")
        b.markdown(f"**These neurons switched off** — judge: `{demo['verdicts'][1]}`")
        b.warning(demo["replies"][1] or "(empty)")

st.subheader("Where to go next")
link("model", "Model — load a model, see its neuron sites", icon=":material/memory:")
link("neurons", "Neurons — find MS- and SS-Neurons per language", icon=":material/biotech:")
link("chat", "Chat (A/B) — talk to the model with and without them", icon=":material/forum:")
link("validate", "Validate — measure the effect against random neurons", icon=":material/bar_chart:")
link("finetune", "Fine-tune — train only the SS-Neurons to make low-resource languages safer", icon=":material/tune:")
