"""Where does reply B depart from reply A? For the Chat page's highlighting (pure functions, no Streamlit)."""

from __future__ import annotations

import html


def departure(a: str, b: str) -> int | None:
    """Index in ``b`` where it stops being a copy of ``a``, moved back to the start of that word; None if equal."""
    if a == b:
        return None
    i = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        i += 1
    while i > 0 and b[i - 1].isalnum() and ord(b[i - 1]) < 0x2E80:
        i -= 1  # back to the word's start (space-delimited scripts), so a word is never split in two
    return i


def _block(text: str) -> str:
    return html.escape(text).replace("$", "&#36;")  # no accidental LaTeX from dollar signs


def highlight_html(a: str, b: str, empty: str = "(empty reply)") -> str:
    """``b`` as escaped HTML with the part where it departs from ``a`` in a <mark>."""
    i = departure(a, b)
    if not b:
        body = f"<em>{html.escape(empty)}</em>"
    elif i is None:
        body = _block(b)
    else:
        body = _block(b[:i]) + "<mark>" + _block(b[i:]) + "</mark>"
    return f'<div style="white-space: pre-wrap">{body}</div>'


def plain_html(text: str, empty: str = "(empty reply)") -> str:
    return f'<div style="white-space: pre-wrap">{_block(text) if text else "<em>" + html.escape(empty) + "</em>"}</div>'


def summary(a: str, b: str) -> str:
    """'B is the same as A', 'B departs from A at the start', 'B departs from A after 12 words'."""
    i = departure(a, b)
    if i is None:
        return "B is the same as A."
    words = len(b[:i].split())
    if words == 0:
        return "B departs from A at the start (highlighted)."
    return f"B departs from A after {words} word{'s' if words != 1 else ''} (highlighted)."
