"""User-facing errors.

Every failure a user can cause (bad model id, bad file, bad language code, ...) is raised as an
`SSNError` subclass whose message says what went wrong and what to do. The CLI prints the message
without a traceback; the app shows it with `st.error`.
"""

from __future__ import annotations


class SSNError(Exception):
    """Base class: the message is meant to be shown to the user as is."""


class ModelLoadError(SSNError):
    """The model could not be found, verified or loaded."""


class UnsupportedArchitectureError(SSNError):
    """The model family has no neuron-site mapping."""


class NeuronFileError(SSNError):
    """A neuron-set / scores / delta file is unreadable or does not match the loaded model."""


class PromptSetError(SSNError):
    """A prompt set is missing, malformed, empty or uses an unknown language code."""


class JudgeError(SSNError):
    """A judge could not run (guard model unusable, API endpoint unreachable, ...)."""


class TrainingError(SSNError):
    """Training was stopped (non-finite loss, bad configuration, ...)."""


class Cancelled(SSNError):
    """A long job was cancelled by the user; nothing partial was written."""


class DistributedError(SSNError):
    """A multi-process run (`accelerate launch`, torchrun) cannot go on: another process failed, died or hangs, or
    the processes were started differently."""


def finite(value, what: str) -> float:
    """``value`` as a float; SSNError naming ``what`` unless it is a real, finite number (not NaN or infinity).

    Every number a user gives (CLI, API, app) passes through this before it can become a result.
    """
    import math

    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
        raise SSNError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise SSNError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SSNError(f"{what} must be a finite number, got {value!r}")
    return number
