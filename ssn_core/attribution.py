"""Gradient scores for every neuron at once: the paper's global ΔLLM (estimated) and refusal attribution.

Both take one forward pass with every site's carrier kept in the autograd graph, then backward passes that give
∂(something)/∂a for all neurons of all layers together. A neuron's activation a_s (at position s) times that
gradient, summed over positions, is the first-order change of the something when the neuron is zeroed everywhere
(the deactivation the paper and `interventions.suppress` perform).

``global`` (ΔLLM, the paper's importance): the change of the model's final hidden states h_t (over the tokens the
aggregate weights w_t select) when neuron N is zeroed, Δh ≈ −Σ_s J_{t,s,N} a_{s,N}. Its size for every N at once,
with k random projections: for r_t ~ N(0, w_t I) independent per token,

    E_r[(Σ_t r_t · Δh_t)²] = Σ_t w_t ‖Δh_t‖²,   and   Σ_t r_t · Δh_t ≈ −Σ_s a_s · ∂(Σ_t r_t · h_t)/∂a_s,

so one backward pass of y = Σ_t r_t · h_t per projection gives a sample for every neuron; the score is
sqrt(mean_k sample²), the root of the weighted mean squared change (the exact ablation in `scoring` reports the
weighted mean norm; with ``aggregate="last"`` the two are the same quantity). The estimator's relative error
falls as 1/sqrt(k) (`compare-methods --methods global:K` measures the agreement with exact ablation per k). The
first-order step assumes the change is small; a neuron whose removal changes the output a lot is still ranked high.

``attribution`` (beyond the paper): m = the refusal margin of `ssn_core.refusal` (log-probability of opening with a
refusal minus that of opening with compliance, teacher-forced). Attribution patching (Nanda 2023; Syed et al. 2023):

    Δm(zeroing N) ≈ −Σ_s a_s · ∂m/∂a_s      score_N = Σ_s a_s · ∂m/∂a_s   (signed: > 0 = the neuron supports refusal)

for every neuron in one forward + backward per batch. For a harmful prompt with a reply (``pairs``) the refusal side
is that reply (the model's own refusal, or a template in the language), for a harmless one the compliance side is
the model's own answer; otherwise both sides are the language's openings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssn_core.errors import SSNError
from ssn_core.hooks import hook_modules, hook_sites
from ssn_core.sites import NeuronSite, SiteKind, SiteMap

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ssn_core.loading import LoadedModel

Results = dict[tuple[int, str], torch.Tensor]


def _input_embeddings(model: PreTrainedModel) -> nn.Module:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        raise SSNError(f"{type(model).__name__} has no input embedding module; gradient scores need one") from None


class _CarrierTape:
    """Keeps every site's carrier (in the graph) during forward passes; several passes append in order."""

    def __init__(self, sites: SiteMap, kinds: Sequence[str]):
        self.sites = [site for site in sites if site.kind in kinds]
        self.tensors: dict[tuple[int, str], list[torch.Tensor]] = {site.key: [] for site in self.sites}

    def hooks(self) -> list[tuple[NeuronSite, Callable]]:
        def keep(site: NeuronSite):
            def fn(carrier):
                self.tensors[site.key].append(carrier)
            return fn

        return [(site, keep(site)) for site in self.sites]

    def flat(self) -> list[torch.Tensor]:
        return [t for per_site in self.tensors.values() for t in per_site]


def _graph_inputs(model: PreTrainedModel) -> AbstractContextManager[int]:
    """A hook on the input embeddings that makes the forward pass differentiable even when the weights are frozen."""
    def make_leaf(out, x):
        return out.detach().requires_grad_(True)

    return hook_modules([((_input_embeddings(model), "out"), make_leaf)])


