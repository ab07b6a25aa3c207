"""``collapse_``: apply a plan to a model in place (structure and weights)."""
from __future__ import annotations

import torch
from torch import nn

from ..algebra import Affine, canonical_affines, make_linear
from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCFusedMLP, linears_of
from ..planning import FACTOR, KEEP, MERGE, PARTIAL, CollapsePlan, SitePlan, plan_collapse


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
    acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
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
            dev = max((abs(1 - j.alpha[c]) for c in chans), default=0.0)
            if dev > plan.tol:
                out.append(f"{sp.path} joint {i}: {j.decision} at |1-alpha|={dev:.3f} > tol {plan.tol:g}")
    return out


def collapse_(model: nn.Module, plan: CollapsePlan | None = None, *, force: bool = False, **plan_kwargs) -> CollapsePlan:
    """Apply ``plan`` (or ``plan_collapse(model, **plan_kwargs)``) in place; returns the plan.

    Refuses, with the reason, a joint the plan would linearise beyond its bound (``tol``)
    unless ``force=True``; checks that the plan matches the model (paths, widths, current
    alphas) before changing anything, so a refused call leaves the model as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"collapse_ expects an nn.Module, got {type(model).__name__}")
    if plan is None:
        plan = plan_collapse(model, force=force, **plan_kwargs)
    elif plan_kwargs:
        raise TypeError(f"pass either a plan or planning options, not both (got {sorted(plan_kwargs)})")
    if not isinstance(plan, CollapsePlan):
        raise TypeError(f"plan must be a CollapsePlan, got {type(plan).__name__}")
    refused = [] if force else _refusals(plan)
    if refused:
        raise ValueError("collapse refused, outputs would change beyond the plan's bound: " + "; ".join(refused)
                         + ". Re-plan, or pass force=True to accept the change.")
    mods = [_check_site_matches(model, sp) for sp in plan.sites]
    for m, sp in zip(mods, plan.sites):
        _check_alphas(m, sp)
        if sp.changes:
            _check_finite(m, sp.path)
    for m, sp in zip(mods, plan.sites):
        if sp.changes:
            apply_site(m, sp)
    _record(model, plan)
    return plan


def apply_site(m: nn.Module, sp: SitePlan) -> None:
    """Rebuild one site according to its joint decisions (structure and weights)."""
    like = linears_of(m)[0].weight
    aff = canonical_affines(m)
    decisions = [j.decision for j in sp.joints]
    if isinstance(m, LCFusedMLP):
        _apply_mlp(m, aff, sp, like)
        return
    groups, p = [], 0
    for q in range(len(aff)):
        if q == len(aff) - 1 or decisions[q] != MERGE:
            groups.append((p, q))
            p = q + 1
    lins, acts = [], []
    for gi, (p, q) in enumerate(groups):
        a = aff[p]
        for k in range(p + 1, q + 1):
            a = a.then(aff[k])
        lins.append(make_linear(a, like))
        if gi < len(groups) - 1:
            acts.append(m.acts[q] if decisions[q] == KEEP else nn.Identity())
    m.linears = nn.ModuleList(lins)
    m.acts = nn.ModuleList(acts)
    m.norms = nn.ModuleList(nn.Identity() for _ in acts)
    m.drops = nn.ModuleList(nn.Identity() for _ in acts)
    m.norm_pre = [False] * len(acts)


def _apply_mlp(m: LCFusedMLP, aff: list[Affine], sp: SitePlan, like: torch.Tensor) -> None:
    decision = sp.joints[0].decision
    a1, a2 = aff
    if decision == MERGE:
        fc = make_linear(a1.then(a2), like)
        _clear(m)
        m.fc, m.form = fc, "merged"
    elif decision == FACTOR:
        fc1, fc2 = make_linear(a1, like), make_linear(a2, like)
        _clear(m)
        m.fc1, m.fc2, m.form = fc1, fc2, "factored"
    elif decision == PARTIAL:
        lin = torch.tensor(sp.joints[0].linear_channels, dtype=torch.long, device=a1.weight.device)
        keep = torch.ones(a1.weight.shape[0], dtype=torch.bool, device=a1.weight.device)
        keep[lin] = False
        act = m.act
        w2l = a2.weight[:, lin]
        fc1 = make_linear(Affine(a1.weight[keep], a1.bias[keep]), like)
        fc2 = make_linear(Affine(a2.weight[:, keep], a2.bias + w2l @ a1.bias[lin]), like)
        skip = make_linear(Affine(w2l @ a1.weight[lin], a2.bias.new_zeros(a2.weight.shape[0])), like, bias=False)
        new_act = CollapsibleActivation(act.base, int(keep.sum()), act.alpha.detach()[keep.to(act.alpha.device)])
        _clear(m)
        m.fc1, m.act, m.fc2, m.skip, m.form = fc1, new_act.to(like.device, like.dtype), fc2, skip, "partial"
    else:
        raise ValueError(f"unknown decision {decision!r} for site {sp.path!r}")


def _clear(m: LCFusedMLP) -> None:
    for name in ("fc1", "act", "fc2", "drop", "norm", "fc", "skip"):
        if name in m._modules:
            del m._modules[name]
    m.norm, m.drop = None, None


def _record(model: nn.Module, plan: CollapsePlan) -> None:
    model.__dict__.setdefault("_lc_plans", []).append(plan)
