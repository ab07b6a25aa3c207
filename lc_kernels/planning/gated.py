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
   to its own dense function there (``fit="local"``) or to the dense model's stream after its block
   (``fit="global"``: it also absorbs what the sites before it changed).

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

from ..algebra import Affine, FIT_RIDGE, ridge_fit
from ..nn.gated import LCGatedMLP
from ..ops.reference import collapsible_activation
from .inputs import Batch, ForwardFn
from .layerwise import BlockStream, _Measure, _Stop, find_blocks, relative_error, site_hooks
from .plan import KEEP, LINEAR, PARTIAL, CollapsePlan, JointPlan, SitePlan
from .inputs import run_model

FITS = ("local", "global")
# Rows of each site's dense inputs the estimate pass uses (the fit pass uses every row): the
# candidates' errors only rank widths, and the Gram matrix costs rows x (h + d)^2.
ESTIMATE_ROWS = 4096
# Kept-width candidates per site: where a PARTIAL removes these fractions of the block's FLOPs.
FRACTIONS = tuple(k / 20 for k in range(1, 20))


@dataclass
class GatedSite:
    """A read-only view of an uncollapsed LCGatedMLP in float64."""

    path: str
    module: LCGatedMLP
    d: int
    h: int
    d_out: int
    base: str
    alpha: torch.Tensor
    wg: torch.Tensor
    bg: torch.Tensor
    wu: torch.Tensor
    bu: torch.Tensor
    wd: torch.Tensor
    bd: torch.Tensor

    @classmethod
    def of(cls, m: LCGatedMLP, path: str) -> "GatedSite":
        f64 = lambda t: t.detach().to(torch.float64)  # noqa: E731
        if m.packed:
            w, b = m.gate_up_proj.weight, m.gate_up_proj.bias
            h = w.shape[0] // 2
            wg, wu = w[:h], w[h:]
            bg, bu = (b[:h], b[h:]) if b is not None else (None, None)
        else:
            wg, wu, bg, bu = m.gate_proj.weight, m.up_proj.weight, m.gate_proj.bias, m.up_proj.bias
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=w_dev)  # noqa: E731
        w_dev = wg.device
        h = wg.shape[0]
        return cls(path, m, m.in_features, h, m.out_features, m.act.base, f64(m.act.alpha), f64(wg),
                   f64(bg) if bg is not None else zeros(h), f64(wu), f64(bu) if bu is not None else zeros(h),
                   f64(m.down_proj.weight), f64(m.down_proj.bias) if m.down_proj.bias is not None
                   else zeros(m.out_features))

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
            return sum(p.numel() for p in self.module.parameters())
        bias = self.module.spec()["bias"]
        gated = 2 * self.d * kept + (2 * kept if bias else 0) + kept * self.d_out + (self.alpha.numel() > 1) * kept \
            + (self.alpha.numel() == 1)
        return (gated if kept else 0) + self.d * self.d_out + self.d_out

    def kept_for(self, fraction: float, round_to: int) -> int:
        """Kept channels (a multiple of ``round_to``) for a PARTIAL removing ``fraction`` of the FLOPs."""
        keep = self.flops(self.h) * (1 - fraction) / 2 - self.d * self.d_out
        k = keep / (2 * self.d + self.d_out)
        if round_to > 1:
            k = round_to * round(k / round_to)
        return int(max(0, min(self.h, k)))


