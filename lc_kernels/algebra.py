"""Pure maths on weights, in float64: affine maps, BatchNorm folding, products, least-squares fits.

Planning uses it for errors, transforms for weights; it changes no model. With BatchNorm
between two Linears (``s = gamma / sqrt(var + eps)``) the eval-mode joint is affine, so it folds
into the neighbouring Linear; a run of Linears with linear joints multiplies into one map
``W = W_q ... W_p``, ``b = W_q(...(W_p b_p ...)) + b_q``. Products are formed in float64 and
cast back once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .nn.activation import CollapsibleActivation
from .nn.mlp import LCFusedMLP, linears_of
from .ops.reference import collapsible_activation


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
# least-squares fits

# Ridge strength relative to the mean diagonal of A^T A: enough to keep the normal equations
# well posed when calibration tokens are few against the width, small enough that the fit
# follows the data; the pull is toward the exact merge, so it never moves away from exactness.
FIT_RIDGE = 1e-3


class NormalEquations:
    """``A^T A`` and ``A^T Y`` for ``A = [x, 1]``, accumulated in float64 over batches (memory O(d^2))."""

    def __init__(self, d_in: int, d_out: int, device: torch.device):
        self.ata = torch.zeros(d_in + 1, d_in + 1, dtype=torch.float64, device=device)
        self.aty = torch.zeros(d_in + 1, d_out, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a = with_ones(x)
        self.ata += a.T @ a
        self.aty += a.T @ y.to(torch.float64)
        self.rows += x.shape[0]


def with_ones(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def affine_matrix(a: Affine) -> torch.Tensor:
    """``a`` as the (d_in + 1, d_out) matrix M with ``[x, 1] @ M = a(x)``."""
    return torch.cat([a.weight.T, a.bias[None, :]], dim=0)


def ridge_fit(ata: torch.Tensor, aty: torch.Tensor, m0: Affine, ridge: float = FIT_RIDGE,
              lam: float | None = None) -> Affine:
    """``argmin ||A M - Y||^2 + lam ||M - M0||^2`` from the normal equations.

    ``M = (A^T A + lam I)^-1 (A^T Y + lam M0)`` with ``lam = ridge * trace(A^T A) / (d + 1)`` unless
    ``lam`` (absolute) is given. Where ``Y = A M0`` (a joint already linear on the data) the solution
    is ``M0`` for any lam, and the fit's residual on the data is never larger than M0's.
    """
    d = ata.shape[0]
    if lam is None:
        lam = ridge * float(torch.diagonal(ata).mean()) if ata.numel() else 0.0
        lam = lam if lam > 0 else 1.0
    m0m = affine_matrix(m0)
    lhs = ata + lam * torch.eye(d, dtype=ata.dtype, device=ata.device)
    m = torch.linalg.solve(lhs, aty + lam * m0m)
    return Affine(m[:-1].T.contiguous(), m[-1].contiguous())


# ----------------------------------------------------------------------------------------------
# a collapsed site as blocks


Act = tuple[str, torch.Tensor]  # (base, alpha float64): sigma_alpha


@dataclass
class LinearBlock:
    """Linears ``first..last`` multiplied into one map (or a single Linear), then ``act_after``."""

    first: int
    last: int
    map: Affine
    act_after: Act | None  # None: no activation (a FACTOR joint, or the site's output)
    changed: bool  # a merged group, or the Linear after a FACTOR joint: fitted with calibration data


@dataclass
class PartialBlock:
    """The groups around a PARTIAL joint: a narrow MLP ``fc2(act(fc1 x))`` plus ``skip(x)``."""

    first: int
    last: int
    fc1: Affine  # kept channels' rows of the first group
    act: Act  # kept channels' slopes
    fc2: Affine  # kept channels' columns of the second group, no bias
    skip: Affine  # the folded channels and every bias: what is fitted
    act_after: Act | None
    joint: int  # the PARTIAL joint (the last Linear of the first group)
    kept: torch.Tensor  # bool per channel of that joint: True = stays nonlinear
    changed: bool = True


Block = LinearBlock | PartialBlock


def _act(acts: list[Act | None], i: int, keep: torch.Tensor | None = None) -> Act | None:
    a = acts[i]
    if a is None:
        return None
    base, alpha = a
    if keep is not None and alpha.numel() > 1:
        alpha = alpha[keep]
    return base, alpha


def exact_blocks(affines: list[Affine], acts: list[Act | None], decisions: list[str],
                 linear_channels: list[list[int] | None]) -> list[Block]:
    """The exact (algebraic) collapse of a site as blocks: MERGE runs multiply, FACTOR drops the
    activation, PARTIAL folds ``linear_channels`` of its joint into a skip around the two groups."""
    n = len(affines)
    groups, p = [], 0
    for q in range(n):
        if q == n - 1 or decisions[q] != "MERGE":
            groups.append((p, q))
            p = q + 1
    maps = []
    for p, q in groups:
        a = affines[p]
        for k in range(p + 1, q + 1):
            a = a.then(affines[k])
        maps.append(a)
    blocks: list[Block] = []
    g, after_factor = 0, False
    while g < len(groups):
        p, q = groups[g]
        joint = decisions[q] if q < n - 1 else None
        if joint == "PARTIAL":
            if g + 1 >= len(groups):
                raise ValueError("a PARTIAL joint needs a Linear after it")
            p2, q2 = groups[g + 1]
            nxt = decisions[q2] if q2 < n - 1 else None
            if nxt == "PARTIAL":
                raise ValueError(f"joints {q} and {q2} are both PARTIAL around one group of Linears; a partial block "
                                 "owns the Linears on both sides of its joint, so adjacent PARTIAL joints cannot "
                                 "both collapse: keep one of them")
            first, second = maps[g], maps[g + 1]
            width = first.weight.shape[0]
            lin = torch.zeros(width, dtype=torch.bool, device=first.weight.device)
            lin[torch.as_tensor(linear_channels[q] or [], dtype=torch.long, device=lin.device)] = True
            keep = ~lin
            w2l = second.weight[:, lin]
            skip = Affine(w2l @ first.weight[lin], second.bias + w2l @ first.bias[lin])
            blocks.append(PartialBlock(
                p, q2, Affine(first.weight[keep], first.bias[keep]), _act(acts, q, keep),
                Affine(second.weight[:, keep], torch.zeros_like(second.bias)), skip,
                _act(acts, q2) if nxt == "KEEP" else None, q, keep))
            after_factor = nxt == "FACTOR"
            g += 2
            continue
        blocks.append(LinearBlock(p, q, maps[g], _act(acts, q) if joint == "KEEP" else None,
                                  changed=q > p or after_factor))
        after_factor = joint == "FACTOR"
        g += 1
    return blocks


def apply_act(z: torch.Tensor, act: Act | None) -> torch.Tensor:
    return z if act is None else collapsible_activation(z, act[0], act[1].to(z.dtype))


def _lin(x: torch.Tensor, a: Affine) -> torch.Tensor:
    return F.linear(x, a.weight.to(x.dtype), a.bias.to(x.dtype))


def block_forward(b: Block, x: torch.Tensor) -> torch.Tensor:
    """One block's output before its ``act_after``, in ``x``'s dtype."""
    if isinstance(b, LinearBlock):
        return _lin(x, b.map)
    h = apply_act(_lin(x, b.fc1), b.act)
    return _lin(h, b.fc2) + _lin(x, b.skip)


def run_blocks(blocks: list[Block], x: torch.Tensor, upto: int | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The collapsed site on ``x`` (float64 unless ``dtype``); with ``upto`` the input of block ``upto``."""
    h = x.to(dtype)
    for b in blocks[:upto]:
        h = apply_act(block_forward(b, h), b.act_after)
    return h


