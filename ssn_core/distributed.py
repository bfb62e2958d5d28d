"""Data-parallel runs: the same command under ``accelerate launch`` (or ``torchrun``), each process doing a share.

How a run is split. Every process loads its own copy of the model and runs the same program on the same data. Each
loop over batches goes through `run_batches`, which forms exactly the batches a one-process run forms; of N processes,
process r runs batches r, r + N, r + 2N, ... So every batch computes what it computes in a one-process run (same
prompts, same padding, same per-batch seed) and only sums are added in another order. The shares are put back
together once per loop, on every process:

- per-batch results (replies, margins, partial sums) are gathered in batch order (`run_batches(..., gather=True)`),
  so anything added up from them is added in the one-process order: identical results;
- the score tables' running sums are all-reduced once at the end (`all_reduce_`): equal to float tolerance.

Every process ends a loop with the whole result, so the code after it (selection, judging, statistics) runs the
same everywhere; only process 0 writes result folders (`ssn_core.io.writing_result_dir`) and prints.

Lockstep. Batches run in rounds of N, one per process, and each round ends with one tiny all-reduce:

- progress: after round k every batch below (k + 1)·N is done on some process, so the bar on process 0 counts the
  work of all of them;
- failure: a process whose batch raised says so in that all-reduce; the others stop with a message naming it
  instead of waiting for it;
- liveness: when a process died or hangs, the all-reduce fails after the timeout (``--dist-timeout`` /
  ``$SSN_DIST_TIMEOUT``, default 30 minutes) with a `DistributedError`, instead of the others waiting forever.

The control messages (flags, gathered results, sums) go over a gloo group of CPU tensors that this module creates with
that timeout; on GPUs only training's gradient all-reduce uses the launcher's NCCL group. Gathered results travel as
JSON (strings, numbers, tensors as lists), never pickled.

With one process every function here is a no-op: `run_batches` is a plain loop and nothing is communicated.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import torch

from ssn_core.errors import DistributedError, SSNError

DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_ENV = "SSN_DIST_TIMEOUT"
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank (0 = the process that writes), size (processes), local rank (GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the launcher's process-group backend (gloo on CPUs, nccl on GPUs)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def describe(self) -> dict:
        """What a manifest records about the run."""
        return {"processes": self.size, "backend": self.backend}


_WORLD: World | None = None
_CONTROL = None  # the gloo group of the control messages


def launched() -> bool:
    """True when a launcher started several processes (``WORLD_SIZE`` > 1) or a process group is up."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        size = 1
    return size > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())


def timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise SSNError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SSNError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def init(timeout_s: float | None = None) -> World:
    """Join the other processes of a launch (once; later calls return the same `World`).

    Under ``accelerate launch`` / ``torchrun`` this initialises the process group through accelerate's
    ``PartialState`` (gloo without CUDA, NCCL with it; each process's GPU is selected by its local rank) and
    creates the gloo control group with ``timeout_s`` (default ``$SSN_DIST_TIMEOUT`` or 30 minutes). Without a
    launcher it returns the one-process world and touches nothing.
    """
    global _WORLD, _CONTROL
    if _WORLD is not None:
        return _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    timeout = timeout_from_env() if timeout_s is None else float(timeout_s)
    if not math.isfinite(timeout) or timeout <= 0:
        raise SSNError(f"the timeout of a multi-process run must be a positive number of seconds, got {timeout_s}")
    delta = datetime.timedelta(seconds=timeout)
    dist = torch.distributed
    try:
        if dist.is_initialized():
            rank, size = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
        else:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available(), timeout=delta)
            rank, size, local_rank = state.process_index, state.num_processes, max(state.local_process_index, 0)
        if size <= 1:
            _WORLD = World()
            return _WORLD
        backend = str(dist.get_backend())
        _CONTROL = dist.new_group(backend="gloo", timeout=delta)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the other processes of this launch: {_first_line(exc)}") from None
    _WORLD = World(rank=rank, size=size, local_rank=local_rank, backend=backend, timeout_s=timeout)
    return _WORLD


def world() -> World:
    """The current `World` (joins the launch on first use)."""
    return _WORLD if _WORLD is not None else init()


def is_main() -> bool:
    return world().is_main


