"""The one place where SSN Lab touches a model: hooks on neuron-site carriers.

`hook_sites({site: fn})` runs ``fn(carrier)`` on the carrier tensor of each site during forward
passes made inside the ``with`` block. ``fn`` may return a replacement tensor (same shape) or
``None`` to only observe.

Why it is built this way:

- *Reversible.* A wrapper of a module's ``forward`` (an instance attribute, not a PyTorch hook:
  cheaper per call, see `_ForwardWrapper`) is installed only while some context needs it and is
  removed when the last one exits, also on exceptions and KeyboardInterrupt. After all contexts
  have exited, the model has no SSN wrappers left: the cached model is never left modified.
- *Isolated between threads.* The app serves several browser sessions from one cached model, and
  the A/B chat generates in worker threads. Each registration is tagged with an id, and the module's
  wrapper only calls the functions whose id is active in the *current* `contextvars` context. A thread
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
    """The fns registered on one (module, "in" | "out"); calls those active in the caller's context."""

    def __init__(self) -> None:
        self.fns: dict[int, list[tuple[Callable, bool]]] = {}  # hook id -> [(fn, wants_module_input)]

    def apply(self, carrier: torch.Tensor, module_input: torch.Tensor | None,
              active: frozenset[int]) -> torch.Tensor | None:
        changed = False
        for hook_id, fns in list(self.fns.items()):
            if hook_id not in active:
                continue
            for fn, wants_input in fns:
                result = fn(carrier, module_input) if wants_input else fn(carrier)
                if result is not None:
                    carrier, changed = result, True
        return carrier if changed else None


class _ForwardWrapper:
    """The module's instance ``forward`` while some dispatcher on it has fns: the "in" fns edit its first
    positional input, then the module runs, then the "out" fns edit its output.

    A wrapper of ``forward`` rather than PyTorch forward hooks, because a module with hooks takes
    ``Module._call_impl``'s slow path: on the starter's 120 sites that alone cost ~4% of a decoding step
    (bench `hook-overhead`), about twice the wrapper's cost. An instance ``forward`` another library set
    before us (accelerate's dispatch does this) is called inside and put back when we leave.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.previous = module.__dict__.get("forward")  # an instance forward set before us, or None
        self.inner = module.forward
        self.on_input: _ModuleDispatcher | None = None
        self.on_output: _ModuleDispatcher | None = None
        module.forward = self  # an instance attribute: Module.__call__ calls it like the class's forward

    def __call__(self, *args, **kwargs):
        active = _ACTIVE_IDS.get()
        if not active:
            return self.inner(*args, **kwargs)
        if self.on_input is not None and args:
            new_input = self.on_input.apply(args[0], None, active)
            if new_input is not None:
                args = (new_input, *args[1:])
        output = self.inner(*args, **kwargs)
        if self.on_output is None:
            return output
        module_input = args[0] if args else None  # the input the module actually saw (after any "in" fns)
        if isinstance(output, tuple):  # not expected for linear layers, but be safe
            new_first = self.on_output.apply(output[0], module_input, active)
            return output if new_first is None else (new_first, *output[1:])
        new_output = self.on_output.apply(output, module_input, active)
        return output if new_output is None else new_output

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self:
            if self.previous is None:
                del self.module.forward
            else:
                self.module.forward = self.previous
        else:  # something wrapped the module after us: stay in its chain, passing everything through
            self.on_input = self.on_output = None


# (id(module), where) -> dispatcher; id(module) -> the wrapper that calls that module's dispatchers. The wrapper
# keeps its module alive while installed.
_DISPATCHERS: dict[tuple[int, str], _ModuleDispatcher] = {}
_WRAPPERS: dict[int, _ForwardWrapper] = {}


def _register(hook_id: int, entries: list[tuple[nn.Module, str, Callable, bool]]) -> None:
    with _REGISTRY_LOCK:
        for module, where, fn, wants_input in entries:
            key = (id(module), where)
            dispatcher = _DISPATCHERS.get(key)
            if dispatcher is None:
                dispatcher = _DISPATCHERS[key] = _ModuleDispatcher()
                wrapper = _WRAPPERS.get(id(module))
                if wrapper is None:
                    wrapper = _WRAPPERS[id(module)] = _ForwardWrapper(module)
                if where == "in":
                    wrapper.on_input = dispatcher
                else:
                    wrapper.on_output = dispatcher
            dispatcher.fns.setdefault(hook_id, []).append((fn, wants_input))


def _unregister(hook_id: int) -> None:
    with _REGISTRY_LOCK:
        for key in list(_DISPATCHERS):
            dispatcher = _DISPATCHERS[key]
            dispatcher.fns.pop(hook_id, None)
            if dispatcher.fns:
                continue
            del _DISPATCHERS[key]
            module_id, where = key
            wrapper = _WRAPPERS[module_id]
            if where == "in":
                wrapper.on_input = None
            else:
                wrapper.on_output = None
            if wrapper.on_input is None and wrapper.on_output is None:
                wrapper.remove()
                del _WRAPPERS[module_id]


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
    """Our forward wrappers plus PyTorch forward hooks currently anywhere in the model (0 when nothing is active)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               + isinstance(m.__dict__.get("forward"), _ForwardWrapper) for m in model.modules())


def bind_context(fn: Callable) -> Callable:
    """Wrap ``fn`` to run in a copy of the *caller's* current context.

    Use it for a worker thread's target (``Thread(target=bind_context(model.generate), ...)``) so the
    worker sees the hooks active where the thread was created; a plain thread starts with none.
    """
    context = copy_context()

    def run_in_context(*args, **kwargs):
        return context.run(fn, *args, **kwargs)

    return run_in_context
