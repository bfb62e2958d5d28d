"""Recipes: named settings of method, aggregate, ranking, p and sites (`RECIPES`, `get_recipe`), so that a result
can be reproduced or compared by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssn_core.errors import SSNError

if TYPE_CHECKING:
    from ssn_core.scoring import Aggregate, ScoringMethod
    from ssn_core.sites import SiteKind


@dataclass(frozen=True)
class Recipe:
    """A named identification setting. ``default`` was chosen by held-out evidence (README, "Which neurons");
    the others stay available by name so that results can be compared and reproduced."""

    name: str
    method: ScoringMethod
    aggregate: Aggregate
    ranking: str
    p: float
    kinds: tuple[SiteKind, ...]
    own_replies: bool
    note: str


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("default", "attribution", "all", "per-site", 0.01, ("mlp", "attn_q", "attn_k", "attn_v", "attn_o"), False,
           "refusal attribution (activation x gradient of the refusal margin), top 1% per layer and site"),
    Recipe("paper", "global", "reply", "per-site", 0.01, ("mlp", "attn_q", "attn_k", "attn_v", "attn_o"), True,
           "the paper's form: ΔLLM (final-output change, estimated) on (prompt, reply) pairs, top 1% per layer"),
    Recipe("plnd", "impact", "content", "per-site", 0.03, ("mlp", "attn_v", "attn_o"), False,
           "SSN Lab's first default: layer-local deactivation effect over the user's tokens, top 3% per layer"),
    Recipe("last", "impact", "last", "per-site", 0.03, ("mlp", "attn_v", "attn_o"), False,
           "layer-local deactivation effect at the last prompt token, top 3% per layer"),
    Recipe("direction", "direction", "last", "per-site", 0.01, ("mlp", "attn_v", "attn_o"), False,
           "each neuron's write along the refusal direction at the last prompt token, top 1% per layer"),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise SSNError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}") from None
