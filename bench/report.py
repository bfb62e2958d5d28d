"""Print the latest result row of every benchmark as a Markdown table (for bench/README.md).

``python -m bench.report [--results-dir DIR] [--mode quick|full|smoke]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import RESULTS_DIR, fmt_ratio


def latest_rows(results_dir: Path, mode: str | None = None) -> list[dict]:
    rows = []
    for path in sorted(Path(results_dir).glob("*.json")):
        entries = [r for r in json.loads(path.read_text(encoding="utf-8")) if mode is None or r.get("mode") == mode]
        if entries:
            rows.append(entries[-1])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | ratio | value | goal | met? | model, batch x seq | when (UTC) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for name, value in row["ratios"].items():
            goal = row["goals"].get(name, "")
            met = row["met"].get(name)
            met_text = "" if name not in row["goals"] else ("yes" if met else "**no**" if met is False else "n/a")
            shape = f"{row.get('batch')} x {row.get('seq_len')}" if row.get("batch") else ""
            unit = "%" if name.endswith("_pct") else "x"
            shown = fmt_ratio(value) if unit == "x" or value is None else f"{value:.3g}%"
            lines.append(f"| {row['benchmark']} | {name} | {shown} | {goal + unit if goal else ''} | "
                         f"{met_text} | {row['model']} {row.get('dtype') or ''} {shape} | {row['timestamp']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--mode", default=None)
    args = parser.parse_args(argv)
    rows = latest_rows(Path(args.results_dir), args.mode)
    print(table(rows))
    for row in rows:
        machine = row["machine"]
        print(f"\n- {row['benchmark']}: `{row['command']}`; {machine['cpu']}, {machine['cores']} cores, "
              f"{machine['ram_gib']} GiB, GPU {machine['gpu']}, load avg {machine['load_avg_1m']}; "
              f"torch {row['versions']['torch']}, transformers {row['versions']['transformers']}")


if __name__ == "__main__":
    main()