class GatedStats:
    """``G = A^T A`` for ``A = [h, x, 1]`` on a site's inputs, and ``A^T T`` for a target ``T``."""

    def __init__(self, site: GatedSite, explicit_target: bool):
        n = site.h + site.d + 1
        dev = site.wd.device
        self.site = site
        self.g = torch.zeros(n, n, dtype=torch.float64, device=dev)
        self.aty = torch.zeros(n, site.d_out, dtype=torch.float64, device=dev) if explicit_target else None
        self.tt = 0.0
        self.rows = 0
        self.stream2 = 0.0  # ||stream after the block||^2 on the same rows

    def add(self, x: torch.Tensor, target: torch.Tensor | None = None, stream: torch.Tensor | None = None) -> None:
        x = x.to(torch.float64)
        a = torch.cat([self.site.hidden(x), x, x.new_ones(x.shape[0], 1)], dim=1)
        self.g += a.T @ a
        if self.aty is not None:
            t = target.to(torch.float64)
            self.aty += a.T @ t
            self.tt += float(t.pow(2).sum())
        if stream is not None:
            self.stream2 += float(stream.to(torch.float64).pow(2).sum())
        self.rows += x.shape[0]

    def _dense_map(self) -> torch.Tensor:
        """``M0`` with ``A M0 = W_d h + b_d`` (the dense block), as a (h + d + 1, d_out) matrix."""
        s = self.site
        return torch.cat([s.wd.T, torch.zeros(s.d, s.d_out, dtype=torch.float64, device=s.wd.device), s.bd[None]])

    def target_terms(self) -> tuple[torch.Tensor, float]:
        """``A^T T`` and ``||T||^2``: the explicit target's, or the dense block's own output (local)."""
        if self.aty is not None:
            return self.aty, self.tt
        m0 = self._dense_map()
        aty = self.g @ m0
        return aty, float((m0 * aty).sum())

    def scores(self, ridge: float = FIT_RIDGE) -> torch.Tensor:
        """Per channel: the part of ``h_c`` a linear map of ``[x, 1]`` leaves unexplained (norm), times
        ``||W_d[:, c]||``. Channels with score 0 fold into the skip at no cost."""
        s, g = self.site, self.g
        xh = slice(s.h, None)
        gxx, gxh = g[xh, xh], g[xh, :s.h]
        lam = ridge * float(torch.diagonal(gxx).mean()) or 1.0
        sol = torch.linalg.solve(gxx + lam * torch.eye(gxx.shape[0], dtype=g.dtype, device=g.device), gxh)
        r2 = (torch.diagonal(g)[:s.h] - (gxh * sol).sum(0)).clamp_min(0)
        return r2.sqrt() * s.wd.norm(dim=0)

    def fit(self, kept: torch.Tensor, ridge: float = FIT_RIDGE) -> tuple[Affine, float]:
        """The joint least-squares fit on ``[h_K, x, 1]`` (kept channels ``kept``, sorted), pulled toward
        the dense block's own weights; returns the map (``weight`` = ``[W_d', S]``) and its squared
        error on the data."""
        s = self.site
        idx = torch.cat([kept.to(self.g.device), torch.arange(s.h, s.h + s.d + 1, device=self.g.device)])
        ata = self.g[idx][:, idx]
        aty_all, tt = self.target_terms()
        aty = aty_all[idx]
        prior = Affine(torch.cat([s.wd[:, kept], torch.zeros(s.d_out, s.d, dtype=torch.float64,
                                                              device=s.wd.device)], dim=1), s.bd.clone())
        fit = ridge_fit(ata, aty, prior, ridge)
        m = torch.cat([fit.weight.T, fit.bias[None]])
        err2 = tt - 2 * float((m * aty).sum()) + float((m * (ata @ m)).sum())
        return fit, max(err2, 0.0)

    def order(self) -> torch.Tensor:
        """Channels from most to least worth keeping."""
        return self.scores().argsort(descending=True)


def kept_channels(stats: GatedStats, k: int) -> torch.Tensor:
    return stats.order()[:k].sort().values


def build_module(site: GatedSite, kept: torch.Tensor, fit: Affine) -> LCGatedMLP:
    """The PARTIAL (``kept`` non-empty) or LINEAR replacement of ``site``, cast once to its dtype."""
    like = site.module.down_proj.weight
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
# streaming the calibration data through the sites in forward order