def shutdown(leave: bool = True) -> None:
    """Forget the world (end of a command) and, with ``leave``, destroy the process group; harmless without one."""
    global _WORLD, _CONTROL
    if leave and _WORLD is not None and _WORLD.active and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
            from accelerate import PartialState

            getattr(PartialState, "_reset_state", lambda: None)()  # its shared state names the destroyed group
        except (RuntimeError, ValueError, ImportError):
            pass
    _WORLD, _CONTROL = None, None


# ----------------------------------------------------------------------------------------------------------------
# Errors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _lost(what: str, exc: BaseException) -> DistributedError:
    w = world()
    text = str(exc).lower()
    if "timed out" in text or "timeout" in text:
        why = f"did not answer within {w.timeout_s:g} s (it hangs, died, or is far slower)"
    elif any(word in text for word in ("closed", "reset", "broken pipe", "refused")):
        why = "stopped (its connection closed: it failed, was killed or ran out of memory)"
    else:
        detail = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(exc))  # gloo prefixes its source location
        why = f"could not be reached ({detail[:160]})"
    return DistributedError(
        f"process {w.rank} of {w.size}: another process {why} while {what}; stopping without writing anything. "
        f"The other processes' messages say why; --dist-timeout (${TIMEOUT_ENV}) sets how long processes wait for "
        "each other")


def _all_reduce(tensor: torch.Tensor, what: str) -> None:
    try:
        torch.distributed.all_reduce(tensor, group=_CONTROL)
    except RuntimeError as exc:  # DistBackendError / DistStoreError are RuntimeErrors
        raise _lost(what, exc) from None


def _sync(failed: bool, what: str) -> None:
    """End of a round: everyone says whether its batch failed; a failure elsewhere stops this process too."""
    w = world()
    flags = torch.zeros(w.size, dtype=torch.int32)
    flags[w.rank] = int(failed)
    _all_reduce(flags, what)
    others = [r for r in flags.nonzero().flatten().tolist() if r != w.rank]
    if others and not failed:
        names = ", ".join(str(r) for r in others)
        raise DistributedError(f"process {names} of {w.size} stopped with an error while {what} (its message says "
                               f"why); process {w.rank} stops too, nothing was written")


# ----------------------------------------------------------------------------------------------------------------
# Splitting work


def check_enough(n: int, what: str) -> None:
    """SSNError when there are fewer work items than processes (some would have nothing to do)."""
    w = world()
    if w.size > n:
        raise SSNError(f"{what}: {n}, fewer than the {w.size} processes of this launch (every process needs a share of "
                       f"the work): run at most {n} process{'es' if n != 1 else ''}, or give more {what}")


@overload
def run_batches(n: int, fn: Callable[[int], T], *, after: Callable[[int], None] | None = None,
                gather: Literal[True] = True, what: str = "working") -> list[T]:
    ...


@overload
def run_batches(n: int, fn: Callable[[int], T], *, after: Callable[[int], None] | None = None,
                gather: Literal[False], what: str = "working") -> None:
    ...


def run_batches(n: int, fn: Callable[[int], T], *, after: Callable[[int], None] | None = None, gather: bool = True,
                what: str = "working") -> list[T] | None:
    """``[fn(0), ..., fn(n - 1)]``, each batch run by one process (see the module docstring), on every process.

    ``after(done)`` is called after each round with the number of batches finished by all processes together (one
    process: after every batch). With ``gather=False`` nothing is gathered and None is returned: ``fn`` accumulates
    into something the caller combines with `all_reduce_`. Results must be JSON-able (str, numbers, lists, dicts
    with str keys) or tensors (also inside lists, tuples and dicts).
    """
    w = world()
    if not w.active:
        out = []
        for b in range(n):
            out.append(fn(b))
            if after is not None:
                after(b + 1)
        return out if gather else None
    mine: list[tuple[int, Any]] = []
    for start in range(0, n, w.size):
        b = start + w.rank
        if b < n:
            try:
                result = fn(b)
            except KeyboardInterrupt:  # every process of the launch gets the signal: nobody to tell
                raise
            except BaseException:
                # DistributedError: the others are gone as well; this process's own error is the one to report
                with contextlib.suppress(DistributedError):
                    _sync(True, what)
                raise
            if gather:
                mine.append((b, result))
        _sync(False, what)
        if after is not None:
            after(min(n, start + w.size))
    if not gather:
        return None
    merged: dict[int, Any] = {}
    for part in gather_json([[b, _encode(r)] for b, r in mine], what):
        for b, value in part:
            merged[int(b)] = _decode(value)
    return [merged[b] for b in range(n)]


