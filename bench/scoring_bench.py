"""Scoring throughput: vs a plain forward, vs exact per-neuron ablation, vs a peer library (nnsight)."""

from __future__ import annotations

import torch

from bench import legacy
from bench.common import (
    BenchContext,
    BenchResult,
    alternate,
    fmt_ratio,
    goal_text,
    median,
    paired_ratio,
    require,
)
from bench.workloads import batch_shape, plain_forward, scoring_batches


def scoring_vs_forward(ctx: BenchContext) -> BenchResult:
    """All-site one-pass impact scoring vs the plain forward it rides on; also each site kind alone."""
    scoring = require("ssn_core.scoring")
    lm = ctx.lm
    cfg = ctx.config
    batches = scoring_batches(lm, n_prompts=cfg.pick(2, 2, 32), batch_size=cfg.pick(2, 2, 8))
    kinds = lm.sites.kinds

    def run_forward():
        for batch in batches:
            plain_forward(lm, batch)

    def run_scoring(selected):
        def fn():
            for batch in batches:
                scoring.score_batch(lm, batch, "impact", selected)
        return fn

    def run_old(selected):  # the q/k recomputation as it was before issue 17 (bench.legacy), beside the new one
        scoring_fn = run_scoring(selected)

        def fn():
            with legacy.old_qk():
                scoring_fn()
        return fn

    qk = [k for k in ("attn_q", "attn_k") if k in kinds]
    fns = {"forward": run_forward, "all": run_scoring(kinds)}
    fns.update({kind: run_scoring((kind,)) for kind in kinds})
    if qk:
        fns["all_old"] = run_old(kinds)
        fns.update({f"{kind}_old": run_old((kind,)) for kind in qk})
    ctx.log(f"{len(batches)} batches, {cfg.rounds} alternating rounds of {', '.join(fns)}")
    # Warm-up: one forward and one all-sites pass fill the weight-derived constants of every kind.
    times = alternate(fns, cfg.rounds, warm=["forward", "all"])
    # Throughput ratio: forward time / scoring time (1.0 = scoring costs nothing on top of the forward).
    ratios = {"all_sites": paired_ratio(times["forward"], times["all"])}
    per_kind = {kind: paired_ratio(times["forward"], times[kind]) for kind in kinds}
    old = {("all_sites" if name == "all_old" else name.removesuffix("_old")):
           paired_ratio(times["forward"], times[name])
           for name in fns if name.endswith("_old")}
    if "all_sites" in old:
        ratios["all_sites_old_qk"] = old["all_sites"]
    for kind in qk:
        ratios[kind], ratios[f"{kind}_old"] = per_kind[kind], old[kind]
    B, T = batch_shape(batches)
    parts = " ".join(f"{k}={fmt_ratio(v)}" + (f" (old {fmt_ratio(old[k])})" if k in old else "")
                     for k, v in per_kind.items())
    result = BenchResult(
        name="scoring-vs-forward",
        ratios=ratios,
        goals={"all_sites": ">= 0.85", **{kind: ">= 0.5" for kind in qk}},
        summary="",
        batch=B,
        seq_len=T,
        details={"per_kind_throughput_ratio": per_kind, "old_qk_path_throughput_ratio": old,
                 "median_s": {k: median(v) for k, v in times.items()},
                 "times_s": times, "n_batches": len(batches), "reference": "base-model forward, no LM head"},
    )
    before = f" (old q/k path {fmt_ratio(old['all_sites'])})" if "all_sites" in old else ""
    result.summary = (f"scoring-vs-forward: all sites {fmt_ratio(ratios['all_sites'])}{before}"
                      f"{goal_text(result, 'all_sites')} | per kind {parts}"
                      + "".join(f" | {kind}{goal_text(result, kind)}" for kind in qk))
    return result


