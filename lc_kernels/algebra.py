"""Pure maths on weights, in float64: affine maps, BatchNorm folding, products, least-squares fits.

Planning uses it for errors, transforms for weights; it changes no model. With BatchNorm
between two Linears (``s = gamma / sqrt(var + eps)``) the eval-mode joint is affine, so it folds
into the neighbouring Linear; a run of Linears with linear joints multiplies into one map
``W = W_q ... W_p``, ``b = W_q(...(W_p b_p ...)) + b_q``. Products are formed in float64 and
cast back once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .nn.mlp import LCFusedMLP, linears_of


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
