"""Fitted collapse of gated FFN sites (:class:`~lc_kernels.nn.gated.LCGatedMLP`): plan, fit, measure.

A gated block ``y = W_d (act(W_g x) * W_u x) + b_d`` has no algebraic merge (at alpha = 1 it is
bilinear), so every form other than KEEP is fitted to calibration data:

* PARTIAL keeps ``k`` channels as a narrower gated MLP and adds a linear skip ``S x + c`` fitted
  jointly with the kept channels' ``W_d`` columns: the least-squares regression of the target on
  ``[h_K, x, 1]`` (``h_c = act(g_c) u_c``);
* LINEAR replaces the block by the fitted affine map (``K`` empty).

The calibration batches are split (:func:`~lc_kernels.planning.inputs.holdout_split`): the last 1/8
is held out of every fit, and every choice below is made by what it measures there, never by an
error on the rows a map was fitted on (with ``h + d + 1`` regressors per site, an in-sample residual
shrinks toward 0 and says little about new text). Planning (:func:`plan_partial`, shared by gated
sites and the classic sites of :mod:`~lc_kernels.planning.partial`) runs streamed passes
(:mod:`~lc_kernels.planning.layerwise`):

1. estimate, on the dense model (:func:`estimate_site`): per site, the Gram matrix of
   ``[x, 1, h]`` over every fit row (float64), the channels ordered by backward elimination with
   compensation (:func:`obs_order`), the ridge picked from a grid and every candidate width's error
   measured on the held-out rows, all from one Cholesky factor per ridge;
2. allocation (:mod:`~lc_kernels.planning.allocate`), with ``target``: whole assignments (one width
   everywhere, a depth schedule, the least summed held-out site error, then search moves) are
   compared by the model's end-to-end error on the held-out rows with the estimate's fits in place
   (:class:`~lc_kernels.planning.layerwise.HeldOut`: next-token KL for a causal LM); the best is
   kept and every one measured is listed in ``plan.allocation``;
3. fit: the chosen widths fitted in sequence on the fit rows, each site on the inputs the
   replacements before it produce, to its own dense function there (``fit="local"``) or to the dense
   model's stream after its block (``fit="global"``); with ``fit=None`` both, and the estimate's own
   fits (each site on its dense inputs), are measured on the held-out rows and the best is kept.

The fitted modules travel with the plan (``plan.fitted``): :func:`~lc_kernels.collapse_` installs
them without calibration data. The plan's measured error is the model's output error with exactly
those modules in place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra import Affine, FIT_RIDGE, ridge_fit, with_ones
from ..nn.gated import LCGatedMLP
from ..ops.reference import collapsible_activation
from .inputs import Batch, ForwardFn
from .allocate import SEARCH_EVALS, Option, choose, lagrangian
from .inputs import holdout_split
from .layerwise import HeldOut, SiteStream, _Measure, materialized, relative_error, replaced_outputs
from .plan import KEEP, LINEAR, PARTIAL, CollapsePlan, JointPlan, SitePlan

FITS = ("local", "global")
# Kept-width candidates per site: where a PARTIAL removes these fractions of the block's FLOPs.
FRACTIONS = tuple(k / 20 for k in range(1, 20))


_WEIGHTS = ("alpha", "wg", "bg", "wu", "bu", "wd", "bd")


class GatedSite:
    """A read-only view of an uncollapsed LCGatedMLP: its widths now, its float64 weights on demand.

    The float64 copies (``wg``, ``bg``, ``wu``, ``bu``, ``wd``, ``bd``, ``alpha``) are made when first
    read and dropped by :meth:`release`: a sweep holds one site's copy at a time, not the depth's.
    """

    def __init__(self, m: LCGatedMLP, path: str):
        self.path, self.module = path, m
        self.d, self.h, self.d_out = m.in_features, m.hidden_features, m.out_features
        self.base = m.act.base
        self.n_alphas = m.act.num_parameters
        self.bias = m.spec()["bias"]
        self.dtype = m.down_proj.weight.dtype  # replacements are cast to it once
        self._w: dict[str, torch.Tensor] | None = None

    @classmethod
    def of(cls, m: LCGatedMLP, path: str) -> "GatedSite":
        return cls(m, path)

    def __getattr__(self, name: str) -> torch.Tensor:
        if name in _WEIGHTS:
            if self._w is None:
                with materialized(self.module):  # offloaded weights are loaded for the copy, then released
                    self._w = _float64_weights(self.module)
            return self._w[name]
        raise AttributeError(name)

    def release(self) -> None:
        """Drop the float64 copies (they are made again if read)."""
        self._w = None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``act(g) * u`` in float64, every channel."""
        x = x.to(torch.float64)
        return collapsible_activation(F.linear(x, self.wg, self.bg), self.base, self.alpha) * F.linear(x, self.wu,
                                                                                                         self.bu)

    def flops(self, kept: int) -> int:
        """FLOPs per token with ``kept`` gated channels (``h``: uncollapsed; 0: LINEAR) plus the skip."""
        if kept >= self.h:
            return 2 * (2 * self.d * self.h + self.h * self.d_out)
        return 2 * (2 * self.d * kept + kept * self.d_out + self.d * self.d_out)

    def params(self, kept: int) -> int:
        if kept >= self.h:
            return 2 * self.d * self.h + self.h * self.d_out + (2 * self.h + self.d_out if self.bias else 0) \
                + self.n_alphas
        gated = 2 * self.d * kept + (2 * kept if self.bias else 0) + kept * self.d_out + (self.n_alphas > 1) * kept \
            + (self.n_alphas == 1)
        return (gated if kept else 0) + self.d * self.d_out + self.d_out

    def kept_for(self, fraction: float, round_to: int) -> int:
        """Kept channels (a multiple of ``round_to``) for a PARTIAL removing ``fraction`` of the FLOPs."""
        keep = self.flops(self.h) * (1 - fraction) / 2 - self.d * self.d_out
        k = keep / (2 * self.d + self.d_out)
        if round_to > 1:
            k = round_to * round(k / round_to)
        return int(max(0, min(self.h, k)))

    # The site interface :func:`plan_partial` calls (planning/partial.py's ClassicSite has the same).
    label = "gated"

    def build(self, kept: torch.Tensor, fit: Affine) -> LCGatedMLP:
        return build_module(self, kept, fit)

    def site_plan(self, kept: int, channels: torch.Tensor | None, reason: str, error: float | None) -> SitePlan:
        return gated_site_plan(self, kept, channels, reason, error)

    def carry(self, rep: LCGatedMLP, channels: torch.Tensor, together: tuple) -> LCGatedMLP:
        return rep


