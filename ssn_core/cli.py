"""Command line: ``python -m ssn_core <command>`` (or ``ssn <command>`` when installed).

Adding a command (other modules' owners): write two functions in this file,

    def add_<name>_parser(sub) -> None:       # sub = the subparsers object
        p = sub.add_parser("<name>", help="...")
        add_model_args(p)                     # if it needs a model: --model/--dtype/--quant/--device/...
        p.set_defaults(func=cmd_<name>)

    def cmd_<name>(args) -> int:              # 0 on success
        lm = load_from_args(args)
        ...

and append ``add_<name>_parser`` to `SUBCOMMANDS` at the bottom. Import heavy modules (torch, transformers,
ssn_core.<engine module>) inside ``cmd_<name>`` so that ``--help`` stays fast. Raise `SSNError` subclasses for
user mistakes: `main` prints ``error: <message>`` and exits with status 2, without a traceback (anything else is
one ``internal error:`` line, exit 1). Check every argument before ``load_from_args``: float options are finite
already (`finite_float`); a command with ``--out`` calls ``check_out(args.out, KIND)`` first and writes its result
with ``ssn_core.io.writing_result_dir(out, KIND)`` (KIND: ``ssn-lab/<name>``, written into its manifest.json).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from ssn_core.errors import Cancelled, SSNError

# ----------------------------------------------------------------------------------------------
# Shared helpers


def finite_float(text: str) -> float:
    """argparse type for every float option: a finite number (NaN and infinity never become results)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _finite_floats(parser: argparse.ArgumentParser) -> None:
    """Make every ``type=float`` option of the parser and its subcommands use `finite_float`."""
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.type is float:
            action.type = finite_float
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _finite_floats(subparser)


def check_out(path, kind: str):
    """`ssn_core.io.check_out_dir`: refuse an --out that is not new, empty or an earlier result of this kind,
    before the model is loaded."""
    from ssn_core.io import check_out_dir

    return check_out_dir(path, kind)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from ssn_core.loading import DEFAULT_STARTER, DEVICE_MAPS, DTYPES, QUANTIZATIONS

    parser.add_argument("--model", default=DEFAULT_STARTER,
                        help=f"hub id, local model directory, .gguf file or starter model (default: {DEFAULT_STARTER})")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype (auto: float32 on CPU)")
    parser.add_argument("--quant", default="none", choices=QUANTIZATIONS, help="bitsandbytes quantization")
    parser.add_argument("--device", default="auto", choices=DEVICE_MAPS, help="auto: GPU when available, else CPU")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model repository's own Python code (only for repositories you trust)")
    parser.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                        help="under accelerate launch / torchrun: how long a process waits for the others before it "
                             "stops with an error (default $SSN_DIST_TIMEOUT or 1800)")


