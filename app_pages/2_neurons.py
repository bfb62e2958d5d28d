"""Neurons page: identify MS- and SS-Neurons per language, explore them, download or import them."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import streamlit as st

from ssn_core.errors import PromptSetError
from ssn_core.identify import RECIPES, IdentifyResult, identify
from ssn_core.neurons import NeuronSet
from ssn_core.prompts import (
    BUILTIN_LANGUAGES,
    MULTIJAIL_GROUPS,
    PAPER_GROUPS,
    language_name,
    load_builtin,
    load_file,
    load_multijail,
    with_harmless,
)
from ssn_core.scoring import rank_agreement, sampled_scores
from ui import bundle, charts, explorer_links, jobs, neuron_sources, provenance, state
from ui.common import (
    call,
    csv_bytes,
    existing_folder,
    file_bytes,
    json_bytes,
    load_upload,
    model_page,
    show_error,
    stop_without_result,
)
from ui.neurons_view import neuron_table, overlap_matrix, ss_counts
from ui.state import session

lm = model_page("Neurons", (
    "For each language, score every neuron on **harmful** and **harmless** prompts. **MS-Neurons** = per layer, "
    "the top *p*% on harmful prompts minus the top *p*% on harmless ones. **SS-Neurons** = MS-Neurons of a "
    "non-high-resource language that are also MS-Neurons of the high-resource language(s) (English)."
))

ROOT = Path(__file__).resolve().parent.parent
SLOW_KINDS = ("attn_q", "attn_k")  # exact q/k importance: several forward passes per prompt
MULTIJAIL_DEFAULT = ROOT.parent / "shared" / "datasets" / "multijail" / "MultiJail.csv"


def group_of_language(grouping: str) -> dict[str, str]:
    groups = MULTIJAIL_GROUPS if grouping.startswith("MultiJail") else PAPER_GROUPS
    return {lang: name for name, langs in groups.items() for lang in langs}


# ---------------------------------------------------------------------------------------------------------------
# Setup (folded away once there is a result, so the charts are on screen)
setup = st.expander("Set up an identification run", expanded=session.identify_result is None)
setup.markdown("**1. Prompts**")
source = setup.radio("Prompt set", ["Built-in (12 languages, offline)", "MultiJail CSV", "Upload CSV / JSONL"],
                  horizontal=True, key="nr_source")
mj_path, upload = "", None
if source.startswith("MultiJail"):
    mj_path = setup.text_input("MultiJail CSV path (harmful prompts; harmless ones come from the built-in set)",
                            value=str(MULTIJAIL_DEFAULT) if MULTIJAIL_DEFAULT.is_file() else "", key="nr_mj_path")
elif source.startswith("Upload"):
    upload = setup.file_uploader("Your prompts: columns text, language, label (harmful/harmless), optional id; "
                              "harmful-only files get the built-in harmless prompts",
                              type=["csv", "jsonl", "tsv"], key="nr_upload")
setup.markdown("**2. Languages**")
grouping = setup.radio("Grouping", ["MultiJail (high / medium / low resource)", "Paper (HR = English vs NHR)"],
                    horizontal=True, key="nr_grouping")
groups = MULTIJAIL_GROUPS if grouping.startswith("MultiJail") else PAPER_GROUPS


def recipe_kinds(name: str) -> list[str]:
    """The recipe's sites this model has; the exact q/k of the impact method are left out (slow on a CPU)."""
    recipe = RECIPES[name]
    kinds = [k for k in recipe.kinds if k in lm.sites.kinds]
    if recipe.method == "impact":
        kinds = [k for k in kinds if k not in SLOW_KINDS] or kinds
    return kinds


def apply_recipe() -> None:
    """A new recipe resets p and the sites to the recipe's (the form's other settings stay)."""
    name = st.session_state["nr_recipe"]
    st.session_state["nr_p"] = 100.0 * RECIPES[name].p
    st.session_state["nr_kinds"] = recipe_kinds(name)


