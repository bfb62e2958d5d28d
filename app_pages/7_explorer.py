"""Explorer page: one neuron at a time (what it responds to in every language, what it writes, how important it
is by each method), the user's own neuron sets, and set summaries. ``/explorer?neuron=L2.mlp.3814`` opens a neuron.
"""

from __future__ import annotations

import streamlit as st

from ssn_core import explain_report, explorer
from ssn_core.errors import SSNError
from ssn_core.neurons import format_neuron, parse_neuron
from ssn_core.prompts import BUILTIN_LANGUAGES, language_name, load_builtin
from ssn_core.vocab import vocabulary_projection
from ui import explorer_links, jobs, neuron_sources, state
from ui import explorer_view as view
from ui.common import PAGE_PATHS, file_bytes, json_bytes, model_page, show_error
from ui.neurons_view import neuron_table
from ui.state import session

lm = model_page("Explorer", (
    "One neuron at a time: the prompts of each language on which it fires most and least (tokens highlighted: "
    "orange = positive, blue = negative), the tokens it writes towards, and its importance by every method. "
    "A link such as **/explorer?neuron=L2.mlp.3814** opens a neuron for anyone running the same model."
))
sites = lm.sites
result = session.identify_result
cache: dict = session.explorer_reports

# ---------------------------------------------------------------------------------------------------------------
# Which neuron: a deep link, a click in a table (here or on the Neurons page), or typed
linked = st.query_params.get("neuron")
if linked and linked != session.explorer_linked:
    session.explorer_linked = st.session_state["ex_neuron"] = linked
if session.explorer_picked:  # clicked in one of this page's tables in the last run
    st.session_state["ex_neuron"] = session.explorer_picked
    del session.explorer_picked


def pick(name: str | None) -> None:
    """A neuron clicked in a table below the neuron box: show it (the box is set at the top of the next run)."""
    if name and name != st.session_state.get("ex_neuron"):
        session.explorer_picked = name
        st.rerun()


top = st.columns([2, 3])
text = top[0].text_input("Neuron", key="ex_neuron", placeholder="L2.mlp.3814",
                         help="L<layer>.<site>.<index>; sites: " + ", ".join(sites.kinds))
with top[1]:
    if result is not None:
        with st.expander("Pick from the Neurons table (click a row)", expanded=not text.strip()):
            options = ["ss_all"] + [f"ss:{lang}" for lang in result.ss] + [f"ms:{lang}" for lang in result.ms]
            which = st.selectbox("Set", options, key="ex_table_which", format_func=lambda w: "All SS-Neurons" if
                                 w == "ss_all" else f"{w[:2].upper()} ({w[3:]})")
            pick(explorer_links.neuron_picker_table(neuron_table(result, list(result.ms), which), "ex_table",
                                                    height=240))
    else:
        st.caption("Identify neurons on the **Neurons** page to pick them from its table with one click.")

prompt_pool = session.identify_prompts
available = [lang for lang in (prompt_pool.languages if prompt_pool is not None else BUILTIN_LANGUAGES)]
state.keep_valid("ex_langs", available, multi=True)
wanted = [lang for lang in (list(result.ms) if result is not None else ["en", "zh", "bn", "sw"]) if lang in available]
with st.expander("Prompts"):
    p1, p2, p3 = st.columns([3, 1, 1])
    languages = p1.multiselect("Languages", available, default=wanted or available[:1], key="ex_langs",
                               format_func=lambda code: f"{code} — {language_name(code)}")
    n = p2.number_input("Prompts per language and label", 1, 256, 8, key="ex_n")
    k = p3.number_input("Examples shown", 1, 20, 5, key="ex_k", help="top and bottom prompts per language and label")
    st.caption("Prompts: " + ("this session's identification prompts" if prompt_pool is not None else
                              "the built-in set") + ". A prompt's value is the neuron's largest (top) or smallest "
               "(bottom) activation over the prompt's own tokens.")


def chosen_prompts():
    pool = prompt_pool if prompt_pool is not None else load_builtin(languages)
    return pool.select(languages=languages, limit_per_language=int(n))


def run_explain(lm, prompts, neurons, neuron_set, result, languages, k, set_name="", progress=None, cancel=None):
    return explorer.explain(lm, prompts, neurons, neuron_set, result=result, languages=languages, k=k,
                            set_name=set_name, progress=progress, cancel=cancel)


def finished(name: str):
    """Show the job ``name``'s progress; its result once it ended well (the job is then dropped), else None."""
    return jobs.result_of(jobs.job_panel(name))


def harvest(name: str, store: dict) -> None:
    """A finished explanation job's result into ``store`` under the key it was started for."""
    job = jobs.get_job(name)
    explanation = jobs.result_of(job)
    if explanation is not None:
        store[job.started_with.get("key")] = explanation
        while len(store) > 48:  # the neurons looked at last (and their vocabulary projections)
            store.pop(next(iter(store)))


