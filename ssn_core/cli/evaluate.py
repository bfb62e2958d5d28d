"""``ssn evaluate``, ``ssn validate`` and ``ssn faithfulness``: generate replies on held-out prompts, judge them, and
compare conditions (interventions, random controls, doses). They share the evaluation options and the judge.
"""

from __future__ import annotations

import argparse
import math

from ssn_core.cli.common import TqdmProgress, add_model_args, check_out, format_table, load_from_args
from ssn_core.errors import Cancelled, SSNError
from ssn_core.generation.settings import GENERATION_BATCH_SIZE

UTILITY_BATCH_SIZE = 8  # MGSM and perplexity: whole sequences (perplexity keeps every position's logits)


def _add_eval_common_args(p, default_tokens: int, default_batch: int | None = 8,
                          batch_help: str | None = None) -> None:
    p.add_argument("--langs", default="en,zh,bn,sw", help="languages, comma-separated (default: en,zh,bn,sw)")
    p.add_argument("--prompts", default="builtin", help="builtin | multijail:PATH_OR_HUB_ID | FILE (default: builtin; "
                   "with an identify result, the built-in items it did not use)")
    p.add_argument("--n", type=int, default=None, help="prompts per language (and label); default: all")
    p.add_argument("--judge", default="marker", help="marker (default) | guard:MODEL | api:BASE_URL,MODEL "
                   "(the API key is read from $OPENAI_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    p.add_argument("--batch-size", type=int, default=default_batch,
                   help=batch_help or f"rows in any forward pass (default {default_batch})")
    p.add_argument("--stop-at-verdict", action="store_true",
                   help="end each reply once the judge's verdict on it can no longer change (the marker judge: a "
                        "refusal marker seen; verdicts unchanged, replies shorter, ~1.2x faster on the starter)")
    p.add_argument("--system", default=None, help="system prompt; default: the model's own default; '' for none")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (files written atomically)")


def _judge_from_args(args: argparse.Namespace):
    from ssn_core.evaluation import make_judge
    from ssn_core.loading import ModelSpec, load_model

    def load_guard(source: str):
        spec = ModelSpec(source=source, dtype=args.dtype, quantization=args.quant, device_map=args.device,
                         trust_remote_code=args.trust_remote_code)
        return load_model(spec)

    return make_judge(args.judge, load=load_guard)