class SiteStream:
    """Runs calibration through the sites in forward order, block by block when the model is a stack
    of blocks (one site each), else a whole-model pass per site that stops after it."""

    def __init__(self, model: nn.Module, sites: list[GatedSite], batches: list[Batch], forward_fn: ForwardFn | None,
                 engine: str = "auto"):
        self.model, self.sites, self.batches, self.forward_fn = model, sites, batches, forward_fn
        found = find_blocks(model, [s.path for s in sites]) if engine in ("auto", "layers") else None
        if engine == "layers" and found is None:
            raise ValueError("engine='layers' needs the sites one per entry of a single ModuleList of blocks")
        self.blocks, self.block_of = found if found is not None else (None, None)
        self.kind = "layer-by-layer" if found is not None else "whole-model passes"
        self.modules = {i: s.module for i, s in enumerate(sites)}
        self.passes = 0

    def sweep(self, visit, global_target: bool = False):
        """For each site in forward order: ``visit(i, rows) -> replacement or None``, where ``rows`` is
        a list per batch of ``(x, y, target)`` on the current stream (``target`` is the dense
        model's stream after the block minus the stream before the site's output, for
        ``global_target``, else None). A returned module replaces the site from then on."""
        if self.blocks is not None:
            return self._sweep_blocks(visit, global_target)
        return self._sweep_model(visit)

    def _sweep_blocks(self, visit, global_target: bool):
        stream = BlockStream(self.model, self.blocks, self.batches, self.forward_fn)
        self.passes += 1
        site_at = {b: i for i, b in enumerate(self.block_of)}
        x_c = stream.inputs
        x_d = list(x_c) if global_target else None
        for j in range(len(self.blocks)):
            i = site_at.get(j)
            if i is None:
                x_c = stream.run(j, x_c)
                if x_d is not None:
                    x_d = stream.run(j, x_d)
                continue
            seen: list[tuple[torch.Tensor, torch.Tensor, Batch]] = []
            with site_hooks(self.modules, stream.batch, observe={i: lambda x, y, b: seen.append((x, y, b))}):
                out_c = stream.run(j, x_c)
            rows = []
            if x_d is not None:
                out_d = stream.run(j, x_d)
                for (x, y, b), oc, od in zip(seen, out_c, out_d):
                    # block output = stream before + FFN output: the FFN that reproduces the dense stream
                    # after the block outputs y + (dense - current).
                    t = y + (od - oc) if oc.shape == y.shape else None
                    rows.append((b.rows(x), b.rows(y), None if t is None else b.rows(t), b.rows(od)))
                x_d = out_d
            else:
                rows = [(b.rows(x), b.rows(y), None, b.rows(oc)) for (x, y, b), oc in zip(seen, out_c)]
            new = visit(i, rows)
            if new is None:
                x_c = out_c
            else:
                with site_hooks(self.modules, stream.batch, replace={i: new}):
                    x_c = stream.run(j, x_c)
        self.passes += 0  # block runs are counted by the stream
        return stream

    def _sweep_model(self, visit):
        replace: dict[int, nn.Module] = {}
        order = self._forward_order()
        for i in order:
            seen = []
            current: list[Batch] = []

            def observe(x, y, b, i=i):
                seen.append((b.rows(x), b.rows(y), None, None))
                raise _Stop

            with site_hooks(self.modules, lambda: current[0], observe={i: observe}, replace=dict(replace)):
                for k, b in enumerate(self.batches):
                    current[:] = [b]
                    try:
                        run_model(self.model, b, k, self.forward_fn)
                    except _Stop:
                        pass
            self.passes += 1
            new = visit(i, seen)
            if new is not None:
                replace[i] = new
        return None

    def _forward_order(self) -> list[int]:
        order: list[int] = []
        current: list[Batch] = []

        def seen(i):
            def f(x, y, b):
                if i not in order:
                    order.append(i)
            return f

        with site_hooks(self.modules, lambda: current[0] if current else None,
                        observe={i: seen(i) for i in range(len(self.sites))}):
            b = self.batches[0]
            current[:] = [b]
            run_model(self.model, b, 0, self.forward_fn)
        self.passes += 1
        return order + [i for i in range(len(self.sites)) if i not in order]


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
        st = GatedStats(s, explicit_target=False)
        left = ESTIMATE_ROWS
        for x, y, _, stream in rows:
            if left <= 0:
                break
            st.add(x[:left], stream=None if stream is None else stream[:left])
            left -= min(left, x.shape[0])
        _, tt = st.target_terms()
        norms[i] = tt
        weight = 1.0 / st.stream2 if st.stream2 > 0 else (1.0 / tt if tt > 0 else 1.0)
        order = st.order()
        widths = sorted({s.kept_for(f, round_to) for f in FRACTIONS} | {0}, reverse=True)
        out = [Candidate(s.h, s.flops(s.h), 0.0, weight)]
        for k in widths:
            if k >= s.h or s.flops(k) >= s.flops(s.h):
                continue
            _, e2 = st.fit(order[:k].sort().values, ridge)
            out.append(Candidate(k, s.flops(k), e2, weight))
        cands[i] = out
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
        st = GatedStats(s, explicit_target=explicit)
        for x, y, t, _ in rows:
            st.add(x, target=t if explicit else None)
        ch = st.order()[:k].sort().values if k else torch.zeros(0, dtype=torch.long, device=s.wd.device)
        m, e2 = st.fit(ch, ridge)
        _, tt = st.target_terms()
        fitted[i], channels[i] = build_module(s, ch, m), ch
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
        measured, ref = measure(model, sites, batches, opts.forward_fn, fitted)
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
