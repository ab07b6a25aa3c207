"""Transforms: ``prepare_`` (make MLPs collapsible), ``collapse_`` (apply a plan), save/load.

Merge maths. With BatchNorm between two Linears (``s = gamma / sqrt(var + eps)``) the
eval-mode joint is affine, so it folds into the neighbouring Linear; a run of Linears with
linear joints multiplies into one map ``W = W_q ... W_p``, ``b = W_q(...(W_p b_p ...)) + b_q``.
Products are formed in float64 and cast back once.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import __version__
from .nn.activation import CollapsibleActivation
from .nn.convert import is_activation, to_collapsible
from .nn.mlp import LCChain, LCFusedMLP
from .planner import FACTOR, KEEP, MERGE, PARTIAL, CollapsePlan, SitePlan, find_sites, linears_of, plan_collapse

log = logging.getLogger(__name__)
FilterFn = Callable[[nn.Module, str], bool]


# ----------------------------------------------------------------------------------------------
# finding Linear -> act -> Linear runs


@dataclass
class Joint:
    act: nn.Module
    norm: nn.BatchNorm1d | None = None
    norm_pre: bool = False
    drop: nn.Module | None = None


def _parse_joint(mods: list[nn.Module], i: int, width: int) -> tuple[int, Joint | None, str | None, int]:
    """Read ``[BatchNorm1d] act [Dropout] [BatchNorm1d] [Dropout]`` starting at ``mods[i]``.

    Returns (index after the joint, the joint or None, why not, index of the offending module).
    """
    j = Joint(act=None)  # type: ignore[arg-type]
    bad, bad_at, first = None, i, i
    while i < len(mods) and not isinstance(mods[i], nn.Linear):
        m = mods[i]
        if isinstance(m, nn.BatchNorm1d) and j.norm is None and m.num_features == width:
            j.norm, j.norm_pre = m, j.act is None and bad is None
        elif isinstance(m, nn.Dropout) and j.drop is None:
            j.drop = m
        elif j.act is None and bad is None and is_activation(m):
            try:
                to_collapsible(m, width)
                j.act = m
            except (TypeError, ValueError) as e:
                bad, bad_at = f"{type(m).__name__} left as is: {e}", i
        else:
            return i, None, None, i
        i += 1
    if bad is not None:
        return i, None, bad, bad_at
    if j.act is None:  # adjacent Linears (or only dropout/norm between): nothing to make collapsible
        return i, None, None if i == first else "no activation between the Linears", bad_at
    return i, j, None, bad_at


@dataclass
class ParsedChain:
    start: int
    end: int  # one past the last Linear
    linears: list[nn.Linear]
    joints: list[Joint]
    skip_reason: str | None = None  # why the chain stopped before a further Linear
    skip_at: int = -1


def parse_chain(mods: list[nn.Module], start: int) -> ParsedChain | None:
    """The longest ``Linear (joint Linear)*`` run starting at ``mods[start]``, or None."""
    if not isinstance(mods[start], nn.Linear):
        return None
    chain = ParsedChain(start, start + 1, [mods[start]], [])
    while True:
        width = chain.linears[-1].out_features
        nxt, joint, reason, at = _parse_joint(mods, chain.end, width)
        if nxt >= len(mods) or not isinstance(mods[nxt], nn.Linear) or mods[nxt].in_features != width:
            break
        if joint is None:
            chain.skip_reason, chain.skip_at = reason, at
            break
        chain.linears.append(mods[nxt])
        chain.joints.append(joint)
        chain.end = nxt + 1
    return chain


# ----------------------------------------------------------------------------------------------
# prepare_


class PreparedSites(list):
    """The converted site paths (a list), with ``.skipped``: [(path, reason), ...]."""

    def __init__(self, paths=(), skipped=()):
        super().__init__(paths)
        self.skipped: list[tuple[str, str]] = list(skipped)


@dataclass
class PrepareOptions:
    filter_fn: FilterFn | None
    alpha_init: float
    per_channel: bool
    result: PreparedSites = field(default_factory=PreparedSites)


Handler = Callable[[nn.Module, str, PrepareOptions], None]
_HANDLERS: list[Handler] = []


def register_handler(handler: Handler) -> Handler:
    """Add a converter called as ``handler(module, path, opts)`` for every module of the model.

    A handler converts the sites it recognises in place and appends their paths to
    ``opts.result`` (or ``(path, reason)`` to ``opts.result.skipped``). One handler per model
    family keeps adding a family to one small function.
    """
    _HANDLERS.append(handler)
    return handler


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


@register_handler
def _sequential_handler(seq: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Linear -> act -> Linear runs among the direct children of an ``nn.Sequential``."""
    if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
        return
    keys, mods = list(seq._modules.keys()), list(seq._modules.values())
    i = 0
    while i < len(mods):
        chain = parse_chain(mods, i)
        if chain is None:
            i += 1
            continue
        site = join(path, keys[i])
        if chain.skip_reason:
            opts.result.skipped.append((join(path, keys[chain.skip_at]), chain.skip_reason))
        if len(chain.linears) < 2:
            i += 1
            continue
        if opts.filter_fn is not None and not opts.filter_fn(chain.linears[0], site):
            opts.result.skipped.append((site, "excluded by filter_fn"))
            i = chain.end
            continue
        js = chain.joints
        kw = dict(alpha_init=opts.alpha_init, per_channel=opts.per_channel)
        if len(chain.linears) == 2:
            new = LCFusedMLP.from_modules(chain.linears[0], js[0].act, chain.linears[1], js[0].norm,
                                          norm_pre=js[0].norm_pre, drop=js[0].drop, **kw)
        else:
            new = LCChain(chain.linears, [j.act for j in js], [j.norm for j in js], [j.norm_pre for j in js],
                          [j.drop for j in js], **kw)
        # Consumed children become Identity placeholders, so neither the positions (seq[7])
        # nor the state_dict keys of the untouched children move.
        seq._modules[keys[i]] = new
        for k in keys[i + 1:chain.end]:
            seq._modules[k] = nn.Identity()
        opts.result.append(site)
        i = chain.end


