"""Swapping modules' forward for a dispatch while any context uses it: the one mechanism under
`ssn_core.packed_linear` (MKL's packed products) and `ssn_core.generation.greedy_screen` (the screened output layer).

Each module's dispatch is installed once however many contexts (threads, app sessions) use it, counted per module,
and the module's own forward comes back when the last of them exits. What a call does is for the dispatch to
decide from its contextvars context, so a context that did not ask sees the module's own result. Also the two
speed-ups' shared switch (`env_switch`) and their timing check at first use (`fastest_alternating`).
"""

from __future__ import annotations

import os
import threading
import time
import types
from collections.abc import Callable, Sequence

import torch
from torch import nn


class ForwardSwap:
    """Installs ``dispatch(module, *args)`` as the forward of modules, reference-counted across contexts."""

    def __init__(self, dispatch: Callable):
        self.dispatch = dispatch
        self._users: dict[int, tuple[nn.Module, int]] = {}  # id(module) -> (module, contexts using its dispatch)
        self._lock = threading.Lock()

    def install(self, modules: Sequence[nn.Module]) -> None:
        with self._lock:
            for module in modules:
                entry = self._users.get(id(module))
                if entry is None:
                    module.forward = types.MethodType(self.dispatch, module)
                    self._users[id(module)] = (module, 1)
                else:
                    self._users[id(module)] = (module, entry[1] + 1)

    def uninstall(self, modules: Sequence[nn.Module]) -> None:
        with self._lock:
            for module in modules:
                entry = self._users.get(id(module))
                if entry is None:
                    continue
                if entry[1] > 1:
                    self._users[id(module)] = (module, entry[1] - 1)
                else:
                    del self._users[id(module)]
                    module.__dict__.pop("forward", None)

    def installed(self, module: nn.Module) -> bool:
        """Whether ``module``'s forward is currently this dispatch."""
        return getattr(module.__dict__.get("forward"), "__func__", None) is self.dispatch

    def replaced_by_another(self, module: nn.Module) -> bool:
        """Whether somebody else replaced ``module``'s forward (accelerate's offload hooks, quantized layers, ...)."""
        return "forward" in module.__dict__ and not self.installed(module)


def env_switch(name: str) -> str:
    """A speed-up's environment switch: "off" ("0", "false", "no", "off"), "on" ("1", "true", "yes", "on"), else
    "auto" (unset included): on where it pays on this CPU."""
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "on" if value in ("1", "true", "yes", "on") else "auto"


def fastest_alternating(plain: Callable[[], object], fast: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(plain, fast) seconds, each the fastest of ``repeats`` calls made alternately (a speed-up's check at first
    use: alternating keeps a drifting machine from favouring either side)."""
    plain_s, fast_s = [], []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            plain()
            plain_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            fast()
            fast_s.append(time.perf_counter() - start)
    return min(plain_s), min(fast_s)
