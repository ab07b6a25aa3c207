"""``collapse_``: apply a plan to a model in place (structure and weights)."""
from __future__ import annotations

import copy

import warnings

import torch
from torch import nn

from ..algebra import Block, LinearBlock, canonical_affines, collapsed_modules, exact_blocks, install, site_acts
from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCFusedMLP, linears_of
from ..nn.gated import LCGatedMLP
from ..planning.plan import weights_version
from ..planning import DECISIONS, GATED_DECISIONS, KEEP, LINEAR, MERGE, PARTIAL, CollapsePlan, SitePlan, plan_collapse
from ..planning.calibration import eval_no_grad
from ..planning.cost import partial_conflict
from ..planning.fitting import fit_stream, site_decisions
from ..planning.gated import GatedSite, SiteStream, fit_plan
from ..planning.partial import ClassicSite
from ..planning.layerwise import is_offloaded, materialized
from ..planning.inputs import calib_batches, holdout_split
from ..planning.sites import site_of
from .atomic import atomic


def _check_site_matches(model: nn.Module, sp: SitePlan) -> nn.Module:
    try:
        m = model.get_submodule(sp.path)
    except AttributeError:
        raise ValueError(f"plan site {sp.path!r} does not exist in this model; was the plan made for another model?") \
            from None
    if type(m).__name__ != sp.kind or (isinstance(m, LCFusedMLP) and m.form != "mlp"):
        what = f"{type(m).__name__}(form={m.form!r})" if isinstance(m, LCFusedMLP) else type(m).__name__
        raise ValueError(f"plan site {sp.path!r} expects an uncollapsed {sp.kind}, the model has {what}")
    lins = linears_of(m)
    widths = [lins[0].in_features] + [lin.out_features for lin in lins]
    if widths != sp.widths:
        raise ValueError(f"plan site {sp.path!r} expects widths {sp.widths}, the model has {widths}")
    return m


def _check_alphas(m: nn.Module, sp: SitePlan) -> None:
    acts = [m.act] if isinstance(m, (LCFusedMLP, LCGatedMLP)) else list(m.acts)
    for i, (act, jp) in enumerate(zip(acts, sp.joints)):
        if not isinstance(act, CollapsibleActivation):
            continue
        now = act.alpha.detach().float().cpu()
        planned = torch.tensor(jp.alpha)
        if now.shape != planned.shape or not torch.allclose(now, planned, rtol=0, atol=1e-6):
            raise ValueError(
                f"site {sp.path!r} joint {i}: alpha changed since the plan was made "
                f"(planned {_summ(planned)}, now {_summ(now)}); call plan_collapse again"
            )


def _summ(t: torch.Tensor) -> str:
    return f"{t.item():.4f}" if t.numel() == 1 else f"{t.numel()} slopes in [{t.min():.4f}, {t.max():.4f}]"


def _check_finite(m: nn.Module, path: str) -> None:
    for name, p in list(m.named_parameters()) + list(m.named_buffers()):
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ValueError(f"site {path!r}: {name} holds NaN or Inf; collapsing would spread it; fix the weights first")


def _refusals(plan: CollapsePlan) -> list[str]:
    """Linearised joints that break the plan's own bound: tol when no budget decided."""
    if plan.forced or plan.max_error is not None or plan.target is not None:
        return []
    out = []
    for sp in plan.sites:
        for i, j in enumerate(sp.joints):
            chans = j.linear_channels if j.decision == PARTIAL else range(len(j.alpha)) if j.decision != KEEP else []
            dev = max((abs(1 - j.alpha[c if len(j.alpha) > 1 else 0]) for c in chans), default=0.0)
            if dev > plan.tol:
                out.append(f"{sp.path} joint {i}: {j.decision} at |1-alpha|={dev:.3f} > tol {plan.tol:g}")
    return out


