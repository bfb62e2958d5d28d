"""Validate page: do the identified neurons *cause* safety? Suppress them (and random controls) and measure."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from ssn_core.evaluation import heldout_prompt_set
from ssn_core.generation import GENERATION_BATCH_SIZE, GenerationSettings
from ssn_core.prompts import BUILTIN_LANGUAGES, PromptSet, load_builtin
from ssn_core.validation import ValidationResult, plan_conditions, validate
from ui import charts, jobs, neuron_sources, provenance, state
from ui.common import csv_bytes, json_bytes, link, model_page, show_error, stop_without_result
from ui.state import session

lm = model_page("Validate", (
    "Causal check of the identified neurons: the harmful prompts of each language are answered with "
    "**no intervention** (baseline), with the **MS / SS-Neurons suppressed**, with **as many random neurons** "
    "suppressed (the control, several seeds), and with the SS-Neurons **reinforced**. If the neurons carry "
    "safety, suppressing them raises the attack success rate (ASR) much more than random suppression does."
))
targets = neuron_sources.validation_targets()
if not targets:
    st.info("Nothing to validate yet: identify MS- and SS-Neurons on the **Neurons** page first (or import a "
            "neuron set there).")
    link("neurons", "Go to the Neurons page", icon=":material/biotech:")
    st.stop()


def parse_betas(text: str) -> tuple[float, ...]:
    """The additive strengths typed in the form ("" = none); SSNError for anything else than numbers >= 0."""
    import math

    from ssn_core.errors import SSNError

    try:
        values = tuple(float(v) for v in str(text or "").replace(";", ",").split(",") if v.strip())
    except ValueError:
        raise SSNError(f"additive reinforcement β {text!r}: give numbers separated by commas, e.g. 0.5, 1") from None
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise SSNError(f"additive reinforcement β {text!r}: every β must be a finite number >= 0")
    return values


state.keep_valid("val_source", targets)
source_label = st.selectbox("Neurons to validate", list(targets), key="val_source",
                            help="An imported set is validated as one target: suppressed against matched random "
                                 "controls, and reinforced.")
result = targets[source_label]
imported = isinstance(result, neuron_sources.SetAsResult)

prompts = None if imported else session.identify_prompts
if prompts is not None and result.is_bundle:
    prompts = None  # the session's prompts belong to its own identification, not to the bundle
languages_available = list(BUILTIN_LANGUAGES) if imported else list(result.ms)
used_ids = result.item_ids
if used_ids and (prompts is None or str(prompts.source).startswith("builtin")):
    # held out by construction: the built-in items identification did not use (and their counterparts)
    prompts, heldout_note = heldout_prompt_set(
        "builtin", [lang for lang in languages_available if lang in BUILTIN_LANGUAGES] or ["en"], None,
        exclude_ids=used_ids)
    st.caption(f"Prompts: the built-in items identification did not use (held out; "
               f"{heldout_note['excluded_item_ids']} item ids excluded).")
elif used_ids:
    prompts = PromptSet(tuple(p for p in prompts if p.id not in used_ids), prompts.source)
    st.caption(f"Prompts: {prompts.source}, without the {len(used_ids)} items identification used (held out).")
elif prompts is None:  # an imported set: the built-in prompts of its languages
    prompts = load_builtin([lang for lang in languages_available if lang in BUILTIN_LANGUAGES] or ["en"])
    st.caption("Prompts: the built-in set (the identification's own prompts are not in this session).")
languages_available = [lang for lang in languages_available if lang in prompts.languages]
has_direction = result.direction is not None
has_means = result.activations is not None
hr_language = (result.hr or ("en",))[0]
state.keep_valid("val_langs", languages_available, multi=True)

with st.form("validate_form"):
    languages = st.multiselect("Languages", languages_available,
                               default=languages_available[: min(4, len(languages_available))], key="val_langs")
    c1, c2, c3, c4 = st.columns(4)
    limit = c1.number_input("Prompts per language", 1, 500, 8, key="val_limit",
                            help="Harmful prompts of each language; more = tighter confidence intervals, slower.")
    n_seeds = c2.number_input("Random-control seeds", 1, 10, 3, key="val_seeds")
    alpha = c3.number_input("Reinforce scale α", 0.0, 10.0, 2.0, step=0.5, key="val_alpha")
    max_new = c4.number_input("Max new tokens", 4, 512, 48, key="val_tokens")
    o1, o2, o3 = st.columns(3)
    use_direction = o1.checkbox("Refusal-direction control", value=True, key="val_direction",
                                disabled=not has_direction,
                                help="The positive control: the refusal direction projected out of every layer. It "
                                     "says how far refusal can be broken at all; each target's drop is reported as "
                                     "a share of it." + ("" if has_direction else " (This result has no direction.)"))
    over_refusal = o2.checkbox("Over-refusal on harmless prompts", value=True, key="val_over",
                               help="The baseline and the reinforcements also answer the language's harmless prompts: "
                                    "does reinforcing make the model refuse what it should answer?")
    betas_text = o3.text_input("Additive reinforcement β", "", key="val_betas", disabled=not has_means,
                               placeholder="e.g. 0.5, 1, 2" if has_means else "needs activation means",
                               help="Comma-separated strengths: each SS-Neuron gets β times its mean activation on the "
                                    "high-resource language's harmful prompts added (beside the ×α scale). Empty: "
                                    "none.")
    batch = st.slider("Batch size", 1, 64, GENERATION_BATCH_SIZE, key="val_batch",
                      help="Rows generated together (lower it if memory is short).")
    go = st.form_submit_button("Run validation", type="primary")
    speed_now = state.model_speed()
    if speed_now is not None and languages:
        from ssn_core.progress import format_duration
        from ssn_core.speed import generation_seconds

        rows = 0
        try:
            for language in languages:
                plan, _ = plan_conditions(
                    result, language, lm.sites, (float(alpha),), tuple(range(int(n_seeds))), hr_language,
                    result.direction.unit if has_direction and use_direction else None, parse_betas(betas_text))
                n_prompts = len(prompts.select(languages=[language], label="harmful", limit_per_language=int(limit)))
                rows += len(plan) * n_prompts
                if over_refusal:
                    rows += n_prompts * len([c for c in plan if c.kind in ("baseline", "reinforce", "shift")])
        except Exception:  # noqa: BLE001 - the run itself reports what is wrong; the hint is optional
            rows = 0
        estimate = generation_seconds(speed_now, rows, int(max_new), int(batch))
    if speed_now is not None and languages and rows:
        st.caption(f"Estimated time for the settings above (when last applied): about "
                   f"**{format_duration(estimate)}** — {rows} replies of up to {int(max_new)} tokens; "
                   f"{speed_now.describe()}.")

if go:
    if not languages:
        st.error("Choose at least one language.")
    else:
        try:
            betas = parse_betas(betas_text) if has_means else ()
        except Exception as exc:  # noqa: BLE001 - a typo in the β list
            show_error(exc)
        else:
            settings = GenerationSettings(max_new_tokens=int(max_new))
            jobs.start_job("validate", validate, lm, result, prompts, languages, settings, alphas=(float(alpha),),
                           seeds=tuple(range(int(n_seeds))), batch_size=int(batch), limit_per_language=int(limit),
                           hr_language=hr_language,
                           direction=None if use_direction and has_direction else False,
                           over_refusal=bool(over_refusal), betas=betas)

job = jobs.job_panel("validate")
if job is not None and job.running:
    st.caption("The results below (if any) are from the previous run.")
validated = jobs.result_of(job)
if validated is not None:
    session.validation_result = validated

vres: ValidationResult | None = session.validation_result
stop_without_result(vres, job, "Choose languages and press **Run validation**; the estimate under the form comes "
                               "from this model's measured speed.")


def condition_suffix(condition: str, alpha) -> str:
    """' ×2' for a scale reinforcement, ' +1·mean' for an additive one, '' otherwise."""
    if alpha is None or pd.isna(alpha):
        return ""
    return f" +{alpha:g}·mean" if str(condition).startswith("shift_") else f" ×{alpha:g}"


def chart_frame(table: list[dict], set_name: str = "") -> pd.DataFrame:
    """ASR and refusal per (language, condition); random seeds collapsed to mean with min–max bars."""
    df = pd.DataFrame(table)
    if "label" not in df.columns:
        df["label_kind"] = "harmful"
    else:
        df["label_kind"] = df["label"].fillna("harmful")
    condition = df["condition"].str.replace("_ss_all", f" {set_name}", regex=False) if set_name else df["condition"]
    df["label"] = condition.str.cat(df.apply(lambda r: condition_suffix(r["condition"], r["alpha"]), axis=1)) \
        + df["label_kind"].map(lambda kind: " [harmless]" if kind == "harmless" else "")
    rows = []
    for (language, label), group in df.groupby(["language", "label"], sort=False):
        if len(group) > 1:  # random seeds: mean, spread as the error bar
            for metric in ("asr", "refusal", "off_target"):
                rows.append({"language": language, "condition": label, "metric": metric,
                             "value": group[metric].mean(), "lo": group[metric].min(), "hi": group[metric].max()})
        elif group.iloc[0]["label_kind"] == "harmless":  # over-refusal: the refusal rate on harmless prompts
            r = group.iloc[0]
            rows.append({"language": language, "condition": label, "metric": "refusal", "value": r["refusal"],
                         "lo": r["refusal_ci_low"], "hi": r["refusal_ci_high"]})
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
st.caption("These results were computed with: " + provenance.describe(provenance.validation_settings(vres)))
frame = chart_frame(vres.table, "set" if provenance.validation_neurons(vres).get("imported") else "")
chart_languages = list(dict.fromkeys(frame["language"]))
per_row = 2 if len(chart_languages) > 1 else 1
for start in range(0, len(chart_languages), per_row):  # a grid of charts, each fitting its column
    # the last row can have fewer charts than columns
    for column, language in zip(st.columns(per_row), chart_languages[start:start + per_row], strict=False):
        with column:
            st.altair_chart(charts.rates_by_condition(frame[frame["language"] == language],
                                                      title=f"{language}: refusal and attack success per condition"))
st.caption("asr = complied with the harmful request, refusal = refused, off_target = neither (echo, loop, wrong "
           "language); [harmless] bars: the refusal rate on harmless prompts (over-refusal). Error bars: 95% bootstrap "
           "interval for single runs; min–max over seeds for the random controls.")


def rounded(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


verdicts = []
for language, targets in vres.summary.get("languages", {}).items():
    for target, cmp in targets.items():
        paired = cmp.get("paired") or {}
        share = cmp.get("share_of_direction")
        verdicts.append({
            "language": language, "target": target, "beats random": cmp["beats_random"],
            "refusal drop (target)": rounded(cmp["drop_target"]),
            "refusal drop (random, mean)": rounded(cmp["drop_random_mean"]),
            "difference to random": rounded(paired.get("mean")),
            "95% CI": (f"[{paired['ci_low']:+.2f}, {paired['ci_high']:+.2f}]" if paired else None),
            "p-value": rounded(paired.get("p_value"), 4), "n": paired.get("n"),
            "share of the control's drop": None if share is None else f"{share:.0%}",
            "note": paired.get("note") or "", "seed spread": rounded(cmp["spread"])})
if verdicts:
    st.markdown("**Does suppressing the target beat the random control?**")
    st.dataframe(pd.DataFrame(verdicts), hide_index=True, width="stretch")
    st.caption("Difference to random: per prompt, refusal under the random controls minus refusal under the target "
               "(mean over prompts), with a 95% bootstrap interval and a sign-flip permutation p-value; *beats "
               "random* means the interval excludes 0. Share of the control's drop: the target's refusal drop as a "
               "share of the refusal-direction control's.")

control_rows = [{"language": language, "baseline refusal": rounded(c["baseline_refusal"]),
                 "refusal with the direction ablated": rounded(c["refusal"]), "drop": rounded(c["drop"]),
                 "ASR with the direction ablated": rounded(c.get("asr"))}
                for language, c in vres.summary.get("direction", {}).items()]
if control_rows:
    st.markdown("**Positive control: the refusal direction ablated**")
    st.dataframe(pd.DataFrame(control_rows), hide_index=True, width="stretch")
    st.caption("How far this model's refusal can be broken at all (the direction is projected out of the residual "
               "stream at every layer); a neuron set's drop is judged against it.")

over_rows = [{"language": r["language"], "condition": r["condition"] + condition_suffix(r["condition"], r["alpha"]),
              "over-refusal": rounded(r["refusal"]), "off_target": rounded(r["off_target"]), "n": r["n"],
              "95% CI": (f"[{r['refusal_ci_low']:.2f}, {r['refusal_ci_high']:.2f}]"
                         if r.get("refusal_ci_low") is not None else None)}
             for r in vres.table if r.get("label") == "harmless"]
if over_rows:
    st.markdown("**Over-refusal on harmless prompts** ([harmless] rows)")
    st.dataframe(pd.DataFrame(over_rows), hide_index=True, width="stretch")
    sweep = [{"language": language, "form": point["form"], "target": point["target"], "strength": point["alpha"],
              "refusal": rounded(point["refusal"]), "refusal gain": rounded(point["refusal_gain"]),
              "over-refusal change": rounded(point.get("over_refusal_change"))}
             for language, points in vres.summary.get("reinforce", {}).items() for point in points]
    if sweep:
        st.caption("Reinforcement trade-off: refusal gained on harmful prompts vs over-refusal added on harmless ones "
                   "(form scale = ×α, add = +β × mean harmful activation).")
        st.dataframe(pd.DataFrame(sweep), hide_index=True, width="stretch")

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
