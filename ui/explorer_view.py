"""Tables, charts and highlighted texts of the Explorer page, from `ssn_core.explorer` reports (no Streamlit)."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ssn_core.explain_report import activation_scale, highlight_html

KIND_NAMES = {"mlp": "MLP neuron", "attn_q": "query coordinate", "attn_k": "key coordinate",
              "attn_v": "value coordinate", "attn_o": "attention-output coordinate"}
LABEL_COLORS = alt.Scale(domain=["harmful", "harmless"], range=["#e45756", "#4c78a8"])


def describe_neuron(neuron: tuple[int, str, int]) -> str:
    layer, kind, index = neuron
    return f"layer {layer}, {KIND_NAMES.get(kind, kind)} {index}"


def _legend() -> alt.Legend:
    return alt.Legend(orient="bottom", direction="horizontal", title=None)


# ----- activations ----------------------------------------------------------------------------------------
def distribution_chart(
    distribution: list[dict], groups: list[dict], value: str = "max",
    title: str = "Peak activation of every prompt (ticks) and the mean per group (bars)",
) -> alt.Chart:
    """Per language, harmful and harmless side by side: one tick per prompt, a bar for the group's mean."""
    prompts = pd.DataFrame(distribution)
    means = pd.DataFrame(groups).rename(columns={"mean_max": "max_mean", "mean": "mean_mean"})
    means["value"] = means["max_mean" if value == "max" else "mean_mean"]
    bars = alt.Chart(means).mark_bar(opacity=0.35).encode(
        x=alt.X("language:N", title=None), xOffset="label:N", y=alt.Y("value:Q", title=f"{value} activation"),
        color=alt.Color("label:N", scale=LABEL_COLORS, legend=_legend()),
        tooltip=["language", "label", "prompts", alt.Tooltip("value:Q", format=".4g", title=f"mean of {value}")])
    ticks = alt.Chart(prompts).mark_tick(thickness=2, size=14).encode(
        x="language:N", xOffset="label:N", y=f"{value}:Q", color=alt.Color("label:N", scale=LABEL_COLORS),
        tooltip=["prompt_id", "language", "label", alt.Tooltip(f"{value}:Q", format=".4g")])
    return alt.layer(bars, ticks, title=title).properties(height=260, width="container")


def examples_html(examples: list, scale: float, empty: str = "(no prompts)") -> str:
    """Numbered prompts with their tokens highlighted (one colour scale for all of a neuron's examples)."""
    if not examples:
        return f"<em>{empty}</em>"
    items = "".join(f"<li style='margin-bottom: 6px'><code>{e.value:.3g}</code> "
                    f"{highlight_html(e.tokens, e.activations, scale)}</li>" for e in examples)
    return f"<ol style='padding-left: 1.4em'>{items}</ol>"


def scale_of(examples: dict) -> float:
    return activation_scale(examples)


# ----- vocabulary -----------------------------------------------------------------------------------------
def vocab_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["token", "logit", "script", "token_id"])


def vocab_chart(projection, n: int = 12, title: str = "Tokens it promotes (right) and suppresses (left)") -> alt.Chart:
    rows = [{**r, "side": "promoted"} for r in projection.promoted[:n]] + \
           [{**r, "side": "suppressed"} for r in projection.suppressed[:n]]
    df = pd.DataFrame(rows)
    df["shown"] = df["token"].map(lambda t: repr(t)[1:-1] or "∅")
    return alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("logit:Q", title="logit change (direction through final norm and unembedding)"),
        y=alt.Y("shown:N", sort="-x", title=None),
        color=alt.Color("side:N", scale=alt.Scale(domain=["promoted", "suppressed"], range=["#f58518", "#4c78a8"]),
                        legend=_legend()),
        tooltip=["shown", "token_id", "script", alt.Tooltip("logit:Q", format=".4g")],
    ).properties(height=max(220, 16 * len(df)), width="container")


# ----- importance -----------------------------------------------------------------------------------------
def importance_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["outranks_%"] = [None if r is None or pd.isna(r) else 100.0 * (n - r) / n
                        for r, n in zip(df["rank_in_layer"], df["of_layer"], strict=True)]
    columns = ["method", "language", "label", "value", "rank_in_layer", "of_layer", "top_percent", "outranks_%",
               "rank_in_kind", "of_kind"] + (["signed"] if "signed" in df.columns else [])
    return df[columns]


def importance_chart(df: pd.DataFrame, method: str) -> alt.Chart:
    """Per language, harmful vs harmless: the share of its layer's neurons (same site) it outranks."""
    part = df[df["method"] == method].dropna(subset=["outranks_%"])
    return alt.Chart(part, title=f"{method}: share of its layer's neurons it outranks").mark_bar().encode(
        x=alt.X("language:N", title=None), xOffset="label:N",
        y=alt.Y("outranks_%:Q", title="outranks (%)", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("label:N", scale=LABEL_COLORS, legend=_legend()),
        tooltip=["language", "label", alt.Tooltip("value:Q", format=".4g"), "rank_in_layer", "of_layer",
                 alt.Tooltip("top_percent:Q", format=".2f")],
    ).properties(height=220, width="container")


# ----- sets -----------------------------------------------------------------------------------------------
def sharing_chart(sharing: list[dict], title: str = "Which languages share its neurons (MS-Neurons of exactly "
                                                    "these languages)") -> alt.Chart:
    df = pd.DataFrame(sharing)
    return alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("neurons:Q"), y=alt.Y("languages:N", sort="-x", title=None),
        color=alt.Color("n_languages:O", title="languages", legend=_legend()),
        tooltip=["languages", "neurons"],
    ).properties(height=max(160, 22 * len(df)), width="container")


def set_neurons_frame(rows: list[dict]) -> pd.DataFrame:
    """One row per neuron of a set (the picker table reads layer, site, index)."""
    return pd.DataFrame(rows).rename(columns={"kind": "site"})
