"""Seeded statistics for small samples: percentile bootstrap CIs of a mean, a one-sided sign-flip p-value, and the
summary of per-item paired differences (`paired_difference`) that validation and training report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ssn_core.errors import SSNError


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean: resample `values` with replacement `n_boot` times.

    Seeded (numpy PCG64) so the same inputs give the same interval on every machine. Empty input -> (nan, nan).
    """
    if n_boot < 1:
        raise SSNError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise SSNError(f"alpha must be between 0 and 1, got {alpha}")
    x = np.asarray(values, dtype=np.float64).ravel()  # [n]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)  # [n_boot]
    chunk = max(1, 2_000_000 // x.size)  # bound memory: chunk x n indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # [chunk, n]
        means[start:stop] = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_flip_p_value(differences: Sequence[float] | np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """One-sided paired permutation test of "mean difference > 0": the share of random sign flips of the per-item
    differences whose mean is at least the observed one (with the observed counted, so never 0). Seeded."""
    d = np.asarray(differences, dtype=np.float64).ravel()  # [n]
    if d.size == 0:
        return math.nan
    observed = d.mean()
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 2_000_000 // d.size)
    for start in range(0, n_perm, chunk):
        stop = min(n_perm, start + chunk)
        signs = rng.integers(0, 2, size=(stop - start, d.size)) * 2 - 1  # [chunk, n] of +-1
        hits += int(((signs * d).mean(axis=1) >= observed - 1e-12).sum())
    return (hits + 1) / (n_perm + 1)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-item differences (e.g. random-control refusal minus target refusal, per prompt), its bootstrap
    CI, a one-sided sign-flip p-value, and a plain note when n is too small to tell."""

    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    note: str = ""

    @property
    def excludes_zero(self) -> bool:
        return self.n > 0 and self.ci_low > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_difference(differences: Sequence[float], n_boot: int = 2000, n_perm: int = 10000, alpha: float = 0.05,
                      seed: int = 0, min_n: int = 30) -> PairedDifference:
    """Summary of per-item paired differences; see `PairedDifference`."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0:
        return PairedDifference(math.nan, math.nan, math.nan, math.nan, 0, "no items")
    low, high = bootstrap_ci(d, n_boot=n_boot, alpha=alpha, seed=seed)
    p = sign_flip_p_value(d, n_perm=n_perm, seed=seed)
    notes = []
    if d.size < min_n:
        notes.append(f"n = {d.size} prompts is small: only differences above about {1.96 / math.sqrt(d.size):.0%} "
                     "can be told from noise")
    if not low > 0:
        notes.append("the CI includes 0: not distinguishable from the random control at this n")
    return PairedDifference(float(d.mean()), low, high, p, int(d.size), "; ".join(notes))