class TqdmProgress:
    """`progress(done, total, message)` callback drawing one tqdm bar per *phase*, updated in place.

    The phase is the message without its counts (`ssn_core.progress.phase_of`): "scored 8/24 prompts" and
    "scored 16/24 prompts" move one bar; a new phase closes the bar and opens the next. A message at count 0
    only announces its phase, so the first counted message of the same total keeps that bar (and renames it).
    """

    def __init__(self) -> None:
        self.bar = None
        self.phase: str | None = None
        self.bars_opened = 0

    def _unit(self, phase: str, total: int) -> tuple[str, bool]:
        in_bytes = total > 1_000_000  # byte counts (starter assembly) get B/kB/MB units
        return ("B" if in_bytes else "it"), in_bytes

    def __call__(self, done: int, total: int, message) -> None:
        from tqdm import tqdm

        from ssn_core.distributed import is_main
        from ssn_core.progress import phase_of

        if not is_main():  # one bar, on process 0; its counts include every process's work
            return

        phase = phase_of(message) or (self.phase or "")
        announced = self.bar is not None and self.bar.n == 0 and self.bar.total == total and done > 0
        if self.bar is None or (phase != self.phase and not announced):
            self.close()
            unit, scale = self._unit(phase, total)
            self.bar = tqdm(total=total, desc=phase, unit=unit, unit_scale=scale, file=sys.stderr, leave=True,
                            dynamic_ncols=True)
            self.bars_opened += 1
        elif phase != self.phase:
            self.bar.set_description(phase, refresh=False)
        self.phase = phase
        self.bar.total = total
        self.bar.n = done
        self._postfix(message)
        self.bar.refresh()

    def _postfix(self, message) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def load_from_args(args: argparse.Namespace):
    """Load the model named by `add_model_args` options, with progress bars on stderr."""
    from ssn_core.loading import ModelSpec, load_model

    spec = ModelSpec(source=args.model, dtype=args.dtype, quantization=args.quant, device_map=args.device,
                     trust_remote_code=args.trust_remote_code)
    progress = TqdmProgress()
    try:
        lm = load_model(spec, progress=progress)
    finally:
        progress.close()
    for note in lm.summary.warnings:  # e.g. no chat template, a damaged starter cache that was rebuilt
        print(f"warning: {note}", file=sys.stderr)
    from ssn_core import distributed

    if distributed.world().active:  # the path may differ per machine; what was loaded must not
        from ssn_core.records import model_identity

        identity = {k: v for k, v in model_identity(lm).items() if k not in ("name", "source")}
        distributed.check_same("the loaded model", identity)
    return lm


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in columns]] + [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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
    from contextlib import nullcontext

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
    context = nullcontext()
    if args.suppress:
        neurons.validate(lm.sites)
        context = suppress(lm, neurons)
        print(f"[suppressing {len(neurons):,} neurons from {args.suppress}]", file=sys.stderr)
    elif args.reinforce:
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


# ----------------------------------------------------------------------------------------------
# ssn train


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune only the parameters owned by a neuron set (a small delta file)")
    add_model_args(p)
    p.add_argument("--neurons", metavar="DIR", help="identify results (from `ssn identify`) for ss / ms-hr / random")
    p.add_argument("--target", default="ss",
                   help="ss (union of SS over --langs) | ss:LANG | ms-hr (English MS) | ms:LANG | random | FILE")
    p.add_argument("--langs", default=None, help="training languages, comma-separated (default en,zh,bn,sw, or those "
                   "of --data)")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="reuse the safety data of an earlier run (its OUT/safety_data.json: same items, split and "
                   "retain replies) instead of building it again")
    p.add_argument("--n", type=int, default=None, help="items per language and label (default: all built-in)")
    p.add_argument("--heldout", type=float, default=0.25, help="share of item ids held out for evaluation")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--epochs", type=float, default=None, help="overrides --steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="skip the before/after held-out evaluation")
    p.add_argument("--eval-n", type=int, default=None, help="held-out items per language to generate for")
    p.add_argument("--eval-tokens", type=int, default=48, help="max new tokens of evaluation replies")
    p.add_argument("--eval-prompts", default=None, metavar="SPEC",
                   help="more held-out harmful prompts for the evaluation, e.g. multijail:PATH (never trained on)")
    p.add_argument("--include-identify-items", action="store_true",
                   help="also train on the built-in items the --neurons identification used (default: left out)")
    p.add_argument("--baselines", default="",
                   help="also train on the same data and compare: random,lora-8,lora-match,full (comma-separated)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (delta.safetensors, train_result.json)")
    p.set_defaults(func=cmd_train)


