"""Command line: ``python -m ssn_core <command>`` (or ``ssn <command>`` when installed).

One module per command group; this one builds the parser from them and runs a command (`main`):

- `common`: the model options (`add_model_args`, `load_from_args`), `finite_float`, `check_out`, the progress bars
  (`TqdmProgress`), `format_table`, the scoring commands' prompt sets.
- `model`: ``info``, ``chat`` (``--replay``), ``prepare-starter``.
- `identify`: ``identify``, ``compare-methods``, ``bundle``.
- `evaluate`: ``evaluate``, ``validate``, ``faithfulness`` (the evaluation options and the judge they share).
- `train`: ``train``.
- `explain`: ``explain``.

Adding a command (other modules' owners): write two functions in the module of its group (or a new one),

    def add_<name>_parser(sub) -> None:       # sub = the subparsers object
        p = sub.add_parser("<name>", help="...")
        add_model_args(p)                     # if it needs a model: --model/--dtype/--quant/--device/...
        p.set_defaults(func=cmd_<name>)

    def cmd_<name>(args) -> int:              # 0 on success
        lm = load_from_args(args)
        ...

and append ``add_<name>_parser`` to `SUBCOMMANDS` below. Import heavy modules (torch, transformers,
ssn_core.<engine module>) inside ``cmd_<name>`` so that ``--help`` stays fast. Raise `SSNError` subclasses for
user mistakes: `main` prints ``error: <message>`` and exits with status 2, without a traceback (anything else is
one ``internal error:`` line, exit 1). Check every argument before ``load_from_args``: float options are finite
already (`finite_float`); a command with ``--out`` calls ``check_out(args.out, KIND)`` first and writes its result
with ``ssn_core.io.writing_result_dir(out, KIND)`` (KIND: ``ssn-lab/<name>``, written into its manifest.json).

Tests that replace a command or `load_from_args` patch it in the module that looks it up (e.g.
``ssn_core.cli.model.cmd_info``; `load_from_args` in every command module), not the re-export here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ssn_core.cli.common import (
    TqdmProgress,
    _finite_floats,
    add_model_args,
    check_out,
    finite_float,
    format_table,
    load_from_args,
)
from ssn_core.cli.evaluate import (
    add_evaluate_parser,
    add_faithfulness_parser,
    add_validate_parser,
    cmd_evaluate,
    cmd_faithfulness,
    cmd_validate,
)
from ssn_core.cli.explain import add_explain_parser, cmd_explain
from ssn_core.cli.identify import (
    RECIPE_NAMES,
    add_bundle_parser,
    add_compare_methods_parser,
    add_identify_parser,
    cmd_bundle,
    cmd_compare_methods,
    cmd_identify,
)
from ssn_core.cli.model import (
    add_chat_parser,
    add_info_parser,
    add_prepare_starter_parser,
    cmd_chat,
    cmd_chat_replay,
    cmd_info,
    cmd_prepare_starter,
)
from ssn_core.cli.train import _TrainProgress, add_train_parser, cmd_train  # noqa: F401 - tests/test_progress.py
from ssn_core.errors import SSNError

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


__all__ = [
    "DISTRIBUTED_COMMANDS",
    "RECIPE_NAMES",
    "SUBCOMMANDS",
    "TqdmProgress",
    "add_bundle_parser",
    "add_chat_parser",
    "add_compare_methods_parser",
    "add_evaluate_parser",
    "add_explain_parser",
    "add_faithfulness_parser",
    "add_identify_parser",
    "add_info_parser",
    "add_model_args",
    "add_prepare_starter_parser",
    "add_train_parser",
    "add_validate_parser",
    "build_parser",
    "check_out",
    "cmd_bundle",
    "cmd_chat",
    "cmd_chat_replay",
    "cmd_compare_methods",
    "cmd_evaluate",
    "cmd_explain",
    "cmd_faithfulness",
    "cmd_identify",
    "cmd_info",
    "cmd_prepare_starter",
    "cmd_train",
    "cmd_validate",
    "finite_float",
    "format_table",
    "join_launch",
    "load_from_args",
    "main",
]
