"""Fine-tune page: train only the parameters owned by a neuron set (a small delta), compare before/after."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.delta import NeuronDelta
from ssn_core.judges import load_refusal_templates
from ssn_core.progress import format_duration
from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin
from ssn_core.training import BASELINES, StudyConfig, StudyResult, TrainConfig, run_study
from ui import charts, jobs, neuron_sources, provenance, state
from ui.common import PAGE_PATHS, call, file_bytes, json_bytes, link, load_upload, model_page, stop_without_result
from ui.state import session

lm = model_page("Fine-tune", (
    "Train **only the parameters that belong to a neuron set** (for the paper: the SS-Neurons) on harmful "
    "prompts paired with refusals in the same language, plus harmless prompts paired with the model's own "
    "answers so it does not learn to refuse everything. The base model is never changed: the result is a "
    "small *delta* you can switch on in the Chat page, download, or load again later."
))


# ---------------------------------------------------------------------------------------------------------------
choices = [c for c in neuron_sources.available_choices() if c.kind not in ("everything", "none")]
identify_prompts = session.identify_prompts

with st.expander("Load a delta trained earlier", expanded=False):
    uploaded = st.file_uploader("Delta file (.safetensors)", type=["safetensors"], key="ft_upload")
    if uploaded is not None and st.button("Load delta", key="ft_load_delta"):
        delta = call(load_upload, NeuronDelta.load, uploaded, model=lm.model, sites=lm.sites)
        if delta is not None:
            session.chat_delta = delta
            st.success(f"Loaded a delta on {len(delta.neurons):,} neurons; it is available in the Chat page.")

if not choices:
    st.info("No neuron set to train yet: identify SS-Neurons on the **Neurons** page (or import a neuron set there).")
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
    st.stop()

templates = call(load_refusal_templates) or {}
result_ss = session.identify_result
candidate_languages = [lang for lang in (list(result_ss.ms) if result_ss is not None else
                                         list(BUILTIN_LANGUAGES)) if lang in templates]
default_languages = [lang for lang in candidate_languages if lang != "en"][:3] or candidate_languages[:1]

with st.form("finetune_form"):
    labels = [c.label() for c in choices]
    state.keep_valid("ft_target", labels)
    state.keep_valid("ft_languages", candidate_languages, multi=True)
    target_label = st.selectbox("Train the parameters of", labels, key="ft_target",
                                help="The paper trains the SS-Neurons (all NHR languages together).")
    languages = st.multiselect("Languages of the safety data", candidate_languages, default=default_languages,
                               key="ft_languages")
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", 1, 5000, 20, key="ft_steps")
    lr = c2.number_input("Learning rate", 1e-6, 1e-1, 5e-4, format="%.0e", key="ft_lr")
    batch_size = c3.number_input("Batch size", 1, 64, 4, key="ft_batch")
    n_per_language = c4.number_input("Items per language", 2, 500, 12, key="ft_n",
                                     help="Harmful (and harmless) items per language; a quarter is held out.")
    evaluate = st.checkbox("Evaluate before and after on the held-out prompts", value=True, key="ft_eval")
    baselines = st.multiselect("Baselines (same data and steps; on a private copy of the model)",
                               list(BASELINES), default=[], key="ft_baselines",
                               help="random: as many random neurons; LoRA r=8 or rank-matched; full fine-tuning "
                                    "(small models only). Each needs extra time and memory.")
    go = st.form_submit_button("Start fine-tuning", type="primary")
    speed_now = state.model_speed()
    if speed_now is not None:
        from ssn_core.speed import fine_tune_plan, total_seconds

        plan = fine_tune_plan(speed_now, languages=max(len(languages), 1), items_per_language=int(n_per_language),
                              steps=int(steps), batch_size=int(batch_size), evaluate=bool(evaluate))
        st.caption(f"Estimated time for the settings above (when last applied): about "
                   f"**{format_duration(total_seconds(plan))}** — "
                   + ", ".join(f"{name} {format_duration(seconds)}" for name, seconds in plan)
                   + (" (baselines extra)" if baselines else "") + f"; {speed_now.describe()}.")

if go:
    if not languages:
        st.error("Choose at least one language.")
    else:
        choice = choices[labels.index(target_label)]
        neurons = neuron_sources.resolve(choice, lm.sites)
        prompts = identify_prompts
        if prompts is None or any(lang not in prompts.languages for lang in languages):
            prompts = call(load_builtin, languages)
        if prompts is not None:
            config = StudyConfig(train=TrainConfig(steps=int(steps), lr=float(lr), batch_size=int(batch_size),
                                                   target=choice.label()),
                                 languages=list(languages), n_per_language=int(n_per_language),
                                 evaluate=bool(evaluate), baselines=tuple(baselines))
            settings = {"neurons": choice.label(), "languages": list(languages), "steps": int(steps),
                        "learning rate": f"{float(lr):g}", "batch size": int(batch_size),
                        "items per language": int(n_per_language), "evaluated": bool(evaluate),
                        "baselines": list(baselines) or "none"}
            del session.train_result  # results of other settings must not sit under this run
            job = jobs.start_job("finetune", run_study, lm, neurons, config, prompts=prompts,
                                 started_with={"settings": settings})
            job.live["series"] = "neurons"


METRICS = {"refusal": "refusal (held-out harmful)", "over_refusal": "over-refusal (held-out harmless)",
           "refusal_nll": "refusal NLL", "retain_nll": "retain NLL"}


def before_after_table(before_rows: list[dict], after_rows: list[dict]) -> pd.DataFrame:
    """Long and narrow: one row per (language, metric) with before, after and the change (fits any width)."""
    before = pd.DataFrame(before_rows).set_index("language")
    after = pd.DataFrame(after_rows).set_index("language")
    rows = []
    for language in before.index:
        for column, name in METRICS.items():
            b, a = before.at[language, column], after.at[language, column]
            rows.append({"language": language, "metric": name, "before": b, "after": a,
                         "change": None if pd.isna(a) or pd.isna(b) else a - b})
    return pd.DataFrame(rows, columns=["language", "metric", "before", "after", "change"])


def live_losses(job: jobs.Job) -> None:
    losses = job.live.get("losses", [])
    if losses:
        st.altair_chart(charts.loss_curve(pd.DataFrame(losses)))


job = jobs.job_panel("finetune", live=live_losses)
if job is not None and not job.running and isinstance(job.result, StudyResult):
    study: StudyResult = job.result
    if study.baseline_error is not None:  # shown as a failed job: the error, no result
        st.error(str(study.baseline_error))
    else:
        session.train_result = state.FineTuneRun(study, job.started_with.get("settings", {}), job.phases_done())
        jobs.drop_job("finetune")

out = session.train_result
stop_without_result(out, job, "Choose the neurons and languages, then press **Start fine-tuning**; the estimate "
                              "under the form comes from this model's measured speed.")

result = out.study.result
st.subheader("Result")
if out.settings:
    st.caption("This result was computed with: " + provenance.describe(provenance.train_settings(out.settings)))
m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("Trained parameters", f"{result.trainable_params:,}")
m2.metric("Share of the model", f"{100 * result.trainable_share:.3f}%")
m3.metric("Final loss", f"{result.losses[-1]:.3f}" if result.losses else "-")
m4.metric("Training time", format_duration(result.seconds))
m5.metric("Total time", format_duration(out.study.seconds),
          help="Everything the job did: the retain replies, the evaluations before and after, the training.")
if out.phases:
    st.caption("Phases: " + " · ".join(f"{p['phase']} {format_duration(p['seconds'])}" for p in out.phases))
if result.losses:
    st.altair_chart(charts.loss_curve(pd.DataFrame({"step": range(1, len(result.losses) + 1),
                                                    "loss": result.losses})))

if result.before is not None and result.after is not None:
    st.markdown("**Held-out prompts, before and after** (refusal should rise, over-refusal and retain NLL "
                "should barely move):")
    st.dataframe(before_after_table(result.before.table(), result.after.table()), hide_index=True, width="stretch")
if out.study.baselines:
    st.markdown("**Baselines on the same data and steps:**")
    st.dataframe(pd.DataFrame(out.study.baseline_rows()), hide_index=True, width="stretch")

c1, c2, c3 = st.columns(3)
if result.delta is not None:
    c1.download_button("Download the delta (.safetensors)", file_bytes(result.delta.save, ".safetensors"),
                       "ssn_delta.safetensors", "application/octet-stream")
    if c2.button("Use in chat", type="primary", key="ft_use_in_chat"):
        session.chat_delta = result.delta
        session.chat_use_delta = True
        st.switch_page(PAGE_PATHS["chat"])
c3.download_button("Run record (JSON)", json_bytes(result.to_dict()), "train_result.json", "application/json")
