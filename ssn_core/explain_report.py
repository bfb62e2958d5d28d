"""Writing an `ssn_core.explorer.Explanation`: JSON, a Markdown report and a small self-contained HTML report with
the prompts' tokens highlighted by activation (the same highlighting the app's Explorer page shows).

    save_explanation(explanation, "runs/explain-L2.mlp.3814")
    # -> explanation.json, report.md, report.html, manifest.json (kind ssn-lab/neuron-explanation)
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from ssn_core.explorer import RESULT_KIND, Example, Explanation, NeuronReport, SetReport

POSITIVE = (230, 85, 13)  # orange-red: the neuron fires
NEGATIVE = (49, 130, 189)  # blue: it is pushed below zero


def explanation_json(explanation: Explanation) -> dict:
    return {"format": RESULT_KIND, "version": 1, "meta": explanation.meta,
            "neurons": [report.to_dict() for report in explanation.neurons],
            "set": explanation.set.to_dict() if explanation.set is not None else None}


def activation_scale(examples: dict[str, dict[str, list[Example]]]) -> float:
    """The largest |activation| among the shown tokens (the colour scale of one neuron's examples)."""
    values = [abs(a) for per in examples.values() for shown in per.values() for e in shown for a in e.activations
              if math.isfinite(a)]
    return max(values, default=0.0) or 1.0


def highlight_html(tokens: list[str], activations: list[float], scale: float) -> str:
    """The tokens as escaped HTML, each with a background whose strength is |activation| / scale and a tooltip."""
    parts = []
    for token, value in zip(tokens, activations, strict=True):
        if not token:
            continue
        strength = 0.0 if not math.isfinite(value) else min(abs(value) / max(scale, 1e-12), 1.0)
        r, g, b = POSITIVE if value >= 0 else NEGATIVE
        text = html.escape(token).replace("$", "&#36;").replace("\n", "⏎<br>")
        parts.append(f'<span title="{value:.4g}" style="background: rgba({r}, {g}, {b}, {0.85 * strength:.3f}); '
                     f'border-radius: 2px">{text}</span>')
    return '<span style="white-space: pre-wrap; line-height: 1.7">' + "".join(parts) + "</span>"


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns)
                     + " |")
    return lines


def _example_line(example: Example) -> str:
    peak = max(range(len(example.activations)), key=lambda i: abs(example.activations[i]), default=None)
    token = example.tokens[peak].strip() if peak is not None else ""
    text = example.text.replace("\n", " ").replace("|", "\\|")
    return f"- **{example.value:.4g}** at “{token}” — {text[:160]}{'…' if len(text) > 160 else ''}"


def _neuron_markdown(report: NeuronReport) -> list[str]:
    lines = [f"## {report.name}", ""]
    if report.membership:
        ms = [lang for lang, m in report.membership.items() if m["ms"]]
        ss = [lang for lang, m in report.membership.items() if m.get("ss")]
        lines += [f"MS-Neuron of: {', '.join(ms) or 'none'} · SS-Neuron of: {', '.join(ss) or 'none'}", ""]
    lines += ["### Activation per language and label", ""]
    lines += _table(report.groups, ["language", "label", "prompts", "mean", "mean_max", "max", "min"]) + [""]
    for group, per in report.examples.items():
        lines.append(f"### {group}: top prompts")
        lines += [_example_line(e) for e in per.get("top", [])] + [""]
        lines.append(f"### {group}: bottom prompts")
        lines += [_example_line(e) for e in per.get("bottom", [])] + [""]
    lines += ["### Vocabulary projection", ""]
    if report.vocabulary is None:
        lines += [report.vocabulary_note, ""]
    else:
        vocab = report.vocabulary
        lines += [f"Direction: {vocab.direction}.", ""]
        lines += ["Promoted: " + ", ".join(f"`{r['token']!r}` {r['logit']:.3g}" for r in vocab.promoted), ""]
        lines += ["Suppressed: " + ", ".join(f"`{r['token']!r}` {r['logit']:.3g}" for r in vocab.suppressed), ""]
        for script, part in vocab.by_script.items():
            who = f" ({', '.join(part['languages'])})" if part["languages"] else ""
            lines.append(f"- {script}{who}: promoted " + ", ".join(repr(r["token"]) for r in part["promoted"][:10])
                         + "; suppressed " + ", ".join(repr(r["token"]) for r in part["suppressed"][:10]))
        lines.append("")
    lines += ["### Importance", ""]
    if report.importance:
        lines += _table(report.importance, ["method", "language", "label", "value", "rank_in_layer", "of_layer",
                                            "top_percent", "rank_in_kind", "of_kind"]) + [""]
    else:
        lines += ["No score table was given (identify first, or pass --neurons / --scores).", ""]
    return lines