def original_values(affines: list[Affine], acts: list[Act | None], x: torch.Tensor,
                    dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """``[h_0, z_0, z_1, ...]``: the site's input and each Linear's output, uncollapsed (float64
    unless ``dtype``)."""
    h = x.to(dtype)
    out = [h]
    for k, a in enumerate(affines):
        z = _lin(h, a)
        out.append(z)
        h = apply_act(z, acts[k]) if k < len(acts) else z
    return out


# ----------------------------------------------------------------------------------------------
# blocks -> modules


def site_acts(m: nn.Module) -> list[Act | None]:
    """(base, alpha float64) per joint of an LCFusedMLP / LCChain; None where already linear."""
    acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
    return [(a.base, a.alpha.detach().to(torch.float64)) if isinstance(a, CollapsibleActivation) else None
            for a in acts]


def _collapsible(act: Act, like: torch.Tensor, original: nn.Module | None = None) -> CollapsibleActivation:
    base, alpha = act
    if isinstance(original, CollapsibleActivation) and original.num_parameters == alpha.numel():
        return original  # a KEEP joint keeps its module (and the slope's parameter identity)
    new = CollapsibleActivation(base, alpha.numel()).to(like.device, like.dtype)
    with torch.no_grad():
        new.alpha.copy_(alpha)  # from float64 straight to the model's dtype (a float32 init rounded float64 slopes)
    return new


def collapsed_modules(m: nn.Module, blocks: list[Block]) -> dict[str, object]:
    """The children (and ``form``) the site ``m`` holds once ``blocks`` replace it; ``m`` is untouched.

    For an LCFusedMLP: ``{"form", "fc" | "fc1", "fc2", ["act"], ["skip"]}``; for an LCChain:
    ``{"linears", "acts", "norms", "drops", "norm_pre", "skips"}``.
    """
    like = linears_of(m)[0].weight
    if isinstance(m, LCFusedMLP):
        if len(blocks) == 1 and isinstance(blocks[0], LinearBlock):
            return {"form": "merged", "fc": make_linear(blocks[0].map, like)}
        if len(blocks) == 1:
            b = blocks[0]
            return {"form": "partial", "fc1": make_linear(b.fc1, like), "act": _collapsible(b.act, like),
                    "fc2": make_linear(Affine(b.fc2.weight, b.skip.bias), like),
                    "skip": make_linear(Affine(b.skip.weight, b.skip.bias), like, bias=False)}
        if blocks[0].act_after is None:
            return {"form": "factored", "fc1": make_linear(blocks[0].map, like),
                    "fc2": make_linear(blocks[1].map, like)}
        raise ValueError("an LCFusedMLP kept nonlinear has no collapsed form")
    old_acts = list(m.acts)
    lins, acts, skips = [], [], {}
    for k, b in enumerate(blocks):
        last = k == len(blocks) - 1
        if isinstance(b, PartialBlock):
            skips[str(len(lins))] = make_linear(Affine(b.skip.weight, b.skip.bias), like, bias=False)
            lins.append(make_linear(b.fc1, like))
            acts.append(_collapsible(b.act, like))
            lins.append(make_linear(Affine(b.fc2.weight, b.skip.bias), like))
        else:
            lins.append(make_linear(b.map, like))
        if not last:
            acts.append(nn.Identity() if b.act_after is None else _collapsible(b.act_after, like, old_acts[b.last]))
    n = len(acts)
    return {"linears": nn.ModuleList(lins), "acts": nn.ModuleList(acts),
            "norms": nn.ModuleList(nn.Identity() for _ in range(n)),
            "drops": nn.ModuleList(nn.Identity() for _ in range(n)), "norm_pre": [False] * n,
            "skips": nn.ModuleDict(skips) if skips else None}


def install(m: nn.Module, parts: dict[str, object]) -> None:
    """Make ``m`` hold ``parts`` (from :func:`collapsed_modules`) in place, keeping ``m`` itself."""
    if isinstance(m, LCFusedMLP):
        for name in ("fc1", "act", "fc2", "drop", "norm", "fc", "skip"):
            if name in m._modules:
                del m._modules[name]
        m.norm, m.drop = None, None
        for name, v in parts.items():
            setattr(m, name, v)
        return
    for name, v in parts.items():
        if name == "skips" and v is None:
            m._modules.pop("skips", None)
        else:
            setattr(m, name, v)


def replacement(m: nn.Module, parts: dict[str, object]) -> nn.Module:
    """A new module computing what ``m`` computes once ``parts`` are installed (``m`` untouched)."""
    new = copy.copy(m)
    new.__dict__ = dict(m.__dict__)
    for k, v in new.__dict__.items():
        if "hook" in k and isinstance(v, dict):
            new.__dict__[k] = type(v)()  # the original's hooks (a planner's, say) are not the copy's
    new._modules = dict(m._modules)
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    install(new, parts)
    return new