def _float64_weights(m: LCGatedMLP) -> dict[str, torch.Tensor]:
    f64 = lambda t: t.detach().to(torch.float64).clone()  # noqa: E731
    if m.packed:
        w, b = m.gate_up_proj.weight, m.gate_up_proj.bias
        h = w.shape[0] // 2
        wg, wu = w[:h], w[h:]
        bg, bu = (b[:h], b[h:]) if b is not None else (None, None)
    else:
        wg, wu, bg, bu = m.gate_proj.weight, m.up_proj.weight, m.gate_proj.bias, m.up_proj.bias
    h, dev = wg.shape[0], wg.device
    zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=dev)  # noqa: E731
    bd = m.down_proj.bias
    return {"alpha": f64(m.act.alpha), "wg": f64(wg), "bg": f64(bg) if bg is not None else zeros(h), "wu": f64(wu),
            "bu": f64(bu) if bu is not None else zeros(h), "wd": f64(m.down_proj.weight),
            "bd": f64(bd) if bd is not None else zeros(m.out_features)}


class GatedStats:
    """Least-squares statistics of one site on the rows it saw: its inputs ``x`` and the target ``T``.

    Screening needs only ``[x, 1]^T [x, 1]``, ``[x, 1]^T h`` and ``sum h^2`` per channel (which
    channels a linear map explains); a fit needs the Gram matrix of ``[h_K, x, 1]`` for the kept
    channels only, built from the stored rows (one block's activations) when they are known.
    """

    def __init__(self, site: GatedSite):
        self.site = site
        self.xs: list[torch.Tensor] = []
        self.ts: list[torch.Tensor] = []
        self.rows = 0
        self.stream2 = 0.0  # ||stream after the block||^2 on the same rows
        self._screen: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._order: torch.Tensor | None = None

    def add(self, x: torch.Tensor, target: torch.Tensor, stream: torch.Tensor | None = None) -> None:
        """Rows of the site's input and of what its replacement should output there."""
        self.xs.append(x.detach())
        self.ts.append(target.detach())
        if stream is not None:
            self.stream2 += float(stream.detach().to(torch.float64).pow(2).sum())
        self.rows += x.shape[0]
        self._screen = self._order = None

    def _hidden(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """``act(g) * u`` of the ``kept`` channels (all when None), computed in the module's dtype."""
        s = self.site
        if not isinstance(s, GatedSite):  # another site kind (planning/partial.py): its own hidden activations
            return s.hidden_rows(x, kept)
        wg, wu, bg, bu = s.wg, s.wu, s.bg, s.bu
        if kept is not None:
            wg, wu, bg, bu = wg[kept], wu[kept], bg[kept], bu[kept]
        dt = x.dtype
        g = F.linear(x, wg.to(dt), bg.to(dt))
        return (collapsible_activation(g, s.base, s.alpha.to(dt) if s.alpha.numel() == 1 or kept is None
                                       else s.alpha[kept].to(dt)) * F.linear(x, wu.to(dt), bu.to(dt))).double()

    def screen(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[x,1]^T [x,1]``, ``[x,1]^T h`` and per-channel ``sum h^2`` (float64)."""
        if self._screen is None:
            s = self.site
            dev = s.wd.device
            gxx = torch.zeros(s.d + 1, s.d + 1, dtype=torch.float64, device=dev)
            gxh = torch.zeros(s.d + 1, s.h, dtype=torch.float64, device=dev)
            hh = torch.zeros(s.h, dtype=torch.float64, device=dev)
            for x in self.xs:
                a, h = with_ones(x), self._hidden(x)
                gxx += a.T @ a
                gxh += a.T @ h
                hh += h.pow(2).sum(0)
            self._screen = gxx, gxh, hh
        return self._screen

    def scores(self, ridge: float = FIT_RIDGE) -> torch.Tensor:
        """Per channel: the part of ``h_c`` a linear map of ``[x, 1]`` leaves unexplained (norm), times
        ``||W_d[:, c]||``. Channels with score 0 fold into the skip at no cost."""
        gxx, gxh, hh = self.screen()
        lam = ridge * float(torch.diagonal(gxx).mean()) or 1.0
        sol = torch.linalg.solve(gxx + lam * torch.eye(gxx.shape[0], dtype=gxx.dtype, device=gxx.device), gxh)
        r2 = (hh - (gxh * sol).sum(0)).clamp_min(0)
        return r2.sqrt() * self.site.wd.norm(dim=0)

    def order(self) -> torch.Tensor:
        """Channels from most to least worth keeping."""
        if self._order is None:
            self._order = self.scores().argsort(descending=True)
        return self._order

    def normal_equations(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``A^T A``, ``A^T T`` and ``||T||^2`` for ``A = [h_kept, x, 1]``."""
        s = self.site
        n = int(kept.numel()) + s.d + 1
        ata = torch.zeros(n, n, dtype=torch.float64, device=s.wd.device)
        aty = torch.zeros(n, s.d_out, dtype=torch.float64, device=s.wd.device)
        tt = 0.0
        for x, t in zip(self.xs, self.ts):
            a = torch.cat([self._hidden(x, kept), with_ones(x)], dim=1)
            t = t.to(torch.float64)
            ata += a.T @ a
            aty += a.T @ t
            tt += float(t.pow(2).sum())
        return ata, aty, tt

    def fit(self, kept: torch.Tensor, ridge: float = FIT_RIDGE, lam: float | None = None, prior: bool = True
            ) -> tuple[Affine, float, float]:
        """The joint least-squares fit on ``[h_K, x, 1]`` (kept channels ``kept``, sorted), pulled toward
        the dense block's own weights (``prior``) or toward 0 (the estimate's fits, which every width
        shares), with ridge ``lam`` (absolute) when given; returns the map (``weight`` =
        ``[W_d', S]``), its squared error on the rows and ``||T||^2``."""
        s = self.site
        kept = kept.to(s.wd.device)
        ata, aty, tt = self.normal_equations(kept)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=s.wd.device)  # noqa: E731
        prior = Affine(torch.cat([s.wd[:, kept], z(s.d_out, s.d)], dim=1), s.bd.clone()) if prior else \
            Affine(z(s.d_out, int(kept.numel()) + s.d), z(s.d_out))
        fit = ridge_fit(ata, aty, prior, ridge, lam)
        m = torch.cat([fit.weight.T, fit.bias[None]])
        err2 = tt - 2 * float((m * aty).sum()) + float((m * (ata @ m)).sum())
        return fit, max(err2, 0.0), tt

    def prefix_errors(self, widths: list[int], ridge: float = FIT_RIDGE) -> dict[int, float]:
        """Squared error of the fit keeping the first ``k`` channels of :meth:`order`, for every ``k`` in
        ``widths``, from one Cholesky factorisation: with the columns ordered ``[x, 1, h_order]``, the
        factor of each leading block is the leading block of the full factor, and the least-squares
        residual of a prefix is ``||T||^2 - ||L^-1 A^T T||^2`` over that prefix (ridge toward 0: an
        estimate that ranks widths)."""
        s = self.site
        n, d1 = s.d + 1 + s.h, s.d + 1
        g = torch.zeros(n, n, dtype=torch.float64, device=s.wd.device)
        aty = torch.zeros(n, s.d_out, dtype=torch.float64, device=s.wd.device)
        tt = 0.0
        for x, t in zip(self.xs, self.ts):
            a = torch.cat([with_ones(x), self._hidden(x)], dim=1)
            t = t.to(torch.float64)
            g += a.T @ a
            aty += a.T @ t
            tt += float(t.pow(2).sum())
        if self._screen is None:  # the same rows: the screening statistics are blocks of this Gram
            self._screen = g[:d1, :d1].clone(), g[:d1, d1:].clone(), torch.diagonal(g)[d1:].clone()
        perm = torch.cat([torch.arange(d1, device=g.device), d1 + self.order().to(g.device)])
        g, aty = g[perm][:, perm], aty[perm]
        lam = ridge * float(torch.diagonal(g).mean()) or 1.0
        chol = torch.linalg.cholesky(g + lam * torch.eye(n, dtype=g.dtype, device=g.device))
        z2 = torch.linalg.solve_triangular(chol, aty, upper=False).pow(2).sum(1).cumsum(0)
        return {k: max(tt - float(z2[s.d + k]), 0.0) for k in widths}


def build_module(site: GatedSite, kept: torch.Tensor, fit: Affine) -> LCGatedMLP:
    """The PARTIAL (``kept`` non-empty) or LINEAR replacement of ``site``, cast once to its dtype."""
    like = torch.empty(0, dtype=site.dtype, device=site.wd.device)
    k = int(kept.numel())
    spec = {**site.module.spec(), "form": "partial" if k else "linear", "kept": k, "rank": None}
    if k and site.alpha.numel() == 1:
        spec["num_alphas"] = 1
    elif k:
        spec["num_alphas"] = k
    m = LCGatedMLP.empty(spec, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        if k:
            w = torch.cat([site.wg[kept], site.wu[kept]])
            m.gate_up_proj.weight.copy_(w)
            if m.gate_up_proj.bias is not None:
                m.gate_up_proj.bias.copy_(torch.cat([site.bg[kept], site.bu[kept]]))
            m.act.alpha.copy_(site.alpha if site.alpha.numel() == 1 else site.alpha[kept])
            m.down_proj.weight.copy_(fit.weight[:, :k])
            m.down_proj.bias.copy_(fit.bias)
            m.skip.weight.copy_(fit.weight[:, k:])
        else:
            m.skip.weight.copy_(fit.weight)
            m.skip.bias.copy_(fit.bias)
    m.train(site.module.training)
    return m


# ----------------------------------------------------------------------------------------------
# planning


@dataclass
class SiteEstimate:
    """One site's candidates on its dense inputs, fitted on the fit rows and measured on held-out rows.

    The columns are ordered ``[x, 1, h_order]`` (channels most worth keeping first), so the Cholesky
    factor ``L`` of the ridge-regularised Gram matrix serves every kept width at once: the leading
    block of ``L`` is the factor of each prefix, the width-``k`` fit is ``L_k^-T z_k`` with
    ``z = L^-1 A^T Y``, and the held-out predictions of every width come from one triangular solve of
    the held-out rows (``A_v L^-T``), accumulated prefix by prefix.
    """

    order: torch.Tensor  # channels, most worth keeping first
    lam: float  # absolute ridge, chosen on the held-out rows
    chol: torch.Tensor  # L, (d + 1 + h)^2
    z: torch.Tensor  # L^-1 A^T Y
    val_err2: dict[int, float]  # held-out squared error per kept width (out of sample)
    fit_err2: dict[int, float]  # the same on the fit rows (in sample: for the report and the tests)
    val_tt: float  # ||Y||^2 on the held-out rows
    weight: float  # 1 / ||stream||^2: how a site error shows in the stream it is added to

    def solve(self, site: GatedSite, k: int) -> tuple[torch.Tensor, Affine]:
        """The kept channels (sorted) and the fitted map of width ``k`` (``[W_d', S]``, bias)."""
        n = site.d + 1 + k
        m = torch.linalg.solve_triangular(self.chol[:n, :n].T, self.z[:n], upper=True)  # rows: [x, 1, h_order[:k]]
        ch = self.order[:k]
        srt = ch.argsort()
        w_h = m[site.d + 1:][srt].T
        w = torch.cat([w_h, m[:site.d].T], dim=1)
        return ch[srt], Affine(w, m[site.d].clone())


# Ridge grid (times the mean diagonal of the Gram matrix), chosen per site on the held-out rows.
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)
# Ridge of the Hessian the channel elimination works on, and how many channels leave per step.
OBS_RIDGE = 1e-3
OBS_STEPS = 64


def obs_order(g: torch.Tensor, aty: torch.Tensor, lam: float, d1: int) -> torch.Tensor:
    """Gated channels from most to least worth keeping, by backward elimination with compensation
    (optimal brain surgeon on the joint least-squares fit of ``[x, 1, h] -> Y``, SlimGPT-style):
    with ``H = G + lam I`` and the fit ``M = H^-1 A^T Y``, removing channel ``j`` and refitting the
    rest raises the squared error by ``||M_j||^2 / [H^-1]_jj``; the cheapest ``h / OBS_STEPS``
    channels leave together, ``M`` and ``H^-1`` are updated for their removal, and so on. The columns
    of ``x`` (the skip) never leave, so a channel the skip already explains goes early."""
    n = g.shape[0]
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=g.dtype, device=g.device))
    # Only the channels' rows and columns of H^-1 and M enter the costs and their updates: work on
    # that block, shrunk as channels leave (a full (d + 1 + h)^2 rank update per step was 6.4 of
    # the 9.3 s per SmolLM2 site on one thread; shrinking blocks cost a third of the FLOPs).
    hc = hinv[d1:, d1:]
    hc = (hc + hc.T) / 2
    mc = hinv[d1:] @ aty
    del hinv
    ids = torch.arange(n - d1, device=g.device)
    step = max(1, math.ceil((n - d1) / OBS_STEPS))
    removed: list[torch.Tensor] = []
    while ids.numel():
        cost = mc.pow(2).sum(1) / torch.diagonal(hc).clamp_min(1e-300)
        sel = cost.argsort()[:step]
        removed.append(ids[sel].flip(0))  # within a step, the costliest to remove first
        keep = torch.ones(ids.numel(), dtype=torch.bool, device=g.device)
        keep[sel] = False
        if not bool(keep.any()):
            break
        kr = hc[keep][:, sel]
        hss = hc[sel][:, sel]
        sol = torch.linalg.solve(hss, torch.cat([mc[sel], kr.T], dim=1))
        mc = torch.addmm(mc[keep], kr, sol[:, :mc.shape[1]], alpha=-1)
        hc = torch.addmm(hc[keep][:, keep], kr, sol[:, mc.shape[1]:], alpha=-1)
        ids = ids[keep]
    return torch.cat(removed[::-1]) if removed else torch.zeros(0, dtype=torch.long, device=g.device)