def collapse_(model: nn.Module, plan: CollapsePlan | None = None, *, calib: object = None,
              forward_fn: object = None, force: bool = False, **plan_kwargs) -> CollapsePlan:
    """Apply ``plan`` (or ``plan_collapse(model, calib=calib, **plan_kwargs)``) in place; returns the plan.

    Refuses, with the reason, a joint the plan would linearise beyond its bound (``tol``)
    unless ``force=True``. A fitted plan (``plan.fit``, planned with calibration data) carries its
    fits: without ``calib`` they are installed as planned (while the sites' weights are those it
    was fitted to); with ``calib`` (and ``forward_fn``) they are fitted again, in the same order, on
    that data. Either way the model-output error on the planning data is the planned one. Everything is
    checked before anything changes (paths, widths, current alphas, decisions, channels), and a
    failure while applying restores the model exactly: the call is all or nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"collapse_ expects an nn.Module, got {type(model).__name__}")
    if any(t.is_meta for t in model.parameters()) and not is_offloaded(model):
        raise ValueError("collapse_ got a model on the meta device (no weights to merge); materialise and load it first")
    if plan is None:
        plan = plan_collapse(model, calib=calib, forward_fn=forward_fn, force=force, **plan_kwargs)
    elif plan_kwargs:
        raise TypeError(f"pass either a plan or planning options, not both (got {sorted(plan_kwargs)})")
    if not isinstance(plan, CollapsePlan):
        raise TypeError(f"plan must be a CollapsePlan, got {type(plan).__name__}")
    plan.validate()  # an edited plan is refused here, naming the field, before anything else reads it
    if any(sp.kind == "LCGatedMLP" for sp in plan.sites):
        return collapse_gated_(model, plan, calib=calib, forward_fn=forward_fn)
    mods = [_check_site_matches(model, sp) for sp in plan.sites]
    for m, sp in zip(mods, plan.sites):
        _check_joints(m, sp)
    refused = [] if force else _refusals(plan)
    if refused:
        raise ValueError("collapse refused, outputs would change beyond the plan's bound: " + "; ".join(refused)
                         + ". Re-plan, or pass force=True to accept the change.")
    for m, sp in zip(mods, plan.sites):
        _check_alphas(m, sp)
        if sp.changes:
            _check_finite(m, sp.path)
            _check_train_norm(m, sp.path)
    changing = {i: sp for i, sp in enumerate(plan.sites) if sp.changes}
    blocks: dict[int, list[Block]] = {}
    if plan.fit and calib is None and changing:
        blocks = _carried_fits(plan, mods, changing)
    elif plan.fit and changing and plan.fit_inputs is not None:
        # planned by the fitted planner (planning/partial.py): the same split, channels, ridges and inputs
        blocks = refit_classic(model, plan, calib, forward_fn)
    elif plan.fit and changing:
        sites = [site_of(m, sp.path) for m, sp in zip(mods, plan.sites)]
        batches = calib_batches(model, calib, forward_fn=forward_fn)
        with eval_no_grad(model):
            blocks, _ = fit_stream(SiteStream(model, sites, batches, forward_fn),
                                   sites, {i: site_decisions(sp) for i, sp in changing.items()}, plan.fit_target or "local")
    training_bn = [sp.path for i, sp in changing.items() if any(
        isinstance(n, nn.BatchNorm1d) and n.training for n in ([mods[i].norm] if isinstance(mods[i], LCFusedMLP)
                                                                 else list(mods[i].norms)))]
    with atomic(model, "collapse_"):
        for i, sp in changing.items():
            site = blocks.get(i) or site_blocks(mods[i], sp)
            parts = collapsed_modules(mods[i], site)
            check_weights(parts, sp.path, site)
            install(mods[i], parts)
        _record(model, plan)
    if training_bn:
        msg = (f"BatchNorm at {training_bn} was folded with its running statistics (eval semantics) while it is in "
               "train mode: in train mode it normalised each batch by that batch's statistics, so the model's "
               "train-mode outputs change (eval-mode outputs are as planned). Call model.eval() before collapse_ "
               "to fold deliberately")
        plan.notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return plan


def _carried_fits(plan: CollapsePlan, mods: list, changing: dict) -> dict[int, list[Block]]:
    """The fits a plan carries, when they still apply: the same sites changing together, each
    site's weights unchanged since the plan was made."""
    together = tuple(sorted(sp.path for sp in changing.values()))
    out, why = {}, None
    for i, sp in changing.items():
        f = plan.fitted.get(sp.path)
        if f is None or not hasattr(f, "blocks"):
            why = "it carries no fitted replacements (a plan read back from JSON holds decisions only)"
        elif f.together != together:
            why = "its sites were fitted together with other sites than those it changes now"
        elif f.versions != weights_version(mods[i]):
            why = f"the weights of {sp.path!r} changed since it was made"
        if why is not None:
            raise ValueError(f"this plan's replacements were fitted to calibration data and {why}: pass calib= (and "
                             "forward_fn=) to collapse_ so they are fitted again, or plan with fit=False for the "
                             "algebraic merge")
        out[i] = copy.deepcopy(f.blocks)
    return out