setup.markdown("**3. Method**")
recipe_name = setup.selectbox(
    "Recipe", list(RECIPES), key="nr_recipe", on_change=apply_recipe,
    format_func=lambda name: f"{name} — {RECIPES[name].note}",
    help="'default' was chosen by held-out evidence (README, 'Which neurons'): refusal attribution finds the "
         "neurons whose suppression breaks refusal on prompts it never saw; 'paper' is the paper's ΔLLM on "
         "(prompt, reply) pairs; 'plnd' is SSN Lab's first default.")
recipe = RECIPES[recipe_name]

with setup.form("identify_form"):
    columns = st.columns(len(groups))
    chosen: list[str] = []
    defaults = {"en", "zh", "bn", "sw"}
    for column, (name, langs) in zip(columns, groups.items(), strict=True):
        chosen += column.multiselect(
            f"{name.upper()} languages", langs, default=[lang for lang in langs if lang in defaults],
            format_func=lambda code: f"{code} — {language_name(code)}", key=f"nr_langs_{name}")
    hr = st.multiselect("High-resource reference (SS-Neurons are shared with these)",
                        [lang for langs in groups.values() for lang in langs], default=["en"], key="nr_hr")

    c1, c2, c3, c4 = st.columns(4)
    method = recipe.method
    c1.caption(f"method **{recipe.method}**, aggregate **{recipe.aggregate}**, ranking **{recipe.ranking}**")
    p_percent = c2.number_input("Top p (%)", 0.1, 20.0, 100.0 * recipe.p, step=0.5, key="nr_p")
    n_per_language = c3.number_input("Prompts per language and label", 2, 500, 8, key="nr_n",
                                     help="The paper uses hundreds; 8 is enough to try the tool on CPU.")
    batch_size = c4.number_input("Batch size", 1, 64, 8, key="nr_batch")
    state.keep_valid("nr_kinds", lm.sites.kinds, multi=True)
    kinds = st.multiselect("Sites", list(lm.sites.kinds), default=recipe_kinds(recipe_name), key="nr_kinds",
                           help="The recipe's sites. With the impact method attn_q / attn_k are left out by default: "
                                "their exact scores cost several forward passes per prompt on a CPU "
                                "(bench/README.md); gradient methods (attribution, global) cover them at no extra "
                                "cost.")
    go = st.form_submit_button("Identify neurons", type="primary")
    speed_now = state.model_speed()
    if speed_now is not None:
        from ssn_core.progress import format_duration
        from ssn_core.speed import scoring_seconds

        n_groups = 2 * len(set(chosen) | set(hr))  # harmful + harmless per language
        estimate = scoring_seconds(speed_now, n_groups * int(n_per_language), kinds)
        st.caption(f"Estimated time for the settings above (when last applied): about "
                   f"**{format_duration(estimate)}** — {n_groups * int(n_per_language)} prompts on "
                   f"{', '.join(kinds) or 'no sites'}; {speed_now.describe()}.")


def load_prompts(source: str, languages: list[str]):
    """The chosen prompt set (harmful + harmless) restricted to the languages; raises SSNError."""
    if source.startswith("Built-in"):
        return load_builtin(languages)
    if source.startswith("MultiJail"):
        if not mj_path.strip():
            raise PromptSetError("give the path of MultiJail.csv")
        return with_harmless(load_multijail(mj_path.strip(), languages=languages))
    if upload is None:
        raise PromptSetError("choose a CSV or JSONL file to upload first")
    prompt_set = load_upload(load_file, upload, languages=languages)
    if "harmless" not in prompt_set.labels:
        prompt_set = with_harmless(prompt_set)
    return prompt_set


def form_settings() -> dict[str, str]:
    """The form's settings in the words `provenance.identify_settings` uses for a result."""
    languages = list(dict.fromkeys(list(hr) + [lang for lang in chosen if lang not in hr]))
    return {"languages": ", ".join(languages), "reference": ", ".join(hr), "importance": method,
            "top p": f"{float(p_percent):g}%", "prompts per language and label": str(int(n_per_language)),
            "sites": ", ".join(kinds)}


