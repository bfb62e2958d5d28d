"""``ssn explain``: what a neuron responds to and writes, or a set's summary, as a report folder
(`ssn_core.explorer`, `ssn_core.explain_report`)."""

from __future__ import annotations

import argparse

from ssn_core.cli.common import TqdmProgress, _load_prompt_spec, add_model_args, check_out, load_from_args
from ssn_core.errors import SSNError


def add_explain_parser(sub) -> None:
    p = sub.add_parser("explain", help="what a neuron responds to and writes: top/bottom prompts per language with "
                                       "token activations, vocabulary projection, importance by method; set summaries")
    add_model_args(p)
    p.add_argument("--neuron", action="append", default=[], metavar="L2.mlp.3814",
                   help="neuron to explain as L<layer>.<site>.<index> (repeat it, or separate several with commas)")
    p.add_argument("--set", metavar="FILE_OR_DIR", help="neuron set (.json/.safetensors) to summarise, or an identify "
                   "result folder (its union of SS-Neurons)")
    p.add_argument("--neurons", metavar="DIR", help="identify result (`ssn identify --out`): MS / SS membership per "
                   "language and its importance scores")
    p.add_argument("--scores", action="append", default=[], metavar="FILE",
                   help="more score tables (.safetensors: an identify result's scores.safetensors, compare-methods' "
                        "scores_<method>.safetensors); repeat for several methods")
    p.add_argument("--methods", default="impact,activation",
                   help="score these methods now unless a given table has them (impact, activation; '' for none)")
    p.add_argument("--langs", default="en,zh,bn,sw", help="languages, comma-separated (default: en,zh,bn,sw)")
    p.add_argument("--prompts", default="builtin",
                   help="builtin | multijail:PATH_OR_HUB_ID (harmless prompts from the built-in set) | FILE")
    p.add_argument("--n", type=int, default=16, help="prompts per language and label (default 16)")
    p.add_argument("--k", type=int, default=5, help="top and bottom prompts shown per language and label (default 5)")
    p.add_argument("--top-tokens", type=int, default=20, help="promoted / suppressed tokens listed (default 20)")
    p.add_argument("--aggregate", default="content", choices=("content", "all"),
                   help="tokens a prompt's activations are read at: the user's own text (default) or all tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: explanation.json, report.md, report.html")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssn_core.explain_report import markdown_report, save_explanation
    from ssn_core.explorer import RESULT_KIND, explain, format_neuron, parse_neurons
    from ssn_core.identify import IdentifyResult
    from ssn_core.neurons import NeuronSet
    from ssn_core.prompts import parse_languages
    from ssn_core.scoring import SITE_KINDS, ScoreTable, score

    neurons = parse_neurons(",".join(args.neuron))
    if not neurons and not args.set:
        raise SSNError("give --neuron L2.mlp.3814 (one or more) or --set FILE to explain")
    for name, value in (("--n", args.n), ("--k", args.k), ("--top-tokens", args.top_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise SSNError(f"{name} must be at least 1, got {value}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("impact", "activation")]
    if unknown:
        raise SSNError(f"--methods {unknown[0]!r}: explain scores impact and activation itself; give other methods' "
                       "tables with --scores")
    languages = parse_languages(args.langs)
    out = check_out(args.out, RESULT_KIND)
    prompts = _load_prompt_spec(args.prompts, languages, args.n)
    set_is_result = bool(args.set) and Path(args.set).expanduser().is_dir()

    def read_files(sites=None):
        """(result, neuron set, its name, score tables); read before the model load, checked against it after."""
        result = IdentifyResult.load(args.neurons, sites) if args.neurons else None
        neuron_set, set_name = None, ""
        if set_is_result:
            set_result = IdentifyResult.load(args.set, sites)
            result = result or set_result
            neuron_set, set_name = set_result.ss_all, f"all SS-Neurons of {args.set}"
            if len(neuron_set) == 0:
                example = Path(args.set) / "sets" / f"ms_{set_result.languages[0]}.json"
                raise SSNError(f"{args.set} has no SS-Neurons to summarise; pass one of its sets instead, e.g. "
                               f"--set {example}")
        elif args.set:
            neuron_set, set_name = NeuronSet.load(args.set, sites), Path(args.set).name
        return result, neuron_set, set_name, [ScoreTable.load(path, sites) for path in args.scores]

    read_files()
    lm = load_from_args(args)
    neurons = parse_neurons(",".join(args.neuron), lm.sites)
    result, neuron_set, set_name, tables = read_files(lm.sites)
    have = {t.method for t in tables} | ({result.scores.method} if result is not None and result.scores is not None
                                         else set())
    wanted = {kind for _, kind, _ in neurons} | set(neuron_set.counts_per_kind() if neuron_set else ())
    kinds = [kind for kind in SITE_KINDS if kind in wanted]  # both were checked against the model's sites
    progress = TqdmProgress()
    try:
        for method in methods:
            if method not in have:
                tables.append(score(lm, prompts, method=method, kinds=kinds, batch_size=args.batch_size,
                                    aggregate=args.aggregate, progress=progress))
        explanation = explain(lm, prompts, neurons, neuron_set, result=result, tables=tables, languages=languages,
                              k=args.k, top_tokens=args.top_tokens, aggregate=args.aggregate,
                              batch_size=args.batch_size, set_name=set_name, progress=progress)
    finally:
        progress.close()
    out = save_explanation(explanation, out)
    for report in explanation.neurons:
        best = max(report.groups, key=lambda g: g["mean_max"])
        promoted = ", ".join(repr(r["token"]) for r in report.vocabulary.promoted[:8]) if report.vocabulary else \
            report.vocabulary_note
        print(f"{format_neuron(report.neuron)}: fires most on {best['language']}/{best['label']} prompts (mean peak "
              f"{best['mean_max']:.3g}); promotes {promoted}")
    if explanation.set is not None:
        print(f"set {explanation.set.name}: {explanation.set.size:,} neurons")
    print(f"{len(prompts)} prompts in {explanation.meta['seconds']:.1f}s; wrote {out} "
          f"({len(markdown_report(explanation).splitlines())} lines of report.md)")
    return 0
