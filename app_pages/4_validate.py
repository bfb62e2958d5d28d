"""Validate page: do the identified neurons *cause* safety? Suppress them (and random controls) and measure."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ui import charts, jobs
from ui.common import csv_bytes, json_bytes, link, need, require_model

st.title("Validate")
st.write(
    "Causal check of the identified neurons: the harmful prompts of each language are answered with "
    "**no intervention** (baseline), with the **MS / SS-Neurons suppressed**, with **as many random neurons** "
    "suppressed (the control, several seeds), and with the SS-Neurons **reinforced**. If the neurons carry "
    "safety, suppressing them raises the attack success rate (ASR) much more than random suppression does."
)
lm = require_model()
result = st.session_state.get("identify_result")
if result is None:
    st.info("Nothing to validate yet: identify MS- and SS-Neurons on the **Neurons** page first.")
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
    st.stop()

GenerationSettings = need("ssn_core.generation").GenerationSettings
ValidationResult, validate = need("ssn_core.validation").ValidationResult, need("ssn_core.validation").validate

languages_available = list(result.ms)
prompts = st.session_state.get("identify_prompts")
if prompts is None:  # e.g. a result folder was imported: use the built-in prompts of its languages
    from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin

    prompts = load_builtin([lang for lang in languages_available if lang in BUILTIN_LANGUAGES] or ["en"])
    st.caption("Prompts: the built-in set (the identification's own prompts are not in this session).")
languages_available = [lang for lang in languages_available if lang in prompts.languages]

with st.form("validate_form"):
    languages = st.multiselect("Languages", languages_available,
                               default=languages_available[: min(4, len(languages_available))], key="val_langs")
    c1, c2, c3, c4 = st.columns(4)
    limit = c1.number_input("Prompts per language", 1, 500, 8, key="val_limit",
                            help="Harmful prompts of each language; more = tighter confidence intervals, slower.")
    n_seeds = c2.number_input("Random-control seeds", 1, 10, 3, key="val_seeds")
    alpha = c3.number_input("Reinforce scale α", 0.0, 10.0, 2.0, step=0.5, key="val_alpha")
    max_new = c4.number_input("Max new tokens", 4, 512, 48, key="val_tokens")
    batch = st.slider("Batch size", 1, 64, 8, key="val_batch",
                      help="Rows generated together (lower it if memory is short).")
    go = st.form_submit_button("Run validation", type="primary")

if go:
    if not languages:
        st.error("Choose at least one language.")
    else:
        settings = GenerationSettings(max_new_tokens=int(max_new))
        jobs.start_job("validate", validate, lm, result, prompts, languages, settings, alphas=(float(alpha),),
                       seeds=tuple(range(int(n_seeds))), batch_size=int(batch), limit_per_language=int(limit),
                       hr_language=getattr(result, "hr", ("en",))[0] if getattr(result, "hr", None) else "en")

job = jobs.job_panel("validate")
if job is not None and not job.running and isinstance(job.result, ValidationResult):
    st.session_state["validation_result"] = job.result
    st.session_state.pop("job:validate", None)

vres: ValidationResult | None = st.session_state.get("validation_result")
if vres is None:
    if job is None:
        st.info("Choose languages and press **Run validation**. A few prompts per language take a minute on CPU.")
    st.stop()


def chart_frame(table: list[dict]) -> pd.DataFrame:
    """ASR and refusal per (language, condition); random seeds collapsed to mean with min–max bars."""
    df = pd.DataFrame(table)
    df["label"] = df["condition"] + df["alpha"].map(lambda a: "" if pd.isna(a) else f" ×{a:g}")
    rows = []
    for (language, label), group in df.groupby(["language", "label"], sort=False):
        if len(group) > 1:  # random seeds: mean, spread as the error bar
            for metric in ("asr", "refusal", "off_target"):
                rows.append({"language": language, "condition": label, "metric": metric,
                             "value": group[metric].mean(), "lo": group[metric].min(), "hi": group[metric].max()})
        else:
            r = group.iloc[0]
            rows.append({"language": language, "condition": label, "metric": "asr", "value": r["asr"],
                         "lo": r["ci_low"], "hi": r["ci_high"]})
            rows.append({"language": language, "condition": label, "metric": "refusal", "value": r["refusal"],
                         "lo": r["refusal_ci_low"], "hi": r["refusal_ci_high"]})
            rows.append({"language": language, "condition": label, "metric": "off_target", "value": r["off_target"],
                         "lo": r["off_target"], "hi": r["off_target"]})
    return pd.DataFrame(rows)


st.subheader("Results")
st.altair_chart(charts.rates_by_condition(chart_frame(vres.table)))
st.caption("asr = complied with the harmful request, refusal = refused, off_target = neither (echo, loop, wrong "
           "language). Error bars: 95% bootstrap interval for single runs; min–max over seeds for the random controls.")

verdicts = []
for language, targets in vres.summary.get("languages", {}).items():
    for target, cmp in targets.items():
        verdicts.append({"language": language, "target": target, "beats random": cmp["beats_random"],
                         "refusal drop (target)": round(cmp["drop_target"], 3),
                         "refusal drop (random, mean)": round(cmp["drop_random_mean"], 3),
                         "seed spread": round(cmp["spread"], 3)})
if verdicts:
    st.markdown("**Does suppressing the target beat the random control?**")
    st.dataframe(pd.DataFrame(verdicts), hide_index=True, width="stretch")

corr = vres.summary.get("correlation", {})
if len(corr.get("ss_counts") or {}) >= 2:
    scatter = pd.DataFrame({"language": list(corr["ss_counts"]),
                            "ss_count": list(corr["ss_counts"].values()),
                            "baseline_asr": [corr["baseline_asr"][lang] for lang in corr["ss_counts"]]})
    st.altair_chart(charts.scatter_count_vs_asr(scatter, x="ss_count", y="baseline_asr",
                                                title="SS-Neuron count vs baseline ASR"))
    if corr.get("pearson") is None:
        st.caption(str(corr.get("note", "Too few languages for a correlation.")))
    else:
        st.caption(f"Pearson {corr['pearson']:+.2f}, Spearman {corr['spearman']:+.2f} over {corr['n']} languages. "
                   f"The paper reports a strong negative correlation (more SS-Neurons, lower ASR).")
notes = vres.summary.get("notes", [])
if notes:
    with st.expander(f"Notes ({len(notes)}): conditions skipped"):
        for note in notes:
            st.caption(note)

table = pd.DataFrame(vres.table)
st.dataframe(table, hide_index=True, width="stretch")
c1, c2, c3 = st.columns(3)
c1.download_button("Table (CSV)", csv_bytes(table), "validation_table.csv", "text/csv")
c2.download_button("All replies (CSV)", csv_bytes(pd.DataFrame(vres.rows)), "validation_replies.csv", "text/csv")
c3.download_button("Summary + manifest (JSON)", json_bytes({"summary": vres.summary, "manifest": vres.manifest}),
                   "validation_summary.json", "application/json")
with st.expander("Replies"):
    st.dataframe(pd.DataFrame(vres.rows), hide_index=True, width="stretch")