class _TrainProgress(TqdmProgress):
    """`progress(step, total, info)` for training: one tqdm bar per phase, the loss as a postfix."""

    def _unit(self, phase: str, total: int) -> tuple[str, bool]:
        return ("step" if phase == "training" else "item"), False

    def _postfix(self, message) -> None:
        if isinstance(message, dict) and "loss" in message:
            self.bar.set_postfix(loss=f"{message['loss']:.4f}", refresh=False)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssn_core.errors import Cancelled, TrainingError
    from ssn_core.generation import GenerationSettings
    from ssn_core.io import atomic_write_json, writing_result_dir
    from ssn_core.prompts import load_builtin, parse_languages
    from ssn_core.training import (
        METHODS,
        RESULT_KIND,
        SafetyData,
        TrainConfig,
        build_safety_data,
        compare_methods,
        is_main_process,
        paired_refusal_difference,
        resolve_target,
        run_train,
    )

    languages = parse_languages(args.langs or "en,zh,bn,sw")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = [b for b in baselines if b not in METHODS or b == "neurons"]
    if unknown:
        raise TrainingError(f"unknown baseline(s) {', '.join(unknown)}; choose from random, lora-8, lora-match, full")
    config = TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip, target=args.target)
    config.check()
    if not 0 <= args.heldout < 1:
        raise TrainingError(f"--heldout must be in [0, 1), got {args.heldout}")
    out = check_out(args.out, RESULT_KIND)
    if args.data and not Path(args.data).expanduser().is_file():
        raise TrainingError(f"--data {args.data}: no such file (it is OUT/safety_data.json of an earlier `ssn train`)")
    main_process = is_main_process()  # under accelerate launch `main` joined the other processes before this
    lm = load_from_args(args)
    saved_data = None
    if args.data:
        saved_data = SafetyData.load(args.data, lm.sites)
        if args.langs and set(languages) != set(saved_data.languages):
            raise TrainingError(f"--langs {','.join(languages)} does not match the languages of {args.data} "
                                f"({','.join(saved_data.languages)}); leave --langs out to use the data's")
        languages = saved_data.languages
    neurons = resolve_target(args.target, lm.sites, identify_dir=args.neurons, languages=languages, seed=args.seed)
    excluded: set[str] = set()
    if args.neurons and not args.include_identify_items:
        from ssn_core.identify import IdentifyResult

        used = IdentifyResult.load(args.neurons).item_ids
        excluded = set(used) | {("s" if i.startswith("h") else "h") + i[1:] for i in used if i[:1] in ("h", "s")}
    extra_heldout = None
    if args.eval_prompts:
        from ssn_core.evaluation import load_prompt_spec

        extra_heldout = load_prompt_spec(args.eval_prompts, languages, args.eval_n, "harmful")
    if main_process:
        print(f"[training {len(neurons):,} neurons ({args.target}) on {', '.join(languages)}]", file=sys.stderr)
    progress = _TrainProgress() if main_process else None
    eval_kwargs = {"settings": GenerationSettings(max_new_tokens=args.eval_tokens),
                   "max_eval_per_language": args.eval_n}
    try:
        if saved_data is not None:
            data = saved_data
        else:
            prompts = load_builtin(languages, n=args.n)
            data = build_safety_data(lm, prompts, languages, heldout_fraction=args.heldout, seed=args.seed,
                                     exclude_ids=excluded, extra_heldout=extra_heldout, progress=progress)
        result = run_train(lm, neurons, data, config, evaluate=not args.no_eval, eval_kwargs=eval_kwargs,
                           progress=progress)
        comparison, baseline_error = None, None
        if baselines:
            try:
                results, rows = compare_methods(lm, neurons, data, config, methods=baselines,
                                                eval_kwargs=eval_kwargs, random_seed=args.seed, before=result.before,
                                                progress=progress)
                comparison = [result.summary_row(), *rows]
                random_result = next((r for r in results if r.method == "random"), None)
                if random_result is not None and result.after is not None and random_result.after is not None:
                    nhr = [lang for lang in languages if lang != "en"]
                    paired = paired_refusal_difference(result.after, random_result.after, nhr)
                    comparison[0]["vs_random_nhr_refusal"] = paired
            except SSNError as exc:  # the neuron training is done: keep it, then report the failure
                if isinstance(exc, Cancelled) or not main_process:
                    raise
                baseline_error = exc
    finally:
        if progress is not None:
            progress.close()
    if not main_process:
        return 0
    with writing_result_dir(out, RESULT_KIND) as tmp:  # one folder per run: delta, record, data, comparison
        result.write_files(tmp)
        data.save(tmp / "safety_data.json", lm)
        if comparison:
            atomic_write_json(tmp / "comparison.json", comparison)
    if baseline_error is not None:
        raise SSNError(f"the baselines failed: {baseline_error}. The {args.target} training itself finished and was "
                       f"saved in {out}")
    print(f"trained {result.trainable_params:,} parameters ({100 * result.trainable_share:.4f}% of the model) "
          f"in {result.seconds:.1f} s; final loss {result.losses[-1]:.4f}")
    if result.before is not None and result.after is not None:
        rows = []
        for before, after in zip(result.before.table(), result.after.table(), strict=True):
            rows.append({"language": before["language"],
                         "refusal": f"{_pct(before['refusal'])} -> {_pct(after['refusal'])}",
                         "over_refusal": f"{_pct(before['over_refusal'])} -> {_pct(after['over_refusal'])}",
                         "refusal_nll": f"{_num(before['refusal_nll'])} -> {_num(after['refusal_nll'])}",
                         "retain_nll": f"{_num(before['retain_nll'])} -> {_num(after['retain_nll'])}"})
        print(format_table(rows, ["language", "refusal", "over_refusal", "refusal_nll", "retain_nll"]))
    if comparison:
        paired = comparison[0].pop("vs_random_nhr_refusal", None)
        columns = list(dict.fromkeys(key for row in comparison for key in row))
        print(format_table(comparison, columns))
        if paired is not None:
            pooled = paired["pooled"]
            print(f"held-out NHR refusal, {args.target} minus random neurons of the same shape: {pooled['mean']:+.3f} "
                  f"[95% CI {pooled['ci_low']:+.3f}, {pooled['ci_high']:+.3f}], p = {pooled['p_value']:.3g}, "
                  f"n = {pooled['n']} prompts" + (f" ({pooled['note']})" if pooled["note"] else ""))
            comparison[0]["vs_random_nhr_refusal"] = paired
    print(f"saved {out / 'delta.safetensors'}, {out / 'train_result.json'} and {out / 'safety_data.json'} "
          "(reuse it with --data)")
    return 0


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# ----------------------------------------------------------------------------------------------
# ssn identify / ssn compare-methods  (scoring/, identify.py)

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


