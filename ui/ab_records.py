"""The Chat page's reproducible A/B records: what a turn ran with, and its "Download this exchange" button.

The record itself is built by `ssn_core.records` (prompt, replies, verdicts, intervention with the neuron set, its
hash, scale and rows, generation settings, seed, model fingerprint, versions); `ssn chat --replay FILE`
regenerates it and says whether the replies match.
"""

from __future__ import annotations

import streamlit as st

from ssn_core.records import intervention_record, make_record, verdict_dict
from ui.common import json_bytes


def turn_context(intervention, description: str, settings, delta=None) -> dict:
    """What to keep with a turn so that its record can be written once it is judged."""
    return {"settings": settings, "record_intervention": intervention_record(intervention, description, delta)}


def with_record(lm, turn: dict) -> dict:
    """The judged turn with its record's JSON bytes (written once; the download button only hands them out)."""
    if "settings" not in turn:
        return turn
    verdicts = {side: verdict_dict(turn.get(f"{side}_verdict")) for side in ("a", "b")}
    verdict = turn.get("b_verdict") or turn.get("a_verdict")
    judge = {"name": getattr(verdict, "judge", None), "version": getattr(verdict, "version", None),
             "language": turn.get("language"), "language_how": turn.get("language_how")}
    record = make_record(lm, turn["prompt"], turn["a"], turn["b"], turn["settings"], turn["record_intervention"],
                         verdicts=verdicts, judge=judge, stopped=bool(turn.get("stopped")))
    return {**turn, "record": json_bytes(record)}


def download_button(turn: dict, number: int) -> None:
    if turn.get("record") is None:
        return
    st.download_button("Download this exchange", turn["record"], f"ab-exchange-{number}.json", "application/json",
                       key=f"chat_record_{number}", icon=":material/download:",
                       help="JSON with the prompt, both replies, verdicts, the intervention (set hash, scale, rows), "
                            "generation settings, seed, model fingerprint and versions. `ssn chat --replay FILE` "
                            "regenerates it and says whether the replies match.")
