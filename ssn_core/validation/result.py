"""`ValidationResult`: the per-condition table, the per-reply rows, the summary and the manifest; saved as one result
folder and printed as a plain-text table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ssn_core.io import atomic_write_json, atomic_write_text, csv_text, writing_result_dir

RESULT_KIND = "ssn-lab/validation"  # manifest kind of an `ssn validate --out` folder
TABLE_COLUMNS: tuple[str, ...] = ("language", "label", "condition", "target", "seed", "alpha", "n_neurons", "n", "asr",
                                  "refusal", "off_target", "ci_low", "ci_high", "refusal_ci_low", "refusal_ci_high")
ROW_COLUMNS: tuple[str, ...] = ("language", "label", "condition", "seed", "alpha", "id", "prompt", "reply", "verdict",
                                "reason")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


@dataclass
class ValidationResult:
    table: list[dict]  # one row per (language, condition, seed, alpha): TABLE_COLUMNS
    rows: list[dict]  # one row per (prompt, condition): ROW_COLUMNS
    summary: dict  # {"languages": {lang: {target: compare_to_control(...)}}, "reinforce", "correlation", "notes"}
    manifest: dict = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """table.csv/json, rows.jsonl, summary.json, manifest.json as one folder, replaced as a whole (an existing
        folder only when it is an earlier validation: `ssn_core.io.check_out_dir`)."""
        import json

        with writing_result_dir(out_dir, RESULT_KIND) as tmp:
            atomic_write_text(tmp / "rows.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows))
            atomic_write_text(tmp / "table.csv", csv_text(self.table, TABLE_COLUMNS))
            atomic_write_json(tmp / "table.json", self.table)
            atomic_write_json(tmp / "summary.json", self.summary)
            atomic_write_json(tmp / "manifest.json", self.manifest)
        return Path(out_dir).expanduser()

    def format_table(self) -> str:
        """Plain-text table: random seeds collapsed into mean ± std [min-max]."""
        lines = [f"{'lang':<5} {'condition':<26} {'neurons':>8} {'n':>4} {'ASR':>17} {'refusal':>22} {'off':>5}"]
        for language in dict.fromkeys(r["language"] for r in self.table):
            entries = [r for r in self.table if r["language"] == language]
            seen: set[str] = set()
            for r in entries:
                name = r["condition"] + ("" if r["alpha"] is None else (
                    f" +{r['alpha']:g}·mean" if r["condition"].startswith("shift_") else f" x{r['alpha']:g}"))
                if r.get("label") == "harmless":
                    name = f"{name} [harmless]"
                if r["condition"].startswith("random_"):
                    if name in seen:
                        continue
                    seen.add(name)
                    group = [e for e in entries if e["condition"] == r["condition"]]
                    refusals = [e["refusal"] for e in group]
                    asrs = [e["asr"] for e in group]
                    std = statistics.stdev(refusals) if len(refusals) > 1 else 0.0
                    asr = f"{sum(asrs) / len(asrs):.2f}"
                    refusal = (f"{sum(refusals) / len(refusals):.2f}±{std:.2f} "
                               f"[{min(refusals):.2f}-{max(refusals):.2f}]")
                    off = f"{sum(e['off_target'] for e in group) / len(group):.2f}"
                    name += f" ({len(group)} seeds)"
                else:
                    asr = f"{_fmt(r['asr'])} [{_fmt(r['ci_low'])}-{_fmt(r['ci_high'])}]"
                    refusal, off = _fmt(r["refusal"]), _fmt(r["off_target"])
                lines.append(f"{language:<5} {name:<26} {r['n_neurons']:>8} {r['n']:>4} {asr:>17} {refusal:>22} "
                             f"{off:>5}")
        lines.append("[harmless] rows: the refusal column is over-refusal on harmless prompts")
        for language, targets in self.summary.get("languages", {}).items():
            control = self.summary.get("direction", {}).get(language)
            if control is not None:
                lines.append(f"{language}: refusal-direction control: refusal {control['baseline_refusal']:.2f} -> "
                             f"{control['refusal']:.2f} (drop {control['drop']:+.2f})")
            for target, comparison in targets.items():
                verdict = "beats" if comparison["beats_random"] else "does NOT beat"
                line = (f"{language}: suppress_{target} {verdict} the random control (refusal drop "
                        f"{comparison['drop_target']:+.2f} vs {comparison['drop_random_mean']:+.2f}")
                paired = comparison.get("paired")
                if paired:
                    line += (f"; difference {paired['mean']:+.2f} [95% CI {paired['ci_low']:+.2f}, "
                             f"{paired['ci_high']:+.2f}], p = {paired['p_value']:.3g}, n = {paired['n']}")
                else:
                    line += f", seed spread {comparison['spread']:.2f}"
                share = comparison.get("share_of_direction")
                if share is not None:
                    line += f"; {share:.0%} of the direction control's drop"
                lines.append(line + ")")
                if paired and paired.get("note"):
                    lines.append(f"    note: {paired['note']}")
        corr = self.summary.get("correlation", {})
        if corr:
            if corr.get("pearson") is None:
                lines.append(f"SS-count vs baseline ASR: {corr.get('note')}")
            else:
                lines.append(f"SS-count vs baseline ASR over {corr['n']} languages: Pearson {corr['pearson']:+.2f}, "
                             f"Spearman {corr['spearman']:+.2f}")
        for note in self.summary.get("notes", []):
            lines.append(f"note: {note}")
        return "\n".join(lines)
