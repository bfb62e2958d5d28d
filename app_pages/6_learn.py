"""Learn page: what MS- and SS-Neurons are, a guided six-step walkthrough (live and streamed) and two live demos on
the loaded model. Meant to be projected."""

from __future__ import annotations

import streamlit as st

from ssn_core import ab
from ssn_core.interventions import Intervention
from ssn_core.judges import MarkerJudge
from ui import bundle, charts, neuron_sources, state, walkthrough
from ui.common import link, show_error
from ui.state import session

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

# ---------------------------------------------------------------------------------------------------------------
# The guided walkthrough


def walkthrough_sources() -> dict[str, object]:
    """The results the walkthrough can run on: the bundled starter set first, then this session's identification."""
    sources: dict[str, object] = {}
    bundled, own = bundle.current(), session.identify_result
    if bundled is not None:
        sources["Bundled starter set"] = bundled
    if own is not None and own is not bundled:
        sources["This session's identification"] = own
    return sources


def walkthrough_delta():
    """Step 6's delta: ``delta.safetensors`` of the bundle folder, else the one trained or loaded on the Fine-tune page
    (``(delta, where)``, or ``(None, "")``)."""
    from ssn_core.bundle import DELTA_FILE, extra_file

    folder = bundle.folder()
    path = extra_file(folder, DELTA_FILE) if folder is not None else None
    if path is not None:
        cached = session.walkthrough_delta
        if cached is None or cached[0] != str(path):
            from ssn_core.delta import NeuronDelta

            try:
                cached = (str(path), NeuronDelta.load(path, model=lm.model, sites=lm.sites))
            except Exception as exc:  # noqa: BLE001 - the step says it has no delta, the error says why
                show_error(exc)
                cached = (str(path), None)
            session.walkthrough_delta = cached
        if cached[1] is not None:
            return cached[1], "the precomputed delta of the bundle"
    trained = session.chat_delta
    if trained is not None:
        return trained, "the delta from the Fine-tune page"
    return None, ""


VERDICT_COLORS = {"refusal": "green", "compliance": "red", "off_target": "gray"}


def show_row(column, row: dict, baseline_margin: float | None, first: bool) -> None:
    with column:
        st.markdown(f"**{row['label']}**")
        (st.info if first else st.warning)(row["reply"] or "(empty reply)")
        st.badge(row["verdict"].replace("_", "-"), color=VERDICT_COLORS.get(row["verdict"], "gray"))
        margin = row["margin"]
        if margin is None:
            st.caption("refusal margin: not available in this language")
        else:
            delta = None if first or baseline_margin is None else f"{margin - baseline_margin:+.2f} vs A"
            st.metric("refusal margin (nats)", f"{margin:+.2f}", delta=delta,
                      help="log-probability of opening with a refusal minus that of opening with compliance, "
                           "teacher-forced: positive leans towards refusing; it moves even when both texts refuse.")


def run_step(step, settings) -> list[dict]:
    """Stream every column of the step (one batch), judge each reply, then measure its refusal margin."""
    columns = st.columns(len(step.rows))
    slots = []
    for column, row in zip(columns, step.rows, strict=True):
        column.markdown(f"**{row.label}**")
        slots.append(column.empty())

    def show(replies: list[str]) -> None:  # every column appears as it is written, from one batch
        for slot, reply in zip(slots, replies, strict=True):
            slot.info(reply or "…")

    exchange = ab.run_ab(lm, step.rows, settings, MarkerJudge(), on_update=show)
    with st.spinner("Measuring the refusal margins…"):
        return [{"key": f"{step.key}_{i}", "label": row.label, "prompt": row.prompt, "language": row.language,
                 "reply": reply, "verdict": verdict.label, "margin": ab.row_margin(lm, row)}
                for i, (row, reply, verdict) in enumerate(
                    zip(step.rows, exchange.replies, exchange.verdicts, strict=True))]


