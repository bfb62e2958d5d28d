"""``ssn train``: targeted fine-tuning of a neuron set (`ssn_core.training`), with optional baselines on the same data.
"""

from __future__ import annotations

import argparse
import sys

from ssn_core.cli.common import TqdmProgress, add_model_args, check_out, format_table, load_from_args
from ssn_core.errors import SSNError


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
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (delta.safetensors, train_result.json)")
    p.set_defaults(func=cmd_train)


class _TrainProgress(TqdmProgress):
    """`progress(step, total, info)` for training: one tqdm bar per phase, the loss as a postfix."""

    def _unit(self, phase: str, total: int) -> tuple[str, bool]:
        return ("step" if phase == "training" else "item"), False

    def _postfix(self, message) -> None:
        if isinstance(message, dict) and "loss" in message and self.bar is not None:
            self.bar.set_postfix(loss=f"{message['loss']:.4f}", refresh=False)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ssn_core.errors import TrainingError
    from ssn_core.io import writing_result_dir
    from ssn_core.prompts import load_builtin, parse_languages
    from ssn_core.training import (
        RESULT_KIND,
        SafetyData,
        StudyConfig,
        TrainConfig,
        is_main_process,
        resolve_target,
        run_study,
    )

    languages = parse_languages(args.langs or "en,zh,bn,sw")
    if not 0 <= args.heldout < 1:
        raise TrainingError(f"--heldout must be in [0, 1), got {args.heldout}")
    config = StudyConfig(
        train=TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, max_length=args.max_length, seed=args.seed,
                          weight_decay=args.weight_decay, grad_clip=args.grad_clip, target=args.target),
        languages=languages, heldout_fraction=args.heldout, evaluate=not args.no_eval,
        eval_max_new_tokens=args.eval_tokens, eval_per_language=args.eval_n,
        baselines=[b.strip() for b in args.baselines.split(",") if b.strip()],
        private_copy_for_lora=False)  # this process owns its model: no copy for PEFT, no second model in memory
    config.check()
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
    if args.neurons and not args.include_identify_items:
        from ssn_core.identify import IdentifyResult

        used = IdentifyResult.load(args.neurons).item_ids
        config.exclude_ids = set(used) | {("s" if i.startswith("h") else "h") + i[1:] for i in used
                                          if i[:1] in ("h", "s")}
    extra_heldout = None
    if args.eval_prompts:
        from ssn_core.evaluation import load_prompt_spec

        extra_heldout = load_prompt_spec(args.eval_prompts, languages, args.eval_n, "harmful")
    if main_process:
        print(f"[training {len(neurons):,} neurons ({args.target}) on {', '.join(languages)}]", file=sys.stderr)
    progress = _TrainProgress() if main_process else None
    try:
        if saved_data is not None:
            study = run_study(lm, neurons, config, data=saved_data, progress=progress)
        else:
            study = run_study(lm, neurons, config, prompts=load_builtin(languages, n=args.n),
                              extra_heldout=extra_heldout, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if not main_process:
        return 0
    result, baseline_error, comparison = study.result, study.baseline_error, study.comparison()
    with writing_result_dir(out, RESULT_KIND) as tmp:  # one folder per run: delta, record, data, comparison
        study.write_files(tmp, lm)
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