def run_identify(lm, prompts, languages, hr, recipe_name, p, kinds, n, batch_size, progress=None,
                 cancel: threading.Event | None = None):
    selected = prompts.select(languages=languages, limit_per_language=n)
    return identify(lm, selected, languages, hr=tuple(hr), recipe=recipe_name, p=p,
                                    kinds=tuple(kinds), batch_size=batch_size, find_direction=True,
                                    activation_means=True, progress=progress, cancel=cancel)


if go:
    languages = list(dict.fromkeys(chosen + [lang for lang in hr if lang not in chosen]))
    if len(languages) < 2 or not hr:
        st.error("Choose at least one high-resource reference and one other language.")
    elif not kinds:
        st.error("Choose at least one site kind.")
    else:
        try:
            prompt_set = load_prompts(source, languages)
            session.identify_prompts = prompt_set
            session.identify_n = int(n_per_language)
            jobs.start_job("identify", run_identify, lm, prompt_set, languages, hr, recipe_name, p_percent / 100.0,
                           kinds, int(n_per_language), int(batch_size))
        except Exception as exc:  # noqa: BLE001 - bad files, unknown languages, ...
            show_error(exc)

job = jobs.job_panel("identify")
found = jobs.result_of(job)
if found is not None:
    session.identify_result = found

# ---------------------------------------------------------------------------------------------------------------
# Import
with st.expander("Import a saved neuron set or identification result"):
    i1, i2 = st.columns(2)
    neuron_file = i1.file_uploader("Neuron set (.json or .safetensors)", type=["json", "safetensors"],
                                   key="nr_import_file")
    if neuron_file is not None and i1.button("Import neuron set", key="nr_import_set"):
        imported = call(load_upload, NeuronSet.load, neuron_file, lm.sites)
        if imported is not None:
            neuron_sources.add_imported(neuron_file.name, imported)
            st.success(f"Imported {len(imported):,} neurons as '{neuron_file.name}': use it in Chat, Validate, "
                       "Fine-tune or Learn.")
    bundled = bundle.current()
    if bundled is not None and session.identify_result is not bundled and i1.button(
            "Use the bundled starter set again", key="nr_use_bundle",
            help="The starter's bundled MS / SS sets and refusal direction (`make starter-neurons`)."):
        session.identify_result = bundled
        st.success("The bundled starter set is this session's result again.")
    result_dir = i2.text_input("Result folder (saved by the CLI or this page)", key="nr_import_dir")
    if result_dir and i2.button("Load result folder", key="nr_import_result"):
        folder = call(existing_folder, result_dir, "result folder")
        loaded = None if folder is None else call(IdentifyResult.load, folder, lm.sites)
        if loaded is not None:
            session.identify_result = loaded
            st.success(f"Loaded the identification result from {result_dir}.")

if bundle.error() is not None:
    st.warning(f"The bundled starter neuron set could not be loaded: {bundle.error()}")
result = session.identify_result
stop_without_result(result, job, "Choose languages and press **Identify neurons**; the estimate under the form comes "
                                 "from this model's measured speed.")

# ---------------------------------------------------------------------------------------------------------------
# Results
st.subheader("Results")
languages = list(result.ms)
group_map = group_of_language(st.session_state.get("nr_grouping", "MultiJail"))
m1, m2, m3 = st.columns(3)
m1.metric("Languages", len(languages))
m2.metric("SS-Neurons (union)", f"{len(result.ss_all):,}")
m3.metric("Share of all neurons", f"{100 * result.ss_all.fraction_of(lm.sites):.3f}%")
if len(result.ss_all) == 0:
    st.warning("No SS-Neurons: no MS-Neuron of the other languages is also an MS-Neuron of the reference language. "
               "Use more prompts per language or a larger p (a tiny random model has almost none).")

