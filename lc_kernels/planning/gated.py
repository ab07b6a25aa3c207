"""Fitted collapse of gated FFN sites (:class:`~lc_kernels.nn.gated.LCGatedMLP`): plan, fit, measure.

A gated block ``y = W_d (act(W_g x) * W_u x) + b_d`` has no algebraic merge (at alpha = 1 it is
bilinear), so every form other than KEEP is fitted to calibration data:

* PARTIAL keeps ``k`` channels as a narrower gated MLP and adds a linear skip ``S x + c`` fitted
  jointly with the kept channels' ``W_d`` columns: the least-squares regression of the target on
  ``[h_K, x, 1]`` (``h_c = act(g_c) u_c``);
* LINEAR replaces the block by the fitted affine map (``K`` empty).

Every candidate's fit and error on the data come from one Gram matrix of ``[h, x, 1]`` per site
(float64, ``(h + d + 1)^2``): a candidate is a solve on a sub-block, no extra pass. The channels to
keep are those whose product a linear map of the input explains least, weighted by ``||W_d[:, c]||``.

Planning runs in two streamed passes (:mod:`~lc_kernels.planning.layerwise`):

1. estimate, on the dense model: each site's error for every candidate width, on its dense inputs;
   widths are allocated across sites to remove ``target`` of the sites' FLOPs (or keep the summed
   error under ``max_error``) with the least summed error, each site's error counted relative to the
   residual stream it is added to;
2. fit, in sequence: each site is fitted on the inputs the already-replaced sites before it produce,
   to the dense model's stream after its block (``fit="global"``, the default: it also absorbs what
   the sites before it changed) or to its own dense function there (``fit="local"``).

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
from .layerwise import SiteStream, _Measure, materialized, relative_error, site_hooks
from .plan import KEEP, LINEAR, PARTIAL, CollapsePlan, JointPlan, SitePlan

FITS = ("local", "global")
# Rows of each site's dense inputs the estimate pass uses (the fit pass uses every row): the
# candidates' errors only rank widths, and the Gram matrix costs rows x (h + d)^2.
ESTIMATE_ROWS = 2048
# Rows that rank a site's channels (the scores need [x,1]^T h and sum h^2: a sample ranks them as
# well as every row, at a fraction of the cost; the fit itself uses every row).
SCREEN_ROWS = 4096
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
            left = SCREEN_ROWS
            for x in self.xs:
                if left <= 0:
                    break
                x, left = x[:left], left - min(left, x.shape[0])
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

    def fit(self, kept: torch.Tensor, ridge: float = FIT_RIDGE) -> tuple[Affine, float, float]:
        """The joint least-squares fit on ``[h_K, x, 1]`` (kept channels ``kept``, sorted), pulled toward
        the dense block's own weights; returns the map (``weight`` = ``[W_d', S]``), its squared error
        on the rows and ``||T||^2``."""
        s = self.site
        kept = kept.to(s.wd.device)
        ata, aty, tt = self.normal_equations(kept)
        prior = Affine(torch.cat([s.wd[:, kept], torch.zeros(s.d_out, s.d, dtype=torch.float64,
                                                              device=s.wd.device)], dim=1), s.bd.clone())
        fit = ridge_fit(ata, aty, prior, ridge)
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
class Candidate:
    kept: int
    flops: int
    err2: float  # squared error at the site's output on the estimate rows
    weight: float  # 1 / ||stream||^2: how a site error shows in the stream it is added to


def estimate(engine: SiteStream, round_to: int, ridge: float = FIT_RIDGE) -> tuple[list[list[Candidate]], list[float]]:
    """Candidates per site on the dense model's inputs; also each site's dense output norm^2."""
    cands: list[list[Candidate]] = [[] for _ in engine.sites]
    norms = [0.0] * len(engine.sites)

    def visit(i, rows):
        s = engine.sites[i]
        st = GatedStats(s)
        left = ESTIMATE_ROWS
        for x, y, _, stream in rows:
            if left <= 0:
                break
            st.add(x[:left], y[:left], stream=None if stream is None else stream[:left])
            left -= min(left, x.shape[0])
        tt = sum(float(t.to(torch.float64).pow(2).sum()) for t in st.ts)
        norms[i] = tt
        weight = 1.0 / st.stream2 if st.stream2 > 0 else (1.0 / tt if tt > 0 else 1.0)
        widths = sorted({s.kept_for(f, round_to) for f in FRACTIONS} | {0}, reverse=True)
        widths = [k for k in widths if k < s.h and s.flops(k) < s.flops(s.h)]
        errs = st.prefix_errors(widths, ridge)
        cands[i] = [Candidate(s.h, s.flops(s.h), 0.0, weight)] + [Candidate(k, s.flops(k), errs[k], weight)
                                                                  for k in widths]
        s.release()
        return None

    engine.sweep(visit)
    return cands, norms


def allocate(cands: list[list[Candidate]], need: float | None, max_err2: float | None) -> list[int]:
    """One candidate per site: the least summed weighted error removing at least ``need`` FLOPs
    (or the most FLOPs with summed weighted error within ``max_err2``), by a Lagrangian sweep over
    the price of a FLOP (each site then picks ``argmin err - price * saving``)."""
    def pick(price: float) -> list[int]:
        out = []
        for cs in cands:
            keep = cs[0].flops
            out.append(min(range(len(cs)), key=lambda c: cs[c].weight * cs[c].err2 - price * (keep - cs[c].flops)))
        return out

    def saving(sel):
        return sum(cs[0].flops - cs[c].flops for cs, c in zip(cands, sel))

    def err(sel):
        return sum(cs[c].weight * cs[c].err2 for cs, c in zip(cands, sel))

    lo, hi = 0.0, 1.0
    ok = (lambda sel: saving(sel) >= need) if need is not None else (lambda sel: err(sel) > max_err2)
    while not ok(pick(hi)) and hi < 1e30:
        hi *= 4
    for _ in range(80):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1e-300 else 0.0
        if ok(pick(mid)):
            hi = mid
        else:
            lo = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    if need is not None:
        return pick(hi)
    sel = pick(lo)
    return sel if err(sel) <= max_err2 else [0] * len(cands)


def fit_plan(engine: SiteStream, kept: list[int], fit: str, ridge: float = FIT_RIDGE
             ) -> tuple[dict[int, LCGatedMLP], dict[int, torch.Tensor], dict[int, float]]:
    """Fit the chosen widths in sequence; returns the replacement modules, each site's kept
    channels and its relative output error (against its target) on the calibration rows."""
    fitted, channels, errors = {}, {}, {}
    global_target = fit == "global" and engine.blocks is not None

    def visit(i, rows):
        s = engine.sites[i]
        k = kept[i]
        if k >= s.h:
            return None
        explicit = global_target and all(t is not None for _, _, t, _ in rows)
        st = GatedStats(s)
        for x, y, t, _ in rows:
            st.add(x, t if explicit else y)
        ch = st.order()[:k].sort().values if k else torch.zeros(0, dtype=torch.long, device=s.wd.device)
        m, e2, tt = st.fit(ch, ridge)
        fitted[i], channels[i] = build_module(s, ch, m), ch
        s.release()
        errors[i] = math.sqrt(e2 / tt) if tt > 0 else 0.0
        return fitted[i]

    engine.sweep(visit, global_target=global_target)
    return fitted, channels, errors


def measure(model: nn.Module, sites: list[GatedSite], batches: list[Batch], forward_fn: ForwardFn | None,
            fitted: dict[int, LCGatedMLP], reference: list[torch.Tensor] | None = None
            ) -> tuple[float, list[torch.Tensor]]:
    """Model-output error with ``fitted`` in place of their sites (and the dense reference)."""
    meas = _Measure(model, forward_fn)
    mods = {i: s.module for i, s in enumerate(sites)}
    current: list[Batch] = []
    before = lambda k, b: current.__setitem__(slice(None), [b])  # noqa: E731
    if reference is None:
        reference = meas.run(batches)
    with site_hooks(mods, lambda: current[0], replace=dict(fitted)):
        outs = meas.run(batches, before)
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


def plan_gated(model: nn.Module, modules: list[tuple[str, LCGatedMLP]], batches: list[Batch], opts,
               engine: str = "auto") -> CollapsePlan:
    """The fitted plan for gated sites (see the module docs); ``plan.fitted`` holds the replacements."""
    sites = [GatedSite.of(m, p) for p, m in modules]
    fit = opts.fit_target
    eng = SiteStream(model, sites, batches, opts.forward_fn, engine)
    total = sum(s.flops(s.h) for s in sites)
    if opts.force:
        kept = [0] * len(sites)
        reasons = ["force: replaced by the fitted linear map"] * len(sites)
    else:
        cands, _ = estimate(eng, opts.round_to)
        need = None if opts.target is None else opts.target * total
        max_err2 = None if need is not None else opts.max_error ** 2
        sel = allocate(cands, need, max_err2)
        kept = [cs[c].kept for cs, c in zip(cands, sel)]
        reasons = ["chosen by the budget" if k < s.h else "kept by the budget" for k, s in zip(kept, sites)]
    notes = []
    for attempt in range(4):
        fitted, channels, errors = fit_plan(eng, kept, fit)
        measured, ref = measure(model, sites, batches, opts.forward_fn, fitted, eng.reference)
        if opts.max_error is None or opts.target is not None or measured <= opts.max_error or not fitted:
            break
        # The estimate ranks; the sequential fit measures. Over the bound: give back the site whose
        # output moved most, and fit again.
        worst = max(errors, key=errors.get)
        kept[worst] = sites[worst].h
        reasons[worst] = f"kept: fitted in sequence the plan measured {measured:.3e} > max_error {opts.max_error:g}"
        notes.append(f"{sites[worst].path} kept after the sequential fit measured {measured:.3e}")
    plan = CollapsePlan([gated_site_plan(s, k, channels.get(i), r, errors.get(i))
                         for i, (s, k, r) in enumerate(zip(sites, kept, reasons))],
                        opts.tol, opts.objective, forced=opts.force, max_error=opts.max_error, target=opts.target,
                        search="lagrangian", fit=True, round_to=opts.round_to)
    plan.fitted = {sites[i].path: m for i, m in fitted.items()}
    plan.measured_error = measured
    plan.calib_rows = sum(b.n_rows for b in batches)
    plan.fit_target = fit
    saved = total - plan.flops_after
    plan.notes = [
        f"est. error: ||delta|| / ||target|| at each gated site's output on {plan.calib_rows} calibration rows, the "
        f"site fitted in sequence ({fit} target: " + ("its own dense function on its current inputs)" if fit == "local"
                                                      else "the dense model's stream after its block)"),
        f"measured model-output error ||dy|| / ||y|| with the planned sites replaced together: {measured:.3e}"
        + (" (at the final hidden state)" if _Measure(model, opts.forward_fn).point is not None else ""),
        f"calibration streamed {eng.kind}; widths allocated over {len(sites)} gated sites by a Lagrangian sweep",
        f"removes {saved / total if total else 0:.1%} of the gated sites' FLOPs ({saved} of {total} per token)",
        *notes,
    ]
    return plan


def gated_sites(model: nn.Module) -> list[tuple[str, LCGatedMLP]]:
    """Every uncollapsed LCGatedMLP of ``model`` (path, module), in module order."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LCGatedMLP) and m.form == "gated"]


__all__ = ["gated_sites", "GatedSite", "GatedStats", "plan_gated", "fit_plan", "measure", "build_module", "FITS"]