def collapse_gated_(model: nn.Module, plan: CollapsePlan, *, calib: object = None,
                    forward_fn: object = None) -> CollapsePlan:
    """Install a gated plan's fitted replacements (``plan.fitted``); with ``calib`` fit them again on it."""
    if any(sp.kind != "LCGatedMLP" for sp in plan.sites):
        raise ValueError("the plan mixes gated FFN sites and other sites; plan and collapse them separately")
    mods: list[LCGatedMLP] = []
    for sp in plan.sites:
        m = _site_module(model, sp.path)
        if not isinstance(m, LCGatedMLP) or m.form != "gated":
            what = f"LCGatedMLP(form={m.form!r})" if isinstance(m, LCGatedMLP) else type(m).__name__
            raise ValueError(f"plan site {sp.path!r} expects an uncollapsed LCGatedMLP, the model has {what}")
        widths = [m.in_features, m.hidden_features, m.out_features]
        if sp.widths != widths:
            raise ValueError(f"plan site {sp.path!r} expects widths {sp.widths}, the model has {widths}")
        if len(sp.joints) != 1 or sp.joints[0].decision not in GATED_DECISIONS:
            got = [j.decision for j in sp.joints]
            raise ValueError(f"plan site {sp.path!r}: a gated site has one joint decided {GATED_DECISIONS}, got {got}")
        with materialized(m):
            _check_alphas(m, sp)
        mods.append(m)
    changing = [(m, sp) for m, sp in zip(mods, plan.sites) if sp.changes]
    fitted = dict(plan.fitted)
    if calib is not None and changing:
        fitted = refit_gated(model, plan, calib, forward_fn)
    missing = [sp.path for _, sp in changing if sp.path not in fitted]
    if missing:
        raise ValueError(f"the plan carries no fitted replacement for {missing[:3]} (a plan read back from JSON holds "
                         "decisions only): pass calib= to fit them, or plan again with lc.plan_collapse(..., calib=)")
    for m, sp in changing:
        rep = fitted[sp.path]
        want = "partial" if sp.joints[0].decision == PARTIAL else "linear"
        if not isinstance(rep, LCGatedMLP) or rep.form != want or (rep.in_features, rep.out_features) != (
                m.in_features, m.out_features):
            raise ValueError(f"plan site {sp.path!r}: its fitted replacement is {rep!r}, expected an LCGatedMLP of "
                             f"form {want!r} with widths {m.in_features} -> {m.out_features}")
        _check_finite(rep, sp.path)
    with atomic(model, "collapse_"):
        for m, sp in changing:
            m.become(fitted[sp.path])
        _record(model, plan)
    return plan


def _site_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"plan site {path!r} does not exist in this model; was the plan made for another model?") \
            from None


def refit_classic(model: nn.Module, plan: CollapsePlan, calib: object, forward_fn: object) -> dict[int, list[Block]]:
    """A classic plan of the fitted planner fitted again on ``calib`` (:func:`refit_gated`), as blocks per site."""
    fitted = refit_gated(model, plan, calib, forward_fn, view=ClassicSite)
    out = {}
    for i, sp in enumerate(plan.sites):
        if sp.path in fitted:
            site = ClassicSite(model.get_submodule(sp.path), sp.path)
            out[i] = site.carry(fitted[sp.path], _kept_channels(site, sp), ()).blocks
    return out