def _early_judge(args: argparse.Namespace):
    """The judge built and checked before any model is loaded (marker, api: key and endpoint); None for a guard
    model judge, which is loaded after the model under test."""
    from ssn_core.evaluation import make_judge

    if (args.judge or "").strip().startswith("guard:"):
        return None
    judge = make_judge(args.judge)
    check = getattr(judge, "check", None)
    if callable(check):
        check()
    return judge


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="generate replies, judge them, and report per-language ASR / refusal rates")
    add_model_args(p)
    _add_eval_common_args(p, 128, None, f"rows in any forward pass (default: {GENERATION_BATCH_SIZE} generating "
                          f"replies, rows being nearly free on a CPU; {UTILITY_BATCH_SIZE} for MGSM and perplexity)")
    p.add_argument("--label", default="all", choices=("all", "harmful", "harmless"),
                   help="which prompts to use (harmless prompts give the over-refusal rate; default: all)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--suppress", metavar="FILE", help="neuron set (.json/.safetensors) to set to 0")
    group.add_argument("--reinforce", metavar="FILE", help="neuron set (.json/.safetensors) to scale by --alpha")
    p.add_argument("--alpha", type=float, default=2.0, help="reinforcement scale (default 2)")
    p.add_argument("--delta", metavar="FILE", help="a trained delta (`ssn train --out DIR`: DIR/delta.safetensors), "
                   "switched on for every reply (combines with --suppress / --reinforce)")
    p.add_argument("--mgsm", type=int, default=0, metavar="N", help="also MGSM accuracy on N problems per language")
    p.add_argument("--mgsm-path", default=None, metavar="DIR",
                   help="folder of mgsm_<lang>.tsv files (default: the juletxara/mgsm hub dataset)")
    p.add_argument("--mgsm-tokens", type=int, default=256, help="max new tokens of MGSM replies")
    p.add_argument("--ppl", type=int, default=0, metavar="N",
                   help="also perplexity on N built-in harmless prompts per language (languages it has)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import time
    from contextlib import AbstractContextManager, nullcontext

    from ssn_core.evaluation import RESULT_KIND, evaluate, evaluate_utility, load_prompt_spec
    from ssn_core.generation import GenerationSettings, check_prompts
    from ssn_core.interventions import Intervention
    from ssn_core.metrics import MGSM_LANGUAGES, load_mgsm
    from ssn_core.neurons import NeuronSet
    from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin, parse_languages

    # Everything that can be checked without the model is checked first: no reply is generated for nothing.
    languages = parse_languages(args.langs)
    label = None if args.label == "all" else args.label
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system,
                                  stop_at_verdict=args.stop_at_verdict)
    settings.validate()
    mgsm_settings = GenerationSettings(max_new_tokens=args.mgsm_tokens, system=args.system)
    if args.mgsm:
        mgsm_settings.validate()
    if args.reinforce and args.alpha < 0:
        raise SSNError(f"--alpha must be >= 0, got {args.alpha}")
    if args.mgsm < 0 or args.ppl < 0:
        raise SSNError(f"--mgsm and --ppl count problems / texts per language: give N >= 0 (got {args.mgsm}, "
                       f"{args.ppl})")
    out = check_out(args.out, RESULT_KIND)
    prompts = load_prompt_spec(args.prompts, languages, args.n, label)
    if args.mgsm:
        for lang in languages:
            if lang in MGSM_LANGUAGES:
                load_mgsm(lang, args.mgsm_path, n=args.mgsm)  # a missing folder or offline hub fails now
    neuron_file = args.suppress or args.reinforce
    neurons = NeuronSet.load(neuron_file) if neuron_file else None
    delta = None
    if args.delta:
        from ssn_core.delta import NeuronDelta, apply_delta

        delta = NeuronDelta.load(args.delta)  # unreadable or non-finite: refused before the model load
    judge = _early_judge(args)

    lm = load_from_args(args)
    check_prompts(lm, [p.text for p in prompts], settings)
    judge = judge or _judge_from_args(args)
    interventions = []
    if args.suppress:
        assert neurons is not None  # loaded before the model
        neurons.validate(lm.sites)
        interventions.append(Intervention(neurons, scale=0.0, label=f"suppress {args.suppress}"))
    elif args.reinforce:
        assert neurons is not None  # loaded before the model
        neurons.validate(lm.sites)
        interventions.append(Intervention(neurons, scale=args.alpha, label=f"reinforce {args.reinforce}"))
    delta_context: AbstractContextManager[None] = nullcontext()
    condition = None
    if delta is not None:
        # Validated against the model (NeuronFileError when it belongs to another one), slices next to their modules.
        delta = NeuronDelta.load(args.delta, lm.model, lm.sites)
        delta_context = apply_delta(lm, delta)
        condition = " + ".join([f"delta {args.delta}", *(i.describe() for i in interventions)])
    progress = TqdmProgress()
    start = time.perf_counter()
    utility_error = None
    try:
        with delta_context:
            result = evaluate(lm, prompts, languages, settings, judge=judge, interventions=interventions,
                              batch_size=GENERATION_BATCH_SIZE if args.batch_size is None else args.batch_size,
                              label=label, condition=condition, progress=progress)
            if args.mgsm or args.ppl:
                ppl_langs = [lang for lang in languages if lang in BUILTIN_LANGUAGES] if args.ppl else []
                ppl_texts = ({lang: [p.text for p in load_builtin([lang], n=args.ppl, label="harmless")]
                              for lang in ppl_langs})
                try:
                    result.utility = evaluate_utility(
                        lm, languages, mgsm_n=args.mgsm, mgsm_path=args.mgsm_path, mgsm_settings=mgsm_settings,
                        perplexity_texts=ppl_texts, interventions=interventions,
                        batch_size=UTILITY_BATCH_SIZE if args.batch_size is None else args.batch_size,
                        progress=progress)
                except SSNError as exc:  # the safety replies are done: save them, then report the failure
                    if isinstance(exc, Cancelled):
                        raise
                    utility_error = exc
    finally:
        progress.close()
    out = result.save(out)
    if utility_error is not None:
        raise SSNError(f"the utility evaluation failed: {utility_error}. The safety evaluation itself was saved in "
                       f"{out} (without utility.json)")
    print(result.format_table())
    print(f"judge {judge.name} ({judge.version}); condition: {result.rows[0]['condition']}; "
          f"{len(result.rows)} replies in {time.perf_counter() - start:.1f}s; wrote {out}")
    return 0


