"""Validation / evaluation throughput: replies per second of today's engine path vs the path before issue 17.

The old path (`bench.legacy`): fixed text-major batches of ``batch_size`` rows through transformers' ``generate``,
each batch running until its longest reply ends. The new path (`ssn_core.validation.run_packed` ->
`ssn_core.generation.generate_many`): one stream of batches of at most ``batch_size`` rows, longest prompts first,
the prompts' common prefix run once per condition, finished rows replaced at once; optionally each reply ends when
its marker-judge verdict is settled (``stop_at_verdict``). Same prompts, conditions, settings and batch size on both
sides; the verdicts of both are compared reply by reply.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from bench import legacy
from bench.common import BenchContext, BenchResult, alternate, fmt_ratio, goal_text, median, paired_ratio, require
from bench.workloads import ROOT_DATA, bench_prompts, random_neuron_set

SS_FRACTION = 0.003
OLD_DEFAULT_BATCH = 8  # `ssn validate` and `ssn evaluate`: --batch-size before GENERATION_BATCH_SIZE


def _prompts(language: str, n: int, offset: int = 0) -> list[str]:
    """MultiJail prompts of a language (from ../shared/datasets), else the built-in set's."""
    path = ROOT_DATA / "multijail" / "MultiJail.csv"
    if path.is_file():
        from ssn_core.prompts import load_multijail

        items = [p.text for p in load_multijail(path, languages=[language], min_per_language=1)]
        return items[offset:offset + n]
    items = [p.text for p in bench_prompts(4 * n + offset) if getattr(p, "language", "en") == language]
    return (items or [p.text for p in bench_prompts(n)])[:n]


def _conditions(lm, validation):
    """A validation run's shape: baseline, a suppressed set (0.3% of every site), two matched random controls, the
    set reinforced x2, and a direction ablated from the residual stream (module-level hooks)."""
    target = random_neuron_set(lm.sites, SS_FRACTION, seed=0)
    Condition = validation.Condition
    hidden = lm.model.get_input_embeddings().weight.shape[1]
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    return [Condition("baseline"), Condition("suppress", "ss", target, scale=0.0),
            Condition("random", "ss", validation.random_matched(target, lm.sites, seed=0), scale=0.0, seed=0),
            Condition("random", "ss", validation.random_matched(target, lm.sites, seed=1), scale=0.0, seed=1),
            Condition("reinforce", "ss", target, scale=2.0, alpha=2.0),
            Condition("direction", "refusal", direction=direction / direction.norm())]


def _agreement(judge, texts_by_lang, old, new, prefix_ok: bool = False) -> dict:
    """Reply-by-reply comparison of two runs: same verdict (label and reason), same reply (or a prefix of it)."""
    same_verdict = same_reply = total = 0
    for lang, texts in texts_by_lang.items():
        for i, text in enumerate(texts):
            for a, b in zip(old[lang][i], new[lang][i], strict=True):
                va, vb = judge.judge(text, a, lang), judge.judge(text, b, lang)
                same_verdict += (va.label, va.reason) == (vb.label, vb.reason)
                same_reply += (a.startswith(b) if prefix_ok else a == b)
                total += 1
    return {"replies": total, "same_verdict": same_verdict, "same_reply" + ("_or_prefix" if prefix_ok else ""):
            same_reply}