def refit_gated(model: nn.Module, plan: CollapsePlan, calib: object, forward_fn: object, view=GatedSite.of) -> dict:
    """The plan's widths fitted again, in sequence, on ``calib`` (channels chosen from it); ``view``
    makes each site's view (planning/partial.py's ClassicSite for LCFusedMLP plans)."""
    sites = [view(model.get_submodule(sp.path), sp.path) for sp in plan.sites]
    kept = [s.h - len(sp.joints[0].linear_channels or []) if sp.joints[0].decision == PARTIAL
            else 0 if sp.joints[0].decision in (LINEAR, MERGE) else s.h for s, sp in zip(sites, plan.sites)]
    batches = calib_batches(model, calib, forward_fn=forward_fn)
    with eval_no_grad(model):
        if plan.fit_inputs is None:  # a plan that fitted on every row, channels ranked where each site fits
            fitted, _, _ = fit_plan(SiteStream(model, sites, batches, forward_fn), kept, plan.fit_target or "local")
        else:  # the planner's split, channels, ridges and inputs: the same fits again on the same calib
            fit_b, val_b = holdout_split(batches, forward_fn=forward_fn)
            orders = {i: _kept_channels(s, sp) for i, (s, sp) in enumerate(zip(sites, plan.sites))}
            lams = {i: sp.fit_ridge for i, sp in enumerate(plan.sites) if sp.fit_ridge is not None}
            fitted, _, _ = fit_plan(SiteStream(model, sites, fit_b + val_b, forward_fn), kept,
                                    plan.fit_target or "local", orders=orders, lams=lams, n_fit=len(fit_b),
                                    prior=False, sequential=plan.fit_inputs != "dense")
    return {sites[i].path: mod for i, mod in fitted.items()}


def _kept_channels(site: GatedSite, sp: SitePlan) -> torch.Tensor:
    """The channels a gated site's plan keeps (sorted): all but those it folds."""
    folded = set(sp.joints[0].linear_channels or []) if sp.joints[0].decision == PARTIAL else set(range(site.h))
    return torch.tensor([c for c in range(site.h) if c not in folded], dtype=torch.long)


def _check_joints(m: nn.Module, sp: SitePlan) -> None:
    """Every decision known, PARTIAL channels valid, and the plan buildable (no shared group)."""
    widths = sp.widths
    if len(sp.joints) != len(widths) - 2:
        raise ValueError(f"plan site {sp.path!r} has {len(sp.joints)} joints, the model's site has {len(widths) - 2}")
    for i, j in enumerate(sp.joints):
        if j.decision not in DECISIONS:
            raise ValueError(f"plan site {sp.path!r} joint {i}: unknown decision {j.decision!r}; expected one of "
                             f"{DECISIONS}")
        if j.decision == PARTIAL:
            ch, h = j.linear_channels, widths[i + 1]
            if not ch or not all(isinstance(c, int) and 0 <= c < h for c in ch) or len(set(ch)) != len(ch) \
                    or len(ch) >= h:
                raise ValueError(f"plan site {sp.path!r} joint {i}: PARTIAL needs a strict, non-empty subset of the "
                                 f"{h} channels as distinct ints in [0, {h}), got {ch!r}")
    bad = partial_conflict([j.decision for j in sp.joints])
    if bad is not None:
        raise ValueError(f"plan site {sp.path!r}: joint {bad} and the PARTIAL joint before it share a group of "
                         "Linears; a partial block owns the Linears on both sides of its joint, keep one of them")


def _check_train_norm(m: nn.Module, path: str) -> None:
    norms = [m.norm] if isinstance(m, LCFusedMLP) else list(m.norms)
    for n in norms:
        if isinstance(n, nn.BatchNorm1d) and (n.running_mean is None or n.running_var is None):
            raise ValueError(f"site {path!r}: its BatchNorm1d has no running statistics (track_running_stats=False), "
                             "so it normalises each batch by that batch's statistics, which no fixed Linear can "
                             "reproduce; keep this site (KEEP) or train with running statistics")


