"""(prompt, reply) pairs: the data the paper's importance is measured on, and what targeted training learns from.

The paper scores neurons on harmful prompts answered with safe refusals and harmless prompts answered normally, the
reply teacher-forced after the prompt. `build_pairs` makes those pairs from a prompt set:

- harmless prompt -> the model's own greedy answer (what it normally says; the trainer's retain replies too);
- harmful prompt  -> the model's own reply where the judge calls it a refusal, else a refusal in the prompt's language
  from ``assets/refusals/refusal_templates.json`` (phrasing picked deterministically from seed and item id).

`render_pair` / `completion_text` give the reply as the chat template renders an assistant turn (end-of-turn token
included), so scoring (``aggregate="reply"``) and training tokenise a pair the same way.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import PromptSetError
from ssn_core.io import read_json

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel

FORMAT = "ssn-lab/pairs"


@dataclass(frozen=True)
class PromptPair:
    """A prompt with the reply its score or training uses. ``source``: own | template."""

    id: str
    language: str
    label: str  # harmful | harmless
    text: str
    reply: str
    source: str


def pick_template(options: Sequence[str], seed: int, *parts: str) -> str:
    """A deterministic choice from seed and item (not Python's salted hash)."""
    digest = hashlib.sha256("|".join([str(seed), *parts]).encode()).digest()
    return options[int.from_bytes(digest[:8], "little") % len(options)]


def render_pair(lm: LoadedModel, user_text: str, reply: str) -> tuple[str, str]:
    """(prompt, completion) text: the reply as the chat template renders an assistant turn (end-of-turn included)."""
    prompt = lm.format_chat(user_text)
    tokenizer = lm.tokenizer
    full = None
    if getattr(tokenizer, "chat_template", None):
        try:
            messages = [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]
            full = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - templates that reject this shape: fall back to prompt + reply + eos
            full = None
    if isinstance(full, str) and full.startswith(prompt) and len(full) > len(prompt):
        return prompt, full[len(prompt):]
    return prompt, " " + reply + (tokenizer.eos_token or "")


def completion_text(lm: LoadedModel, user_text: str, reply: str, prompt: str | None = None) -> str:
    """The text that follows ``prompt`` when the model answers ``reply`` (raw prompts: a space, reply, eos)."""
    if prompt is None:
        return " " + reply + (lm.tokenizer.eos_token or "")
    rendered_prompt, completion = render_pair(lm, user_text, reply)
    return completion if rendered_prompt == prompt else " " + reply + (lm.tokenizer.eos_token or "")


def own_replies(lm: LoadedModel, texts: Sequence[str], *, max_new_tokens: int = 48, batch_size: int = 8,
                progress: Progress | None = None, cancel: threading.Event | None = None,
                what: str = "replies") -> list[str]:
    """The base model's greedy reply to every text (call it with no intervention or delta active)."""
    from ssn_core import distributed
    from ssn_core.generation import GenerationSettings, generate

    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def run_chunk(chunk) -> list[str]:  # under a launch each process answers its share of the batches
        check_cancel(cancel, f"generating {what} was cancelled; nothing was written")
        return generate(lm, list(chunk), settings)

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"{what} {done}/{total}")

    return distributed.map_chunks(list(texts), batch_size, run_chunk, after=report, what=f"generating {what}")


def build_pairs(lm: LoadedModel, prompts, *, judge=None, own_refusals: bool = True, max_new_tokens: int = 48,
                seed: int = 0, batch_size: int = 8, templates: dict[str, list[str]] | None = None,
                progress: Progress | None = None,
                cancel: threading.Event | None = None) -> list[PromptPair]:
    """Harmless -> the model's own answer; harmful -> its own refusal, or a template refusal where it does not refuse.

    ``own_refusals=False`` pairs every harmful prompt with a template refusal (no generation for them).
    """
    from ssn_core.judges import MarkerJudge, load_refusal_templates

    items = list(getattr(prompts, "prompts", prompts))
    if not items:
        raise PromptSetError("no prompts to pair with replies")
    templates = templates if templates is not None else load_refusal_templates()
    missing = sorted({p.language for p in items if p.label == "harmful" and p.language not in templates})
    if missing:
        raise PromptSetError(f"no refusal templates for language(s) {', '.join(missing)}; templates exist for: "
                             f"{', '.join(sorted(templates))}")
    to_generate = [p for p in items if p.label == "harmless" or own_refusals]
    generated = own_replies(lm, [p.text for p in to_generate], max_new_tokens=max_new_tokens, batch_size=batch_size,
                            progress=progress, cancel=cancel, what="own replies")
    replies = {id(p): r for p, r in zip(to_generate, generated, strict=True)}
    harmful_own = [p for p in to_generate if p.label == "harmful"]
    judge = judge if judge is not None else MarkerJudge()
    verdicts = judge.judge_many([p.text for p in harmful_own], [replies[id(p)] for p in harmful_own],
                                [p.language for p in harmful_own]) if harmful_own else []
    refused = {id(p) for p, v in zip(harmful_own, verdicts, strict=True) if v.label == "refusal"}
    pairs = []
    for p in items:
        if p.label == "harmless":
            pairs.append(PromptPair(p.id, p.language, p.label, p.text, replies[id(p)].strip() or ".", "own"))
        elif id(p) in refused:
            pairs.append(PromptPair(p.id, p.language, p.label, p.text, replies[id(p)].strip(), "own"))
        else:
            reply = pick_template(templates[p.language], seed, p.id, p.language)
            pairs.append(PromptPair(p.id, p.language, p.label, p.text, reply, "template"))
    return pairs


def save_pairs(path: str | Path, pairs: Sequence[PromptPair], lm: LoadedModel | None = None,
               meta: dict | None = None) -> Path:
    """Write pairs as JSON (atomically), with the model whose own replies they hold."""
    from ssn_core.io import atomic_write_json

    path = Path(path)
    atomic_write_json(path, {"format": FORMAT, "version": 1,
                             "model_fingerprint": lm.sites.fingerprint() if lm is not None else None,
                             "meta": meta or {}, "pairs": [asdict(p) for p in pairs]})
    return path


def load_pairs(path: str | Path, sites=None) -> list[PromptPair]:
    """Read pairs written by `save_pairs`; with ``sites``, refuse pairs whose own replies came from another model."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"pairs file not found: {path}")
    data = read_json(path, PromptSetError)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("pairs"), list):
        raise PromptSetError(f"{path} is not an SSN Lab pairs file (format {FORMAT!r})")
    recorded = data.get("model_fingerprint")
    if sites is not None and recorded and recorded != sites.fingerprint():
        raise PromptSetError(f"{path} holds another model's own replies (fingerprint {recorded}); build the pairs "
                             "again for this model")
    try:
        pairs = [PromptPair(**{k: str(v) for k, v in row.items()}) for row in data["pairs"]]
    except TypeError as exc:
        raise PromptSetError(f"{path}: malformed pair ({exc})") from None
    for p in pairs:
        if p.label not in ("harmful", "harmless"):
            raise PromptSetError(f"{path}: pair {p.id!r} has label {p.label!r}")
    return pairs