def add_validate_parser(sub) -> None:
    p = sub.add_parser("validate", help="causal validation: suppress MS/SS-Neurons vs matched random neurons, "
                                        "reinforce SS-Neurons")
    add_model_args(p)
    p.add_argument("--neurons", required=True, metavar="DIR", help="identify result directory (`ssn identify --out`)")
    _add_eval_common_args(p, 48, GENERATION_BATCH_SIZE)  # generation only: rows are nearly free on a CPU
    p.add_argument("--seeds", type=int, default=3, help="random-control seeds 0..K-1 (default 3)")
    p.add_argument("--alphas", default="2", help="reinforcement scales, comma-separated (default 2)")
    p.add_argument("--betas", default="",
                   help="additive reinforcement: add beta x each SS-Neuron's mean activation on the HR language's "
                        "harmful prompts, comma-separated (default: none)")
    p.add_argument("--only", default=None, choices=("suppress", "reinforce"),
                   help="run only the suppression part (control, sets, random controls) or only the reinforcement "
                        "part (scale and additive, with over-refusal); default: both")
    p.add_argument("--reinforce-sets", default="own",
                   help="sets to reinforce, comma-separated: own (each language's SS set; the union where it has "
                        "none) and/or ss_all (the union of all SS sets, in every language); default: own")
    p.add_argument("--reinforce-random", action="store_true",
                   help="beside each reinforced set, a matched random set scaled the same way (the control)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the refusal-direction control (the identify result's direction, ablated)")
    p.add_argument("--no-over-refusal", action="store_true",
                   help="skip answering harmless prompts under the reinforce conditions (over-refusal)")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    import time

    from ssn_core.errors import PromptSetError
    from ssn_core.evaluation import heldout_prompt_set
    from ssn_core.generation import GenerationSettings, check_prompts
    from ssn_core.identify import IdentifyResult
    from ssn_core.prompts import parse_languages
    from ssn_core.validation import RESULT_KIND, validate

    languages = parse_languages(args.langs)
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise SSNError(f"--alphas {args.alphas!r}: expected numbers separated by commas, e.g. 1.5,2,3") from None
    if not alphas or any(not math.isfinite(a) or a < 0 for a in alphas):
        raise SSNError(f"--alphas {args.alphas!r}: give one or more finite scales >= 0")
    if args.seeds < 1:
        raise SSNError(f"--seeds must be at least 1, got {args.seeds}")
    try:
        betas = [float(b) for b in args.betas.split(",") if b.strip()]
    except ValueError:
        raise SSNError(f"--betas {args.betas!r}: expected numbers separated by commas, e.g. 1,2") from None
    if any(not math.isfinite(b) for b in betas):
        raise SSNError(f"--betas {args.betas!r}: give finite numbers")
    from ssn_core.validation import REINFORCE_SETS

    reinforce_sets = [name.strip() for name in args.reinforce_sets.split(",") if name.strip()]
    if not reinforce_sets or any(name not in REINFORCE_SETS for name in reinforce_sets):
        raise SSNError(f"--reinforce-sets {args.reinforce_sets!r}: give some of {', '.join(REINFORCE_SETS)}")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system,
                                  stop_at_verdict=args.stop_at_verdict)
    settings.validate()
    out = check_out(args.out, RESULT_KIND)
    found = IdentifyResult.load(args.neurons)
    if betas and found.activations is None:
        raise SSNError(f"--betas needs the neurons' mean activations, which {args.neurons} does not hold (identify "
                       "it again with this version)")  # not an identify result: fails before the model load
    prompts, heldout = heldout_prompt_set(args.prompts, languages, args.n, exclude_ids=found.item_ids,
                                          identify_source=found.manifest.get("prompt_source"),
                                          harmless=not args.no_over_refusal)
    without = [lang for lang in languages if not any(p.language == lang and p.label == "harmful" for p in prompts)]
    if without:
        raise PromptSetError(f"the prompt set has no harmful prompts in language(s) {', '.join(without)}; validation "
                             "measures what suppressing neurons does to replies to harmful prompts")
    judge = _early_judge(args)
    lm = load_from_args(args)
    check_prompts(lm, [p.text for p in prompts], settings)
    neurons = IdentifyResult.load(args.neurons, sites=lm.sites)
    judge = judge or _judge_from_args(args)
    progress = TqdmProgress()
    start = time.perf_counter()
    try:
        result = validate(lm, neurons, prompts, languages, settings, alphas=alphas, seeds=range(args.seeds),
                          judge=judge, batch_size=args.batch_size, over_refusal=not args.no_over_refusal,
                          direction=False if args.no_control else None, betas=betas,
                          parts=(args.only,) if args.only else ("suppress", "reinforce"),
                          reinforce_sets=reinforce_sets, reinforce_random=args.reinforce_random, progress=progress)
    finally:
        progress.close()
    result.manifest["heldout"] = heldout
    out = result.save(out)
    print(result.format_table())
    print(f"judge {judge.name} ({judge.version}); prompts per language: "
          + ", ".join(f"{k} {v}" for k, v in result.summary["prompts_per_language"].items())
          + f"; {len(result.rows)} replies in {time.perf_counter() - start:.1f}s; wrote {out}")
    return 0