def prepare_(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    alpha_init: float = 0.0,
    per_channel: bool = False,
) -> PreparedSites:
    """Make every Linear -> activation -> Linear site collapsible, in place.

    ReLU, GELU (erf and tanh), SiLU, PReLU and LeakyReLU become :class:`CollapsibleActivation`
    (PReLU and LeakyReLU keep their slope as alpha); at ``alpha_init=0`` the model computes
    the same function. Runs of three or more Linears become one :class:`LCChain`. Other
    activations are left alone and listed in ``result.skipped`` with the reason.
    ``filter_fn(first_linear, site_path) -> bool`` selects sites. Returns the converted paths.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(alpha_init, (int, float)) or not math.isfinite(alpha_init):
        raise ValueError(f"alpha_init must be a finite float (0 keeps the activation as is), got {alpha_init!r}")
    opts = PrepareOptions(filter_fn, float(alpha_init), bool(per_channel))
    _load_integrations()
    visited: set[int] = set()
    for path, m in list(model.named_modules()):
        if _inside_site(path, opts.result) or id(m) in visited:
            continue
        visited.add(id(m))
        for handler in _HANDLERS:
            handler(m, path, opts)
    for p, reason in opts.result.skipped:
        log.info("prepare_: skipped %s: %s", p, reason)
    return opts.result


def _inside_site(path: str, done: list[str]) -> bool:
    return any(path == d or path.startswith(d + ".") for d in done)


def _load_integrations() -> None:
    """Register the timm / transformers handlers (they import neither library themselves)."""
    from . import integrations  # noqa: F401


# ----------------------------------------------------------------------------------------------
# merge maths (float64)


@dataclass
class Affine:
    weight: torch.Tensor  # (out, in), float64
    bias: torch.Tensor  # (out,), float64

    def then(self, nxt: "Affine") -> "Affine":
        """The map ``nxt(self(x))``."""
        return Affine(nxt.weight @ self.weight, nxt.weight @ self.bias + nxt.bias)


def affine_of(lin: nn.Linear) -> Affine:
    w = lin.weight.detach().to(torch.float64)
    b = lin.bias.detach().to(torch.float64) if lin.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                        device=w.device)
    return Affine(w, b)


def bn_scale_shift(norm: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``s * x + t`` (float64)."""
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("cannot fold a BatchNorm1d without running statistics (track_running_stats=False)")
    var = norm.running_var.detach().to(torch.float64)
    mean = norm.running_mean.detach().to(torch.float64)
    s = torch.rsqrt(var + norm.eps)
    t = -mean * s
    if norm.affine:
        s, t = s * norm.weight.detach().to(torch.float64), t * norm.weight.detach().to(torch.float64)
        t = t + norm.bias.detach().to(torch.float64)
    return s, t


def fold_norm(before: Affine, after: Affine, norm: nn.BatchNorm1d, pre: bool) -> tuple[Affine, Affine]:
    """Fold BN into the Linear before the activation (``pre``) or the one after it."""
    s, t = bn_scale_shift(norm)
    if pre:
        return Affine(s[:, None] * before.weight, s * before.bias + t), after
    return before, Affine(after.weight * s[None, :], after.weight @ t + after.bias)


def canonical_affines(m: nn.Module) -> list[Affine]:
    """The site's Linears in float64 with every BatchNorm folded in (eval semantics)."""
    lins = linears_of(m)
    aff = [affine_of(lin) for lin in lins]
    if isinstance(m, LCFusedMLP):
        norms, pres = [m.norm], [m.norm_pre]
    else:
        norms = [n if isinstance(n, nn.BatchNorm1d) else None for n in m.norms]
        pres = list(m.norm_pre)
    for i, (norm, pre) in enumerate(zip(norms, pres)):
        if norm is not None:
            aff[i], aff[i + 1] = fold_norm(aff[i], aff[i + 1], norm, pre)
    return aff


def make_linear(a: Affine, like: torch.Tensor, bias: bool = True) -> nn.Linear:
    """An nn.Linear holding ``a`` cast back once to ``like``'s dtype and device."""
    out_f, in_f = a.weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(a.weight)
        if bias:
            lin.bias.copy_(a.bias)
    return lin