# Casting a float64 product back rounds each normal entry by at most 2^-9 (bf16) of itself, so
# losing 10% of a map's norm is underflow (entries flushed to zero or subnormal), never rounding.
UNDERFLOW_LOSS = 0.1


def check_weights(parts: dict, path: str, blocks: list[Block] | None = None) -> None:
    """Refuse collapsed weights that do not fit the model's dtype: overflow (inf or NaN), and, with the
    float64 ``blocks`` they were cast from, underflow (the product flushed to zero or subnormal)."""
    dtype = None
    for name, v in parts.items():
        mods = v if isinstance(v, (nn.ModuleList, nn.ModuleDict)) else [v] if isinstance(v, nn.Module) else []
        for mod in (mods.values() if isinstance(mods, nn.ModuleDict) else mods):
            for pname, p in mod.named_parameters():
                if not torch.isfinite(p).all():
                    raise ValueError(f"site {path!r}: the collapsed {name}.{pname} overflows {p.dtype} (inf or NaN "
                                     "after casting the float64 product back); collapse with float32 weights "
                                     "(model.float()) and cast afterwards, or keep this site")
                if isinstance(mod, nn.Linear) and pname == "weight":
                    dtype = p.dtype
    if blocks is None or dtype is None:
        return
    for what, weight, bias in _block_maps(blocks):
        w_lost = _cast_loss(weight, dtype)
        scale = max(float(weight.norm()), float(bias.norm())) if bias is not None else 0.0
        b_lost = _cast_loss(bias, dtype, scale) if bias is not None else 0.0
        if w_lost > UNDERFLOW_LOSS or b_lost > UNDERFLOW_LOSS:
            part = "weight" if w_lost >= b_lost else "bias"
            tiny = torch.finfo(dtype).tiny
            raise ValueError(f"site {path!r}: the collapsed {what} underflows {dtype}: casting its float64 {part} "
                             f"back loses {max(w_lost, b_lost):.0%} of it (entries below {tiny:.1e} become "
                             f"subnormal or zero); keep the model in a wider dtype (model.float() before collapse_), "
                             "or keep this site (KEEP)")


def _cast_loss(t: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> float:
    """||cast(t) - t|| / scale (default ||t||): what casting the float64 ``t`` to ``dtype`` loses."""
    scale = float(t.norm()) if scale is None else scale
    if scale == 0.0 or t.dtype == dtype:
        return 0.0
    return float((t.to(dtype).to(t.dtype) - t).norm()) / scale


def _block_maps(blocks: list[Block]):
    """(description, float64 weight, float64 bias or None) of every Linear the blocks install."""
    for b in blocks:
        span = f"Linear {b.first}" if b.first == b.last else f"Linears {b.first}..{b.last}"
        if isinstance(b, LinearBlock):
            yield f"map of {span}" + (" (merged)" if b.last > b.first else ""), b.map.weight, b.map.bias
        else:
            yield f"partial block of {span}: fc1", b.fc1.weight, b.fc1.bias
            yield f"partial block of {span}: fc2", b.fc2.weight, b.skip.bias
            yield f"partial block of {span}: skip", b.skip.weight, None


def site_blocks(m: nn.Module, sp: SitePlan) -> list[Block]:
    """The exact (algebraic) blocks of a site under its plan: BatchNorm folded, products in float64."""
    return exact_blocks(canonical_affines(m), site_acts(m), [j.decision for j in sp.joints],
                        [j.linear_channels for j in sp.joints])


def apply_site(m: nn.Module, sp: SitePlan, blocks: list[Block] | None = None) -> None:
    """Rebuild one site according to its joint decisions (structure and weights): the exact
    merge, or ``blocks`` fitted to calibration data."""
    if blocks is None:
        blocks = site_blocks(m, sp)
    install(m, collapsed_modules(m, blocks))


def _record(model: nn.Module, plan: CollapsePlan) -> None:
    model.__dict__.setdefault("_lc_plans", []).append(plan)