produced = provenance.identify_settings(result)
if result.is_bundle:
    st.caption(f"Showing {bundle.describe(result)}. It loads by itself with its model, so Chat, Validate and Learn "
               "work from the first second; identify neurons above to compute your own.")
st.caption("These results were computed with: " + provenance.describe(produced))
if result.direction is not None:
    st.caption(f"Refusal direction: layer {result.direction.layer} (difference of mean residual states between "
               f"harmful and harmless prompts of {', '.join(result.direction.meta.get('languages', []) or ['?'])}, "
               "at the last prompt token): the positive control of Chat, Validate and the dose-response check.")
changed = provenance.differences(produced, form_settings())
if changed and job is None and not result.is_bundle:
    st.info("The form above now differs from the settings of these results: " + "; ".join(changed)
            + ". Press **Identify neurons** to recompute.")

result_hr = result.hr
state.keep_valid("nr_focus", languages)
focus = st.selectbox("Language", languages, key="nr_focus",
                     index=next((i for i, lang in enumerate(languages) if lang not in result_hr), 0))
hr_names = ", ".join(result_hr) or "en"


def per_layer(name: str, neurons: NeuronSet, title: str, empty: str) -> None:
    """The set's neurons per layer, or a note when it is empty."""
    if len(neurons):
        st.altair_chart(charts.counts_per_layer(charts.counts_frame({name: neurons}), title=title))
    else:
        st.caption(empty)


left, middle, right = st.columns(3)
with left:
    per_layer(f"MS ({focus})", result.ms[focus], f"MS-Neurons of {focus} per layer",
              f"{focus} has no MS-Neurons with these settings.")
with middle:
    if focus not in result.ss:
        st.caption(f"{focus} is a reference language: its MS-Neurons define the SS-Neurons of the others.")
    else:
        per_layer(f"SS ({focus})", result.ss[focus], f"SS-Neurons of {focus} per layer (shared with {hr_names})",
                  f"{focus} has no SS-Neurons: none of its MS-Neurons is also an MS-Neuron of {hr_names}.")
with right:
    counts = ss_counts(result, group_map)
    st.altair_chart(charts.bar_per_language(counts, "ss_count", title="SS-Neurons per language"))
st.altair_chart(charts.overlap_heatmap(overlap_matrix(result), title="MS-Neuron overlap between languages (Jaccard)"),
                width="content")

# ---------------------------------------------------------------------------------------------------------------
# Neuron table and downloads
st.markdown("**Neuron table**")
which_options = ["ss_all"] + [f"ss:{lang}" for lang in result.ss] + [f"ms:{lang}" for lang in languages]
state.keep_valid("nr_table_set", which_options)
which = st.selectbox("Set", which_options, key="nr_table_set",
                     format_func=lambda w: "All SS-Neurons" if w == "ss_all" else f"{w[:2].upper()} ({w[3:]})")
table = neuron_table(result, languages, which)
query = st.text_input("Search (e.g. 'mlp', 'layer 3', 'attn_v 12')", key="nr_search")
if query.strip():
    mask = pd.Series(True, index=table.index)
    for token in query.lower().replace("layer", " ").split():
        mask &= table["site"].str.contains(token, regex=False) | (table["layer"].astype(str) == token) | (
            table["index"].astype(str) == token)
    table = table[mask]
if result.scores is None:
    st.info(bundle.NO_SCORES)
opened = explorer_links.neuron_picker_table(table, "nr_table_pick", width="stretch", height=300)
st.caption(f"{len(table):,} rows. Click a row to open that neuron in the **Explorer** (its prompts, tokens and "
           "vocabulary).")
if opened:
    explorer_links.open_in_explorer(opened)

selected_set: NeuronSet = result.ss_all if which == "ss_all" else (
    result.ss[which[3:]] if which.startswith("ss:") else result.ms[which[3:]])
