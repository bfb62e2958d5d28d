"""The conditions validation runs for one language: the baseline, the refusal-direction control, each suppressed
set with its matched random controls (`random_matched`), and the scale and additive reinforcement
(`shift_offsets`). `plan_conditions` says which, and notes the ones skipped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ssn_core.errors import NeuronFileError, SSNError
from ssn_core.neurons import NeuronSet
from ssn_core.sites import SiteMap

SUPPRESS_TARGETS: tuple[str, ...] = ("ms", "ss", "ss_all")
PARTS: tuple[str, ...] = ("suppress", "reinforce")
REINFORCE_SETS: tuple[str, ...] = ("own", "ss_all")  # a language's own SS set (the union where it has none), the union


def random_matched(neurons: NeuronSet, sites: SiteMap, seed: int, exclude: NeuronSet | None = None,
                   disjoint: bool = True) -> NeuronSet:
    """Random neurons with the same count per (layer, site kind) as ``neurons``.

    Drawn without replacement, disjoint from ``neurons`` (unless ``disjoint=False``) and from ``exclude``.
    The same (set, seed) gives the same draw on every machine: one CPU generator seeded with ``seed`` draws
    the (layer, kind) groups in the set's sorted order.
    """
    generator = torch.Generator().manual_seed(int(seed))
    drawn: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, kind), target in neurons.neurons.items():
        if (layer, kind) not in sites.sites:
            raise NeuronFileError(f"the neuron set has {kind} neurons in layer {layer}, which this model lacks")
        size = sites.get(layer, kind).size
        allowed = torch.ones(size, dtype=torch.bool)  # [N]
        if disjoint:
            allowed[target] = False
        if exclude is not None:
            allowed[exclude.get(layer, kind)] = False
        candidates = allowed.nonzero().flatten()
        count = int(target.numel())
        if candidates.numel() < count:
            raise SSNError(
                f"cannot draw {count} random {kind} neurons in layer {layer}: that site has {size} neurons and only "
                f"{candidates.numel()} are outside the target set" + (" and the excluded set" if exclude else "")
                + "; the target set covers too much of the site for a disjoint random control"
            )
        pick = torch.randperm(candidates.numel(), generator=generator)[:count]
        drawn[(layer, kind)] = candidates[pick]
    meta = {"method": "random_matched", "seed": int(seed), "matched_to": neurons.meta.get("name", ""),
            "disjoint": bool(disjoint)}
    for key in ("model_fingerprint", "model_type", "n_layers", "sizes"):
        if key in neurons.meta:
            meta[key] = neurons.meta[key]
    return NeuronSet(drawn, meta)


@dataclass(frozen=True, eq=False)
class Condition:
    """One way of running the model: ``kind`` baseline | suppress | random | reinforce, on ``target`` set."""

    kind: str  # baseline | suppress | random | reinforce | direction
    target: str = ""  # "" (baseline), "ms", "ss", "ss_all", "refusal" (direction)
    neurons: NeuronSet | None = None
    scale: float = 1.0
    seed: int | None = None
    alpha: float | None = None
    direction: torch.Tensor | None = None  # kind "direction": projected out of the residual stream
    offsets: dict | None = None  # kind "shift": added to the neurons (β times their mean harmful activation)

    @property
    def name(self) -> str:
        return "baseline" if self.kind == "baseline" else f"{self.kind}_{self.target}"

    @property
    def key(self) -> str:
        """Unique within a language: name plus seed / alpha."""
        suffix = (f"#seed{self.seed}" if self.seed is not None
                  else f"@{self.alpha:g}" if self.alpha is not None else "")
        return self.name + suffix

    @property
    def n_neurons(self) -> int:
        return 0 if self.neurons is None else len(self.neurons)


def shift_offsets(neurons: NeuronSet, activations, hr_language: str, beta: float) -> dict:
    """β times each neuron's mean activation on the HR language's harmful prompts: the additive reinforcement
    ("make the neuron act as it does when English refuses, β times over"). ``activations``: an activation
    `ScoreTable` (its ``signed`` means), as `identify(..., activation_means=True)` keeps."""
    signed = (activations.signed or {}).get((hr_language, "harmful")) if activations is not None else None
    if signed is None:
        raise SSNError(f"the additive reinforcement needs the neurons' mean activations on {hr_language} harmful "
                       "prompts (identify with activation means; `ssn identify` keeps them)")
    return {(layer, kind): float(beta) * signed[kind][layer, indices]
            for (layer, kind), indices in neurons.neurons.items()}


def plan_conditions(neurons, language: str, sites: SiteMap, alphas: Sequence[float] = (2.0,),
                    seeds: Sequence[int] = (0, 1, 2), hr_language: str = "en",
                    direction: torch.Tensor | None = None, betas: Sequence[float] = (),
                    parts: Sequence[str] = PARTS, reinforce_sets: Sequence[str] = ("own",),
                    reinforce_random: bool = False) -> tuple[list[Condition], list[str]]:
    """The conditions run for one language, and notes on the ones skipped (empty neuron sets).

    ``direction``: the refusal direction, run as the positive control ``direction_refusal``. ``betas``: additive
    reinforcement ``shift_<target>`` of the same set the scale reinforcement uses (`shift_offsets`). ``parts``:
    ``suppress`` (the control, suppressed sets and their random controls) and/or ``reinforce`` (the scale and
    additive reinforcement); the baseline is always run. ``reinforce_sets``: which sets are reinforced: ``own`` (the
    language's own SS set, or the union where it has none) and/or ``ss_all`` (the union of every language's SS set,
    also in languages with a set of their own: their own sets can be a handful of neurons). ``reinforce_random``: each
    reinforced set also as a matched random set scaled the same way (``reinforce_random_<target>``), the control that
    tells a set's effect from scaling any neurons of that shape.
    """
    unknown_sets = [name for name in reinforce_sets if name not in REINFORCE_SETS]
    if unknown_sets or not reinforce_sets:
        raise SSNError(f"reinforced sets must be some of {', '.join(REINFORCE_SETS)}, "
                       f"got {', '.join(reinforce_sets) or 'none'}")
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise SSNError(f"validation parts must be some of {', '.join(PARTS)}, got {', '.join(parts) or 'none'}")
    conditions, notes = _plan_all(neurons, language, sites, alphas, seeds, hr_language, direction, betas,
                                  reinforce_sets, reinforce_random)
    keep = {"baseline"} | ({"direction", "suppress", "random"} if "suppress" in parts else set()) | (
        {"reinforce", "shift"} if "reinforce" in parts else set())
    return [c for c in conditions if c.kind in keep], notes


def _plan_all(neurons, language: str, sites: SiteMap, alphas: Sequence[float], seeds: Sequence[int],
              hr_language: str, direction: torch.Tensor | None, betas: Sequence[float],
              reinforce_sets: Sequence[str] = ("own",), reinforce_random: bool = False
              ) -> tuple[list[Condition], list[str]]:
    conditions = [Condition("baseline")]
    if direction is not None:
        conditions.append(Condition("direction", "refusal", direction=direction))
    notes: list[str] = []
    if language not in neurons.ms:
        known = ", ".join(neurons.ms) or "none"
        notes.append(f"{language}: the neuron result has no MS-Neurons for this language (it has {known}); "
                     "run identify with this language to suppress its own sets")
    targets: list[tuple[str, NeuronSet | None]] = [("ms", neurons.ms.get(language))]
    if language != hr_language:
        targets.append(("ss", neurons.ss.get(language)))
    targets.append(("ss_all", neurons.ss_all))
    for target, neuron_set in targets:
        if neuron_set is None or len(neuron_set) == 0:
            notes.append(f"{language}: no {target.upper().replace('_ALL', ' (all)')} neurons; "
                         f"suppress_{target} skipped")
            continue
        neuron_set.validate(sites)
        conditions.append(Condition("suppress", target, neuron_set, scale=0.0))
        for seed in seeds:
            control = random_matched(neuron_set, sites, seed=seed)
            conditions.append(Condition("random", target, control, scale=0.0, seed=int(seed)))
    own_ss = neurons.ss.get(language) if language != hr_language else None
    own = ("ss", own_ss) if own_ss is not None and len(own_ss) else ("ss_all", neurons.ss_all)
    chosen = [own] if "own" in reinforce_sets else []
    if "ss_all" in reinforce_sets and all(target != "ss_all" for target, _ in chosen):
        chosen.append(("ss_all", neurons.ss_all))
    if not any(neuron_set is not None and len(neuron_set) for _, neuron_set in chosen):
        notes.append(f"{language}: no SS-Neurons to reinforce")
    for reinforce_target, reinforce_set in chosen:
        if reinforce_set is None or not len(reinforce_set):
            continue
        random_set = random_matched(reinforce_set, sites, seed=int(seeds[0])) if reinforce_random else None
        for alpha in alphas:
            if alpha < 0:
                raise SSNError(f"reinforcement scale must be >= 0, got {alpha}")
            conditions.append(Condition("reinforce", reinforce_target, reinforce_set, scale=float(alpha),
                                        alpha=float(alpha)))
            if random_set is not None:
                conditions.append(Condition("reinforce", f"random_{reinforce_target}", random_set, scale=float(alpha),
                                            alpha=float(alpha)))
        for beta in betas:
            offsets = shift_offsets(reinforce_set, getattr(neurons, "activations", None), hr_language, beta)
            conditions.append(Condition("shift", reinforce_target, reinforce_set, alpha=float(beta), offsets=offsets))
    return conditions, notes