def scoring_vs_ablation(ctx: BenchContext) -> BenchResult:
    """Impact scores for every neuron vs exact ablation of every neuron, extrapolated from a timed sample."""
    scoring = require("ssn_core.scoring")
    lm = ctx.lm
    cfg = ctx.config
    batches = scoring_batches(lm, n_prompts=cfg.pick(2, 2, 4), batch_size=cfg.pick(2, 2, 4))
    batch = batches[0]
    # A few neurons of every kind, spread over all layers: the per-neuron cost hardly depends on which.
    sample = scoring.sample_neurons(lm.sites, lm.sites.kinds, cfg.pick(1, 1, 8), 0, per="kind")
    chunk = 8  # the engine's default: 8 neurons share one forward over a repeated batch

    times = alternate(
        {"impact": lambda: scoring.score_batch(lm, batch, "impact", lm.sites.kinds),
         "ablation_sample": lambda: scoring.ablation_batch(lm, batch, sample, chunk=chunk)},
        rounds=cfg.pick(1, 1, 3),  # the goal has a wide margin; one round is enough in --quick
    )
    total = lm.sites.total_neurons
    per_neuron = [t / len(sample) for t in times["ablation_sample"]]
    full_ablation = [p * total for p in per_neuron]
    ratio = paired_ratio(full_ablation, times["impact"])
    B, T = batch_shape([batch])
    result = BenchResult(
        name="scoring-vs-ablation",
        ratios={"speedup": ratio},
        goals={"speedup": ">= 1000"},
        summary="",
        batch=B,
        seq_len=T,
        details={"sampled_neurons": len(sample), "total_neurons": total, "chunk": chunk,
                 "ablation_s_per_neuron": median(per_neuron), "extrapolated_full_ablation_s": median(full_ablation),
                 "impact_all_sites_s": median(times["impact"]), "times_s": times},
        notes=[("full ablation time = (timed sample time / sampled neurons) x all neurons; the sample includes "
                "the one baseline forward, which slightly favours ablation")],
    )
    result.summary = (f"scoring-vs-ablation: impact scoring is {fmt_ratio(ratio)} faster than exact ablation of all "
                      f"{total} neurons (extrapolated from {len(sample)}){goal_text(result, 'speedup')}")
    return result


# ----- peer: the same activations captured and reduced by nnsight / by a plain full activation cache -----


def _site_list(lm):
    """Sites in execution order within each layer (nnsight requires that order)."""
    order = {"attn_q": 0, "attn_k": 1, "attn_v": 2, "attn_o": 3, "mlp": 4}
    return sorted(lm.sites, key=lambda s: (s.layer, order[s.kind]))


def _reduce(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean |a|, weighted mean a) over tokens: values [B, T, N], weights [B, T] -> [B, N] each."""
    values = values.float()
    return torch.einsum("btn,bt->bn", values.abs(), weights), torch.einsum("btn,bt->bn", values, weights)


def _nnsight_runner(lm, batches):
    """Capture every site's neuron vector and reduce it inside an nnsight trace, per batch."""
    try:
        from nnsight import NNsight
    except ImportError as exc:
        return None, f"nnsight is not installed ({exc})"
    sites = _site_list(lm)
    before = {id(m) for m in lm.model.modules() if "forward" in m.__dict__}
    wrapped = NNsight(lm.model)
    # NNsight replaces every module's forward for good; keep its replacements only while its own runs go, so that
    # ours (and every later benchmark on the shared model) runs the model's own forwards.
    patched = [(m, m.__dict__["forward"]) for m in lm.model.modules()
               if "forward" in m.__dict__ and id(m) not in before]

    def attached(on: bool) -> None:
        for module, forward in patched:
            if on:
                module.forward = forward
            else:
                module.__dict__.pop("forward", None)

    attached(False)

    def envoy(site):
        module = wrapped
        for part in site.module_name.split("."):
            module = module[int(part)] if part.isdigit() else getattr(module, part)
        return module.input if site.where == "in" else module.output

    def run():
        attached(True)
        try:
            return _trace_all()
        finally:
            attached(False)

    def _trace_all():
        results = []
        for batch in batches:
            saved = []
            with torch.no_grad(), wrapped.trace(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                position_ids=batch.position_ids, use_cache=False):
                for site in sites:
                    carrier = envoy(site)
                    if site.contiguous_start is not None:
                        values = carrier[..., site.contiguous_start: site.contiguous_start + site.size]
                    else:
                        values = carrier[..., site.coords]
                    w = batch.weights
                    saved.append((torch.einsum("btn,bt->bn", values.abs(), w).save(),
                                  torch.einsum("btn,bt->bn", values, w).save()))
            results.append(saved)
        return results

    try:
        check = run()  # also the warm-up
    except Exception as exc:  # noqa: BLE001 - report why the peer could not run, then fall back
        return None, f"nnsight could not trace this model: {type(exc).__name__}: {exc}"
    return (run, check), None