def show_examples(examples: dict, which: str = "top") -> None:
    scale = view.scale_of(examples)
    for language in languages:
        st.markdown(f"**{language} — {language_name(language)}**")
        for column, label in zip(st.columns(2), ("harmful", "harmless"), strict=True):
            per = examples.get(f"{language}/{label}", {})
            with column:
                st.caption(f"{label}: highest activation")
                st.markdown(view.examples_html(per.get("top", []), scale), unsafe_allow_html=True)
                if which == "both":
                    with st.expander(f"{label}: lowest activation"):
                        st.markdown(view.examples_html(per.get("bottom", []), scale), unsafe_allow_html=True)


def neuron_section(neuron: tuple[int, str, int]) -> None:
    name = format_neuron(neuron)
    if st.query_params.get("neuron") != name:  # the address bar always holds the link to what is shown
        st.query_params["neuron"] = session.explorer_linked = name
    st.subheader(f"{name} — {view.describe_neuron(neuron)}")
    member = explorer.membership(result, neuron)
    if member:
        ms = [lang for lang, m in member.items() if m["ms"]]
        ss = [lang for lang, m in member.items() if m.get("ss")]
        st.markdown(" ".join([f":red-badge[SS {lang}]" for lang in ss] + [f":blue-badge[MS {lang}]" for lang in ms])
                    or "Not an MS-Neuron of any identified language.")
    b1, b2, b3 = st.columns([1, 1, 3])
    if b1.button("Suppress in Chat", key="ex_to_chat", icon=":material/forum:",
                 help="Chat's column B switches this one neuron off"):
        neuron_sources.send_neuron_to_chat(neuron)
        st.switch_page(PAGE_PATHS["chat"])
    active = neuron_sources.active_custom_set()
    if b2.button("Add to my set", key="ex_add", icon=":material/playlist_add:", help=f"adds it to '{active}'"):
        added = neuron_sources.add_to_custom_set([neuron])
        st.toast(f"{name} added to '{active}' ({len(added)} neurons): Chat, Validate and Fine-tune offer it.")
    b3.caption(f"Link to this neuron: `/explorer?neuron={name}`")

    key = (name, tuple(languages), int(n), int(k), prompt_pool is not None)
    harvest("explorer", cache)
    job = jobs.get_job("explorer")
    if key not in cache and languages and not (job is not None and job.started_with.get("key") == key):
        try:  # a job for another neuron is cancelled by the new one
            jobs.start_job("explorer", run_explain, lm, chosen_prompts(), [neuron], None, result, languages, int(k),
                           started_with={"key": key})
        except SSNError as exc:
            show_error(exc)
    jobs.job_panel("explorer")
    harvest("explorer", cache)
    tab_act, tab_vocab, tab_imp = st.tabs(["Activations", "Vocabulary", "Importance"])
    with tab_act:
        explanation = cache.get(key)
        if not languages:
            st.info("Choose at least one language under **Prompts**.")
        elif explanation is None:
            st.caption("Collecting this neuron's activations on the chosen prompts…")
        else:
            report = explanation.neurons[0]
            st.altair_chart(view.distribution_chart(report.distribution, report.groups))
            show_examples(report.examples, "both")
            d1, d2 = st.columns(2)
            d1.download_button("Explanation (JSON)", json_bytes(explain_report.explanation_json(explanation)),
                               f"{name}.json", "application/json", key="ex_dl_json")
            d2.download_button("Report (HTML)", explain_report.html_report(explanation), f"{name}.html", "text/html",
                               key="ex_dl_html")
    with tab_vocab:
        vocab_key = ("vocab", name, tuple(languages))
        if vocab_key not in cache:
            cache[vocab_key] = vocabulary_projection(lm, neuron, 20, languages)
        projection, note = cache[vocab_key]
        if projection is None:
            st.info(note)
        else:
            st.caption(f"Output direction: {projection.direction}, read through the final norm and the unembedding.")
            st.altair_chart(view.vocab_chart(projection))
            for script, part in projection.by_script.items():
                if part["languages"]:
                    st.markdown(f"**{script}** tokens ({', '.join(part['languages'])}; {part['tokens']:,} in the "
                                "vocabulary)")
                    v1, v2 = st.columns(2)
                    v1.dataframe(view.vocab_frame(part["promoted"][:10]), hide_index=True)
                    v2.dataframe(view.vocab_frame(part["suppressed"][:10]), hide_index=True)
    with tab_imp:
        own_scores = None if result is None else result.scores  # None for the bundled starter set too
        if result is not None and own_scores is None:
            st.caption("The bundled starter set ships without its score table, so its importance scores are not "
                       "here; score impact and activation below, or identify neurons on the Neurons page.")
        tables = ([own_scores] if own_scores is not None else []) + session.explorer_tables
        frame = view.importance_frame(explorer.importance(tables, neuron))
        if frame.empty:
            st.info("No score table covers this neuron's site yet: identify neurons on the Neurons page, or score "
                    "impact and activation here on the chosen prompts.")
        else:
            for method in dict.fromkeys(frame["method"]):
                st.altair_chart(view.importance_chart(frame, method))
            st.dataframe(frame, hide_index=True)
        if st.button(f"Score impact and activation of every {neuron[1]} neuron on these prompts", key="ex_score"):
            jobs.start_job("explorer_scores", score_tables, lm, chosen_prompts(), neuron[1])
        tables_done = finished("explorer_scores")
        if tables_done is not None:
            session.explorer_tables = [t for t in session.explorer_tables if t.kinds != (neuron[1],)] + tables_done
            st.rerun()