# ----------------------------------------------------------------------------------------------
# collapse_


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


# ----------------------------------------------------------------------------------------------
# save / load

WEIGHTS, META = "model.safetensors", "lc_collapse.json"
CHECKPOINT_FORMAT = "lc_kernels.collapsed/1"


def _layout(model: nn.Module) -> dict[str, int]:
    """site path -> slopes per joint (1, or the width when per channel), for rebuilding."""
    layout = {}
    for plan in getattr(model, "_lc_plans", []):
        for sp in plan.sites:
            layout.setdefault(sp.path, max(len(j.alpha) for j in sp.joints))
    for site in find_sites(model):
        layout.setdefault(site.path, max(a.num_parameters for a in site.acts if a is not None))
    return layout


def save_collapsed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights (safetensors) and how to rebuild it (JSON) into directory ``path``.

    The JSON holds every plan ``collapse_`` applied to the model, in order, and which sites
    ``prepare_`` converted; :func:`load_collapsed` replays them onto a freshly built model.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_collapsed expects an nn.Module, got {type(model).__name__}")
    layout = _layout(model)
    if not layout:
        raise ValueError("the model has no LayerCollapse sites: run prepare_ (and collapse_) before saving")
    os.makedirs(path, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:  # tied weights are stored once
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "lc_kernels_version": __version__,
        "prepared": layout,
        "aliases": aliases,
        "plans": [p.to_dict() for p in getattr(model, "_lc_plans", [])],
    }
    save_file(tensors, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a ``save_collapsed`` directory; errors name the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, w_path = os.path.join(path, META), os.path.join(path, WEIGHTS)
    for p in (meta_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p} is missing; expected a directory written by save_collapsed")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt (not JSON: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} has format {got!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated: {e}") from e
    return meta, tensors


def load_collapsed(model: nn.Module, path: str | os.PathLike) -> CollapsePlan | None:
    """Rebuild a collapsed model saved by :func:`save_collapsed` onto a fresh original ``model``.

    ``model`` is the architecture as originally built (or already prepared). The checkpoint is
    validated against a copy first; on any mismatch the error names the site and what differs
    and ``model`` is left unchanged. Returns the last plan applied (None for a prepared,
    uncollapsed checkpoint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_collapsed expects an nn.Module, got {type(model).__name__}")
    meta, tensors = read_checkpoint(path)
    try:
        plans = [CollapsePlan.from_dict(d) for d in meta["plans"]]
        layout = {str(k): int(v) for k, v in meta["prepared"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{os.path.join(path, META)} is corrupt: {e}") from e
    trial = copy.deepcopy(model)
    rebuild_(trial, plans, layout)
    state = _state_from_file(trial, tensors, meta.get("aliases", {}))
    rebuild_(model, plans, layout)  # validated on the copy: the same steps cannot fail now
    model.load_state_dict(state)
    return plans[-1] if plans else None


def rebuild_(model: nn.Module, plans: list[CollapsePlan], layout: dict[str, int]) -> None:
    """Prepare ``model`` as ``layout`` records and replay the plans' structure (not weights)."""
    if not any(isinstance(m, (LCFusedMLP, LCChain)) for m in model.modules()):
        per_ch = {p for p, n in layout.items() if n > 1}
        got = list(prepare_(model, filter_fn=lambda m, p: p in per_ch, per_channel=True))
        got += prepare_(model, filter_fn=lambda m, p: p in layout and p not in per_ch)
        missing = sorted(set(layout) - set(got))
        if missing:
            raise ValueError(f"checkpoint sites {missing} were not found in this model (it has {sorted(got)}); "
                             "build the same architecture the checkpoint was saved from")
    for plan in plans:
        for sp in plan.sites:
            m = _check_site_matches(model, sp)
            acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
            for act, jp in zip(acts, sp.joints):
                if isinstance(act, CollapsibleActivation) and act.num_parameters != len(jp.alpha):
                    raise ValueError(f"site {sp.path!r}: checkpoint has {len(jp.alpha)} slopes per joint, "
                                     f"the model {act.num_parameters}")
            if sp.changes:
                apply_site(m, sp)
        _record(model, plan)


def _record(model: nn.Module, plan: CollapsePlan) -> None:
    model.__dict__.setdefault("_lc_plans", []).append(plan)


def _state_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    expected = model.state_dict()
    state, problems = {}, []
    for k, v in expected.items():
        src = aliases.get(k, k)
        if src not in tensors:
            problems.append(f"{_site_of(k)}: missing {k}")
        elif tuple(tensors[src].shape) != tuple(v.shape):
            problems.append(f"{_site_of(k)}: {k} has shape {tuple(tensors[src].shape)} in the checkpoint, "
                            f"{tuple(v.shape)} in the model")
        else:
            state[k] = tensors[src]
    extra = sorted(set(tensors) - set(expected) - set(aliases.values()))
    problems += [f"{_site_of(k)}: unexpected {k} in the checkpoint" for k in extra]
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems[:10])
                         + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else ""))
    return state


def _site_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:-2]) or parts[0]
