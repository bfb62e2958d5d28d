"""``ssn identify``, ``ssn compare-methods`` and ``ssn bundle``: scoring neurons (`ssn_core.scoring`), selecting
MS-/SS-Neurons (`ssn_core.identify`), checking the fast scores against exact ablation, and shipping a result.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, cast

from ssn_core.cli.common import (
    TqdmProgress,
    _load_prompt_spec,
    add_model_args,
    check_out,
    format_table,
    load_from_args,
)
from ssn_core.errors import SSNError

if TYPE_CHECKING:  # ssn_core.sites imports torch: `ssn --help` stays fast
    from ssn_core.sites import SiteKind

_ALL_SITES = "mlp,attn_q,attn_k,attn_v,attn_o"
RECIPE_NAMES = ("default", "paper", "plnd", "last", "direction")  # = ssn_core.identify.RECIPES (a test checks)


def _add_scoring_args(p: argparse.ArgumentParser, langs: str, n: int | None) -> None:
    p.add_argument("--langs", default=langs, help=f"comma-separated language codes (default: {langs})")
    p.add_argument("--prompts", default="builtin",
                   help="builtin | multijail:PATH_OR_HUB_ID (harmless prompts from the built-in set) | "
                        "FILE (.csv/.tsv/.jsonl with text, language, label columns)")
    p.add_argument("--n", type=int, default=n, help="prompts per language and label (default: all)" if n is None
                   else f"prompts per language and label (default: {n})")
    p.add_argument("--aggregate", default=None, choices=("content", "last", "all", "reply"),
                   help="tokens a prompt's score averages over: the user's own tokens, the last prompt token, all, or "
                        "the reply of (prompt, reply) pairs (default: the recipe's, else content)")
    p.add_argument("--template", default="chat", choices=("chat", "raw"),
                   help="send prompts through the chat template as a user turn (default) or as raw text")
    p.add_argument("--sites", default=None, help=f"site kinds to score (default: the recipe's, else {_ALL_SITES}); "
                   "with the impact method attn_q/attn_k are exact but cost more (attention is recomputed once per "
                   "head dim); gradient methods cover them at no extra cost")
    p.add_argument("--batch-size", type=int, default=8)


def _check_contrast(prompts, languages: list[str]) -> None:
    """MS-Neurons contrast harmful with harmless prompts: every language needs both (checked before the model load)."""
    for lang in languages:
        for label in ("harmful", "harmless"):
            if not any(p.language == lang and p.label == label for p in prompts):
                raise SSNError(f"language {lang} has no {label} prompts; MS-Neurons contrast harmful with harmless "
                               "prompts of the same language")


def _sites_arg(value: str) -> tuple[SiteKind, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    if not kinds:
        raise SSNError("--sites is empty; give some of " + _ALL_SITES)
    unknown = [k for k in kinds if k not in _ALL_SITES.split(",")]
    if unknown:
        raise SSNError(f"unknown site kind {unknown[0]!r} in --sites; expected some of {_ALL_SITES}")
    return cast("tuple[SiteKind, ...]", kinds)  # every one is a site kind (_ALL_SITES)


def add_identify_parser(sub) -> None:
    p = sub.add_parser("identify", help="score neurons and select MS-/SS-Neurons for each language")
    add_model_args(p)
    _add_scoring_args(p, "en,zh,ar,sw,jv", 32)
    p.add_argument("--hr", default="en", help="high-resource language(s), comma-separated (default: en)")
    p.add_argument("--recipe", default="default", choices=tuple(RECIPE_NAMES),
                   help="named settings of method, aggregate, ranking, p and sites (default: 'default', chosen by "
                        "held-out evidence; 'paper': ΔLLM on (prompt, reply) pairs; 'plnd': the first release's); "
                        "--method/--aggregate/--ranking/--p/--sites override single settings")
    p.add_argument("--method", default=None, choices=("impact", "activation", "global", "attribution", "direction"),
                   help="attribution: activation x gradient of the refusal margin; global: the paper's ΔLLM "
                        "(final-output change, estimated with --projections random projections); impact: exact "
                        "layer-local deactivation effect; direction: write along the refusal direction; activation: "
                        "mean |activation|")
    p.add_argument("--p", type=float, default=None, help="top fraction per layer and site (default: the recipe's)")
    p.add_argument("--ranking", default=None, choices=("per-site", "pooled", "global"))
    p.add_argument("--projections", type=int, default=8, help="random projections of the global ΔLLM estimate")
    p.add_argument("--own-replies", action="store_true", default=None,
                   help="score (prompt, reply) pairs with the model's own replies (generated first)")
    p.add_argument("--no-direction", action="store_true",
                   help="skip finding the refusal direction (the positive control used by validate and Chat)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.set_defaults(func=cmd_identify)


def _apply_recipe(args: argparse.Namespace):
    """Fill the scoring settings the user did not give from the recipe (as `identify` does); return the recipe."""
    from ssn_core.identify import get_recipe

    recipe = get_recipe(args.recipe)
    args.given = {k: getattr(args, k) for k in ("method", "aggregate", "ranking", "p", "sites")
                  if getattr(args, k) is not None}
    if args.aggregate is None:
        args.aggregate = recipe.aggregate if args.method in (None, recipe.method) else (
            "all" if args.method == "attribution" else "content")
    args.method = args.method or recipe.method
    args.ranking = args.ranking or recipe.ranking
    args.p = recipe.p if args.p is None else args.p
    kinds = recipe.kinds if args.method != "direction" else tuple(k for k in recipe.kinds if k not in ("attn_q",
                                                                                                        "attn_k"))
    args.sites = args.sites or ",".join(kinds)
    if args.own_replies is None:
        args.own_replies = recipe.own_replies
    return recipe


def cmd_identify(args: argparse.Namespace) -> int:
    import time

    from ssn_core.identify import MANIFEST_FORMAT, identify
    from ssn_core.identify.selection import _check_p
    from ssn_core.prompts import parse_languages

    languages = parse_languages(args.langs)
    hr = parse_languages(args.hr)
    all_languages = list(dict.fromkeys([*hr, *languages]))
    recipe = _apply_recipe(args)
    _check_p(args.p)
    if args.method == "attribution" and args.aggregate != "all":
        raise SSNError("attribution sums over every position; --aggregate does not apply to it (leave it out)")
    if args.method == "direction" and {"attn_q", "attn_k"} & set(_sites_arg(args.sites)):
        raise SSNError("the direction method scores mlp, attn_v and attn_o (q/k do not write into the residual "
                       "stream): give --sites mlp,attn_v,attn_o")
    if args.projections < 1:
        raise SSNError(f"--projections must be at least 1, got {args.projections}")
    check_out(args.out, MANIFEST_FORMAT)
    prompts = _load_prompt_spec(args.prompts, all_languages, args.n)
    _check_contrast(prompts, all_languages)
    kinds = _sites_arg(args.sites)
    lm = load_from_args(args)
    progress = TqdmProgress()
    start = time.perf_counter()
    try:
        result = identify(lm, prompts, languages, hr=tuple(hr), method=args.method, p=args.p,
                          aggregate=args.aggregate, kinds=kinds, batch_size=args.batch_size, ranking=args.ranking,
                          template=args.template, own_replies=args.own_replies, projections=args.projections,
                          find_direction=not args.no_direction, activation_means=True, recipe=recipe.name,
                          progress=progress)
    finally:
        progress.close()
    result.manifest["recipe"]["overridden"] = sorted(args.given)
    out = result.save(args.out)
    total = lm.sites.total_neurons if set(kinds) == set(lm.sites.kinds) else sum(
        lm.sites.get(0, k).size * lm.sites.n_layers for k in kinds)
    rows = []
    for lang, ms in result.ms.items():
        ss = result.ss.get(lang)
        rows.append({"language": lang, "role": "HR" if lang in result.hr else "NHR", "ms": len(ms),
                     "ms_%": f"{100 * len(ms) / total:.2f}", "ss": "-" if ss is None else len(ss)})
    print(format_table(rows, ["language", "role", "ms", "ms_%", "ss"]))
    print(f"all SS (union): {len(result.ss_all)}   shared by every NHR language: {len(result.ss_shared_all_nhr)}   "
          f"scored neurons: {total}")
    print(f"recipe {recipe.name}: method {args.method}, aggregate {args.aggregate}, ranking {args.ranking}, "
          f"p {args.p:g}, sites {args.sites}")
    if result.direction is not None:
        print(f"refusal direction: layer {result.direction.layer} (the positive control for validate and Chat)")
    print(f"{len(prompts)} prompts (item ids {_id_span(result.manifest['item_ids'])}) scored in "
          f"{result.manifest['timing']['score_seconds']:.1f}s (total {time.perf_counter() - start:.1f}s); wrote {out}")
    return 0


def _id_span(ids) -> str:
    ids = sorted(ids)
    return "none" if not ids else (ids[0] if len(ids) == 1 else f"{ids[0]}..{ids[-1]}, {len(ids)} in all")


def add_compare_methods_parser(sub) -> None:
    p = sub.add_parser("compare-methods",
                       help="validate fast importance scores against exact one-neuron-at-a-time ablation")
    add_model_args(p)
    _add_scoring_args(p, "en", 8)
    p.add_argument("--sample", type=int, default=64, help="neurons per site kind, drawn over all layers (default 64)")
    p.add_argument("--top", type=float, default=0.1, help="top fraction for the overlap column (default 0.1)")
    p.add_argument("--methods", default="impact,activation,global:4,global:16",
                   help="fast methods to compare with exact ablation, comma-separated; global:K = the ΔLLM estimate "
                        "with K random projections (default: impact,activation,global:4,global:16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="optional output directory for scores and agreement.csv")
    p.set_defaults(func=cmd_compare_methods)


def cmd_compare_methods(args: argparse.Namespace) -> int:
    from ssn_core.prompts import parse_languages
    from ssn_core.scoring import COMPARISON_KIND, compare_methods, parse_method_spec

    languages = parse_languages(args.langs)
    if not 0 < args.top <= 1:
        raise SSNError(f"--top must be in (0, 1], got {args.top}")
    if args.sample < 1:
        raise SSNError(f"--sample must be at least 1, got {args.sample}")
    if args.out:
        check_out(args.out, COMPARISON_KIND)
    args.aggregate = args.aggregate or "last"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for spec in methods:
        parse_method_spec(spec)
    if args.aggregate == "reply":
        raise SSNError("compare-methods scores bare prompts; --aggregate reply needs (prompt, reply) pairs")
    prompts = _load_prompt_spec(args.prompts, languages, args.n)
    kinds = _sites_arg(args.sites or _ALL_SITES)
    lm = load_from_args(args)
    progress = TqdmProgress()
    try:
        comparison = compare_methods(lm, prompts, sample=args.sample, methods=methods, aggregate=args.aggregate,
                                     kinds=kinds, batch_size=args.batch_size, template=args.template, top=args.top,
                                     seed=args.seed, progress=progress)
    finally:
        progress.close()
    rows = [{**r, "spearman": f"{r['spearman']:.3f}", "top_overlap": f"{r['top_overlap']:.2f}"}
            for r in comparison.agreement.to_dict(orient="records")]
    print(f"agreement with exact ablation ({len(prompts)} prompts, aggregate={args.aggregate}, "
          f"top {100 * args.top:g}% overlap):")
    print(format_table(rows, ["method", "kind", "n", "spearman", "top_overlap"]))
    print("seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in comparison.seconds.items()))
    if args.out:
        print(f"wrote {comparison.save(args.out)}")
    return 0


# ----------------------------------------------------------------------------------------------
# ssn bundle


def add_bundle_parser(sub) -> None:
    p = sub.add_parser("bundle", help="write a small identify result for shipping (sets, counts, overlap, refusal "
                                      "direction, the HR language's harmful activation means; no score table), "
                                      "e.g. the starter's assets/starter_neurons/<model>/")
    p.add_argument("--neurons", required=True, metavar="RUN_DIR", help="identify result (`ssn identify --out`)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bundle folder, e.g. assets/starter_neurons/qwen2.5-coder-0.5b (replaced as a whole)")
    p.add_argument("--model-source", default=None,
                   help="the model source the bundle is offered for (default: the one identify recorded)")
    p.add_argument("--walkthrough", metavar="FILE", default=None,
                   help="JSON settings of the Learn walkthrough, stored as walkthrough.json (default: keep the earlier "
                        "bundle's)")
    p.add_argument("--delta", metavar="FILE", default=None,
                   help="a targeted fine-tune's delta (`ssn train --out`), stored as delta.safetensors for the "
                        "walkthrough's last step (default: keep the earlier bundle's)")
    p.set_defaults(func=cmd_bundle)


def cmd_bundle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssn_core.bundle import bundle_size, save_bundle
    from ssn_core.identify import MANIFEST_FORMAT, IdentifyResult

    if Path(args.neurons).expanduser().resolve() == Path(args.out).expanduser().resolve():
        raise SSNError("--out is the --neurons folder itself (its score table would be lost); give another folder "
                       "for the bundle")
    out = check_out(args.out, MANIFEST_FORMAT)
    result = IdentifyResult.load(args.neurons)
    out = save_bundle(result, out, model_source=args.model_source, origin=str(args.neurons),
                      walkthrough=args.walkthrough, delta=args.delta)
    bundle = IdentifyResult.load(out)
    info = bundle.manifest["bundle"]
    ss = ", ".join(f"{lang} {len(s)}" for lang, s in bundle.ss.items()) or "none"
    print(f"bundle for {info['model_source']} (fingerprint {bundle.manifest.get('model_fingerprint')}): MS "
          + ", ".join(f"{lang} {len(s)}" for lang, s in bundle.ms.items()) + f"; SS {ss}; all SS {len(bundle.ss_all)}")
    print("refusal direction: " + (f"layer {bundle.direction.layer}" if bundle.direction is not None else
                                   "none (identify without --no-direction to have the positive control)"))
    print("additive reinforcement: " + (info["activations"] or "no activation means (identify keeps them)"))
    extras = [name for name in ("walkthrough.json", "delta.safetensors") if (out / name).is_file()]
    print(f"wrote {out} ({bundle_size(out) / 1e6:.2f} MB" + (f"; with {', '.join(extras)}" if extras else "")
          + "); left out: " + "; ".join(info["left_out"]))
    return 0
