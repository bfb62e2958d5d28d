"""The Chat page's turns: a finished (or stopped) A/B exchange as a history entry, and its "Download this exchange"
button.

The exchange itself is `ssn_core.ab` (both rows in one batch, judged) and its record `ssn_core.ab.exchange_record`
(prompt, replies, verdicts, intervention with the neuron set, its hash, scale and rows, generation settings, seed,
model fingerprint, versions); `ssn chat --replay FILE` regenerates it and says whether the replies match.
"""

from __future__ import annotations

import streamlit as st

from ssn_core import ab
from ssn_core.judges import Judge
from ui.common import json_bytes


def turn(lm, pending: dict, exchange: ab.ABResult) -> dict:
    """The history entry of a judged exchange: what the page showed while it ran (``pending``: prompt, description,
    judged language and how it was chosen, settings), the verdicts, and the record's JSON bytes (written once; the
    download button only hands them out) when the turn knows its settings."""
    entry = {k: v for k, v in pending.items() if k != "rows"}
    entry.update(a=exchange.replies[0], b=exchange.replies[1], stopped=exchange.stopped,
                 a_verdict=exchange.verdicts[0], b_verdict=exchange.verdicts[1])
    if "settings" in pending:
        record = ab.exchange_record(lm, exchange, pending.get("description", ""), pending.get("language_how", ""))
        entry["record"] = json_bytes(record)
    return entry


def stopped_turn(lm, pending: dict, judge: Judge) -> dict:
    """The history entry of a generation stopped half-way: the partial replies as they were, judged."""
    rows = pending.get("rows") or ab.two_rows(pending["prompt"], None, pending.get("language"))
    exchange = ab.judge_rows(rows, [pending["a"], pending["b"]], pending.get("settings"), judge, stopped=True)
    return turn(lm, pending, exchange)


def download_button(entry: dict, number: int) -> None:
    if entry.get("record") is None:
        return
    st.download_button("Download this exchange", entry["record"], f"ab-exchange-{number}.json", "application/json",
                       key=f"chat_record_{number}", icon=":material/download:",
                       help="JSON with the prompt, both replies, verdicts, the intervention (set hash, scale, rows), "
                            "generation settings, seed, model fingerprint and versions. `ssn chat --replay FILE` "
                            "regenerates it and says whether the replies match.")
