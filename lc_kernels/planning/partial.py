"""Classic FFN sites (:class:`~lc_kernels.LCFusedMLP`: ``fc2(act(fc1 x))``) in the fitted planner of
:mod:`~lc_kernels.planning.gated`: one estimator, one allocator, one held-out measurement for both
site kinds; a site kind brings only its view (:class:`ClassicSite`) and its replacement.

A PARTIAL LCFusedMLP keeps ``k`` channels of ``fc1`` / ``act`` and a linear ``skip``:
``y = skip(x) + fc2_K(act(fc1_K x))`` with ``fc2``'s bias as the block's bias, so the joint
least-squares fit of ``[h_K, x, 1] -> y`` (``h = act(fc1 x)``) is exactly ``fc2.weight``,
``skip.weight`` and ``fc2.bias``; with ``K`` empty the fit is the MERGE form's single Linear.

The plan's entries are ordinary LCFusedMLP decisions (PARTIAL with the folded channels, MERGE,
KEEP) and its fits travel as :class:`~lc_kernels.planning.plan.FittedSite` blocks, as the older
classic path's do, so :func:`~lc_kernels.collapse_` installs them and ``save_collapsed`` /
``load_collapsed`` read them back unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra import Affine, LinearBlock, PartialBlock, affine_of, collapsed_modules, replacement
from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCFusedMLP
from ..ops.reference import collapsible_activation
from .gated import plan_partial
from .inputs import Batch
from .layerwise import materialized
from .plan import CollapsePlan, FittedSite, SitePlan, weights_version
from .sites import Site, site_of
from .threshold import build_site_plan

_WEIGHTS = ("alpha", "w1", "b1", "wd", "bd")


def qualifies(site: Site) -> bool:
    """A site the fitted planner serves: an uncollapsed LCFusedMLP with one collapsible activation
    and no BatchNorm between its Linears (chains and norm sites stay on the older path)."""
    m = site.module
    return (isinstance(m, LCFusedMLP) and m.form == "mlp" and m.norm is None
            and isinstance(m.act, CollapsibleActivation))


class ClassicSite:
    """A read-only view of an uncollapsed LCFusedMLP with the interface of
    :class:`~lc_kernels.planning.gated.GatedSite`: widths, cost per kept width, float64 weights on
    demand (``w1``, ``b1``, ``wd`` = ``fc2.weight``, ``bd``, ``alpha``; dropped by :meth:`release`),
    the hidden activations, and the replacement built from a fit."""

    label = "Linear -> act -> Linear"

    def __init__(self, m: LCFusedMLP, path: str):
        self.path, self.module = path, m
        self.d, self.h, self.d_out = m.fc1.in_features, m.fc1.out_features, m.fc2.out_features
        self.base = m.act.base
        self.n_alphas = m.act.num_parameters
        self.dtype = m.fc2.weight.dtype
        self.view = site_of(m, path)
        self._w: dict[str, torch.Tensor] | None = None

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _WEIGHTS:
            if self._w is None:
                with materialized(self.module):
                    self._w = _float64_weights(self.module)
            return self._w[name]
        raise AttributeError(name)

    def release(self) -> None:
        """Drop the float64 copies (they are made again if read)."""
        self._w = None

    def hidden_rows(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """``act(fc1 x)`` of the ``kept`` channels (all when None), computed in ``x``'s dtype (the
        module's), returned in float64."""
        w1, b1, alpha = self.w1, self.b1, self.alpha
        if kept is not None:
            w1, b1 = w1[kept], b1[kept]
            alpha = alpha if alpha.numel() == 1 else alpha[kept]
        dt = x.dtype
        return collapsible_activation(F.linear(x, w1.to(dt), b1.to(dt)), self.base, alpha.to(dt)).double()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(fc1 x)`` in float64, every channel."""
        x = x.to(torch.float64)
        return collapsible_activation(F.linear(x, self.w1, self.b1), self.base, self.alpha)

    def flops(self, kept: int) -> int:
        """FLOPs per token with ``kept`` channels (``h``: uncollapsed; 0: MERGE) plus the skip."""
        if kept >= self.h:
            return 2 * (self.d * self.h + self.h * self.d_out)
        return 2 * (self.d * kept + kept * self.d_out + self.d * self.d_out)

    def params(self, kept: int) -> int:
        if kept >= self.h:
            return sum(p.numel() for p in self.module.parameters())
        narrow = self.d * kept + kept + kept * self.d_out + (kept if self.n_alphas > 1 else 1) if kept else 0
        return narrow + self.d * self.d_out + self.d_out

    def kept_for(self, fraction: float, round_to: int) -> int:
        """Kept channels (a multiple of ``round_to``) for a PARTIAL removing ``fraction`` of the FLOPs."""
        keep = self.flops(self.h) * (1 - fraction) / 2 - self.d * self.d_out
        k = keep / (self.d + self.d_out)
        if round_to > 1:
            k = round_to * round(k / round_to)
        return int(max(0, min(self.h, k)))

    def blocks(self, kept: torch.Tensor, fit: Affine) -> list:
        """The fit as the blocks :func:`~lc_kernels.algebra.collapsed_modules` installs (float64)."""
        k = int(kept.numel())
        if not k:
            return [LinearBlock(0, 1, Affine(fit.weight, fit.bias), None, True)]
        mask = torch.zeros(self.h, dtype=torch.bool, device=kept.device)
        mask[kept] = True
        alpha = self.alpha if self.alpha.numel() == 1 else self.alpha[kept]
        return [PartialBlock(0, 1, Affine(self.w1[kept], self.b1[kept]), (self.base, alpha),
                             Affine(fit.weight[:, :k], torch.zeros_like(fit.bias)),
                             Affine(fit.weight[:, k:], fit.bias), None, 0, mask)]

    def build(self, kept: torch.Tensor, fit: Affine) -> LCFusedMLP:
        """The PARTIAL (``kept`` non-empty) or MERGE replacement, cast once to the site's dtype; the
        site's module is untouched."""
        return replacement(self.module, collapsed_modules(self.module, self.blocks(kept, fit)))

    def site_plan(self, kept: int, channels: torch.Tensor | None, reason: str, error: float | None) -> SitePlan:
        folded = [] if kept >= self.h else list(range(self.h)) if not kept else \
            sorted(set(range(self.h)) - set(channels.tolist()))
        sp = build_site_plan(self.view, [folded], [reason])
        sp.est_error = error if sp.changes else 0.0
        sp.error_source = "calib: fitted, in sequence" if sp.changes else "kept"
        self.release()
        return sp

    def carry(self, rep: LCFusedMLP, channels: torch.Tensor, together: tuple) -> FittedSite:
        """What the plan carries for this site: the installed weights as float64 blocks (exactly the
        module that was measured), the weights' version and the sites fitted with it."""
        return FittedSite(_blocks_of(rep, channels, self.h), weights_version(self.module), together)