def estimate_site(s: GatedSite, fit_rows: list, val_rows: list, widths: list[int],
                  ridges: tuple[float, ...] = RIDGES, select: str = "obs") -> SiteEstimate:
    """Normal equations of ``[x, 1, h] -> y`` over every fit row, channels ranked, and each ridge of
    ``ridges`` and kept width measured on ``val_rows`` (each a list of ``(x, y)``); without held-out
    rows the errors are in-sample and the ridge is ``FIT_RIDGE``."""
    d1, n = s.d + 1, s.d + 1 + s.h
    dev = s.wd.device
    g = torch.zeros(n, n, dtype=torch.float64, device=dev)
    aty = torch.zeros(n, s.d_out, dtype=torch.float64, device=dev)
    tt, stream2 = 0.0, 0.0
    st = GatedStats(s)
    for x, y, stream in fit_rows:
        a = torch.cat([with_ones(x), st._hidden(x)], dim=1)
        yd = y.to(torch.float64)
        g += a.T @ a
        aty += a.T @ yd
        tt += float(yd.pow(2).sum())
        if stream is not None:
            stream2 += float(stream.to(torch.float64).pow(2).sum())
    st._screen = g[:d1, :d1], g[:d1, d1:], torch.diagonal(g)[d1:]
    if select == "obs":
        order = obs_order(g, aty, OBS_RIDGE * (float(torch.diagonal(g).mean()) or 1.0), d1)
    else:
        order = st.scores().argsort(descending=True)
    perm = torch.cat([torch.arange(d1, device=dev), d1 + order.to(dev)])
    g, aty = g[perm][:, perm], aty[perm]
    av = [torch.cat([with_ones(x), st._hidden(x)], dim=1)[:, perm] for x, _ in val_rows]
    yv = [y.to(torch.float64) for _, y in val_rows]
    val_tt = sum(float(y.pow(2).sum()) for y in yv)
    mean_diag = float(torch.diagonal(g).mean()) or 1.0
    asc = sorted(set(widths))
    best = None
    for r in (ridges if av else (FIT_RIDGE,)):
        lam = r * mean_diag
        chol = torch.linalg.cholesky(g + lam * torch.eye(n, dtype=g.dtype, device=dev))
        z = torch.linalg.solve_triangular(chol, aty, upper=False)
        z2 = z.pow(2).sum(1).cumsum(0)
        fit_err = {k: max(tt - float(z2[s.d + k]), 0.0) for k in asc}
        if av:
            val_err = {k: 0.0 for k in asc}
            for a, y in zip(av, yv):
                b = torch.linalg.solve_triangular(chol, a.T, upper=False).T  # A_v L^-T
                pred, at = torch.zeros_like(y), 0
                for k in asc:
                    pred += b[:, at:d1 + k] @ z[at:d1 + k]
                    at = d1 + k
                    val_err[k] += float((y - pred).pow(2).sum())
        else:
            val_err = dict(fit_err)
        score = sum(val_err.values())
        if best is None or score < best[0]:
            best = (score, lam, chol, z, val_err, fit_err)
    _, lam, chol, z, val_err, fit_err = best
    weight = 1.0 / stream2 if stream2 > 0 else (1.0 / tt if tt > 0 else 1.0)
    return SiteEstimate(order, lam, chol, z, val_err, fit_err, val_tt if av else tt, weight)