def _full_cache_runner(lm, batches):
    """The naive peer: register_forward_hook copies every carrier into a cache; reduce after the pass."""
    sites = _site_list(lm)

    def run():
        results = []
        for batch in batches:
            cache: dict = {}
            handles = []
            for site in sites:
                def hook(module, args, output, site=site, cache=cache):
                    carrier = args[0] if site.where == "in" else output
                    cache[site.key] = site.read(carrier).detach().clone()
                if site.where == "in":
                    handles.append(site.module.register_forward_pre_hook(lambda m, a, h=hook: h(m, a, None)))
                else:
                    handles.append(site.module.register_forward_hook(hook))
            try:
                plain_forward(lm, batch)
            finally:
                for handle in handles:
                    handle.remove()
            results.append([_reduce(cache[s.key], batch.weights) for s in sites])
        return results

    return run


def scoring_vs_peer(ctx: BenchContext) -> BenchResult:
    """Our capture+reduce (score_batch method="activation") vs nnsight doing the same on the same batches."""
    scoring = require("ssn_core.scoring")
    lm = ctx.lm
    cfg = ctx.config
    batches = scoring_batches(lm, n_prompts=cfg.pick(2, 2, 32), batch_size=cfg.pick(2, 2, 8))
    sites = _site_list(lm)

    def ours():
        return [scoring.score_batch(lm, batch, "activation", lm.sites.kinds) for batch in batches]

    notes = []
    nnsight_run, why_not = _nnsight_runner(lm, batches)
    fns = {"ours": ours, "full_cache_hooks": _full_cache_runner(lm, batches)}
    if nnsight_run is not None:
        run, check = nnsight_run
        fns["nnsight"] = run
        # Same numbers on both sides, or the comparison means nothing.
        mine = ours()
        worst = 0.0
        for b, saved in enumerate(check):
            for site, (mag, signed) in zip(sites, saved, strict=True):
                ref_mag, ref_signed = mine[b][site.key]
                worst = max(worst, float((mag - ref_mag).abs().max()), float((signed - ref_signed).abs().max()))
        notes.append(f"nnsight and ours agree to max abs diff {worst:.2e}")
    else:
        notes.append(why_not)
    times = alternate(fns, cfg.rounds)
    ratios = {"vs_full_cache": paired_ratio(times["full_cache_hooks"], times["ours"])}
    goals = {"vs_full_cache": ">= 1.0"}
    if "nnsight" in times:
        ratios = {"vs_nnsight": paired_ratio(times["nnsight"], times["ours"]), **ratios}
        goals = {"vs_nnsight": ">= 1.0"}
    headline = "vs_nnsight" if "vs_nnsight" in ratios else "vs_full_cache"
    B, T = batch_shape(batches)
    result = BenchResult(
        name="scoring-vs-peer",
        ratios=ratios,
        goals=goals,
        summary="",
        batch=B,
        seq_len=T,
        details={"median_s": {k: median(v) for k, v in times.items()}, "times_s": times,
                 "sites": len(sites), "n_batches": len(batches),
                 "what": "capture every site's neuron vector; reduce to per-prompt weighted mean |a| and mean a"},
        notes=notes,
    )
    other = "" if headline == "vs_full_cache" else f" | vs full-cache hooks {fmt_ratio(ratios['vs_full_cache'])}"
    peer = "nnsight" if headline == "vs_nnsight" else "full-cache register_forward_hook (nnsight unavailable)"
    result.summary = (f"scoring-vs-peer: our capture+reduce throughput / {peer}'s = {fmt_ratio(ratios[headline])}"
                      f"{goal_text(result, headline)}{other}")
    return result