def _set_markdown(report: SetReport) -> list[str]:
    lines = [f"## Set: {report.name} ({report.size:,} neurons)", ""]
    if report.sharing:
        lines += ["### Which languages share which neurons (MS-Neurons of exactly these languages)", ""]
        lines += _table(report.sharing, ["languages", "n_languages", "neurons"]) + [""]
        lines += _table(report.per_language, ["language", "ms", "ss", "share_ms"]) + [""]
    lines += ["### Set activation (mean |activation| of its neurons) per language and label", ""]
    lines += _table(report.groups, ["language", "label", "prompts", "mean", "mean_max", "max", "min"]) + [""]
    for group, per in report.examples.items():
        lines.append(f"### {group}: prompts where the set is most active")
        lines += [_example_line(e) for e in per.get("top", [])] + [""]
    if report.importance:
        lines += ["### Importance of the set's neurons", ""]
        lines += _table(report.importance, ["method", "language", "label", "kind", "neurons", "mean",
                                            "median_top_percent"]) + [""]
    return lines


def markdown_report(explanation: Explanation) -> str:
    meta = explanation.meta
    setting = (f"Model: {meta.get('model_name')} ({meta.get('model_source')}, fingerprint "
               f"{meta.get('model_fingerprint')}) · prompts: {meta.get('prompts')} from "
               f"{meta.get('prompt_source') or 'the given set'} · top/bottom {meta.get('k')} per language and label "
               f"· tokens: {meta.get('aggregate')}")
    how = ("A prompt's top value is the neuron's largest activation over its tokens, its bottom value the smallest. "
           "report.html shows every prompt with its tokens highlighted.")
    lines = ["# SSN Lab neuron explanation", "", setting, "", how, ""]
    for report in explanation.neurons:
        lines += _neuron_markdown(report)
    if explanation.set is not None:
        lines += _set_markdown(explanation.set)
    return "\n".join(lines).rstrip() + "\n"


def _examples_html(examples: dict[str, dict[str, list[Example]]], which: tuple[str, ...] = ("top", "bottom")) -> str:
    scale = activation_scale(examples)
    parts = []
    languages = list(dict.fromkeys(group.split("/")[0] for group in examples))
    for language in languages:
        parts.append(f"<h4>{html.escape(language)}</h4><div style='display: flex; gap: 24px'>")
        for label in ("harmful", "harmless"):
            per = examples.get(f"{language}/{label}")
            if per is None:
                continue
            parts.append(f"<div style='flex: 1'><b>{label}</b>")
            for kind in which:
                parts.append(f"<div><i>{kind}</i></div><ol>")
                for e in per.get(kind, []):
                    highlighted = highlight_html(e.tokens, e.activations, scale)
                    parts.append(f"<li><code>{e.value:.4g}</code> {highlighted}</li>")
                parts.append("</ol>")
            parts.append("</div>")
        parts.append("</div>")
    return "".join(parts)


def html_report(explanation: Explanation) -> str:
    intro = (f"<h1>SSN Lab neuron explanation</h1><p>{html.escape(str(explanation.meta.get('model_name')))} · "
             f"{explanation.meta.get('prompts')} prompts · orange = positive activation, blue = negative; hover a "
             f"token for its value.</p>")
    body = [intro]
    for report in explanation.neurons:
        body.append(f"<h2>{report.name}</h2>")
        body.append(_examples_html(report.examples))
        if report.vocabulary is not None:
            promoted = ", ".join(html.escape(repr(r["token"])) for r in report.vocabulary.promoted)
            suppressed = ", ".join(html.escape(repr(r["token"])) for r in report.vocabulary.suppressed)
            body.append(f"<p><b>Promotes</b> {promoted}<br><b>Suppresses</b> {suppressed}</p>")
        else:
            body.append(f"<p>{html.escape(report.vocabulary_note)}</p>")
    if explanation.set is not None:
        body.append(f"<h2>Set: {html.escape(explanation.set.name)} ({explanation.set.size:,} neurons)</h2>")
        body.append(_examples_html(explanation.set.examples, ("top",)))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>SSN Lab explanation</title></head>"
            "<body style='font-family: sans-serif; max-width: 1200px; margin: auto'>" + "".join(body)
            + "</body></html>\n")


def save_explanation(explanation: Explanation, directory: str | os.PathLike) -> Path:
    """explanation.json, report.md and report.html as one result folder (`ssn_core.io.writing_result_dir`)."""
    from ssn_core.io import atomic_write_json, atomic_write_text, writing_result_dir

    with writing_result_dir(directory, RESULT_KIND) as tmp:
        atomic_write_json(tmp / "explanation.json", explanation_json(explanation))
        atomic_write_text(tmp / "report.md", markdown_report(explanation))
        atomic_write_text(tmp / "report.html", html_report(explanation))
        atomic_write_json(tmp / "manifest.json", {"format": RESULT_KIND, **{
            k: v for k, v in explanation.meta.items() if k != "languages"},
            "neurons": [r.name for r in explanation.neurons],
            "set": explanation.set.name if explanation.set is not None else None})
    return Path(directory).expanduser()