def candidate_widths(s: GatedSite, round_to: int) -> list[int]:
    """Kept widths worth measuring, widest first: KEEP, PARTIALs removing 5%, 10%, ... of the FLOPs, LINEAR."""
    widths = sorted({s.kept_for(f, round_to) for f in FRACTIONS} | {0}, reverse=True)
    return [s.h] + [k for k in widths if k < s.h and s.flops(k) < s.flops(s.h)]


def fit_plan(engine: SiteStream, kept: list[int], fit: str, ridge: float = FIT_RIDGE, *,
             orders: dict[int, torch.Tensor] | None = None, lams: dict[int, float] | None = None,
             n_fit: int | None = None, prior: bool = True, sequential: bool = True
             ) -> tuple[dict[int, LCGatedMLP], dict[int, torch.Tensor], dict[int, float]]:
    """Fit the chosen widths in sequence; returns the replacement modules, each site's kept
    channels and its relative output error (against its target) on the held-out batches (on the fit
    rows when none are held out). ``orders`` and
    ``lams`` (per site: channels most worth keeping first, absolute ridge) come from the estimate;
    without them each site ranks its channels on the rows it sees. Only the first ``n_fit`` batches
    are fitted on (the rest are held out). ``prior``: ridge toward the dense weights (else toward 0);
    ``sequential=False`` fits every site on the dense model's inputs (nothing is replaced during the
    sweep)."""
    fitted, channels, errors = {}, {}, {}
    global_target = fit == "global" and engine.blocks is not None

    def visit(i, rows):
        s = engine.sites[i]
        k = kept[i]
        if k >= s.h:
            return None
        held = rows[n_fit:] if n_fit is not None else []
        rows = rows[:n_fit] if n_fit is not None else rows
        explicit = global_target and all(t is not None for _, _, t, _ in rows + held)
        st = GatedStats(s)
        for x, y, t, _ in rows:
            st.add(x, t if explicit else y)
        order = orders[i] if orders is not None and i in orders else st.order()
        ch = order[:k].sort().values.to(s.wd.device) if k else torch.zeros(0, dtype=torch.long, device=s.wd.device)
        m, e2, tt = st.fit(ch, ridge, None if lams is None else lams.get(i), prior)
        fitted[i], channels[i] = s.build(ch, m), ch
        s.release()
        if held:  # the site's error on rows it was not fitted on
            with torch.no_grad():
                e2 = sum(float((fitted[i](x).double() - (t if explicit else y).double()).pow(2).sum())
                         for x, y, t, _ in held)
            tt = sum(float((t if explicit else y).double().pow(2).sum()) for x, y, t, _ in held)
        errors[i] = math.sqrt(e2 / tt) if tt > 0 else 0.0
        return fitted[i] if sequential else None

    engine.sweep(visit, global_target=global_target)
    return fitted, channels, errors


