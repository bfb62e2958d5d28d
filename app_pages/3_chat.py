"""Chat (A/B): the same prompt answered by the model as is (left) and with an intervention (right).

Both replies come from ONE batched generation of two identical rows (`ssn_core.ab.run_ab`): the edit of column B
(neurons scaled or shifted, the refusal direction ablated, or a trained delta) applies to the right row only, so
seed, sampling and padding are the same and any difference is caused by the intervention.
"""

from __future__ import annotations

import streamlit as st

from ssn_core import ab
from ssn_core.direction import DirectionAblation
from ssn_core.generation import GenerationSettings
from ssn_core.interventions import Intervention, Shift
from ssn_core.judges import MarkerJudge
from ssn_core.langid import detect_language
from ui import ab_records, neuron_sources, state, textdiff
from ui.common import link, model_page, show_error
from ui.state import session

lm = model_page("Chat (A/B)", (
    "Ask something; the **left** column is the model as is, the **right** column is the same model with "
    "the intervention you choose below. Same prompt, same seed, same sampling: differences come from the "
    "neurons you switched off or amplified."
))

sites = lm.sites
VERDICT_STYLE = {"refusal": ("green", ":material/shield:", "refusal"),
                 "compliance": ("red", ":material/warning:", "compliance"),
                 "off_target": ("gray", ":material/help:", "off-target")}
DELTA_LABEL = "Trained delta (Fine-tune page)"
AUTO_LANGUAGE = "auto"
NO_SET = neuron_sources.Choice("none")
DIRECTION = neuron_sources.Choice("direction")
SUPPRESS, REINFORCE, ADD, OFF = "Suppress (×0)", "Reinforce (×α)", "Add β × mean harmful activation", "Off"

# ---------------------------------------------------------------------------------------------------------------
# Intervention controls
with st.expander("Intervention (right column)", expanded=True):
    col1, col2 = st.columns([2, 1])
    # the suggested (most effective) set first, then the other sets, the refusal direction, "every neuron" last
    options = neuron_sources.available_choices(with_direction=True)
    delta = session.chat_delta
    source_labels = [c.label() for c in options] + ([DELTA_LABEL] if delta is not None else [])
    use_delta_now = bool(session.chat_use_delta)  # "Use in chat" on the Fine-tune page: pick the delta, once
    del session.chat_use_delta
    if use_delta_now and delta is not None:
        st.session_state["chat_source"] = DELTA_LABEL
    if st.session_state.get("chat_source") == NO_SET.label() and options[0] != NO_SET:
        del st.session_state["chat_source"]  # a set exists now: the remembered "no set yet" gives way to it
    state.keep_valid("chat_source", source_labels)
    picked_label = col1.selectbox("Neurons", source_labels, index=0, key="chat_source",
                                  help="The first entry is the suggested set: the one whose suppression beat its "
                                       "random control by the most on the Validate page, else the bundled starter "
                                       "set, else the union of all SS-Neurons (Neurons page). The refusal direction "
                                       "is the positive control (how far refusal can be broken at all); the trained "
                                       "delta comes from Fine-tune.")
    use_delta = picked_label == DELTA_LABEL
    use_direction = picked_label == DIRECTION.label()
    fixed = use_delta or use_direction  # no neuron action, random control, layers or sites to choose
    means = neuron_sources.activation_means()  # (activation table, HR language) for the additive form, or None
    actions = [SUPPRESS, REINFORCE] + ([ADD] if means is not None else []) + [OFF]
    state.keep_valid("chat_action", actions)
    action = col2.radio("Action", actions, key="chat_action", disabled=fixed, horizontal=False,
                        help="Add β × mean harmful activation: each neuron gets β times its mean activation on the "
                             "high-resource language's harmful prompts added (the additive reinforcement).")
    if action != ADD:
        alpha = col2.slider("α (reinforce scale)", 1.0, 5.0, 2.0, 0.25, key="chat_alpha",
                            disabled=fixed or action != REINFORCE)
        beta = None
    else:
        beta = col2.slider("β (× mean harmful activation)", 0.0, 5.0, 1.0, 0.25, key="chat_beta", disabled=fixed)
        alpha = None
    random_control = col1.checkbox("Random control: as many random neurons, same layers and sites", key="chat_random",
                                   disabled=fixed,
                                   help="If the random set changes the reply as much, the effect is not specific.")
    c3, c4 = st.columns([2, 1])
    layers_now = st.session_state.get("chat_layers")
    if layers_now is not None and not 0 <= layers_now[0] <= layers_now[1] <= sites.n_layers - 1:
        del st.session_state["chat_layers"]
    state.keep_valid("chat_kinds", sites.kinds, multi=True)
    layer_range = c3.slider("Layers", 0, sites.n_layers - 1, (0, sites.n_layers - 1), key="chat_layers",
                            disabled=fixed)
    kinds = c4.multiselect("Sites", list(sites.kinds), default=list(sites.kinds), key="chat_kinds",
                           disabled=fixed)