def score_tables(lm, prompts, kind, progress=None, cancel=None):
    from ssn_core.scoring import score

    return [score(lm, prompts, method=method, kinds=(kind,), progress=progress, cancel=cancel)
            for method in ("impact", "activation")]


neuron = None
if text.strip():
    try:
        neuron = parse_neuron(text, sites)
    except SSNError as exc:
        show_error(exc)
else:
    st.info("Type a neuron such as `L1.mlp.5`, or click one in the Neurons table.")
if neuron is not None:
    neuron_section(neuron)

# ---------------------------------------------------------------------------------------------------------------
# My sets
st.divider()
st.subheader("My sets")
sets = neuron_sources.custom_sets()
active = neuron_sources.active_custom_set()
names = list(dict.fromkeys([*sets, active]))
m1, m2 = st.columns([2, 3])
chosen_set = m1.selectbox("“Add to my set” adds to", names, index=names.index(active), key="ex_active_set")
if chosen_set != active:
    session.custom_set_active = active = chosen_set
new_name = m2.text_input("Name", placeholder="a name for a new set, or a new name for this one", key="ex_set_name")
n1, n2, n3 = m2.columns(3)
if n1.button("New set", key="ex_set_new", disabled=not new_name.strip() or new_name.strip() in sets):
    session.custom_set_active = new_name.strip()
    st.rerun()
if n2.button("Rename", key="ex_set_rename", disabled=not new_name.strip() or new_name.strip() in sets):
    neuron_sources.rename_custom_set(active, new_name.strip())
    st.rerun()
if n3.button("Delete", key="ex_set_delete", disabled=active not in sets):
    neuron_sources.delete_custom_set(active)
    st.rerun()
current = sets.get(active)
if current is None or len(current) == 0:
    st.caption(f"'{active}' is empty: open a neuron and press **Add to my set**. Chat, Validate and Fine-tune offer "
               "every non-empty set as “My set: <name>”.")
else:
    members = [format_neuron(t) for t in current.triples()]
    st.caption(f"'{active}': {len(current):,} neurons, offered as “My set: {active}” on Chat, Validate and Fine-tune. "
               "Click a row to open that neuron.")
    rows = [{"neuron": m, "layer": t[0], "site": t[1], "index": t[2]} for m, t in
            zip(members, current.triples(), strict=True)]
    pick(explorer_links.neuron_picker_table(view.set_neurons_frame(rows), "ex_set_table",
                                            height=min(320, 40 + 35 * len(members))))
    r1, r2, r3 = st.columns([2, 1, 1])
    drop = r1.multiselect("Remove", members, key="ex_set_drop", label_visibility="collapsed",
                          placeholder="neurons to remove")
    if drop and r1.button("Remove", key="ex_set_remove"):
        neuron_sources.remove_from_custom_set(active, [parse_neuron(m) for m in drop])
        st.rerun()
    saved = current.with_model_meta(sites)
    r2.download_button("Set (JSON)", json_bytes(saved.to_json_dict()), f"{active}.json", "application/json",
                       key="ex_set_json")
    r3.download_button("Set (safetensors)", file_bytes(saved.save, ".safetensors"), f"{active}.safetensors",
                       "application/octet-stream", key="ex_set_st")

# ---------------------------------------------------------------------------------------------------------------
# Set summary
st.divider()
st.subheader("Set summary")
choices = [c for c in neuron_sources.available_choices() if c.kind not in ("none", "everything")]
if not choices:
    st.caption("Identify neurons, import a set or build one above to summarise it: which languages share its "
               "neurons, and the prompts on which the set as a whole is most active.")
    st.stop()
labels = [c.label() for c in choices]
state.keep_valid("ex_set_source", labels)
set_label = st.selectbox("Set", labels, key="ex_set_source")
if st.button("Summarise this set", key="ex_set_go", disabled=not languages):
    target = neuron_sources.resolve(choices[labels.index(set_label)], sites)
    try:
        jobs.start_job("explorer_set", run_explain, lm, chosen_prompts(), [], target, result, languages, int(k),
                       set_name=set_label)
    except SSNError as exc:
        show_error(exc)
summary_done = finished("explorer_set")
if summary_done is not None:
    session.explorer_set_reports = {summary_done.set.name: summary_done}
summary = session.explorer_set_reports.get(set_label)
if summary is not None:
    part = summary.set
    st.metric("Neurons", f"{part.size:,}")
    if part.sharing:
        st.altair_chart(view.sharing_chart(part.sharing))
        st.dataframe(part.per_language, hide_index=True)
    st.altair_chart(view.distribution_chart(part.distribution, part.groups, title="Set activation (mean |a| of its "
                                            "neurons): peak of every prompt and the mean per group"))
    show_examples(part.examples)
    st.caption("Its neurons (click a row to open one):")
    pick(explorer_links.neuron_picker_table(view.set_neurons_frame(part.neurons), "ex_summary_table", height=260))