@contextlib.contextmanager
def _greedy_screen_off():
    """The new path with greedy decoding's output layer in float32 (``SSN_GREEDY_SCREEN=0``), to show what the
    bfloat16 screen (`ssn_core.generation.greedy_screen`) adds."""
    previous = os.environ.get("SSN_GREEDY_SCREEN")
    os.environ["SSN_GREEDY_SCREEN"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SSN_GREEDY_SCREEN", None)
        else:
            os.environ["SSN_GREEDY_SCREEN"] = previous


def _unscreened(fn):
    def run():
        with _greedy_screen_off():
            return fn()
    return run


@contextlib.contextmanager
def _count_forwards(generation):
    """Count and time the new path's prefills and decoding steps (rows per step) while the block runs."""
    stats = {"prefill_s": 0.0, "prefills": 0, "prefill_rows": 0, "step_s": 0.0, "steps": 0, "step_rows": 0}
    decoder = generation._Decoder
    prefill, step = decoder.prefill, decoder.step

    def timed_prefill(self, rows, prompts, prefix=None):
        t0 = time.perf_counter()
        try:
            return prefill(self, rows, prompts, prefix)
        finally:
            stats["prefill_s"] += time.perf_counter() - t0
            stats["prefills"] += 1
            stats["prefill_rows"] += len(rows)

    def timed_step(self, batch):
        t0 = time.perf_counter()
        try:
            return step(self, batch)
        finally:
            stats["step_s"] += time.perf_counter() - t0
            stats["steps"] += 1
            stats["step_rows"] += len(batch.rows)

    decoder.prefill, decoder.step = timed_prefill, timed_step
    try:
        yield stats
    finally:
        decoder.prefill, decoder.step = prefill, step


def _old_batch_breakdown(lm, texts, conditions, settings, batch_size, interventions_mod) -> dict:
    """Where one old-path batch's time goes: the prefill forward, the decoding steps, and who they served."""
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(conditions))][:batch_size]
    chunk = [texts[i] for i, _ in pairs]
    interventions = legacy.condition_interventions(conditions, [j for _, j in pairs])
    prompts = lm.prompt_texts(chunk, chat=settings.chat, system=settings.system)
    inputs = lm.tokenize_prompts(prompts, chat_formatted=settings.chat)
    ids = inputs["input_ids"]
    lengths = inputs["attention_mask"].sum(-1).tolist()
    common = 0
    rows = [r[ids.shape[1] - n:].tolist() for r, n in zip(ids, lengths, strict=True)]
    while common < min(lengths) - 1 and all(r[common] == rows[0][common] for r in rows):
        common += 1
    with interventions_mod.intervene(lm, *interventions):
        t0 = time.perf_counter()
        replies = legacy.generate(lm, chunk, settings)
        total = time.perf_counter() - t0
        position = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.model(**inputs, position_ids=position, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    legacy.generate(lm, chunk, settings)
    no_hooks = time.perf_counter() - t0
    reply_tokens = [len(lm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    useful = [min(n + 1, settings.max_new_tokens) for n in reply_tokens]  # + the stop token
    steps = max(useful)
    return {"rows": len(chunk), "total_s": total, "prefill_s": prefill, "decode_s": total - prefill,
            "decode_steps": steps, "s_per_step": (total - prefill) / max(steps, 1),
            "prompt_tokens": int(ids.numel()), "padding_share": 1 - sum(lengths) / ids.numel(),
            "shared_prefix_tokens": common, "shared_prefix_share": common * len(lengths) / sum(lengths),
            "useful_row_steps_share": sum(useful) / (len(chunk) * steps),
            "hooks_on_vs_off": total / no_hooks}


def validation_throughput(ctx: BenchContext) -> BenchResult:
    validation = require("ssn_core.validation")
    generation = require("ssn_core.generation")
    interventions_mod = require("ssn_core.interventions")
    from ssn_core.judges import MarkerJudge

    lm = ctx.lm
    cfg = ctx.config
    languages = ("en", "zh")
    n_per_lang = cfg.pick(1, 4, 30)
    batch_size = cfg.pick(4, 16, 16)
    settings = generation.GenerationSettings(max_new_tokens=cfg.pick(4, 32, 32))
    stop_settings = generation.GenerationSettings(max_new_tokens=settings.max_new_tokens, stop_at_verdict=True)
    judge = MarkerJudge()
    texts = {lang: _prompts(lang, n_per_lang) for lang in languages}
    conditions = _conditions(lm, validation)
    n_replies = sum(len(t) for t in texts.values()) * len(conditions)
    eval_texts = [t for lang in ("en", "zh", "ar", "sw", "bn", "th") for t in _prompts(lang, cfg.pick(1, 4, 16), 50)]
    outputs: dict[str, object] = {}

    def one_stream(run_settings, run_batch_size):
        groups = [validation.PackedGroup(t, conditions, lang) for lang, t in texts.items()]
        replies = validation.run_packed_groups(lm, groups, run_settings, run_batch_size, judge=judge)
        return dict(zip(texts, replies, strict=True))

    def run(name, fn):
        def timed():
            outputs[name] = fn()
        return timed

    fns = {
        "old": run("old", lambda: {lang: legacy.run_packed(lm, t, conditions, settings, batch_size)
                                   for lang, t in texts.items()}),
        # What `validate` runs: every language's share in one stream (`run_packed_groups`).
        "new": run("new", lambda: one_stream(settings, batch_size)),
        # The previous pass's path beside it: one stream per language.
        "new_per_language": run("new_per_language", lambda: {
            lang: validation.run_packed(lm, t, conditions, settings, batch_size) for lang, t in texts.items()}),
        "new_stop_at_verdict": run("new_stop_at_verdict", lambda: one_stream(stop_settings, batch_size)),
        # The same stream with the output layer in float32: what the greedy screen adds.
        "new_unscreened": run("new_unscreened", _unscreened(lambda: one_stream(settings, batch_size))),
        # Each path at its own default batch size: the old CLI's 8, the new `GENERATION_BATCH_SIZE` (what a user of
        # `ssn validate` without --batch-size gets).
        "old_default": run("old_default", lambda: {
            lang: legacy.run_packed(lm, t, conditions, settings, OLD_DEFAULT_BATCH) for lang, t in texts.items()}),
        "new_default": run("new_default", lambda: one_stream(settings, generation.GENERATION_BATCH_SIZE)),
        "eval_old": run("eval_old", lambda: legacy.evaluate_replies(lm, eval_texts, settings, batch_size)),
        "eval_new": run("eval_new", lambda: generation.generate_many(lm, eval_texts, settings, batch_size=batch_size)),
        "eval_new_unscreened": run("eval_new_unscreened", _unscreened(
            lambda: generation.generate_many(lm, eval_texts, settings, batch_size=batch_size))),
        "eval_old_default": run("eval_old_default", lambda: legacy.evaluate_replies(lm, eval_texts, settings,
                                                                                    OLD_DEFAULT_BATCH)),
        "eval_new_default": run("eval_new_default", lambda: generation.generate_many(
            lm, eval_texts, settings, batch_size=generation.GENERATION_BATCH_SIZE)),
    }
    # Warm-up on one short row each (first-call costs), then every path in alternating rounds.
    warm_settings = generation.GenerationSettings(max_new_tokens=2)
    legacy.run_packed(lm, texts["en"][:1], conditions[:2], warm_settings, batch_size)
    validation.run_packed(lm, texts["en"][:1], conditions[:2], warm_settings, batch_size)
    rounds = cfg.repeats or cfg.pick(1, 1, 3)  # minutes per round on a 2-core CPU: one round in --quick
    ctx.log(f"{n_replies} validation replies ({len(conditions)} conditions x {n_per_lang} prompts x "
            f"{len(languages)} languages) and {len(eval_texts)} evaluation replies per path, batch {batch_size}, "
            f"{settings.max_new_tokens} new tokens, {rounds} alternating round(s)")
    times = alternate(fns, rounds, warmup=0,
                      on_time=lambda r, name, seconds: ctx.log(f"round {r + 1}: {name} {seconds:.1f} s"))
    ratios = {"validation_replies_per_s": paired_ratio(times["old"], times["new"]),
              "validation_stop_at_verdict": paired_ratio(times["old"], times["new_stop_at_verdict"]),
              "validation_one_stream_vs_per_language": paired_ratio(times["new_per_language"], times["new"]),
              "validation_at_defaults": paired_ratio(times["old_default"], times["new_default"]),
              "evaluation_replies_per_s": paired_ratio(times["eval_old"], times["eval_new"]),
              "evaluation_at_defaults": paired_ratio(times["eval_old_default"], times["eval_new_default"]),
              "validation_screened_vs_float32_head": paired_ratio(times["new_unscreened"], times["new"]),
              "evaluation_screened_vs_float32_head": paired_ratio(times["eval_new_unscreened"], times["eval_new"])}
    agree = {"new_vs_old": _agreement(judge, texts, outputs["old"], outputs["new"]),
             "stop_at_verdict_vs_old": _agreement(judge, texts, outputs["old"], outputs["new_stop_at_verdict"],
                                                  prefix_ok=True),
             "defaults_new_vs_old": _agreement(judge, texts, outputs["old_default"], outputs["new_default"]),
             "one_stream_vs_per_language": _agreement(judge, texts, outputs["new_per_language"], outputs["new"]),
             "screened_vs_float32_head": _agreement(judge, texts, outputs["new_unscreened"], outputs["new"])}
    eval_agree = sum(a == b for a, b in zip(outputs["eval_old"], outputs["eval_new"], strict=True))
    eval_screen_agree = sum(a == b for a, b in zip(outputs["eval_new_unscreened"], outputs["eval_new"], strict=True))
    eval_default_agree = sum(a == b for a, b in zip(outputs["eval_old_default"], outputs["eval_new_default"],
                                                    strict=True))
    ctx.log("profiling one old-path batch and one new-path run (en)")
    breakdown = _old_batch_breakdown(lm, texts["en"], conditions, settings, batch_size, interventions_mod)
    with _count_forwards(generation) as new_stats:
        t0 = time.perf_counter()
        validation.run_packed(lm, texts["en"], conditions, settings, batch_size)
        new_stats["total_s"] = time.perf_counter() - t0
    new_stats["rows_per_step"] = new_stats["step_rows"] / max(new_stats["steps"], 1)
    result = BenchResult(
        name="validation-throughput",
        ratios=ratios,
        goals={"validation_replies_per_s": ">= 2.0", "evaluation_replies_per_s": ">= 2.0"},
        summary="",
        batch=batch_size,
        seq_len=settings.max_new_tokens,
        details={"replies": n_replies, "eval_replies": len(eval_texts), "conditions": [c.key for c in conditions],
                 "languages": list(languages), "agreement": agree,
                 "eval_same_reply": f"{eval_agree}/{len(eval_texts)}",
                 "eval_defaults_same_reply": f"{eval_default_agree}/{len(eval_texts)}",
                 "eval_screened_same_reply": f"{eval_screen_agree}/{len(eval_texts)}",
                 "greedy_screen_by_default": generation.greedy_screen.enabled(),
                 "replies_per_s": {k: (n_replies if not k.startswith("eval") else len(eval_texts)) / median(v)
                                   for k, v in times.items()},
                 "old_batch_breakdown": breakdown, "new_run_breakdown_en": new_stats,
                 "median_s": {k: median(v) for k, v in times.items()}, "times_s": times},
        notes=[("ratios are replies per second of the new path / the old path on the same prompts, conditions and "
               "settings (greedy); agreement compares the two runs' verdicts (label and reason) reply by reply")],
    )
    a, s, d = agree["new_vs_old"], agree["stop_at_verdict_vs_old"], agree["defaults_new_vs_old"]
    o, g = agree["one_stream_vs_per_language"], agree["screened_vs_float32_head"]
    result.summary = (
        f"validation-throughput: replies/s new/old {fmt_ratio(ratios['validation_replies_per_s'])}"
        f"{goal_text(result, 'validation_replies_per_s')}; with stop_at_verdict "
        f"{fmt_ratio(ratios['validation_stop_at_verdict'])}; each at its default batch "
        f"({OLD_DEFAULT_BATCH} -> {generation.GENERATION_BATCH_SIZE}) {fmt_ratio(ratios['validation_at_defaults'])} "
        f"(same verdicts {d['same_verdict']}/{d['replies']})"
        f" | evaluation {fmt_ratio(ratios['evaluation_replies_per_s'])}"
        f"{goal_text(result, 'evaluation_replies_per_s')}; each at its default batch "
        f"{fmt_ratio(ratios['evaluation_at_defaults'])} (same replies {eval_default_agree}/{len(eval_texts)})"
        f" | same verdicts {a['same_verdict']}/{a['replies']} "
        f"(stop_at_verdict {s['same_verdict']}/{s['replies']}), same replies {a['same_reply']}/{a['replies']}"
        f" | one stream / one per language {fmt_ratio(ratios['validation_one_stream_vs_per_language'])} "
        f"(same replies {o['same_reply']}/{o['replies']})"
        f" | greedy screen / float32 output layer: validation "
        f"{fmt_ratio(ratios['validation_screened_vs_float32_head'])} (same replies {g['same_reply']}/{g['replies']}),"
        f" evaluation {fmt_ratio(ratios['evaluation_screened_vs_float32_head'])} (same replies "
        f"{eval_screen_agree}/{len(eval_texts)})")
    return result

