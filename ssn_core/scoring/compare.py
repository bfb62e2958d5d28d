"""Validating the fast scores against exact ablation: `compare_methods` (``ssn compare-methods``).

Every fast method and exact ablation score the same sampled neurons on the same prompts; per kind, the Spearman
rank correlation and the top-fraction overlap say how far the fast ranking can be trusted. (Not
`ssn_core.training.compare_finetunes`, which compares fine-tuning methods.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ssn_core.errors import SSNError
from ssn_core.scoring.ablation import Triple, sample_neurons
from ssn_core.scoring.forward import _check_kinds
from ssn_core.scoring.loop import Progress, score
from ssn_core.scoring.table import METHODS, ScoreTable, ScoringMethod
from ssn_core.sites import SITE_KINDS, SiteKind, SiteMap

if TYPE_CHECKING:
    from ssn_core.loading import LoadedModel
    from ssn_core.scoring.batch import Aggregate

COMPARISON_KIND = "ssn-lab/method-comparison"  # manifest kind of an `ssn compare-methods --out` folder


@dataclass
class MethodComparison:
    """Fast scores vs exact ablation on the same sampled neurons and prompts."""

    tables: dict[str, ScoreTable]  # method -> scores (ablation: NaN outside the sample)
    sample: list[Triple]
    agreement: Any  # pandas DataFrame: method, kind, n, spearman, top_overlap
    top: float
    seconds: dict[str, float]

    def save(self, directory: str | Path) -> Path:
        """scores_<method>.safetensors, agreement.csv, comparison.json and manifest.json as one folder, replaced as
        a whole (an existing folder only when it is an earlier comparison: `ssn_core.io.check_out_dir`)."""
        from ssn_core.io import atomic_write_json, atomic_write_text, writing_result_dir

        with writing_result_dir(directory, COMPARISON_KIND) as tmp:
            for method, table in self.tables.items():
                table.save(tmp / f"scores_{method}.safetensors")
            atomic_write_text(tmp / "agreement.csv", self.agreement.to_csv(index=False))
            atomic_write_json(tmp / "comparison.json", {
                "sample": [list(t) for t in self.sample], "top": self.top, "seconds": self.seconds,
                "agreement": self.agreement.to_dict(orient="records"),
            })
        return Path(directory).expanduser()


def _mean_over_groups(table: ScoreTable, kind: str) -> torch.Tensor:
    """Prompt-weighted mean score over all (language, label) groups: [L, N]."""
    total = sum(table.counts[g] for g in table.groups)
    # a score table has at least one group, so the sum is a tensor (never the empty sum's 0)
    weighted = cast(torch.Tensor, sum(per_kind[kind] * table.counts[g] for g, per_kind in table.groups.items()))
    return weighted / max(total, 1)


def parse_method_spec(spec: str) -> tuple[ScoringMethod, int]:
    """'impact' -> ('impact', 8); 'global:16' -> ('global', 16): a method and its number of random projections."""
    name, _, count = spec.partition(":")
    if name not in METHODS or name == "ablation":
        raise SSNError(f"unknown method {spec!r} to compare; expected some of "
                       f"{', '.join(m for m in METHODS if m != 'ablation')} (global:K for K projections)")
    if count and name != "global":
        raise SSNError(f"{spec!r}: only global takes a number of projections (global:K)")
    try:
        projections = int(count) if count else 8
    except ValueError:
        raise SSNError(f"{spec!r}: the number of projections must be an integer") from None
    if projections < 1:
        raise SSNError(f"{spec!r}: at least 1 projection")
    return name, projections


def compare_methods(lm: LoadedModel, prompts, sample: Sequence[Triple] | int = 64, methods: Sequence[str] = ("impact",
                    "activation"), aggregate: Aggregate = "content", kinds: Sequence[SiteKind] = SITE_KINDS,
                    batch_size: int = 8, template: str = "chat", top: float = 0.1, seed: int = 0,
                    progress: Progress | None = None, cancel: threading.Event | None = None) -> MethodComparison:
    """Spearman rank correlation and top-``top`` overlap of each fast method with exact ablation, per kind.

    ``sample`` is a neuron list or a count per kind (spread over layers). Scores are averaged over all
    prompts (every language and label) before ranking. ``methods``: names, or ``global:K`` for the global ΔLLM
    estimate with K random projections (its agreement grows with K: run several K side by side).
    """
    import time

    import pandas as pd
    from scipy.stats import spearmanr

    sites: SiteMap = lm.sites
    kinds = _check_kinds(kinds, sites)
    triples = sample_neurons(sites, kinds, sample, seed, per="kind") if isinstance(sample, int) else list(sample)
    tables: dict[str, ScoreTable] = {}
    seconds: dict[str, float] = {}
    for spec in ("ablation", *methods):
        name: ScoringMethod
        name, projections = ("ablation", 8) if spec == "ablation" else parse_method_spec(spec)
        start = time.perf_counter()
        tables[spec] = score(lm, prompts, method=name, aggregate=aggregate, kinds=kinds, batch_size=batch_size,
                             template=template, sample=triples if name == "ablation" else None, seed=seed,
                             projections=projections, progress=progress, cancel=cancel)
        seconds[spec] = round(time.perf_counter() - start, 3)
    rows = []
    for method in methods:
        for kind in kinds:
            chosen = [(layer, index) for layer, k, index in triples if k == kind]
            if not chosen:
                continue
            layers = torch.tensor([c[0] for c in chosen])
            indices = torch.tensor([c[1] for c in chosen])
            exact = _mean_over_groups(tables["ablation"], kind)[layers, indices].double()
            fast = _mean_over_groups(tables[method], kind)[layers, indices].double()
            rho = float(spearmanr(exact.numpy(), fast.numpy()).statistic) if len(chosen) > 2 else math.nan
            k = max(1, math.floor(top * len(chosen)))
            top_exact = set(torch.argsort(-exact, stable=True)[:k].tolist())
            top_fast = set(torch.argsort(-fast, stable=True)[:k].tolist())
            rows.append({"method": method, "kind": kind, "n": len(chosen), "spearman": rho,
                         "top_overlap": len(top_exact & top_fast) / k})
    agreement = pd.DataFrame(rows, columns=["method", "kind", "n", "spearman", "top_overlap"])
    return MethodComparison(tables=tables, sample=triples, agreement=agreement, top=top, seconds=seconds)