edit: ab.Edit | None = None  # what column B runs with (`ssn_core.ab` puts it on that row only)
description = "no intervention"
if use_delta:
    edit = delta
    description = f"trained delta ({delta.meta.get('name', 'fine-tuned')})"
elif use_direction:
    direction = neuron_sources.refusal_direction()
    edit = DirectionAblation(direction.unit, label="refusal direction ablated")
    description = f"refusal direction (layer {direction.layer}) projected out of every layer (positive control)"
    st.caption("Column B: the difference of mean residual states between harmful and harmless prompts, projected out "
               "of the residual stream at every layer. It shows how far this model's refusal can be broken at all; "
               "compare a neuron set's effect with it.")
elif options[source_labels.index(picked_label)] == NO_SET:
    st.info("No neuron set yet, so column B is the model as is. Identify MS/SS-Neurons on the **Neurons** page or "
            "import a set there; the most effective one becomes the default here.")
elif action != OFF:
    choice = options[source_labels.index(picked_label)]
    try:
        neurons = neuron_sources.resolve(choice, sites)
        neurons = neurons.restrict(layers=range(layer_range[0], layer_range[1] + 1), kinds=kinds)
        if random_control and len(neurons):
            from ssn_core.validation import random_matched

            neurons = random_matched(neurons, sites, seed=int(st.session_state.get("chat_seed", 0)))
        label = ("random control for " if random_control else "") + choice.label()
        if action == ADD:
            offsets, hr = neuron_sources.additive_offsets(neurons, float(beta))
            edit = Shift(neurons, offsets, label=label)
            description = f"add {float(beta):g} × mean {hr} harmful activation to {len(neurons)} neurons ({label})"
        else:
            scale = 0.0 if action == SUPPRESS else float(alpha)
            edit = Intervention(neurons, scale=scale, label=label)
            description = edit.describe()
        if len(neurons) == 0:
            st.warning("The chosen set has no neurons in these layers and sites: both columns will be the same.")
        if choice.kind == "everything":
            middle = (sites.n_layers * 2 // 5, sites.n_layers * 3 // 5)
            st.caption(f"Extreme demo without identified neurons. Switching off *everything* just breaks the model; "
                       f"try Sites = mlp and Layers ≈ {middle[0]}–{middle[1]}: many models then stop refusing.")
        if choice.kind == "bundle":
            st.caption("The bundled starter set: all SS-Neurons found on this model with the default recipe "
                       "(`make starter-neurons`), shipped with SSN Lab so that it works from the first second.")
    except Exception as exc:  # noqa: BLE001 - e.g. a random control that cannot be drawn
        show_error(exc)
        edit = None
st.caption(f"Right column: **{description}**.")
if session.identify_result is None and picked_label != NO_SET.label():
    st.caption("Tip: identify MS/SS-Neurons on the Neurons page to get the paper's sets here.")
    link("neurons", "Neurons page", icon=":material/biotech:")

# ---------------------------------------------------------------------------------------------------------------
# Generation settings and examples
with st.expander("Generation settings"):
    g1, g2, g3, g4 = st.columns(4)
    max_new = g1.number_input("Max new tokens", 4, 1024, 64, key="chat_max_new")
    sample = g2.checkbox("Sample (instead of greedy)", value=False, key="chat_sample")
    temperature = g3.slider("Temperature", 0.1, 2.0, 0.7, 0.1, key="chat_temperature", disabled=not sample)
    seed = g4.number_input("Seed", 0, 2**31 - 1, 0, key="chat_seed")


def make_settings() -> GenerationSettings:
    sampling = {"do_sample": True, "temperature": float(temperature)} if sample else {}
    return GenerationSettings(max_new_tokens=int(max_new), seed=int(seed), **sampling)


@st.cache_data(show_spinner=False)
def example_prompts() -> dict[str, list[str]]:
    """A few harmful prompts per language from the built-in set (quick picks)."""
    try:
        from ssn_core.prompts import load_builtin

        prompt_set = load_builtin()
        by_language: dict[str, list[str]] = {}
        for p in prompt_set.select(label="harmful"):
            by_language.setdefault(p.language, [])
            if len(by_language[p.language]) < 3:
                by_language[p.language].append(p.text)
        return by_language
    except Exception:  # noqa: BLE001 - examples are a convenience
        return {}


examples = example_prompts()
languages = sorted(examples) or ["en"]
judge = MarkerJudge()
judge_languages = [AUTO_LANGUAGE] + sorted(set(judge.languages) | set(languages))
e1, e2, e3 = st.columns([1, 1, 3])
state.keep_valid("chat_language", languages)
state.keep_valid("chat_judge_language", judge_languages)
language = e1.selectbox("Examples in", languages, index=languages.index("en") if "en" in languages else 0,
                        key="chat_language")
judge_language = e2.selectbox(
    "Judge language", judge_languages, key="chat_judge_language",
    format_func=lambda code: "Auto (from the prompt)" if code == AUTO_LANGUAGE else code,
    help="Auto: the prompt's language is detected from its script and common words, for each message. Choose a "
         "language to override a wrong guess.")
picked_example = None
with e3:
    if examples.get(language):
        st.caption("Examples (harmful prompts from the built-in set):")
        for i, text in enumerate(examples[language]):
            if st.button(text[:90] + ("…" if len(text) > 90 else ""), key=f"chat_example_{language}_{i}"):
                picked_example = text


def judged_language(prompt: str) -> tuple[str | None, str]:
    """(language code for the judge, how it was chosen) for one prompt."""
    if judge_language != AUTO_LANGUAGE:
        return judge_language, "chosen"
    guess = detect_language(prompt)
    return guess.code, ("detected" if guess.code else "not detected: every language's markers")


# ---------------------------------------------------------------------------------------------------------------
# Conversation
history: list[dict] = session.chat_history
interrupted = session.chat_pending
del session.chat_pending
if interrupted is not None:  # the last generation was stopped (Stop, or another click while it ran): keep it
    history.append(ab_records.stopped_turn(lm, interrupted, judge))


def badge(verdict, language: str | None = None, how: str = "") -> None:
    if verdict is None:
        return
    color, icon, text = VERDICT_STYLE.get(verdict.label, ("gray", None, verdict.label))
    judged = f" Judged as {language or 'any language'} ({how})." if how else ""
    st.badge(text, icon=icon, color=color, help=f"marker judge: {verdict.reason}.{judged}")


left, right = st.columns(2)
left.markdown("#### A — model as is")
right.markdown(f"#### B — {description}")
for number, turn in enumerate(history, start=1):
    differ = turn["a"] != turn["b"]
    for column, side in ((left, "a"), (right, "b")):
        with column:
            with st.chat_message("user"):
                st.write(turn["prompt"])
            with st.chat_message("assistant"):
                if not differ:
                    st.write(turn[side] or "*(empty reply)*")
                elif side == "a":
                    st.markdown(textdiff.plain_html(turn["a"]), unsafe_allow_html=True)
                else:  # where B departs from A is highlighted
                    st.markdown(textdiff.highlight_html(turn["a"], turn["b"]), unsafe_allow_html=True)
                badge(turn.get(f"{side}_verdict"), turn.get("language"), turn.get("language_how", ""))
                if side == "b":
                    judged = (f"judged as {turn.get('language') or 'any language'} ({turn['language_how']})"
                              if turn.get("language_how") else "")
                    st.caption(" · ".join(x for x in (turn["description"], textdiff.summary(turn["a"], turn["b"]),
                                                      judged, "stopped by you" if turn.get("stopped") else "") if x))
                    ab_records.download_button(turn, number)

prompt = st.chat_input("Type a prompt for both columns…", key="chat_prompt") or picked_example
if prompt:
    for column in (left, right):
        with column, st.chat_message("user"):
            st.write(prompt)
    with left:
        slot_a = st.chat_message("assistant").empty()
    with right:
        slot_b = st.chat_message("assistant").empty()
    stop_slot = st.empty()
    # Clicking Stop reruns the page, which ends this run (and the generation with it) at the next token; the
    # partial replies kept in "chat_pending" become a turn marked "stopped" at the top of the next run.
    stop_slot.button("Stop", key="chat_stop", icon=":material/stop_circle:",
                     help="Stop generating; what both columns wrote so far is kept.")
    code, how = judged_language(prompt)
    settings = make_settings()
    pending = {"prompt": prompt, "a": "", "b": "", "language": code, "language_how": how,
               "description": description, "settings": settings, "rows": ab.two_rows(prompt, edit, code)}
    session.chat_pending = pending

    def show(replies: list[str]) -> None:
        pending["a"], pending["b"] = replies
        slot_a.markdown(replies[0])
        slot_b.markdown(replies[1])

    exchange, error = None, None
    try:
        exchange = ab.run_ab(lm, pending["rows"], settings, judge, on_update=show)
    except Exception as exc:  # noqa: BLE001 - shown, the history keeps what was there
        error = exc
    del session.chat_pending  # (a Stop never gets here: its rerun ends this run first)
    stop_slot.empty()
    if error is not None:
        show_error(error)
    else:
        history.append(ab_records.turn(lm, pending, exchange))
        st.rerun()

if history:
    if st.button("Clear conversation", key="chat_clear"):
        session.chat_history = []
        st.rerun()
else:
    st.caption("Each message is answered independently (single turn), as in the paper's evaluation.")