def _float64_weights(m: LCFusedMLP) -> dict[str, torch.Tensor]:
    f64 = lambda t: t.detach().to(torch.float64).clone()  # noqa: E731
    w1, w2 = m.fc1.weight, m.fc2.weight
    zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=w1.device)  # noqa: E731
    return {"alpha": f64(m.act.alpha), "w1": f64(w1), "b1": f64(m.fc1.bias) if m.fc1.bias is not None else
            zeros(w1.shape[0]), "wd": f64(w2), "bd": f64(m.fc2.bias) if m.fc2.bias is not None else zeros(w2.shape[0])}


def _blocks_of(rep: LCFusedMLP, channels: torch.Tensor, h: int) -> list:
    if rep.form == "merged":
        return [LinearBlock(0, 1, affine_of(rep.fc), None, True)]
    f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
    mask = torch.zeros(h, dtype=torch.bool, device=rep.fc1.weight.device)
    mask[channels.to(mask.device)] = True
    bias = f64(rep.fc2.bias)
    return [PartialBlock(0, 1, affine_of(rep.fc1), (rep.act.base, f64(rep.act.alpha)),
                         Affine(f64(rep.fc2.weight), torch.zeros_like(bias)), Affine(f64(rep.skip.weight), bias),
                         None, 0, mask)]


def plan_classic(model: nn.Module, sites: list[Site], batches: list[Batch], opts) -> CollapsePlan:
    """The fitted plan of classic sites, made by the gated sites' planner
    (:func:`~lc_kernels.planning.gated.plan_partial`)."""
    return plan_partial(model, [ClassicSite(s.module, s.path) for s in sites], batches, opts)


__all__ = ["ClassicSite", "qualifies", "plan_classic"]
