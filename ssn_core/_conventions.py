"""Conventions shared by the engine's modules, defined once here (private: the modules re-export what they name).

- `Progress`: the ``progress(done, total, message)`` callback of a long job.
- `check_cancel`: the check a long job makes between batches: its ``cancel`` event set -> `Cancelled`.
- `pad_id`: the token id that pads a batch.
- `input_device`: the device a model's inputs go to.

Importing this module is cheap (no torch), like ``import ssn_core``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ssn_core.errors import Cancelled

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ssn_core.loading import LoadedModel

# progress(done, total, message): ``done`` of ``total`` units (batches, prompts, replies) and what is being done.
Progress = Callable[[int, int, str], None]


class CancelEvent(Protocol):
    """What a long job asks of its cancel event: a `threading.Event`, or anything with ``is_set()``."""

    def is_set(self) -> bool: ...


def check_cancel(cancel: CancelEvent | None, message: str) -> None:
    """Raise `Cancelled(message)` when ``cancel`` (an event, or anything with ``is_set()``) is set; None never is."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(message)


def pad_id(lm: LoadedModel) -> int:
    """The token id that pads a batch of ``lm`` (a LoadedModel): the tokenizer's pad token, else the first token
    that ends a reply (``lm.stop_token_ids``: the generation config's eos, then the tokenizer's), else 0.

    Padding is masked out of attention (and loss), so any valid id gives the same results; this one is what every
    batch uses. Loading sets the pad token to eos when a tokenizer has none, so the fallbacks are rarely reached.
    """
    value = lm.tokenizer.pad_token_id
    if value is not None:
        return int(value)
    return (lm.stop_token_ids or [0])[0]


def input_device(model: nn.Module) -> torch.device:
    """Where the inputs of ``model`` go: its input embedding's device (the first layer's under a multi-device map),
    else its first parameter's, else the CPU (a model without parameters)."""
    hf_model: Any = model  # a transformers model (maybe PEFT-wrapped): torch's Module type does not know its methods
    try:
        return hf_model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        pass
    try:
        return next(model.parameters()).device
    except StopIteration:
        import torch

        return torch.device("cpu")