def measure(model: nn.Module, sites: list[GatedSite], batches: list[Batch], forward_fn: ForwardFn | None,
            fitted: dict[int, LCGatedMLP], reference: list[torch.Tensor] | None = None
            ) -> tuple[float, list[torch.Tensor]]:
    """Model-output error with ``fitted`` in place of their sites (and the dense reference)."""
    meas = _Measure(model, forward_fn)
    if reference is None:
        reference = meas.run(batches)
    outs = replaced_outputs(meas, {i: s.module for i, s in enumerate(sites)}, batches, fitted)
    return relative_error(outs, reference), reference


def gated_site_plan(s: GatedSite, kept: int, channels: torch.Tensor | None, reason: str,
                    error: float | None) -> SitePlan:
    decision = KEEP if kept >= s.h else PARTIAL if kept else LINEAR
    folded = None
    if decision == PARTIAL and channels is not None:
        keep = set(channels.tolist())
        folded = [c for c in range(s.h) if c not in keep]
    joint = JointPlan(s.alpha.float().cpu().tolist(), decision, reason, folded)
    s.release()
    return SitePlan(s.path, "LCGatedMLP", [s.d, s.h, s.d_out], [joint], s.params(s.h), s.params(kept),
                    s.flops(s.h), s.flops(kept), error if decision != KEEP else 0.0,
                    "calib: fitted, in sequence" if decision != KEEP else "kept")