def _contributions(tape: _CarrierTape, grads: Sequence[torch.Tensor], reduce) -> Results:
    """Σ_positions a · ∂/∂a per neuron, mapped back to prompt rows by ``reduce(pass_index, [rows, N]) -> [B, N]``."""
    results: Results = {}
    i = 0
    for site in tape.sites:
        total = None
        for pass_index, carrier in enumerate(tape.tensors[site.key]):
            grad = grads[i]
            i += 1
            if grad is None:
                continue
            per_row = site.read((carrier.detach() * grad).float()).sum(1)  # [rows, T, C] -> [rows, N]
            per_prompt = reduce(pass_index, per_row)
            total = per_prompt if total is None else total + per_prompt
        if total is not None:
            results[site.key] = total.detach()
    return results


def attribution_batch(lm: LoadedModel, items: Sequence, kinds: Sequence[SiteKind], *, openings=None,
                      max_tokens: int | None = None, system: str | None = None) -> Results:
    """Refusal attribution per prompt and neuron: {(layer, kind): [B, N]} (signed; see the module docstring)."""
    from ssn_core.refusal import DEFAULT_MAX_TOKENS, load_openings, margins_from_logprobs, opening_logprobs

    openings = openings or load_openings()
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS
    refusal_lists, compliance_lists = [], []
    for item in items:
        refusals, compliances = openings.for_language(item.language)
        reply = getattr(item, "reply", None)
        if reply and item.label == "harmful":
            refusals = (reply,)
        elif reply and item.label == "harmless":
            compliances = (reply,)
        refusal_lists.append(list(refusals))
        compliance_lists.append(list(compliances))
    tape = _CarrierTape(lm.sites, kinds)
    with torch.enable_grad(), _graph_inputs(lm.model), hook_sites(tape.hooks()):
        logprobs = opening_logprobs(lm, [item.text for item in items],
                                    [r + c for r, c in zip(refusal_lists, compliance_lists, strict=True)],
                                    max_tokens=max_tokens, system=system)
        margins = margins_from_logprobs(logprobs, [len(r) for r in refusal_lists])  # [B]
        carriers = tape.flat()
        grads = torch.autograd.grad(margins.sum(), carriers, allow_unused=True)
    counts = torch.tensor([len(r) + len(c) for r, c in zip(refusal_lists, compliance_lists, strict=True)])
    parent = torch.repeat_interleave(torch.arange(len(items)), counts)  # continuation row -> prompt

    def reduce(pass_index: int, per_row: torch.Tensor) -> torch.Tensor:
        if pass_index == 0:  # the prompt pass: one row per prompt
            return per_row
        out = per_row.new_zeros(len(items), per_row.shape[1])
        return out.index_add_(0, parent.to(per_row.device), per_row)  # the openings' pass: rows per opening

    return _contributions(tape, grads, reduce)


def global_batch(lm: LoadedModel, batch, kinds: Sequence[SiteKind], *, projections: int = 8, seed: int = 0
                 ) -> Results:
    """Estimated ΔLLM per prompt and neuron, {(layer, kind): [B, N]}, from ``projections`` backward passes."""
    from ssn_core.scoring import _forward

    if projections < 1:
        raise SSNError(f"the global ΔLLM estimate needs at least 1 random projection, got {projections}")
    tape = _CarrierTape(lm.sites, kinds)
    squares: Results = {}
    with torch.enable_grad(), _graph_inputs(lm.model), hook_sites(tape.hooks()):
        hidden = _forward(lm.model, batch).float()  # [B, T, hidden]
        carriers = tape.flat()
        scale = batch.weights.to(hidden.device).clamp(min=0).sqrt()[..., None]  # [B, T, 1]: r_t ~ N(0, w_t I)
        generator = torch.Generator().manual_seed(int(seed))
        for k in range(projections):
            r = torch.randn(hidden.shape, generator=generator).to(hidden.device) * scale
            y = (hidden * r).sum()
            grads = torch.autograd.grad(y, carriers, retain_graph=k < projections - 1, allow_unused=True)
            for key, sample in _contributions(tape, grads, lambda _, per_row: per_row).items():
                squares[key] = squares.get(key, 0) + sample.double() ** 2
    return {key: (value / projections).sqrt().float() for key, value in squares.items()}