def _load_prompt_spec(spec: str, languages: list[str], n: int | None):
    """builtin | multijail:PATH | FILE -> PromptSet restricted to ``languages``, at most ``n`` per (lang, label)."""
    from pathlib import Path

    from ssn_core.errors import PromptSetError
    from ssn_core.prompts import load_builtin, load_file, load_multijail, with_harmless

    if spec == "builtin":
        return load_builtin(languages, n=n)
    if spec.startswith("multijail:"):
        harmful = load_multijail(spec.split(":", 1)[1], languages=languages, n=n)
        prompts = with_harmless(harmful)
    elif Path(spec).is_file():
        prompts = load_file(spec, languages=languages)
    else:
        raise PromptSetError(f"--prompts {spec!r}: expected 'builtin', 'multijail:PATH' or an existing file")
    return prompts.select(languages, limit_per_language=n)


def _check_contrast(prompts, languages: list[str]) -> None:
    """MS-Neurons contrast harmful with harmless prompts: every language needs both (checked before the model load)."""
    for lang in languages:
        for label in ("harmful", "harmless"):
            if not any(p.language == lang and p.label == label for p in prompts):
                raise SSNError(f"language {lang} has no {label} prompts; MS-Neurons contrast harmful with harmless "
                               "prompts of the same language")