def build_channels(m: nn.Module, order: torch.Tensor) -> torch.Tensor:
    """The kept channels (sorted) of a replacement built from the first ``m.kept_features`` of ``order``
    (an LCFusedMLP: its ``fc1`` rows when PARTIAL, none when merged)."""
    k = m.kept_features if isinstance(m, LCGatedMLP) else m.fc1.out_features if m.form == "partial" else 0
    return order[:k].sort().values


def estimate(engine: SiteStream, widths: list[list[int]], n_fit: int) -> list[SiteEstimate]:
    """Every site's :class:`SiteEstimate` on the dense model's inputs (one streamed pass): the first
    ``n_fit`` batches are fitted on, the rest measure."""
    ests: list[SiteEstimate | None] = [None] * len(engine.sites)

    def visit(i, rows):
        s = engine.sites[i]
        fit_rows = [(x, y, stream) for x, y, _, stream in rows[:n_fit]]
        val_rows = [(x, y) for x, y, _, _ in rows[n_fit:]]
        ests[i] = estimate_site(s, fit_rows, val_rows, widths[i][1:])
        s.release()
        return None

    engine.sweep(visit)
    return ests


def options(sites: list[GatedSite], widths: list[list[int]], ests: list[SiteEstimate]) -> list[list[Option]]:
    """Per site the allocator's candidates, widest (KEEP, error 0) first, each PARTIAL / LINEAR with its
    weighted held-out error; LINEAR only where it measures better than the narrowest PARTIAL."""
    out = []
    for s, ws, e in zip(sites, widths, ests):
        opts = [Option(s.h, s.flops(s.h), 0.0, 0.0)] + [
            Option(k, s.flops(k), e.weight * e.val_err2[k], e.weight * e.fit_err2[k]) for k in ws[1:]]
        partial = [o for o in opts[1:] if 0 < o.kept]
        if partial and opts[-1].kept == 0 and opts[-1].err > partial[-1].err:
            opts = opts[:-1]
        out.append(opts)
    return out


