"""Calibrated errors: exact collapse residuals on real inputs and the measured model-output error.

Collapsing a joint sets its slope to 1 on the folded channels, so in eval semantics (BatchNorm
folded, dropout off) a collapsed site computes its original output plus an exact residual:
for ``sigma_alpha(z) = alpha*z + (1-alpha)*base(z)`` it is ``W2 @ ((1-alpha) * (z - base(z)))``
with ``z = fc1(x)`` after a pre-activation BatchNorm and ``W2`` holding a post-activation one
(:func:`~lc_kernels.algebra.canonical_affines`). A chain re-runs its Linears in float64 to
carry a residual through the joints that stay nonlinear.

The model-output error of a set of collapses is *measured*: the model runs on the calibration
inputs with every collapsed site's output shifted by its residual, computed from the input that
site actually receives. That is the collapsed model's function (up to the rounding of the
merged weights) without touching a weight or copying the model.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra import Affine, canonical_affines
from ..ops.reference import base_activation, collapsible_activation
from .inputs import Batch, ForwardFn, output_norm
from .layerwise import Passes
from .plan import KEEP, PARTIAL, SitePlan
from .sites import Site, joint_width

Chosen = list[list[int]]  # per joint of a site: the channels that become linear


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval semantics (BatchNorm running stats, no dropout) without autograd; restores each module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class SiteMath:
    """A site's eval-mode function in float64: BatchNorm folded, and (base, alpha) per joint."""

    site: Site
    affines: list[Affine]
    acts: list[tuple[str, torch.Tensor] | None]

    @classmethod
    def of(cls, site: Site) -> "SiteMath":
        acts = [None if a is None else (a.base, a.alpha.detach().to(torch.float64)) for a in site.acts]
        return cls(site, canonical_affines(site.module), acts)

    def residual(self, x: torch.Tensor, chosen: Chosen) -> torch.Tensor:
        """Collapsed minus original site output (float64) when the ``chosen`` channels become linear."""
        x = x.to(torch.float64)
        if len(self.affines) == 2:
            (base, alpha), (a1, a2) = self.acts[0], self.affines
            ch = torch.as_tensor(chosen[0], dtype=torch.long, device=a1.weight.device)
            z = F.linear(x, a1.weight[ch], a1.bias[ch])  # only the folded channels contribute
            a = alpha if alpha.numel() == 1 else alpha[ch]
            return F.linear((1 - a) * (z - base_activation(z, base)), a2.weight[:, ch])
        ref = new = x
        for i, aff in enumerate(self.affines):
            ref, new = F.linear(ref, aff.weight, aff.bias), F.linear(new, aff.weight, aff.bias)
            if i == len(self.acts) or self.acts[i] is None:
                continue
            base, alpha = self.acts[i]
            ref, lin = collapsible_activation(ref, base, alpha), new
            new = collapsible_activation(new, base, alpha)
            if chosen[i]:
                ch = torch.as_tensor(chosen[i], dtype=torch.long, device=new.device)
                new[..., ch] = lin[..., ch]
        return new - ref


class Calibration:
    """One eval-mode pass of the model over the calibration inputs.

    Records every site's inputs and output norm and the model's output; then gives the exact
    error of a collapse at its site's output (:meth:`site_error`) and measures the model-output
    error of any set of collapses (:meth:`model_error`). Memory: each site's inputs are kept,
    so a few thousand rows is the intended size.
    """

    def __init__(self, model: nn.Module, sites: list[Site], batches: list[Batch], forward_fn: ForwardFn | None = None):
        self.model, self.batches, self.forward_fn = model, batches, forward_fn
        self.sites = [SiteMath.of(s) for s in sites]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in sites]
        self._y2 = [0.0] * len(sites)
        self._cache: dict[tuple, float] = {}
        self.runner = Passes(model, sites, batches, forward_fn)

        def capture(i: int):
            def observe(x, out, batch):
                # A copy: a later in-place op on the activations must not change what was recorded.
                self.inputs[i].append(batch.rows(x.detach()).clone())
                self._y2[i] += float(batch.rows(out.detach()).to(torch.float64).pow(2).sum())
            return observe

        self.reference = self.runner.run(observe={i: capture(i) for i in range(len(sites))}, outputs=True)
        self.y_norm = output_norm(self.reference)
        self.rows = sum(b.n_rows for b in batches)

    @property
    def passes(self) -> int:
        """Forward passes the budget search made (the capture pass not counted)."""
        return self.runner.count - 1

    def site_error(self, i: int, chosen: Chosen) -> float | None:
        """``||delta|| / ||y_site||`` at site ``i``'s output; None when calib never reaches the site."""
        if not self.inputs[i]:
            return None
        d2 = sum(float(self.sites[i].residual(x, chosen).pow(2).sum()) for x in self.inputs[i])
        return math.sqrt(d2 / self._y2[i]) if self._y2[i] > 0 else (0.0 if d2 == 0 else math.inf)

    def channel_scores(self, i: int) -> torch.Tensor:
        """Per hidden channel of a two-Linear site: ``||W2[:, c]|| * ||r_c||``, its residual's size."""
        (base, alpha), (a1, a2) = self.sites[i].acts[0], self.sites[i].affines
        r2 = torch.zeros(a1.weight.shape[0], dtype=torch.float64, device=a1.weight.device)
        for x in self.inputs[i]:
            z = F.linear(x.to(torch.float64), a1.weight, a1.bias)
            r2 += ((1 - alpha) * (z - base_activation(z, base))).reshape(-1, z.shape[-1]).pow(2).sum(0)
        return r2.sqrt() * a2.weight.norm(dim=0)

    def model_error(self, config: dict[int, Chosen]) -> float:
        """Measured ``||y' - y|| / ||y||`` on calib with the sites in ``config`` collapsed together."""
        config = {i: c for i, c in config.items() if any(c)}
        key = tuple(sorted((i, tuple(map(tuple, c))) for i, c in config.items()))
        if not config:
            return 0.0
        if key in self._cache:
            return self._cache[key]

        def shift(i: int):
            return lambda x, out: out + self.sites[i].residual(x, config[i]).to(out.dtype)

        outs = self.runner.run(shift={i: shift(i) for i in config}, outputs=True)
        d2 = sum(float((o - ref).pow(2).sum()) for o, ref in zip(outs, self.reference))
        self._cache[key] = math.sqrt(d2) / self.y_norm
        return self._cache[key]


def chosen_of(site: Site, sp: SitePlan) -> Chosen:
    """The channels a SitePlan makes linear, per joint (already-linear joints hold none)."""
    out = []
    for i, (act, j) in enumerate(zip(site.acts, sp.joints)):
        if act is None or j.decision == KEEP:
            out.append([])
        elif j.decision == PARTIAL:
            out.append(list(j.linear_channels))
        else:
            out.append(list(range(joint_width(site, i))))
    return out