def _sites_arg(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    if not kinds:
        raise SSNError("--sites is empty; give some of " + _ALL_SITES)
    unknown = [k for k in kinds if k not in _ALL_SITES.split(",")]
    if unknown:
        raise SSNError(f"unknown site kind {unknown[0]!r} in --sites; expected some of {_ALL_SITES}")
    return kinds


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

    from ssn_core.identify import MANIFEST_FORMAT, _check_p, identify
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
# ssn evaluate / ssn validate


def _add_eval_common_args(p, default_tokens: int) -> None:
    p.add_argument("--langs", default="en,zh,bn,sw", help="languages, comma-separated (default: en,zh,bn,sw)")
    p.add_argument("--prompts", default="builtin", help="builtin | multijail:PATH_OR_HUB_ID | FILE (default: builtin; "
                   "with an identify result, the built-in items it did not use)")
    p.add_argument("--n", type=int, default=None, help="prompts per language (and label); default: all")
    p.add_argument("--judge", default="marker", help="marker (default) | guard:MODEL | api:BASE_URL,MODEL "
                   "(the API key is read from $OPENAI_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=default_tokens)
    p.add_argument("--batch-size", type=int, default=8)
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
    _add_eval_common_args(p, 128)
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
    from contextlib import nullcontext

    from ssn_core.evaluation import RESULT_KIND, evaluate, evaluate_utility, load_prompt_spec
    from ssn_core.generation import GenerationSettings, check_prompts
    from ssn_core.interventions import Intervention
    from ssn_core.metrics import MGSM_LANGUAGES, load_mgsm
    from ssn_core.neurons import NeuronSet
    from ssn_core.prompts import BUILTIN_LANGUAGES, load_builtin, parse_languages

    # Everything that can be checked without the model is checked first: no reply is generated for nothing.
    languages = parse_languages(args.langs)
    label = None if args.label == "all" else args.label
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system)
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
        neurons.validate(lm.sites)
        interventions.append(Intervention(neurons, scale=0.0, label=f"suppress {args.suppress}"))
    elif args.reinforce:
        neurons.validate(lm.sites)
        interventions.append(Intervention(neurons, scale=args.alpha, label=f"reinforce {args.reinforce}"))
    delta_context, condition = nullcontext(), None
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
                              batch_size=args.batch_size, label=label, condition=condition, progress=progress)
            if args.mgsm or args.ppl:
                ppl_langs = [lang for lang in languages if lang in BUILTIN_LANGUAGES] if args.ppl else []
                ppl_texts = ({lang: [p.text for p in load_builtin([lang], n=args.ppl, label="harmless")]
                              for lang in ppl_langs})
                try:
                    result.utility = evaluate_utility(
                        lm, languages, mgsm_n=args.mgsm, mgsm_path=args.mgsm_path, mgsm_settings=mgsm_settings,
                        perplexity_texts=ppl_texts, interventions=interventions, batch_size=args.batch_size,
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
    _add_eval_common_args(p, 48)
    p.add_argument("--seeds", type=int, default=3, help="random-control seeds 0..K-1 (default 3)")
    p.add_argument("--alphas", default="2", help="reinforcement scales, comma-separated (default 2)")
    p.add_argument("--betas", default="",
                   help="additive reinforcement: add beta x each SS-Neuron's mean activation on the HR language's "
                        "harmful prompts, comma-separated (default: none)")
    p.add_argument("--only", default=None, choices=("suppress", "reinforce"),
                   help="run only the suppression part (control, sets, random controls) or only the reinforcement "
                        "part (scale and additive, with over-refusal); default: both")
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
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system)
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
                          parts=(args.only,) if args.only else ("suppress", "reinforce"), progress=progress)
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
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, system=args.system)
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
    for directory, result in zip(args.neurons, results, strict=True):
        recipe = (result.manifest.get("recipe") or {}).get("name")
        name = recipe or f"{result.scores.method}:{result.scores.aggregate}"
        name = name if name not in tables else f"{name} ({directory})"
        tables[name] = result.scores
        rankings[name] = result.manifest.get("ranking", "per-site")
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