def map_chunks(items: Sequence, batch_size: int, fn: Callable[[Sequence], list], *,
               after: Callable[[int, int], None] | None = None, what: str = "working") -> list:
    """``fn`` over consecutive chunks of ``batch_size`` items (sharded by `run_batches`), results concatenated in
    order: the one-process ``for start in range(0, len(items), batch_size): out += fn(items[start:...])`` loop.
    ``after(done_items, total_items)`` after each round."""
    n = len(items)
    n_batches = math.ceil(n / batch_size)

    def report(done_batches: int) -> None:
        if after is not None:
            after(min(n, done_batches * batch_size), n)

    parts = run_batches(n_batches, lambda b: fn(items[b * batch_size:(b + 1) * batch_size]), after=report,
                        what=what)
    return [x for part in parts for x in part]


# ----------------------------------------------------------------------------------------------------------------
# Combining


def all_reduce_(tensors: Sequence[torch.Tensor], what: str = "adding up the results") -> None:
    """Sum ``tensors`` over all processes, in place (one message; any dtype and device). No-op with one process."""
    w = world()
    tensors = list(tensors)
    if not w.active or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
    _all_reduce(flat, what)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape).to(t.dtype))
        offset += n


def all_reduce_gradients(tensors: Sequence[torch.Tensor], what: str = "adding up the gradients") -> None:
    """Sum tensors in place over the launcher's own process group (NCCL for GPU tensors), one call per tensor."""
    if not world().active:
        return
    for t in tensors:
        try:
            torch.distributed.all_reduce(t)
        except RuntimeError as exc:
            raise _lost(what, exc) from None


def all_reduce_sum(value: float, what: str = "adding up the results") -> float:
    """A number summed over all processes."""
    buffer = torch.tensor([float(value)], dtype=torch.float64)
    all_reduce_([buffer], what)
    return float(buffer[0])


def gather_json(obj: Any, what: str = "gathering the results") -> list:
    """Every process's ``obj`` (JSON-able), in rank order, on every process. One process: ``[obj]``."""
    w = world()
    if not w.active:
        return [obj]
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    sizes = torch.zeros(w.size, dtype=torch.int64)
    sizes[w.rank] = len(data)
    _all_reduce(sizes, what)
    buffer = torch.zeros(int(sizes.max()), dtype=torch.uint8)
    buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(buffer) for _ in range(w.size)]
    try:
        torch.distributed.all_gather(parts, buffer, group=_CONTROL)
    except RuntimeError as exc:
        raise _lost(what, exc) from None
    return [json.loads(parts[r][:int(sizes[r])].numpy().tobytes().decode("utf-8")) for r in range(w.size)]


def check_same(what: str, value: Any) -> None:
    """DistributedError unless every process has the same ``value`` (JSON-able): e.g. the command line, the model."""
    w = world()
    if not w.active:
        return
    values = gather_json(value, f"comparing {what}")
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):
        keys = sorted({k for v in values for k in v if len({json.dumps(x.get(k), sort_keys=True) for x in values}) > 1})
        differences = "; ".join(f"{k}: " + ", ".join(f"process {r} {values[r].get(k)!r}" for r in range(w.size))
                                for k in keys)
    else:
        differences = ", ".join(f"process {r} {v!r}" for r, v in enumerate(values))
    raise DistributedError(f"the {w.size} processes differ in {what} ({differences}); every process of a launch must "
                           "run the same command on the same model")


def _encode(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        cpu = value.detach().cpu()
        return {"__tensor__": str(cpu.dtype).removeprefix("torch."), "shape": list(cpu.shape),
                "data": cpu.reshape(-1).tolist()}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["__tensor__"])
            return torch.tensor(value["data"], dtype=dtype).view(value["shape"])
        if "__tuple__" in value:
            return tuple(_decode(v) for v in value["__tuple__"])
        if "__dict__" in value:
            return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    return value
