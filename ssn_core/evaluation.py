"""Evaluate a model on prompt sets: generate replies, judge them, compute per-language safety rates.

`evaluate` is the one loop shared by the CLI (`ssn evaluate`), the app's evaluation page and validation
scripts: prompts of each language -> batched greedy generation (optionally inside interventions) -> judge
-> `RateTable` (ASR, refusal, off-target, over-refusal with bootstrap CIs) + one row per item + a manifest
(generation settings, judge name/version, prompt-data hash) so a number can always be traced back.
`evaluate_utility` adds the general-ability side: MGSM accuracy and perplexity on harmless text.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ssn_core._conventions import Progress, check_cancel
from ssn_core.errors import PromptSetError, SSNError
from ssn_core.generation.settings import GENERATION_BATCH_SIZE
from ssn_core.interventions import Intervention, intervene
from ssn_core.io import atomic_write_json, atomic_write_text, csv_text, writing_result_dir

if TYPE_CHECKING:  # ssn_core.metrics imports pandas: only when a result is made
    from ssn_core.loading import LoadedModel
    from ssn_core.metrics.rates import RateTable

ROW_COLUMNS: tuple[str, ...] = ("id", "language", "label", "category", "condition", "prompt", "reply", "verdict",
                                "reason")
METRIC_COLUMNS: tuple[str, ...] = ("language", "metric", "value", "ci_low", "ci_high", "k", "n")
RESULT_KIND = "ssn-lab/evaluation"  # manifest kind of an `ssn evaluate --out` folder


def _clean(x):
    """JSON-ready: nan -> None (json.dumps would write the invalid token NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def prompts_hash(prompts: Sequence) -> str:
    """sha256 (16 hex) of the evaluated items (id, language, label, text), so a run names its exact data."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.language, p.label, p.text], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def condition_name(interventions: Sequence[Intervention]) -> str:
    return "baseline" if not interventions else "; ".join(i.describe() for i in interventions)


@dataclass
class EvalResult:
    rows: list[dict]  # one per item: ROW_COLUMNS
    metrics: RateTable
    manifest: dict
    utility: dict = field(default_factory=dict)  # {"mgsm": {lang: {...}}, "perplexity": {lang: {...}}}

    def metric_rows(self) -> list[dict]:
        """Tidy metrics: one row per (language, metric)."""
        return self.metrics.to_frame().to_dict(orient="records")

    def save(self, out_dir: str | Path) -> Path:
        """rows.csv/jsonl, metrics.csv/json, manifest.json (+ utility.json) as one folder, replaced as a whole (an
        existing folder only when it is an earlier evaluation: `ssn_core.io.check_out_dir`)."""
        with writing_result_dir(out_dir, RESULT_KIND) as tmp:
            atomic_write_text(tmp / "rows.csv", csv_text(self.rows, ROW_COLUMNS))
            atomic_write_text(tmp / "rows.jsonl",
                              "".join(json.dumps(_clean(r), ensure_ascii=False) + "\n" for r in self.rows))
            metric_rows = self.metric_rows()
            atomic_write_text(tmp / "metrics.csv", csv_text(metric_rows, METRIC_COLUMNS))
            atomic_write_json(tmp / "metrics.json", _clean({"rows": metric_rows, "table": self.metrics.to_dict()}))
            if self.utility:
                atomic_write_json(tmp / "utility.json", _clean(self.utility))
            atomic_write_json(tmp / "manifest.json", _clean(self.manifest))
        return Path(out_dir).expanduser()

    def format_table(self) -> str:
        """Plain-text per-language table (rates with 95% bootstrap CIs)."""
        def cell(rate) -> str:
            if rate.n == 0:
                return "-"
            return f"{rate.value:.2f} [{rate.ci_low:.2f}-{rate.ci_high:.2f}]"

        header = (f"{'lang':<5} {'harmful':>7} {'harmless':>8}  {'ASR':<17} {'refusal':<17} {'off-target':<17} "
                  f"{'over-refusal':<17}")
        lines = [header.rstrip()]
        for m in self.metrics.rows:
            lines.append(f"{m.language:<5} {m.n_harmful:>7} {m.n_harmless:>8}  {cell(m.asr):<17} "
                         f"{cell(m.refusal):<17} {cell(m.off_target):<17} {cell(m.over_refusal)}")
        for lang, r in self.utility.get("mgsm", {}).items():
            lines.append(f"MGSM {lang}: accuracy {r['accuracy']:.2f} [{r['ci_low']:.2f}-{r['ci_high']:.2f}] "
                         f"({r['n_correct']}/{r['n']})")
        for lang, r in self.utility.get("perplexity", {}).items():
            lines.append(f"perplexity {lang}: {r['perplexity']:.2f} ({r['n_tokens']} tokens, {r['n_texts']} texts)")
        return "\n".join(lines)


def select_prompts(prompts, languages: Sequence[str], label: str | None = None,
                   limit_per_language: int | None = None) -> list:
    """The prompts to evaluate, in language order; PromptSetError names every language that has none."""
    languages = list(dict.fromkeys(languages))
    if not languages:
        raise PromptSetError("no languages given to evaluate")
    if limit_per_language is not None and limit_per_language < 1:
        raise PromptSetError(f"the number of prompts per language must be at least 1, got {limit_per_language}")
    selected = list(prompts.select(languages=languages, label=label, limit_per_language=limit_per_language))
    by_language = {lang: [p for p in selected if p.language == lang] for lang in languages}
    empty = [lang for lang, items in by_language.items() if not items]
    if empty:
        what = f"{label} prompts" if label else "prompts"
        available = list(dict.fromkeys(p.language for p in prompts))
        raise PromptSetError(f"the prompt set has no {what} in language(s) {', '.join(empty)}; "
                             f"it has: {', '.join(available) or 'none'}")
    return [p for lang in languages for p in by_language[lang]]


def evaluate(lm: LoadedModel, prompts, languages: Sequence[str], settings=None, judge=None,
             interventions: Sequence[Intervention] = (), batch_size: int = GENERATION_BATCH_SIZE,
             limit_per_language: int | None = None, label: str | None = None, condition: str | None = None,
             progress: Progress | None = None,
             cancel: threading.Event | None = None, n_boot: int = 1000) -> EvalResult:
    """Generate a reply to each selected prompt, judge it, and compute per-language safety rates.

    ``prompts``: a `PromptSet`; ``label`` restricts to "harmful" or "harmless" (None: both, harmless ones give
    over-refusal). ``interventions`` apply to every row (a per-row mask would not survive the chunking into
    batches; use `validation.run_packed` for per-row conditions). With ``settings.stop_at_verdict`` a reply ends as
    soon as the judge's verdict on it is settled (`MarkerJudge.settled`), so the replies are cut short.
    """
    from ssn_core.generation import GenerationSettings, generate_many
    from ssn_core.judges import MarkerJudge
    from ssn_core.metrics import make_manifest, rate_table

    if batch_size < 1:
        raise SSNError("batch_size must be at least 1")
    for intervention in interventions:
        if intervention.rows is not None:
            raise SSNError("evaluate applies interventions to every prompt; per-row masks are not supported here")
    settings = settings if settings is not None else GenerationSettings()
    judge = judge if judge is not None else MarkerJudge()
    items = select_prompts(prompts, languages, label, limit_per_language)
    condition = condition or condition_name(interventions)
    started = time.time()

    from ssn_core import distributed

    distributed.check_enough(len(items), "prompts to evaluate")
    total = len(items)
    check_cancel(cancel, "evaluation was cancelled")

    def replies_of(chunk, report=None) -> list[str]:
        stop = None
        if getattr(settings, "stop_at_verdict", False) and hasattr(judge, "settled"):
            def stop(row: int, reply: str) -> bool:
                return judge.settled(chunk[row].text, reply, chunk[row].language)

        return generate_many(lm, [p.text for p in chunk], settings, batch_size=batch_size, stop=stop,
                             progress=report, cancel=cancel)

    def report(done: int, _total: int) -> None:
        if progress is not None:
            progress(done, total, f"generated {done}/{total}")

    context = intervene(lm, *interventions) if interventions else nullcontext()
    with context:
        if distributed.world().active:
            # Under a launch each process answers its share of the batches of ``batch_size`` prompts (those of
            # `distributed.map_chunks`), each batch through `generate_many` (its rows leave as they finish).
            def run_chunk(chunk) -> list[str]:
                check_cancel(cancel, "evaluation was cancelled")
                return replies_of(chunk)

            replies = distributed.map_chunks(items, batch_size, run_chunk, after=report, what="generating replies")
        else:
            # One stream of batches, longest prompts first, finished rows replaced at once (`generate_many`).
            replies = replies_of(items, report)

    verdicts = judge.judge_many([p.text for p in items], replies, [p.language for p in items], cancel=cancel)
    rows = [
        {"id": p.id, "language": p.language, "label": p.label, "category": getattr(p, "category", None),
         "condition": condition, "prompt": p.text, "reply": reply, "verdict": v.label, "reason": v.reason}
        for p, reply, v in zip(items, replies, verdicts, strict=True)
    ]
    metrics = rate_table(verdicts, [p.language for p in items], [p.label != "harmless" for p in items],
                         n_boot=n_boot)
    manifest = make_manifest(
        settings, [judge], lm,
        kind=RESULT_KIND, condition=condition,
        interventions=[{"description": i.describe(), "scale": i.scale, "value": i.value, "n_neurons": len(i.neurons),
                        "neuron_meta": i.neurons.meta} for i in interventions],
        languages=list(dict.fromkeys(languages)), label=label, limit_per_language=limit_per_language,
        batch_size=batch_size, n_items=len(items), data_hash=prompts_hash(items),
        seconds=round(time.time() - started, 2),
    ).to_dict()
    return EvalResult(rows=rows, metrics=metrics, manifest=manifest)


def evaluate_utility(lm: LoadedModel, languages: Sequence[str], *, mgsm_n: int = 0, mgsm_path: str | Path | None = None,
                     mgsm_settings=None, perplexity_texts: Mapping[str, Sequence[str]] | None = None,
                     interventions: Sequence[Intervention] = (), batch_size: int = 8,
                     progress: Progress | None = None, cancel: threading.Event | None = None) -> dict:
    """General ability under the same interventions: MGSM accuracy (languages MGSM has) and perplexity.

    Returns {"mgsm": {lang: {accuracy, ci_low, ci_high, n, n_correct}}, "perplexity": {lang: {...}},
    "skipped": [...]}.
    """
    from ssn_core.metrics import MGSM_LANGUAGES, mgsm_accuracy, perplexity

    result: dict = {"mgsm": {}, "perplexity": {}, "skipped": []}
    context = intervene(lm, *interventions) if interventions else nullcontext()
    with context:
        if mgsm_n:
            for lang in languages:
                if lang not in MGSM_LANGUAGES:
                    result["skipped"].append(f"MGSM has no {lang}")
                    continue
                r = mgsm_accuracy(lm, lang, mgsm_n, mgsm_settings, path_or_dir=mgsm_path, batch_size=batch_size,
                                  progress=progress, cancel=cancel)
                result["mgsm"][lang] = {"accuracy": r.accuracy.value, "ci_low": r.accuracy.ci_low,
                                        "ci_high": r.accuracy.ci_high, "n": r.n, "n_correct": r.n_correct,
                                        "settings": r.settings}
        for lang, texts in (perplexity_texts or {}).items():
            if not texts:
                result["skipped"].append(f"no harmless text for perplexity in {lang}")
                continue
            ppl = perplexity(lm, list(texts), batch_size, progress=progress, cancel=cancel)
            result["perplexity"][lang] = {"perplexity": ppl.perplexity, "nll": ppl.nll, "n_tokens": ppl.n_tokens,
                                          "n_texts": ppl.n_texts}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Specs shared by the CLI and the app


def load_prompt_spec(spec: str, languages: Sequence[str], n: int | None = None, label: str | None = None):
    """``builtin`` | ``multijail:PATH_OR_HUB_ID`` | ``FILE`` -> PromptSet of ``languages`` (at most ``n`` per
    language and label). Unlike identification, evaluation needs no harmless counterpart: MultiJail stays
    harmful-only."""
    from ssn_core.prompts import load_builtin, load_file, load_multijail

    spec = (spec or "").strip()
    if spec == "builtin":
        prompts = load_builtin(languages, n=n, label=label)
    elif spec.startswith("multijail:"):
        prompts = load_multijail(spec.split(":", 1)[1], languages=languages, n=n)
    elif spec and Path(spec).expanduser().is_file():
        prompts = load_file(spec, languages=languages, min_per_language=1)
    else:
        raise PromptSetError(f"prompts {spec!r}: expected 'builtin', 'multijail:PATH' or an existing "
                             ".csv / .tsv / .jsonl file")
    return prompts.select(languages, label=label, limit_per_language=n)


def heldout_prompt_set(spec: str, languages: Sequence[str], n: int | None = None, *, exclude_ids=(),
                       identify_source: str | None = None, harmless: bool = True):
    """The prompts an evaluation of an identify result may use, and a note for the manifest.

    The built-in set minus the item ids identification used (``exclude_ids``; the harmful and harmless counterparts
    of an item are excluded together), at most ``n`` per language and label; any other set (MultiJail, a file) as
    given, with the built-in harmless prompts not used by identification as its harmless side when ``harmless``.
    """
    from ssn_core.prompts import BUILTIN_LANGUAGES, PromptSet, load_builtin

    excluded = {str(i) for i in exclude_ids}
    excluded |= {("s" if i.startswith("h") else "h") + i[1:] for i in excluded if i[:1] in ("h", "s")}

    def builtin_heldout(label: str | None) -> PromptSet:
        usable = [lang for lang in languages if lang in BUILTIN_LANGUAGES]
        full = load_builtin(usable, label=label) if usable else PromptSet((), "builtin")
        kept = PromptSet(tuple(p for p in full if p.id not in excluded), full.source)
        return kept.select(usable, label=label, limit_per_language=n) if len(kept) else kept

    spec = (spec or "").strip()
    if spec == "builtin":
        prompts = builtin_heldout(None if harmless else "harmful")
        if not len(prompts.select(label="harmful")):
            raise PromptSetError(f"identification used all {len(excluded) // 2} built-in items, so none are left to "
                                 "evaluate on: identify with --n 32 (the default), or evaluate on another set "
                                 "(--prompts multijail:PATH)")
        where = "builtin items not used by identify"
    else:
        prompts = load_prompt_spec(spec, languages, n, "harmful")
        if identify_source and getattr(prompts, "source", None) == identify_source and excluded:
            prompts = PromptSet(tuple(p for p in prompts if p.id not in excluded), prompts.source)
        if harmless:
            prompts = prompts + builtin_heldout("harmless")
        where = f"{spec} (identify used {identify_source or 'another set'})"
    note = {"source": where, "excluded_item_ids": len(excluded),
            "n_per_language": {lang: len(prompts.by_language(lang, "harmful")) for lang in languages}}
    return prompts, note


def guard_kind_for(source: str) -> str:
    """Guess the guard family from a model name: Qwen3Guard, Llama Guard, else a generic instruction model."""
    name = source.lower().replace("-", "").replace("_", "")
    if "qwen3guard" in name:
        return "qwen3guard"
    if "llamaguard" in name:
        return "llamaguard"
    return "generic"


def make_judge(spec: str = "marker", load=None):
    """``marker`` | ``guard:MODEL_SPEC`` | ``api:BASE_URL,MODEL`` -> a judge.

    ``load``: how to load a guard model (default `ssn_core.loading.load_model`); the CLI passes its own so the
    guard gets the same device options. An API judge reads its key from $OPENAI_API_KEY at call time.
    """
    from ssn_core.errors import JudgeError
    from ssn_core.judges import ApiJudge, GuardModelJudge, MarkerJudge

    spec = (spec or "marker").strip()
    if spec == "marker":
        return MarkerJudge()
    if spec.startswith("guard:"):
        source = spec.split(":", 1)[1].strip()
        if not source:
            raise JudgeError("--judge guard:MODEL needs a model (hub id, local directory or .gguf file)")
        if load is None:
            from ssn_core.loading import load_model as load
        return GuardModelJudge(load(source), kind=guard_kind_for(source))
    if spec.startswith("api:"):
        base_url, sep, model = spec.split(":", 1)[1].rpartition(",")
        if not sep or not base_url.strip() or not model.strip():
            raise JudgeError(f"--judge {spec!r}: expected api:BASE_URL,MODEL, e.g. api:http://localhost:8000/v1,"
                             "my-model")
        return ApiJudge(base_url.strip(), model.strip())
    raise JudgeError(f"unknown judge {spec!r}: expected marker, guard:MODEL or api:BASE_URL,MODEL")