def plan_gated(model: nn.Module, modules: list[tuple[str, LCGatedMLP]], batches: list[Batch], opts,
               engine: str = "auto") -> CollapsePlan:
    """The fitted plan for gated sites (see the module docs); ``plan.fitted`` holds the replacements."""
    return plan_partial(model, [GatedSite.of(m, p) for p, m in modules], batches, opts, engine)


def plan_partial(model: nn.Module, sites: list, batches: list[Batch], opts, engine: str = "auto") -> CollapsePlan:
    """The fitted plan for sites whose forms are a narrower block plus a fitted linear skip: ``sites``
    are views with GatedSite's interface (:class:`GatedSite`, planning/partial.py's ``ClassicSite``);
    ``plan.fitted`` holds what each site's ``carry`` makes of its replacement."""
    fit_b, val_b = holdout_split(batches, forward_fn=opts.forward_fn)
    held = bool(val_b)
    eng = SiteStream(model, sites, fit_b + val_b, opts.forward_fn, engine)
    n_fit = len(fit_b)
    total = sum(s.flops(s.h) for s in sites)
    allocation = getattr(opts, "allocation", None) or "auto"
    evals = getattr(opts, "allocation_evals", None)
    tried: list = []
    val = None
    orders = lams = independent = None
    if opts.force:
        kept = [0] * len(sites)
        reasons = ["force: replaced by the fitted linear map"] * len(sites)
    else:
        widths = [candidate_widths(s, opts.round_to) for s in sites]
        ests = estimate(eng, widths, n_fit)
        orders = {i: e.order for i, e in enumerate(ests)}
        lams = {i: e.lam for i, e in enumerate(ests)}
        cands = options(sites, widths, ests)
        if opts.target is not None:
            val = HeldOut(model, sites, val_b if held else fit_b, opts.forward_fn)
            cache: dict[tuple[int, int], LCGatedMLP] = {}

            def module(i: int, k: int) -> LCGatedMLP:
                if (i, k) not in cache:
                    ch, m = ests[i].solve(sites[i], k)
                    cache[(i, k)] = sites[i].build(ch, m)
                    sites[i].release()
                return cache[(i, k)]

            def evaluate(sel: list[int]) -> float:
                return val({i: module(i, cands[i][c].kept) for i, c in enumerate(sel) if c > 0})

            sel, tried = choose(cands, opts.target, evaluate, allocation=allocation,
                                evals=SEARCH_EVALS if evals is None else evals)
            chosen = [cs[c].kept for cs, c in zip(cands, sel)]
            independent = ({i: module(i, k) for i, k in enumerate(chosen) if k < sites[i].h},
                           min(a.error for a in tried),
                           {i: math.sqrt(ests[i].val_err2[k] / ests[i].val_tt) if ests[i].val_tt > 0 else 0.0
                            for i, k in enumerate(chosen) if k < sites[i].h})
            cache.clear()
        else:
            sel = lagrangian(cands, None, opts.max_error ** 2)
        kept = [cs[c].kept for cs, c in zip(cands, sel)]
        del ests
        reasons = ["chosen by the budget" if k < s.h else "kept by the budget" for k, s in zip(kept, sites)]
    # The chosen widths, fitted in sequence on the fit rows (each site on the inputs the replacements
    # before it produce); with fit=None both targets are fitted and the held-out rows pick one.
    fits = [opts.fit_target] if getattr(opts, "fit", None) in ("local", "global") or val is None else ["local",
                                                                                                        "global"]
    notes = []
    fit_errors: dict[str, float] = {}
    best = None
    inputs = "sequential"
    for fit in fits:
        for attempt in range(4):
            fitted, channels, errors = fit_plan(eng, kept, fit, orders=orders, lams=lams, n_fit=n_fit, prior=False)
            if opts.max_error is None or opts.target is not None or not fitted:
                break
            measured, _ = measure(model, sites, fit_b + val_b, opts.forward_fn, fitted, eng.reference)
            if measured <= opts.max_error:
                break
            # The estimate ranks; the sequential fit measures. Over the bound: give back the site whose
            # output moved most, and fit again.
            worst = max(errors, key=errors.get)
            kept[worst] = sites[worst].h
            reasons[worst] = f"kept: fitted in sequence the plan measured {measured:.3e} > max_error {opts.max_error:g}"
            notes.append(f"{sites[worst].path} kept after the sequential fit measured {measured:.3e}")
        score = val(fitted) if val is not None and (len(fits) > 1 or independent is not None) else 0.0
        fit_errors[fit] = score
        if best is None or score < best[0]:
            best = (score, fit, fitted, channels, errors)
    if independent is not None and getattr(opts, "fit", None) != "global":
        # the search's own fits (each site on its dense inputs, local target): kept when they measure best
        mods, score, errs = independent
        fit_errors["local, dense inputs"] = score
        if score < best[0]:
            chs = {i: build_channels(m, orders[i]) for i, m in mods.items()}
            best = (score, "local", mods, chs, errs)
            inputs = "dense"
            notes.append("fits: each site fitted on the dense model's inputs (they measured best on the held-out rows)")
    _, fit, fitted, channels, errors = best[:5]
    measured, _ = measure(model, sites, fit_b + val_b, opts.forward_fn, fitted, eng.reference)
    plan = CollapsePlan([s.site_plan(k, channels.get(i), r, errors.get(i))
                         for i, (s, k, r) in enumerate(zip(sites, kept, reasons))],
                        opts.tol, opts.objective, forced=opts.force, max_error=opts.max_error, target=opts.target,
                        search="measured" if tried else "lagrangian", fit=True, round_to=opts.round_to)
    plan.allocation = [a.as_dict() for a in tried]
    together = tuple(sorted(sites[i].path for i in fitted))
    plan.fitted = {sites[i].path: sites[i].carry(m, channels[i], together) for i, m in fitted.items()}
    plan.measured_error = measured
    plan.calib_rows = sum(b.n_rows for b in batches)
    plan.fit_target = fit
    plan.fit_inputs = inputs
    if lams is not None:
        for i, sp in enumerate(plan.sites):
            sp.fit_ridge = lams[i] if sp.changes else None
    saved = total - plan.flops_after
    metric = "mean KL per token of the next-token distributions" if val is not None and val.kind == "kl" else \
        "||dy|| / ||y|| at the model output"
    val_rows = sum(b.n_rows for b in val_b)
    plan.notes = [
        f"est. error: ||delta|| / ||target|| at each {sites[0].label} site's output on its "
        f"{sum(b.n_rows for b in fit_b)} fit "
        f"rows, the site fitted " + ("on the dense model's inputs" if inputs == "dense" else "in sequence") + f" ({fit} target: " + ("its own dense function on its current inputs)"
                                                            if fit == "local" else
                                                            "the dense model's stream after its block)"),
        f"measured model-output error ||dy|| / ||y|| on all {plan.calib_rows} calibration rows, the planned sites "
        f"replaced together: {measured:.3e}" + (" (at the final hidden state)" if _Measure(model, opts.forward_fn).point
                                               is not None else ""),
        (f"held out of every fit: {val_rows} calibration rows (widths ranked, ridge chosen and allocations compared "
         f"there by {metric})" if held else
         "no calibration rows could be held out (one row or an opaque forward_fn batch): errors are in-sample"),
        f"calibration streamed {eng.kind}; {len(sites)} {sites[0].label} sites",
        f"removes {saved / total if total else 0:.1%} of the {sites[0].label} sites' FLOPs ({saved} of {total} "
        "per token)",
        *notes,
    ]
    if len(fit_errors) > 1:
        plan.notes.append("fit targets on the held-out rows: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                                          fit_errors.items()) + f"; kept {fit}")
    return plan


def gated_sites(model: nn.Module) -> list[tuple[str, LCGatedMLP]]:
    """Every uncollapsed LCGatedMLP of ``model`` (path, module), in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LCGatedMLP) and m.form == "gated"]


__all__ = ["gated_sites", "GatedSite", "GatedStats", "plan_gated", "plan_partial", "fit_plan", "measure", "build_module",
           "FITS"]