def add_faithfulness_parser(sub) -> None:
    p = sub.add_parser("faithfulness", help="dose-response: suppress the top neurons of each identify result at "
                                            "several p, vs matched random neurons, on held-out prompts")
    add_model_args(p)
    p.add_argument("--neurons", required=True, action="append", metavar="DIR",
                   help="identify result directory; repeat to compare methods (each is ranked as it was identified)")
    _add_eval_common_args(p, 32)
    p.add_argument("--fractions", default="0.0003,0.001,0.003,0.01,0.03",
                   help="doses p (the top fraction identify takes), comma-separated")
    p.add_argument("--generate-at", default="0.01",
                   help="doses at which replies are also generated and judged (comma-separated; '' for none)")
    p.add_argument("--seeds", type=int, default=1, help="random-control seeds per dose (default 1)")
    p.add_argument("--sets", default="ms,ss", help="which sets to switch off: ms, ss or both (default ms,ss)")
    p.set_defaults(func=cmd_faithfulness)


def _fractions(value: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SSNError(f"{what} {value!r}: expected fractions separated by commas, e.g. 0.001,0.01") from None
    bad = [v for v in values if not (math.isfinite(v) and 0 < v <= 1)]
    if bad:
        raise SSNError(f"{what} {value!r}: every value must be a fraction in (0, 1], got {bad[0]}")
    return values


def cmd_faithfulness(args: argparse.Namespace) -> int:
    import time

    from ssn_core.evaluation import heldout_prompt_set
    from ssn_core.faithfulness import RESULT_KIND, faithfulness
    from ssn_core.generation import GenerationSettings
    from ssn_core.identify import IdentifyResult
    from ssn_core.prompts import parse_languages

    languages = parse_languages(args.langs)
    fractions = _fractions(args.fractions, "--fractions")
    if not fractions:
        raise SSNError("--fractions is empty")
    generate_at = _fractions(args.generate_at, "--generate-at")
    missing = [g for g in generate_at if not any(math.isclose(g, f) for f in fractions)]
    if missing:
        raise SSNError(f"--generate-at {missing[0]:g} is not one of --fractions")
    if args.seeds < 1:
        raise SSNError(f"--seeds must be at least 1, got {args.seeds}")
    sets = [x.strip() for x in args.sets.split(",") if x.strip()]
    if not sets or any(x not in ("ms", "ss") for x in sets):
        raise SSNError(f"--sets {args.sets!r}: give ms, ss or ms,ss")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system,
                                  stop_at_verdict=args.stop_at_verdict)
    settings.validate()
    out = check_out(args.out, RESULT_KIND)
    results = [IdentifyResult.load(d) for d in args.neurons]
    for directory, found in zip(args.neurons, results, strict=True):
        if found.scores is None:
            raise SSNError(f"{directory} is a bundle: it has no score table to select neurons at other doses from; "
                           "give the identify result it was made from")
    hr = results[0].hr or ("en",)
    used = frozenset().union(*(r.item_ids for r in results))
    prompts, heldout = heldout_prompt_set(args.prompts, languages, args.n, exclude_ids=used,
                                          identify_source=results[0].manifest.get("prompt_source"), harmless=False)
    judge = _early_judge(args)
    lm = load_from_args(args)
    results = [IdentifyResult.load(d, sites=lm.sites) for d in args.neurons]
    tables, rankings = {}, {}
    for directory, found in zip(args.neurons, results, strict=True):
        scores = found.scores
        assert scores is not None, "checked on the first load above"
        recipe = (found.manifest.get("recipe") or {}).get("name")
        name = recipe or f"{scores.method}:{scores.aggregate}"
        name = name if name not in tables else f"{name} ({directory})"
        tables[name] = scores
        rankings[name] = found.manifest.get("ranking", "per-site")
    direction = next((r.direction.unit for r in results if r.direction is not None), None)
    judge = judge or _judge_from_args(args)
    progress = TqdmProgress()
    start = time.perf_counter()
    try:
        result = faithfulness(lm, tables, prompts, languages, hr=tuple(hr), fractions=fractions, ranking=rankings,
                              seeds=range(args.seeds), generate_at=generate_at, settings=settings, judge=judge,
                              direction=direction, sets=sets, limit_per_language=args.n, batch_size=args.batch_size,
                              progress=progress)
    finally:
        progress.close()
    result.manifest["heldout"] = heldout
    result.manifest["neurons"] = list(args.neurons)
    out = result.save(out)
    rows = [{k: ("-" if r[k] is None else (f"{r[k]:+.2f}" if isinstance(r[k], float) and k != "p" else r[k]))
             for k in ("method", "language", "set", "p", "n_neurons", "margin_drop", "random_margin_drop",
                       "refusal_drop", "random_refusal_drop")} for r in result.summary()]
    print(format_table(rows, ["method", "language", "set", "p", "n_neurons", "margin_drop", "random_margin_drop",
                              "refusal_drop", "random_refusal_drop"]))
    for r in result.rows:
        if r["condition"] == "direction":
            print(f"{r['language']}: refusal-direction control: margin drop {r['margin_drop']:+.2f}"
                  + ("" if r["refusal_drop"] is None else f", refusal drop {r['refusal_drop']:+.2f}"))
    print(f"held-out prompts: {heldout['source']}; {time.perf_counter() - start:.1f}s; wrote {out} "
          "(curve.csv, summary.json, chart.html)")
    return 0
