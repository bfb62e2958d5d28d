"""The one place where SSN Lab touches a model: hooks on neuron-site carriers.

`hook_sites({site: fn})` runs ``fn(carrier)`` on the carrier tensor of each site during forward
passes made inside the ``with`` block. ``fn`` may return a replacement tensor (same shape) or
``None`` to only observe.

Why it is built this way:

- *Reversible.* A PyTorch hook is registered on a module only while some context needs it and is
  removed when the last one exits, also on exceptions and KeyboardInterrupt. After all contexts
  have exited, the model has no SSN hooks left: the cached model is never left modified.
- *Isolated between threads.* The app serves several browser sessions from one cached model, and
  the A/B chat generates in worker threads. Each registration is tagged with an id, and the module
  hook only calls the functions whose id is active in the *current* `contextvars` context. A thread
  that did not enter the context (another user's session) passes through the hook untouched. A
  worker thread that should see the caller's hooks must run in a copy of the caller's context:
  wrap its target with `bind_context`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, copy_context

import torch
from torch import nn

from ssn_core.sites import NeuronSite

CarrierFn = Callable[[torch.Tensor], torch.Tensor | None]

# Hook ids active in the current context (thread / task).
_ACTIVE_IDS: ContextVar[frozenset[int]] = ContextVar("ssn_active_hook_ids", default=frozenset())
_NEXT_ID = itertools.count(1)
_REGISTRY_LOCK = threading.Lock()


class _ModuleDispatcher:
    """One PyTorch hook per (module, in|out); calls the registered fns active in the caller's context."""

    def __init__(self, module: nn.Module, where: str):
        self.fns: dict[int, list[tuple[Callable, bool]]] = {}  # hook id -> [(fn, wants_module_input)]
        if where == "in":
            self.handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self.handle = module.register_forward_hook(self._post_hook)

    def _apply(self, carrier: torch.Tensor, module_input: torch.Tensor | None) -> torch.Tensor | None:
        active = _ACTIVE_IDS.get()
        if not active:
            return None
        changed = False
        for hook_id, fns in list(self.fns.items()):
            if hook_id not in active:
                continue
            for fn, wants_input in fns:
                result = fn(carrier, module_input) if wants_input else fn(carrier)
                if result is not None:
                    carrier, changed = result, True
        return carrier if changed else None

    def _pre_hook(self, module, args):
        if not args:
            return None
        new_input = self._apply(args[0], None)
        return None if new_input is None else (new_input, *args[1:])

    def _post_hook(self, module, args, output):
        # args[0] is the input the module actually saw (after any "in" hooks on the same module).
        module_input = args[0] if args else None
        if isinstance(output, tuple):  # not expected for linear layers, but be safe
            new_first = self._apply(output[0], module_input)
            return None if new_first is None else (new_first, *output[1:])
        return self._apply(output, module_input)


# (id(module), where) -> dispatcher. Modules are kept alive by the dispatcher's hook handle.
_DISPATCHERS: dict[tuple[int, str], _ModuleDispatcher] = {}


def _register(hook_id: int, entries: list[tuple[nn.Module, str, Callable, bool]]) -> None:
    with _REGISTRY_LOCK:
        for module, where, fn, wants_input in entries:
            key = (id(module), where)
            dispatcher = _DISPATCHERS.get(key)
            if dispatcher is None:
                dispatcher = _DISPATCHERS[key] = _ModuleDispatcher(module, where)
            dispatcher.fns.setdefault(hook_id, []).append((fn, wants_input))


def _unregister(hook_id: int) -> None:
    with _REGISTRY_LOCK:
        for key in list(_DISPATCHERS):
            dispatcher = _DISPATCHERS[key]
            dispatcher.fns.pop(hook_id, None)
            if not dispatcher.fns:
                dispatcher.handle.remove()
                del _DISPATCHERS[key]


@contextmanager
def hook_sites(site_fns: Mapping[NeuronSite, CarrierFn] | list[tuple[NeuronSite, CarrierFn]]) -> Iterator[int]:
    """Run ``fn(carrier)`` for each (site, fn) on forward passes inside the block, in this context only.

    Several fns may target the same site (pass a list of pairs); they run in the given order, each
    on the previous one's result. Yields the registration id.
    """
    pairs = list(site_fns.items()) if isinstance(site_fns, Mapping) else list(site_fns)
    with _activate([(site.module, site.where, fn, False) for site, fn in pairs]) as hook_id:
        yield hook_id


ModuleFn = Callable[..., torch.Tensor | None]


@contextmanager
def hook_modules(
    module_fns: Mapping[tuple[nn.Module, str], ModuleFn] | list[tuple[tuple[nn.Module, str], ModuleFn]],
) -> Iterator[int]:
    """Like `hook_sites`, but on any module's input or output (used by training deltas on owned slices).

    Keys are ``(module, "in")`` or ``(module, "out")``. An ``"in"`` fn is called as ``fn(x)`` with the
    module's first positional input; an ``"out"`` fn as ``fn(output, x)``, so it can add a term that
    depends on the input (a low-rank or sliced weight delta). Either may return a replacement tensor
    of the same shape, or ``None``. Same dispatchers, same per-context isolation as `hook_sites`.
    """
    pairs = list(module_fns.items()) if isinstance(module_fns, Mapping) else list(module_fns)
    entries = []
    for (module, where), fn in pairs:
        if where not in ("in", "out"):
            raise ValueError(f"hook position must be 'in' or 'out', got {where!r}")
        entries.append((module, where, fn, where == "out"))
    with _activate(entries) as hook_id:
        yield hook_id


@contextmanager
def _activate(entries: list[tuple[nn.Module, str, Callable, bool]]) -> Iterator[int]:
    hook_id = next(_NEXT_ID)
    token = None
    try:
        _register(hook_id, entries)
        token = _ACTIVE_IDS.set(_ACTIVE_IDS.get() | {hook_id})
        yield hook_id
    finally:
        if token is not None:
            _ACTIVE_IDS.reset(token)
        _unregister(hook_id)


def active_hook_count(model: nn.Module) -> int:
    """PyTorch forward hooks currently registered anywhere in the model (0 when nothing is active)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def bind_context(fn: Callable) -> Callable:
    """Wrap ``fn`` to run in a copy of the *caller's* current context.

    Use it for a worker thread's target (``Thread(target=bind_context(model.generate), ...)``) so the
    worker sees the hooks active where the thread was created; a plain thread starts with none.
    """
    context = copy_context()

    def run_in_context(*args, **kwargs):
        return context.run(fn, *args, **kwargs)

    return run_in_context