selected_set = selected_set.with_model_meta(lm.sites)
d1, d2, d3, d4 = st.columns(4)
d1.download_button("Set (JSON)", json_bytes(selected_set.to_json_dict()), f"{which.replace(':', '_')}.json",
                   "application/json")
d2.download_button("Set (safetensors)", file_bytes(selected_set.save, ".safetensors"),
                   f"{which.replace(':', '_')}.safetensors", "application/octet-stream")
d3.download_button("Table (CSV)", csv_bytes(table), f"{which.replace(':', '_')}.csv", "text/csv")
save_dir = d4.text_input("Save the whole result to folder", key="nr_save_dir", label_visibility="collapsed",
                         placeholder="folder to save the whole result")
if save_dir and d4.button("Save result", key="nr_save"):
    saved = call(result.save, Path(save_dir).expanduser())
    if saved is not None:
        st.success(f"Saved to {saved}")

# ---------------------------------------------------------------------------------------------------------------
# Exact-ablation check of the fast scores


def run_ablation_check(lm, prompts, language, kinds, per_site, aggregate, progress=None,
                       cancel: threading.Event | None = None):
    from ssn_core.scoring import score

    harmful = prompts.select(languages=[language], label="harmful")
    return score(lm, harmful, method="ablation", aggregate=aggregate, kinds=kinds, sample=per_site, seed=0,
                 progress=progress, cancel=cancel)


with st.expander("Check the fast scores against exact ablation (slow)"):
    st.write("Exact ablation zeroes one sampled neuron at a time and measures how much the final hidden state "
             "changes. If the fast scores used above rank neurons like the exact effect does, the rank correlation "
             "is clearly positive.")
    prompts_used = session.identify_prompts
    if result.scores is None:
        st.info(bundle.NO_SCORES)
    elif prompts_used is None or result.scores.method == "ablation":
        st.info("Needs an identification run from this session (its prompts and fast scores).")
    else:
        a1, a2 = st.columns(2)
        per_site = a1.number_input("Neurons sampled per site", 1, 64, 4, key="nr_abl_n")
        state.keep_valid("nr_abl_lang", languages)
        check_language = a2.selectbox("Language", languages, key="nr_abl_lang")
        if st.button("Run the check", key="nr_abl_run"):
            same_prompts = prompts_used.select(limit_per_language=session.identify_n)
            jobs.start_job("ablation", run_ablation_check, lm, same_prompts, check_language,
                           tuple(result.scores.kinds), int(per_site), result.manifest.get("aggregate", "content"),
                           started_with={"language": check_language})
        ablation_job = jobs.job_panel("ablation")
        exact_scores = jobs.result_of(ablation_job)
        if exact_scores is not None:
            session.ablation_check = (ablation_job.started_with["language"], exact_scores)
        check = session.ablation_check
        if check is not None:
            check_lang, exact = check
            frame = sampled_scores(result.scores, exact, check_lang)
            if frame.empty:
                st.warning("No sampled neuron has both scores.")
            else:
                st.altair_chart(charts.score_agreement(frame))
                st.dataframe(rank_agreement(frame), hide_index=True)


# ---------------------------------------------------------------------------------------------------------------
# Dose-response: the top neurons vs matched random neurons switched off, on held-out prompts


def run_dose_response(lm, result, languages, n, fractions, generate_at, batch_size, progress=None,
                      cancel: threading.Event | None = None):
    from ssn_core.evaluation import heldout_prompt_set
    from ssn_core.faithfulness import faithfulness
    from ssn_core.generation import GenerationSettings

    prompts, note = heldout_prompt_set("builtin", languages, n, exclude_ids=result.item_ids, harmless=False)
    name = (result.manifest.get("recipe") or {}).get("name") or f"{result.scores.method}:{result.scores.aggregate}"
    found = faithfulness(lm, {name: result.scores}, prompts, languages, hr=tuple(result.hr or ("en",)),
                         fractions=fractions, ranking=result.manifest.get("ranking", "per-site"), seeds=(0,),
                         generate_at=generate_at, settings=GenerationSettings(max_new_tokens=32),
                         direction=None if result.direction is None else result.direction.unit,
                         limit_per_language=n, batch_size=batch_size, progress=progress, cancel=cancel)
    found.manifest["heldout"] = note
    return found