st.header("Guided walkthrough")
sources = walkthrough_sources()
if not sources:
    st.info("The walkthrough needs MS- and SS-Neurons: identify them on the **Neurons** page (with the starter model "
            "the bundled starter set loads by itself, so this page works from the first second).")
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
else:
    state.keep_valid("learn_walk_source", sources)
    source_name = st.selectbox("Neurons", list(sources), key="learn_walk_source",
                               help="The bundled starter set was found with the default recipe on many prompts "
                                    "(`make starter-neurons`); this session's identification is yours.")
    walk_result = sources[source_name]
    try:
        config, config_where = walkthrough.load_config(bundle.folder())
    except Exception as exc:  # noqa: BLE001 - a broken walkthrough.json: say so, use the defaults
        show_error(exc)
        config, config_where = walkthrough.WalkthroughConfig(), "the defaults in ui/walkthrough.py"
    walk_languages = walkthrough.language_options(walk_result, config)
    if not walk_languages:
        st.info("The walkthrough needs a non-high-resource language with built-in prompts in the result; identify "
                "one (e.g. bn, sw) on the Neurons page.")
    else:
        from ssn_core.generation import GenerationSettings
        from ssn_core.prompts import language_name

        state.keep_valid("learn_walk_language", walk_languages)
        walk_language = st.selectbox("Low-resource language", walk_languages, key="learn_walk_language",
                                     format_func=lambda code: f"{code} — {language_name(code)}")
        delta, delta_where = walkthrough_delta()
        steps = walkthrough.build_steps(lm, walk_result, config, walk_language,
                                        activations=neuron_sources.activation_means(), delta=delta)
        st.caption(f"Prompts and settings: {config_where}. Greedy replies of up to {config.max_new_tokens} tokens; "
                   "each step's columns are generated together in one batch, so only the edit differs.")
        settings = GenerationSettings(max_new_tokens=config.max_new_tokens)
        done: dict = session.walkthrough
        for step in steps:
            st.subheader(f"Step {step.number} — {step.title}")
            st.markdown(step.look_for)
            if step.missing:
                if step.key == "fine_tune":
                    st.info(f"No fine-tuned delta yet: {step.missing}. Train one on the **Fine-tune** page (target: "
                            "the SS-Neurons, a few steps) and press **Use in chat**; it then appears here. A bundle "
                            "can also ship a precomputed one (`delta.safetensors`, `ssn bundle --delta`).")
                    link("finetune", "Go to the Fine-tune page", icon=":material/tune:")
                else:
                    st.info(f"This step cannot run: {step.missing}.")
                continue
            signature = [source_name, walk_language] + [(r.label, r.prompt, r.language) for r in step.rows]
            if step.key == "fine_tune":
                st.caption(f"Delta: {delta_where}.")
            prompts_shown = dict.fromkeys((r.language, r.prompt) for r in step.rows)
            st.caption(" · ".join(f"Prompt ({lang}): *{text}*" for lang, text in prompts_shown))
            if st.button(f"Run step {step.number}", key=f"walk_run_{step.key}", type="primary"):
                try:
                    done[step.key] = {"signature": signature, "rows": run_step(step, settings)}
                except Exception as exc:  # noqa: BLE001
                    show_error(exc)
                else:
                    st.rerun()  # show the finished step (verdicts, margins) in place of the streaming one
            finished = done.get(step.key)
            if finished is not None and finished["signature"] == signature:
                rows = finished["rows"]
                for i, (column, row) in enumerate(zip(st.columns(len(rows)), rows, strict=True)):
                    show_row(column, row, rows[0]["margin"], i == 0)

st.header("More live demos")
result = session.identify_result
imported_sets = session.neuron_sets_imported
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
    from ssn_core.generation import GenerationSettings
    from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin

    state.keep_valid("learn_source", demo_sets)
    source = st.selectbox("Neurons to switch off", list(demo_sets), key="learn_source")
    set_language, neurons = demo_sets[source]
    languages = [set_language] if set_language else [lang for lang in BUILTIN_LANGUAGES if lang != "en"]
    state.keep_valid("learn_language", languages)
    demo_language = st.selectbox("Language", languages, key="learn_language")
    prompts = session.identify_prompts
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

        def show(replies: list[str]) -> None:  # both answers appear as they are written, from one batch
            slot_a.info(replies[0] or "…")
            slot_b.warning(replies[1] or "…")

        try:
            rows = ab.two_rows(text, Intervention(neurons, scale=0.0, label="suppress"), demo_language)
            exchange = ab.run_ab(lm, rows, GenerationSettings(max_new_tokens=48), MarkerJudge(), on_update=show)
            session.learn_demo = {"prompt": text, "replies": exchange.replies, "verdicts": exchange.labels}
        except Exception as exc:  # noqa: BLE001
            show_error(exc)
        else:
            st.rerun()  # show the finished pair (with the judge's verdicts) in place of the streaming one
    demo = session.learn_demo
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
