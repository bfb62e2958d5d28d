"""What every command shares: the model options and their load, float checking, ``--out`` checking, the progress
bars on stderr, plain text tables, and the prompt sets of the scoring commands (identify, compare-methods, explain).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tqdm import tqdm


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
        self.bar: tqdm | None = None
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