def parse_fractions(text: str) -> list[float]:
    import math

    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise PromptSetError(f"doses {text!r}: give fractions separated by commas, e.g. 0.001, 0.01") from None
    if not values or any(not (math.isfinite(v) and 0 < v <= 1) for v in values):
        raise PromptSetError(f"doses {text!r}: every dose must be a fraction in (0, 1]")
    return sorted(set(values))


with st.expander("Dose-response check (faithfulness)"):
    st.write("Do these scores pick neurons that matter? For a few doses p (the top fraction per layer that "
             "identification takes) the MS- and SS-Neurons are switched off and the **refusal margin** is measured "
             "on held-out built-in prompts (items identification did not use), next to as many random neurons in "
             "the same layers and sites. A faithful method's curve drops far below the random one; the grey rule is "
             "the refusal-direction control.")
    if result.scores is None:
        st.info(bundle.NO_SCORES)
    else:
        dose_languages = [lang for lang in languages if lang in BUILTIN_LANGUAGES]
        default_dose = ([lang for lang in dose_languages if lang in result_hr][:1]
                        + [lang for lang in dose_languages if lang not in result_hr][:1])
        state.keep_valid("nr_dose_langs", dose_languages, multi=True)
        f1, f2, f3 = st.columns([2, 1, 1])
        dose_langs = f1.multiselect("Languages", dose_languages, default=default_dose, key="nr_dose_langs")
        dose_n = f2.number_input("Held-out prompts per language", 1, 64, 8, key="nr_dose_n")
        dose_text = f3.text_input("Doses p", "0.001, 0.003, 0.01, 0.03", key="nr_dose_fractions",
                                  help="Top fractions per layer, comma-separated.")
        generate_choice = st.selectbox("Also generate and judge replies at", ["no dose (margin only, fast)",
                                                                              "the largest dose"],
                                       key="nr_dose_generate")
        if st.button("Run the dose-response check", key="nr_dose_run"):
            try:
                fractions = parse_fractions(dose_text)
                if not dose_langs:
                    raise PromptSetError("choose at least one language")
                generate_at = (fractions[-1],) if generate_choice.startswith("the largest") else ()
                jobs.start_job("dose_response", run_dose_response, lm, result, list(dose_langs), int(dose_n),
                               fractions, generate_at, int(st.session_state.get("nr_batch", 8)))
                session.dose_response_for = result.manifest.get("created")
            except Exception as exc:  # noqa: BLE001
                show_error(exc)
        curve_done = jobs.result_of(jobs.job_panel("dose_response"))
        if curve_done is not None:
            session.dose_response = curve_done
        curve = session.dose_response
        if curve is not None and session.dose_response_for == result.manifest.get("created"):
            st.altair_chart(curve.chart())
            held = curve.manifest.get("heldout") or {}
            st.caption(f"Held-out prompts: {held.get('source', 'built-in')} "
                       f"({held.get('excluded_item_ids', 0)} item ids excluded). Margin drop = baseline margin − "
                       "margin with the neurons off (nats; larger = refusal weakened more).")
            summary = pd.DataFrame(curve.summary()).rename(columns={
                "n_neurons": "neurons", "margin_drop": "margin drop", "random_margin_drop": "random margin drop",
                "margin_drop_vs_random": "margin drop vs random", "refusal_drop": "refusal drop",
                "random_refusal_drop": "random refusal drop", "refusal_drop_vs_random": "refusal drop vs random"})
            st.dataframe(summary.round(4), hide_index=True, width="stretch")
