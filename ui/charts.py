"""Altair chart builders. Each takes a tidy DataFrame and returns a chart; no Streamlit in here."""

from __future__ import annotations

import altair as alt
import pandas as pd

from ssn_core.neurons import NeuronSet

SITE_ORDER = ["mlp", "attn_q", "attn_k", "attn_v", "attn_o"]
METRIC_COLORS = {"asr": "#e45756", "refusal": "#4c78a8", "off_target": "#bab0ac"}


def counts_frame(sets: dict[str, NeuronSet]) -> pd.DataFrame:
    """Tidy counts: one row per (set name, layer, site kind) with the number of neurons."""
    rows = []
    for name, neuron_set in sets.items():
        for (layer, kind), count in neuron_set.counts().items():
            rows.append({"set": name, "layer": layer, "site": kind, "count": count})
    return pd.DataFrame(rows, columns=["set", "layer", "site", "count"])


def counts_per_layer(df: pd.DataFrame, title: str = "") -> alt.Chart:
    """Stacked bars: neurons per layer, coloured by site kind; one panel per set (MS / SS)."""
    base = alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("sum(count):Q", title="neurons"),
        color=alt.Color("site:N", sort=SITE_ORDER, title="site"),
        order=alt.Order("site:N"),
        tooltip=["set", "layer", "site", "count"],
    ).properties(height=220)
    if df["set"].nunique() > 1:
        return base.facet(row=alt.Row("set:N", title=None))
    return base


def overlap_heatmap(matrix: pd.DataFrame, title: str = "Overlap (Jaccard)", value_name: str = "jaccard") -> alt.Chart:
    """Language × language heatmap of a square DataFrame (index and columns = languages)."""
    long = matrix.rename_axis(index="lang_a", columns="lang_b").stack().rename(value_name).reset_index()
    order = list(matrix.index)
    heat = alt.Chart(long, title=title).mark_rect().encode(
        x=alt.X("lang_b:N", sort=order, title=None),
        y=alt.Y("lang_a:N", sort=order, title=None),
        color=alt.Color(f"{value_name}:Q", scale=alt.Scale(scheme="blues"), title=value_name),
        tooltip=["lang_a", "lang_b", alt.Tooltip(f"{value_name}:Q", format=".3f")],
    )
    text = alt.Chart(long).mark_text(fontSize=13).encode(
        x=alt.X("lang_b:N", sort=order), y=alt.Y("lang_a:N", sort=order),
        text=alt.Text(f"{value_name}:Q", format=".2f"),
        color=alt.condition(alt.datum[value_name] > 0.5, alt.value("white"), alt.value("black")),
    )
    size = max(260, 56 * len(order))
    return (heat + text).properties(width=size, height=size)


def bar_per_language(df: pd.DataFrame, value: str, title: str, color: str = "group") -> alt.Chart:
    """One bar per language (columns: language, ``value``, optional group)."""
    enc = {
        "x": alt.X("language:N", sort="-y", title=None),
        "y": alt.Y(f"{value}:Q", title=value.replace("_", " ")),
        "tooltip": list(df.columns),
    }
    if color in df.columns:
        enc["color"] = alt.Color(f"{color}:N", title=color)
    return alt.Chart(df, title=title).mark_bar().encode(**enc).properties(height=240)


def rates_by_condition(df: pd.DataFrame, title: str = "Refusal and attack success per condition") -> alt.Chart:
    """Grouped bars with CI error bars. Columns: language, condition, metric, value, lo, hi."""
    bars = alt.Chart().mark_bar().encode(
        x=alt.X("condition:N", title=None, sort=None),
        y=alt.Y("value:Q", title="rate", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("metric:N", title=None,
                        scale=alt.Scale(domain=["asr", "refusal", "off_target"],
                                        range=[METRIC_COLORS["asr"], METRIC_COLORS["refusal"],
                                               METRIC_COLORS["off_target"]])),
        xOffset="metric:N",
        tooltip=["language", "condition", "metric", alt.Tooltip("value:Q", format=".2f"),
                 alt.Tooltip("lo:Q", format=".2f"), alt.Tooltip("hi:Q", format=".2f")],
    )
    errors = alt.Chart().mark_errorbar(ticks=True).encode(
        x=alt.X("condition:N", sort=None), xOffset="metric:N",
        y=alt.Y("lo:Q", title="rate"), y2="hi:Q",
    )
    return alt.layer(bars, errors, data=df).properties(height=240, width=alt.Step(22)).facet(
        column=alt.Column("language:N", title=None), title=title)


def scatter_count_vs_asr(df: pd.DataFrame, x: str = "ss_count", y: str = "asr_drop",
                         title: str = "SS-Neuron count vs attack success") -> alt.Chart:
    """Scatter of one point per language with labels and a linear trend line."""
    points = alt.Chart(df).mark_circle(size=90).encode(
        x=alt.X(f"{x}:Q", title=x.replace("_", " ")), y=alt.Y(f"{y}:Q", title=y.replace("_", " ")),
        tooltip=list(df.columns),
    )
    labels = points.mark_text(align="left", dx=7).encode(text="language:N")
    layers = [points, labels]
    if len(df) >= 3:
        layers.append(points.transform_regression(x, y).mark_line(strokeDash=[4, 3], color="gray"))
    return alt.layer(*layers, title=title).properties(height=280)


def loss_curve(df: pd.DataFrame, title: str = "Training loss") -> alt.Chart:
    """Line chart of loss per step (columns: step, loss, optional series)."""
    enc = {"x": alt.X("step:Q"), "y": alt.Y("loss:Q", scale=alt.Scale(zero=False)), "tooltip": list(df.columns)}
    if "series" in df.columns:
        enc["color"] = alt.Color("series:N", title=None)
    return alt.Chart(df, title=title).mark_line(point=len(df) < 60).encode(**enc).properties(height=240)


def score_agreement(df: pd.DataFrame, title: str = "Fast score vs exact ablation (sampled neurons)") -> alt.Chart:
    """Scatter of the fast importance vs the exact ablation effect, one point per sampled neuron (log axes)."""
    return alt.Chart(df, title=title).mark_circle(size=60, opacity=0.7).encode(
        x=alt.X("fast:Q", scale=alt.Scale(type="symlog"), title="fast score (identification)"),
        y=alt.Y("exact:Q", scale=alt.Scale(type="symlog"), title="exact ablation effect"),
        color=alt.Color("site:N", sort=SITE_ORDER),
        tooltip=["layer", "site", "index", alt.Tooltip("fast:Q", format=".4g"), alt.Tooltip("exact:Q", format=".4g")],
    ).properties(height=280)
