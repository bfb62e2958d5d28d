"""``ssn info``, ``ssn chat`` (and ``chat --replay``), ``ssn prepare-starter``: one model, looked at or talked to."""

from __future__ import annotations

import argparse
import sys

from ssn_core.cli.common import TqdmProgress, add_model_args, format_table, load_from_args
from ssn_core.errors import SSNError

# ----------------------------------------------------------------------------------------------
# ssn info


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="load a model and print its summary and neuron-site table")
    add_model_args(p)
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    lm = load_from_args(args)
    summary = lm.summary
    width = max(len(label) for label, _ in summary.rows())
    for label, value in summary.rows():
        print(f"{label.ljust(width)}  {value}")
    sites = lm.sites
    print()
    print(f"Neuron sites ({sites.family} layout, {sites.n_layers} layers, {sites.total_neurons:,} neurons in all):")
    print(format_table(sites.table(), ["kind", "layers", "neurons_per_layer", "total", "carrier"]))
    return 0


# ----------------------------------------------------------------------------------------------
# ssn chat


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="one reply to one prompt, optionally with neurons suppressed or reinforced")
    add_model_args(p)
    p.add_argument("prompt", nargs="?", help="the user message")
    p.add_argument("--replay", metavar="FILE", help="regenerate an A/B exchange downloaded from the Chat page (its "
                   "prompt, intervention and settings) and say whether both replies match (exit status 3 if not)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--suppress", metavar="FILE", help="neuron set (.json/.safetensors) to set to 0")
    group.add_argument("--reinforce", metavar="FILE", help="neuron set (.json/.safetensors) to scale by --alpha")
    p.add_argument("--alpha", type=float, default=2.0, help="reinforcement scale (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", default=None,
                   help="system prompt; default: the model's own default; '' for none")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from contextlib import AbstractContextManager, nullcontext

    from ssn_core.generation import GenerationSettings, check_prompts, stream_generate
    from ssn_core.interventions import reinforce, suppress
    from ssn_core.neurons import NeuronSet

    if args.replay:
        return cmd_chat_replay(args)
    if args.prompt is None:
        raise SSNError("give a prompt to answer (or --replay FILE)")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, system=args.system)
    settings.validate()
    if not args.prompt.strip():
        raise SSNError("the prompt is empty; give some text to answer")
    if args.reinforce and args.alpha < 0:
        raise SSNError(f"--alpha must be >= 0, got {args.alpha}")
    neuron_file = args.suppress or args.reinforce
    neurons = NeuronSet.load(neuron_file) if neuron_file else None  # a bad file fails before the model loads
    lm = load_from_args(args)
    check_prompts(lm, [args.prompt], settings)
    context: AbstractContextManager[None] = nullcontext()
    if args.suppress:
        assert neurons is not None  # loaded above
        neurons.validate(lm.sites)
        context = suppress(lm, neurons)
        print(f"[suppressing {len(neurons):,} neurons from {args.suppress}]", file=sys.stderr)
    elif args.reinforce:
        assert neurons is not None  # loaded above
        neurons.validate(lm.sites)
        context = reinforce(lm, neurons, alpha=args.alpha)
        print(f"[reinforcing {len(neurons):,} neurons from {args.reinforce} x{args.alpha:g}]", file=sys.stderr)
    shown = ""
    with context:
        for (reply,) in stream_generate(lm, [args.prompt], settings):
            if reply.startswith(shown):
                sys.stdout.write(reply[len(shown):])
            else:  # the decoder revised earlier text: print the reply again on a new line
                sys.stdout.write("\n" + reply)
            sys.stdout.flush()
            shown = reply
    sys.stdout.write("\n")
    return 0


def cmd_chat_replay(args: argparse.Namespace) -> int:
    """`ssn chat --replay FILE`: both columns of a recorded A/B exchange, regenerated; exit 3 when one differs."""
    from ssn_core.records import load_record, replay

    if args.prompt is not None or args.suppress or args.reinforce:
        raise SSNError("--replay takes the prompt, intervention and settings from the record; drop the prompt and "
                       "--suppress / --reinforce")
    record = load_record(args.replay)  # a bad file fails before the model load
    lm = load_from_args(args)
    result = replay(lm, record)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"intervention (B): {record['intervention'].get('description', record['intervention'].get('kind'))}")
    for side, text in (("a", result.a), ("b", result.b)):
        print(f"--- {side.upper()} ({'matches the record' if result.same(side) else 'DIFFERS from the record'})")
        print(text)
        if not result.same(side):
            print(f"--- {side.upper()} as recorded")
            print(record["replies"][side])
    print("replies match" if result.matches else "replies differ", file=sys.stderr)
    return 0 if result.matches else 3


# ----------------------------------------------------------------------------------------------
# ssn prepare-starter


def add_prepare_starter_parser(sub) -> None:
    from ssn_core.loading import DEFAULT_STARTER, STARTERS

    p = sub.add_parser("prepare-starter", help="assemble, verify and convert a starter model into the cache (once)")
    p.add_argument("--name", default=DEFAULT_STARTER, choices=[f"starter:{k}" for k in STARTERS] + list(STARTERS))
    p.set_defaults(func=cmd_prepare_starter)


def cmd_prepare_starter(args: argparse.Namespace) -> int:
    import time

    from ssn_core.loading import prepare_starter

    start = time.perf_counter()
    progress = TqdmProgress()
    notes: list[str] = []
    try:
        path = prepare_starter(args.name, progress=progress, notes=notes)
    finally:
        progress.close()
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.name}: ready in {path} ({time.perf_counter() - start:.1f} s)")
    return 0
