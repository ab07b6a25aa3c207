"""Fitted collapse: replacements fitted by least squares to the activations a site actually sees.

The exact merge ``W2 W1`` is the right map only where the activation is already linear (alpha = 1).
With calibration data each changed block of a site (a merged group, the skip of a PARTIAL joint,
the Linear after a FACTOR joint) is replaced by the ridge least-squares map from its input to the
original site's value at the block's end, pulled toward the exact merge (:func:`~lc_kernels.
algebra.ridge_fit`): at alpha = 1 the fit IS the exact merge. Statistics are normal equations
accumulated in float64 over the calibration batches, so memory is O(width^2) whatever the number
of tokens; padding tokens (``attention_mask == 0``) never enter them.

Two uses:

* the budget search needs the error of many candidate plans: :class:`FittedCalibration` fits each
  candidate's blocks independently from one shared pass of statistics on the original model
  (every block on its original input) and measures the model-output error with the candidates
  swapped in by forward hooks;
* the chosen plan is fitted *in sequence* (:func:`fit_stream`): sites in forward order through the
  calibration engine (:class:`~lc_kernels.planning.layerwise.SiteStream`: block by block for a
  stack of blocks, else one whole-model pass per site), each on the inputs the replacements
  upstream produce, its blocks in order from the site's rows held in memory; the block that ends
  at the site's output targets the dense model's stream after the site (``fit="global"``) or the
  site's own function (``"local"``). The plan carries these fits; ``collapse_`` installs them, so
  the planned model-output error is the one measured after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algebra import (
    FIT_RIDGE, Act, Affine, Block, LinearBlock, NormalEquations, PartialBlock, apply_act, canonical_affines,
    collapsed_modules, exact_blocks, original_values, replacement, ridge_fit, run_blocks, site_acts, with_ones,
)
from .calibration import Chosen
from .cost import decisions_for, partial_conflict
from .inputs import Batch, ForwardFn, flat_output_grad, output_norm, run_model
from .layerwise import Passes
from .sites import Site, joint_width


@dataclass
class SiteStats:
    """Normal-equation statistics of one site on its original activations.

    ``ata[p]``: ``A_p^T A_p`` for ``A_p = [h_p, 1]``, ``h_p`` the input of Linear p;
    ``atz[p, q]``: ``A_p^T z_q`` (``z_q`` the output of Linear q, q >= p); ``ats[p, i]``:
    ``A_p^T sigma_i(z_i)`` (joint i >= p); ``sig2[i]``: per-channel ``sum sigma_i^2``.
    """

    ata: dict[int, torch.Tensor] = field(default_factory=dict)
    atz: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    ats: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    sig2: dict[int, torch.Tensor] = field(default_factory=dict)
    y2: float = 0.0
    rows: int = 0

    def add(self, vals: list[torch.Tensor], acts: list[Act | None]) -> None:
        n = len(vals) - 1  # Linears
        hs = [vals[0]] + [apply_act(vals[k + 1], acts[k]) for k in range(n - 1)]  # inputs of each Linear
        sigmas = hs[1:]  # sigma_i(z_i) = input of Linear i + 1
        # A block starting at Linear p > 0 is fitted independently only inside a chain (a merge after a
        # joint that stays nonlinear); in a one-joint site the Linear after the joint starts a block
        # only after FACTOR, which is fitted in sequence. Its hidden-width Gram matrix (the
        # largest statistic) is skipped there.
        for p in range(n if n > 2 else 1):
            a = with_ones(hs[p])
            _acc(self.ata, p, a.T @ a)
            for q in range(p, n):
                _acc(self.atz, (p, q), a.T @ vals[q + 1])
            for i in range(p, n - 1):
                _acc(self.ats, (p, i), a.T @ sigmas[i])
        for i, s in enumerate(sigmas):
            _acc(self.sig2, i, s.pow(2).sum(0))
        self.y2 += float(vals[-1].pow(2).sum())
        self.rows += vals[0].shape[0]


def _acc(d: dict, key, v: torch.Tensor) -> None:
    d[key] = d[key] + v if key in d else v


class SiteModel:
    """A site's eval-mode function in float64 (BatchNorm folded) and its calibration statistics."""

    def __init__(self, site: Site):
        self.site = site
        self.affines = canonical_affines(site.module)
        self.acts = site_acts(site.module)
        self.stats = SiteStats()

    def exact(self, chosen: Chosen) -> list[Block] | None:
        """Exact blocks for ``chosen`` linear channels per joint; None if it cannot be built."""
        decisions, channels = decisions_for(self.site, chosen)
        if partial_conflict(decisions) is not None:
            return None
        return exact_blocks(self.affines, self.acts, decisions, channels)

    def fit_independent(self, chosen: Chosen, ridge: float = FIT_RIDGE) -> list[Block] | None:
        """Blocks for ``chosen``, each changed one fitted on its ORIGINAL input (search estimate)."""
        blocks = self.exact(chosen)
        if blocks is None or not self.stats.rows:
            return blocks
        st = self.stats
        for k, b in enumerate(blocks):
            if not b.changed:
                continue
            if isinstance(b, LinearBlock):
                if k > 0 and blocks[k - 1].act_after is None and b.first == b.last:
                    continue  # after a FACTOR joint the input is z, not sigma(z): fitted in sequence only
                b.map = ridge_fit(st.ata[b.first], st.atz[(b.first, b.last)], b.map, ridge)
            else:
                target = st.atz[(b.first, b.last)] - st.ats[(b.first, b.joint)][:, b.kept] @ b.fc2.weight.T
                b.skip = ridge_fit(st.ata[b.first], target, b.skip, ridge)
        return blocks

    def _explain(self, joint: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel of ``joint``: the ridge map ``B`` from ``[h, 1]`` (the joint's Linear input) to
        its activation, and ``B``'s explained sum of squares on the data."""
        st = self.stats
        ata, g = st.ata[joint], st.ats[(joint, joint)]
        lam = ridge * float(torch.diagonal(ata).mean()) or 1.0
        beta = torch.linalg.solve(ata + lam * torch.eye(ata.shape[0], dtype=ata.dtype, device=ata.device), g)
        return beta, (g * beta).sum(0)

    def channel_scores(self, joint: int, ridge: float = FIT_RIDGE) -> torch.Tensor:
        """Per channel of ``joint``: what a linear map of the joint's input cannot explain of its
        activation on the data, times the channel's outgoing weight norm. Channels that are
        affine on the data (always active, always off, or alpha = 1) score 0 and fold first."""
        _, explained = self._explain(joint, ridge)
        r2 = (self.stats.sig2[joint] - explained).clamp_min(0)
        return r2.sqrt() * self.affines[joint + 1].weight.norm(dim=0)

    def sensitivity_scores(self, joint: int, x: torch.Tensor, grad_y: list[torch.Tensor],
                           ridge: float = FIT_RIDGE) -> torch.Tensor:
        """Per channel of ``joint``: how much the model output moves when the channel is made linear,
        ``sqrt(sum_t E_u[g_tc^2] r_tc^2)``, with ``r_tc`` what the linear map of the joint's input
        leaves unexplained of the channel's activation at token ``t`` and ``g_tc`` the gradient of a
        random projection ``u . y_model`` with respect to that activation (``grad_y``: one per probe,
        at the site's output, carried back through the site's later Linears). A diagonal, first-order
        Fisher estimate of each channel's effect on the model output."""
        beta, _ = self._explain(joint, ridge)
        vals = original_values(self.affines, self.acts, x.to(torch.float64))
        h_in = vals[0] if joint == 0 else apply_act(vals[joint], self.acts[joint - 1])
        sig = apply_act(vals[joint + 1], self.acts[joint])
        r = sig - with_ones(h_in) @ beta
        g2 = torch.zeros_like(r)
        for gy in grad_y:
            g2 += self._joint_grad(joint, sig, gy.to(torch.float64)).pow(2)
        return (r.pow(2) * g2 / len(grad_y)).sum(0).sqrt()

    def _joint_grad(self, joint: int, sig: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """``d(gy . y_site) / d sigma_joint`` per token, through the site's Linears after the joint."""
        if joint + 2 == len(self.affines):  # the last joint: one Linear after it
            return gy @ self.affines[-1].weight
        with torch.enable_grad():
            s = sig.detach().requires_grad_(True)
            h = s
            for p in range(joint + 1, len(self.affines)):
                h = torch.nn.functional.linear(h, self.affines[p].weight, self.affines[p].bias)
                if p < len(self.affines) - 1:
                    h = apply_act(h, self.acts[p])
            (g,) = torch.autograd.grad((h * gy).sum(), s)
        return g


# The budget search compares thousands of candidate plans; a forward pass of a large model per
# candidate would dominate planning. It estimates instead, from a bounded sample of each site's
# inputs: a candidate's model-output error^2 ~ sum over its sites of gain_i * site_error_i^2, each
# site's gain measured once (its full collapse, on at most GAIN_ROWS calibration tokens). The plan
# it picks is then fitted in sequence and its error measured on all of calib.
SAMPLE_ROWS = 512
GAIN_ROWS = 512
# The sensitivity-based channel choice: gradients of SENS_PROBES random output projections on the
# first SENS_ROWS calibration rows (forward + SENS_PROBES backward passes on those batches).
SENS_ROWS = 4096
SENS_PROBES = 2


class FittedCalibration:
    """Statistics of every site in one pass; fitted candidates and their estimated model error."""

    def __init__(self, model: nn.Module, sites: list[Site], batches: list[Batch], forward_fn: ForwardFn | None,
                 ridge: float = FIT_RIDGE, select: str = "activation"):
        self.model, self.ridge, self.select = model, ridge, select
        self._grads: list | None = None
        self.sites = [SiteModel(s) for s in sites]
        self.runner = Passes(model, sites, batches, forward_fn)
        self.order: list[int] = []
        self._cache: dict[tuple, float] = {}
        self._site_err: dict[tuple, float] = {}
        self._gain: dict[int, float] = {}
        self._blocks: dict[tuple, list[Block] | None] = {}
        self.sample: list[list[torch.Tensor]] = [[] for _ in sites]

        def observe(i: int):
            sm, kept = self.sites[i], self.sample[i]

            def f(x, y, batch):
                if i not in self.order:
                    self.order.append(i)
                rows = batch.rows(x.detach())
                sm.stats.add(original_values(sm.affines, sm.acts, rows), sm.acts)
                have = sum(r.shape[0] for r in kept)
                if have < SAMPLE_ROWS:
                    kept.append(rows[: SAMPLE_ROWS - have].to(torch.float32).clone())
            return f

        self.reference = self.runner.run(observe={i: observe(i) for i in range(len(sites))}, outputs=True)
        self.y_norm = output_norm(self.reference)
        self.rows = sum(b.n_rows for b in batches)
        rows, n = 0, 0
        for b in batches:
            n, rows = n + 1, rows + b.n_rows
            if rows >= GAIN_ROWS:
                break
        self._gain_runner = Passes(model, sites, batches[:n], forward_fn)
        self._gain_ref = self.reference[:n]
        self._gain_norm = math.sqrt(sum(float(r.pow(2).sum()) for r in self._gain_ref))
        self._sample_ref = [self._ref_on_sample(i) for i in range(len(sites))]

    @property
    def passes(self) -> int:
        return self.runner.count + self._gain_runner.count

    def gradients(self, probes: int = SENS_PROBES, max_rows: int = SENS_ROWS) -> None:
        """For the sensitivity-based channel choice: on the first calibration batches (``max_rows``
        rows), each site's input rows and, per random probe ``u``, the gradient of ``u . y_model``
        with respect to the site's output (``u`` standard normal over every output the model
        returns, fixed seeds). Computed once; ``probes`` backward passes per batch."""
        if self._grads is not None:
            return
        sites = [sm.site for sm in self.sites]
        xs: list[list[torch.Tensor]] = [[] for _ in sites]
        gs: list[list[list[torch.Tensor]]] = [[[] for _ in range(probes)] for _ in sites]
        batches, rows = [], 0
        for b in self.runner.batches:
            if rows >= max_rows:
                break
            batches.append(b)
            rows += b.n_rows
        gen = torch.Generator(device="cpu").manual_seed(0)
        for k, b in enumerate(batches):
            eps: dict[int, torch.Tensor] = {}

            def hook(i: int):
                def f(mod, args, kwargs, out):
                    x = args[0] if args else next(iter(kwargs.values()))
                    xs[i].append(b.rows(x.detach()).to(torch.float32))
                    eps[i] = torch.zeros_like(out, requires_grad=True)
                    return out + eps[i]  # d loss / d eps = d loss / d (site output); the graph stays whole
                return f

            handles = [s.module.register_forward_hook(hook(i), with_kwargs=True) for i, s in enumerate(sites)]
            try:
                with torch.enable_grad():
                    y = flat_output_grad(run_model(self.model, b, k, self.runner.forward_fn), b)
                    order = sorted(eps)
                    for p in range(probes if y.requires_grad else 0):
                        u = torch.randn(y.shape, generator=gen).to(y)
                        got = torch.autograd.grad((y * u).sum(), [eps[i] for i in order], retain_graph=p < probes - 1,
                                                  allow_unused=True)
                        for i, g in zip(order, got):
                            if g is not None:  # None: the output does not depend on the site (no gradient path)
                                gs[i][p].append(b.rows(g).to(torch.float32))
            finally:
                for h in handles:
                    h.remove()
        # A site without a gradient on every batch (a forward_fn under no_grad, a detached output)
        # keeps the activation-based ranking.
        self._grads = [(torch.cat(x), [torch.cat(g) for g in gp]) if x and all(len(g) == len(x) for g in gp)
                       else (None, []) for x, gp in zip(xs, gs)]

    def scores(self, i: int, joint: int) -> torch.Tensor:
        """The channel scores of site ``i``'s ``joint`` under this calibration's ``select``."""
        sm = self.sites[i]
        if self.select == "sensitivity":
            self.gradients()
            x, grads = self._grads[i]
            if x is not None:
                return sm.sensitivity_scores(joint, x, grads, self.ridge)
        return sm.channel_scores(joint, self.ridge)

    @property
    def inputs(self) -> list[bool]:
        """Whether calibration reaches each site (the budget search asks)."""
        return [sm.stats.rows > 0 for sm in self.sites]

    def blocks(self, i: int, chosen: Chosen) -> list[Block] | None:
        key = (i, tuple(map(tuple, chosen)))
        if key not in self._blocks:
            self._blocks[key] = self.sites[i].fit_independent(chosen, self.ridge)
        return self._blocks[key]

    def _ref_on_sample(self, i: int) -> torch.Tensor | None:
        if not self.sample[i]:
            return None
        sm = self.sites[i]
        return original_values(sm.affines, sm.acts, torch.cat(self.sample[i]), torch.float32)[-1]

    def site_error(self, i: int, chosen: Chosen) -> float:
        """``||delta|| / ||y_site||`` of site ``i``'s fitted candidate on its input sample."""
        key = (i, tuple(map(tuple, chosen)))
        if key not in self._site_err:
            blocks, ref = self.blocks(i, chosen), self._sample_ref[i]
            if blocks is None:
                self._site_err[key] = math.inf
            elif ref is None:
                self._site_err[key] = 0.0
            else:
                got = run_blocks(blocks, torch.cat(self.sample[i]), dtype=torch.float32)
                self._site_err[key] = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        return self._site_err[key]

    def gain(self, i: int) -> float:
        """How a relative error at site ``i``'s output shows at the model's output (squared ratio),
        measured once with the site fully collapsed."""
        if i not in self._gain:
            site = self.sites[i].site
            full = [list(range(joint_width(site, j))) if a is not None else [] for j, a in enumerate(site.acts)]
            e_site = self.site_error(i, full)
            blocks = self.blocks(i, full)
            if not e_site or blocks is None or not math.isfinite(e_site) or not self._gain_norm:
                self._gain[i] = 1.0
            else:
                outs = self._gain_runner.run(replace={i: _float64_site(blocks)}, outputs=True)
                d2 = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, self._gain_ref))
                self._gain[i] = d2 / self._gain_norm ** 2 / e_site ** 2
        return self._gain[i]

    def model_error(self, config: dict[int, Chosen]) -> float:
        """Estimated ``||y' - y|| / ||y||`` with each configured site replaced by its fitted blocks."""
        config = {i: c for i, c in config.items() if any(c)}
        if not config:
            return 0.0
        key = tuple(sorted((i, tuple(map(tuple, c))) for i, c in config.items()))
        if key not in self._cache:
            errs = [self.site_error(i, c) for i, c in config.items()]
            self._cache[key] = (math.inf if any(math.isinf(e) for e in errs) else
                                math.sqrt(sum(self.gain(i) * e ** 2 for i, e in zip(config, errs))))
        return self._cache[key]


def _float64_site(blocks: list[Block]):
    return lambda x: run_blocks(blocks, x)


def fit_stream(engine, sites: list[Site], plans: dict[int, tuple[list[str], list]], fit: str = "local",
               ridge: float = FIT_RIDGE) -> tuple[dict[int, list[Block]], dict[int, float]]:
    """Fit the plan's changed blocks site by site in forward order through the calibration engine
    (:class:`~lc_kernels.planning.layerwise.SiteStream`), each on the inputs the replacements
    upstream produce.

    Within a site every changed block targets the original site's value at its end. With
    ``fit="global"`` the block that ends at the site's output targets instead what the site must
    output for the dense model's stream to come out (the engine's global target), so it absorbs
    what the sites before it changed; ``"local"`` targets the site's own function on its current
    inputs. Returns the blocks per site (exact blocks for a site calibration never reaches) and
    each site's relative error against its target on the calibration rows.
    """
    done: dict[int, list[Block]] = {}
    errors: dict[int, float] = {}
    use_global = fit == "global"

    def visit(i: int, rows: list) -> nn.Module | None:
        sm = SiteModel(sites[i])
        decisions, channels = plans[i]
        blocks = exact_blocks(sm.affines, sm.acts, decisions, channels)
        done[i] = blocks
        if not rows:
            return replacement(sites[i].module, collapsed_modules(sites[i].module, blocks))
        changed = [k for k, b in enumerate(blocks) if b.changed]
        ends = changed[-1] if changed and blocks[changed[-1]].last == len(sm.affines) - 1 else None
        explicit = use_global and ends is not None and all(t is not None for _, _, t, _ in rows)
        for k in changed:
            neq = _BlockEquations(blocks[k], k, blocks, sm)
            for x, _, t, _ in rows:
                neq.add(x, t if explicit and k == ends else None)
            if neq.rows:
                neq.solve(ridge)
        d2 = t2 = 0.0
        for x, _, t, _ in rows:
            x64 = x.to(torch.float64)
            ref = t.to(torch.float64) if explicit else original_values(sm.affines, sm.acts, x64)[-1]
            d2 += float((run_blocks(blocks, x64) - ref).pow(2).sum())
            t2 += float(ref.pow(2).sum())
        errors[i] = math.sqrt(d2 / t2) if t2 > 0 else 0.0
        return replacement(sites[i].module, collapsed_modules(sites[i].module, blocks))

    engine.sweep(visit, global_target=use_global, only=set(plans))
    for i in plans:  # sites the stream never reached keep their exact blocks
        if i not in done:
            sm = SiteModel(sites[i])
            done[i] = exact_blocks(sm.affines, sm.acts, *plans[i])
    return done, errors


class _BlockEquations:
    """Normal equations of one block: its input (through the already-fitted blocks before it) to
    the original site's value at its end.

    A partial block refits its kept channels' output weights together with the skip: the
    regressors are ``[act(fc1 x), x, 1]``, so the kept channels also absorb what of the folded
    channels' nonlinear remainder they can (pruning's reconstruction step). Its prior is the exact
    partial merge, which the fit returns wherever the folded channels are already linear.
    """

    def __init__(self, b: Block, k: int, blocks: list[Block], sm: SiteModel):
        self.b, self.k, self.blocks, self.sm = b, k, blocks, sm
        self.neq: NormalEquations | None = None

    @property
    def rows(self) -> int:
        return 0 if self.neq is None else self.neq.rows

    def add(self, rows: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Rows of the site's input; ``target`` the block's target there (default: the original
        site's value at the block's end)."""
        rows = rows.to(torch.float64)
        a_in = run_blocks(self.blocks, rows, upto=self.k)
        target = (original_values(self.sm.affines, self.sm.acts, rows)[self.b.last + 1] if target is None
                  else target.to(torch.float64))
        if isinstance(self.b, PartialBlock):
            h = apply_act(torch.nn.functional.linear(a_in, self.b.fc1.weight, self.b.fc1.bias), self.b.act)
            a_in = torch.cat([h, a_in], dim=1)
        if self.neq is None:
            self.neq = NormalEquations(a_in.shape[1], target.shape[1], a_in.device)
        self.neq.add(a_in, target)

    def solve(self, ridge: float) -> None:
        b, neq = self.b, self.neq
        if isinstance(b, LinearBlock):
            b.map = ridge_fit(neq.ata, neq.aty, b.map, ridge)
            return
        kept = b.fc2.weight.shape[1]
        prior = Affine(torch.cat([b.fc2.weight, b.skip.weight], dim=1), b.skip.bias)
        fit = ridge_fit(neq.ata, neq.aty, prior, ridge)
        b.fc2 = Affine(fit.weight[:, :kept].contiguous(), torch.zeros_like(fit.bias))
        b.skip = Affine(fit.weight[:, kept:].contiguous(), fit.bias)


def site_decisions(sp) -> tuple[list[str], list]:
    """(decisions, folded channels per joint) of a SitePlan, as :func:`exact_blocks` takes them."""
    return [j.decision for j in sp.joints], [j.linear_channels for j in sp.joints]


@dataclass
class Measured:
    model_error: float
    site_errors: dict[int, float]


def measure_fitted(model: nn.Module, sites: list[Site], blocks: dict[int, list[Block]], cal: FittedCalibration,
                   runner: Passes) -> Measured:
    """The model-output error and each site's output error with the fitted sites in place, the
    replacements built exactly as ``collapse_`` builds them (same modules, same dtype)."""
    if not blocks:
        return Measured(0.0, {})
    replace = {i: replacement(sites[i].module, collapsed_modules(sites[i].module, b)) for i, b in blocks.items()}
    d2 = {i: 0.0 for i in blocks}
    y2 = {i: 0.0 for i in blocks}

    def observe(i: int):
        sm = SiteModel(sites[i])

        def f(x, y, batch):
            rows = batch.rows(x.detach())
            ref = original_values(sm.affines, sm.acts, rows)[-1]
            d2[i] += float((batch.rows(y.detach()).to(torch.float64) - ref).pow(2).sum())
            y2[i] += float(ref.pow(2).sum())
        return f

    outs = runner.run(observe={i: observe(i) for i in blocks}, replace=replace, outputs=True)
    err = math.sqrt(sum(float((o - r).pow(2).sum()) for o, r in zip(outs, cal.reference))) / cal.y_norm
    return Measured(err, {i: math.sqrt(d2[i] / y2[i]) if y2[i] > 0 else 0.0 for i in blocks})


__all__ = ["Passes", "SiteStats", "SiteModel", "FittedCalibration", "fit_stream", "measure_fitted",
           "site_decisions"]