# ----------------------------------------------------------------------------------------------
# ssn explain


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
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: explanation.json, report.md, report.html")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssn_core.explain_report import markdown_report, save_explanation
    from ssn_core.explorer import RESULT_KIND, explain, format_neuron, parse_neurons
    from ssn_core.identify import IdentifyResult
    from ssn_core.neurons import NeuronSet
    from ssn_core.prompts import parse_languages
    from ssn_core.scoring import ScoreTable, score

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
    kinds = sorted({kind for _, kind, _ in neurons} | set(neuron_set.counts_per_kind() if neuron_set else ()))
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


# ----------------------------------------------------------------------------------------------
# Registry and entry point. Add new `add_<name>_parser` functions to this list.

SUBCOMMANDS: list[Callable] = [
    add_info_parser,
    add_chat_parser,
    add_prepare_starter_parser,
    add_train_parser,
    add_identify_parser,
    add_compare_methods_parser,
    add_evaluate_parser,
    add_validate_parser,
    add_faithfulness_parser,
    add_explain_parser,
    add_bundle_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssn", description="SSN Lab: cross-lingual shared safety neurons")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    for command in sub.choices.values():  # `ssn COMMAND ... --debug` works as well as `ssn --debug COMMAND`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an internal error")
    _finite_floats(parser)
    return parser


# Commands that share their work between the processes of `accelerate launch` / torchrun (ssn_core.distributed).
DISTRIBUTED_COMMANDS: tuple[str, ...] = ("identify", "compare-methods", "evaluate", "validate", "faithfulness", "train")


def join_launch(args: argparse.Namespace):
    """Under a multi-process launch: join the other processes before anything is loaded (each process gets its own
    GPU), check that they all run the same command line, and keep the output to process 0. None without a launch."""
    import json

    from ssn_core import distributed

    if not distributed.launched():
        return None
    if args.command not in DISTRIBUTED_COMMANDS:
        raise SSNError(f"ssn {args.command} runs in one process; under accelerate launch / torchrun only "
                       f"{', '.join(DISTRIBUTED_COMMANDS)} share their work between processes")
    world = distributed.init(getattr(args, "dist_timeout", None))
    if world.active:  # --model may name a different local path per machine: the loaded model is compared after
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "debug", "model")}
        distributed.check_same("the command line", json.loads(json.dumps(settings, sort_keys=True, default=str)))
    return world


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 a user error (``error: <message>``, no traceback), 130 interrupted,
    1 an internal error (a bug: one ``internal error:`` line; ``--debug`` adds the traceback).

    Under ``accelerate launch`` / torchrun with several processes only process 0 prints and writes; the others
    print only their errors, prefixed with their process number."""
    parser = build_parser()
    args = parser.parse_args(argv)
    streams = sys.stdout, sys.stderr
    prefix, finished = "", False
    try:
        world = join_launch(args)
        if world is not None and world.active and not world.is_main:
            prefix = f"process {world.rank} of {world.size}: "
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - closed in the finally below
        status = int(args.func(args) or 0)
        finished = True
        return status
    except SSNError as exc:
        print(f"{prefix}error: {exc}", file=streams[1])
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=streams[1])  # on a new line: a progress bar may end the current one
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line for the user, the traceback on request
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc(file=streams[1])
        text = str(exc).strip().splitlines()
        summary = f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
        hint = "traceback above" if getattr(args, "debug", False) else "rerun with --debug for the traceback"
        print(f"{prefix}internal error: {summary}; {hint}", file=streams[1])
        return 1
    finally:
        if sys.stdout is not streams[0]:
            sys.stdout.close()
            sys.stdout, sys.stderr = streams
        distributed = sys.modules.get("ssn_core.distributed")
        if distributed is not None:  # leave the process group (after an error the others may be gone: just exit)
            distributed.shutdown(leave=finished)


if __name__ == "__main__":
    sys.exit(main())
