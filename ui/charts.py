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


def _legend_below(title: str | None = None) -> alt.Legend:
    """A legend under the chart: it stays inside the chart's own column instead of spilling into the next."""
    return alt.Legend(orient="bottom", direction="horizontal", title=title)


def wrap_title(text: str, width_px: int, char_px: float = 7.5) -> list[str]:
    """Split a chart title into lines that fit ``width_px`` (about ``char_px`` per character at title size)."""
    limit = max(10, int(width_px / char_px))
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > limit:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def counts_per_layer(df: pd.DataFrame, title: str = "") -> alt.Chart:
    """Stacked bars: neurons per layer, coloured by site kind, for one set (draw one chart per set).

    Fits its container (no facets, legend below), so two of them sit side by side without overlapping.
    """
    return alt.Chart(df, title=title).mark_bar().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("sum(count):Q", title="neurons"),
        color=alt.Color("site:N", sort=SITE_ORDER, legend=_legend_below("site")),
        order=alt.Order("site:N"),
        tooltip=["set", "layer", "site", "count"],
    ).properties(height=220, width="container")


def overlap_heatmap(matrix: pd.DataFrame, title: str = "Overlap (Jaccard)", value_name: str = "jaccard") -> alt.Chart:
    """Language × language heatmap of a square DataFrame (index and columns = languages)."""
    long = matrix.rename_axis(index="lang_a", columns="lang_b").stack().rename(value_name).reset_index()
    order = list(matrix.index)
    heat = alt.Chart(long).mark_rect().encode(
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
    # the title wraps to the heatmap's width (a long one-line title is cut off at the chart's edge)
    return (heat + text).properties(width=size, height=size,
                                    title=alt.TitleParams(wrap_title(title, size), anchor="start"))


def bar_per_language(df: pd.DataFrame, value: str, title: str, color: str = "group") -> alt.Chart:
    """One bar per language (columns: language, ``value``, optional group)."""
    enc = {
        "x": alt.X("language:N", sort="-y", title=None),
        "y": alt.Y(f"{value}:Q", title=value.replace("_", " ")),
        "tooltip": list(df.columns),
    }
    if color in df.columns:
        enc["color"] = alt.Color(f"{color}:N", legend=_legend_below(color))
    return alt.Chart(df, title=title).mark_bar().encode(**enc).properties(height=240, width="container")


def rates_by_condition(df: pd.DataFrame, title: str = "") -> alt.Chart:
    """Grouped bars with CI error bars for ONE language. Columns: language, condition, metric, value, lo, hi.

    One chart per language, each fitting its container (the page lays them out in a grid): a faceted chart
    cannot fit a container, and it would give every language slots for conditions that only others have.
    """
    bars = alt.Chart().mark_bar().encode(
        x=alt.X("condition:N", title=None, sort=None, axis=alt.Axis(labelAngle=-30, labelLimit=140)),
        y=alt.Y("value:Q", title="rate", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("metric:N",
                        scale=alt.Scale(domain=["asr", "refusal", "off_target"],
                                        range=[METRIC_COLORS["asr"], METRIC_COLORS["refusal"],
                                               METRIC_COLORS["off_target"]]),
                        legend=_legend_below()),
        xOffset="metric:N",
        tooltip=["language", "condition", "metric", alt.Tooltip("value:Q", format=".2f"),
                 alt.Tooltip("lo:Q", format=".2f"), alt.Tooltip("hi:Q", format=".2f")],
    )
    errors = alt.Chart().mark_errorbar(ticks=True).encode(
        x=alt.X("condition:N", sort=None), xOffset="metric:N",
        y=alt.Y("lo:Q", title="rate"), y2="hi:Q",
    )
    return alt.layer(bars, errors, data=df, title=title).properties(height=260, width="container")


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
    enc = {"x": alt.X("step:Q", axis=alt.Axis(tickMinStep=1, format="d"), scale=alt.Scale(nice=False)),
           "y": alt.Y("loss:Q", scale=alt.Scale(zero=False)), "tooltip": list(df.columns)}
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
