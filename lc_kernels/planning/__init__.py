"""What only READS a model: where it can collapse, what that costs, and what to do (a plan).

``sites.py`` (collapsible sites), ``cost.py`` (FLOPs / params), ``plan.py`` (CollapsePlan,
JSON, table), ``options.py`` (the options, validated once), ``threshold.py`` (no data: tol),
``calibration.py`` (calibration inputs, exact errors, measured model error), ``budget.py``
(max_error / target search). Nothing here changes a model.
"""
from __future__ import annotations

from torch import nn

from .budget import budget_plan
from .fitting import FittedCalibration, Passes, fit_stream, measure_fitted, site_decisions
from .calibration import Calibration, chosen_of, eval_no_grad
from .inputs import calib_batches
from .latency import LatencyTable
from .options import PlanOptions
from .plan import (DECISIONS, FittedSite, weights_version, FACTOR, GATED_DECISIONS, KEEP, LINEAR, MERGE, OBJECTIVES, PARTIAL, CollapsePlan, JointPlan,
                   SitePlan)
from .gated import gated_sites, plan_gated
from .partial import plan_classic, qualifies
from .layerwise import SiteStream, is_offloaded
from .sites import Site, collapsible_sites, find_sites
from .threshold import build_site_plan, plan_site

__all__ = ["plan_collapse", "CollapsePlan", "SitePlan", "JointPlan", "PlanOptions", "Site", "find_sites",
           "DECISIONS", "GATED_DECISIONS", "MERGE", "FACTOR", "KEEP", "PARTIAL", "LINEAR", "OBJECTIVES"]


def plan_collapse(
    model: nn.Module,
    *,
    tol: float = 0.05,
    calib: object = None,
    max_error: float | None = None,
    target: float | None = None,
    force: bool = False,
    objective: str = "flops",
    search: str = "auto",
    fit: bool | None = None,
    forward_fn: object = None,
    round_to: int = 8,
    example: object = None,
    tokens: int | None = None,
    select: str = "activation",
    allocation: str | None = None,
    allocation_evals: int | None = None,
) -> CollapsePlan:
    """Decide, per site, which joints become linear; reads the model, never changes it.

    A joint whose slopes are all within ``tol`` of 1 collapses (MERGE or FACTOR, whichever
    the cost model prefers; chains are solved optimally by dynamic programming). ``force=True``
    collapses every joint regardless of ``tol`` and says so in each reason.

    ``calib`` (a batch, an ``(input, ...)`` tuple, or an iterable of those) replaces the
    ``|1-alpha|`` proxy by the exact error of each collapse at its site's output and measures
    the model-output error of the whole plan. ``max_error=e`` chooses, over joints (per-channel
    two-Linear sites also over PARTIAL widths), the set saving the most ``objective`` with
    measured model-output error ``||dy|| / ||y|| <= e``; ``target=t`` in (0, 1] the set with the
    least measured error that removes at least ``t`` of the collapsible sites' dense cost (FLOPs, or
    measured time with ``objective="latency"``); a target beyond what collapsing every site removes
    is refused with the maximum. Given
    both, the target plan must also meet ``e``. ``search="auto"`` is exhaustive up to
    ``budget.MAX_EXHAUSTIVE`` combinations and greedy above; the notes say which ran. ``tol``
    does not block a site under a budget. The model is run in eval mode under
    ``torch.no_grad`` and left as it was.

    ``calib`` is what the model's forward takes: a tensor, a tuple of positional inputs, a dict of
    keyword inputs (``input_ids``, ``attention_mask``: padding tokens are ignored), or an iterable
    / DataLoader of those; ``forward_fn(model, batch)`` runs anything else. With calibration data
    (and ``fit`` not False) every linearised joint is replaced by the least-squares map fitted to
    the activations it sees, pulled toward the exact merge (which it equals at alpha = 1); the
    budget may then also fold a PARTIAL subset of any joint's channels, chosen from the data and
    kept to multiples of ``round_to``. Errors are those of the fitted replacements, fitted in
    forward order as ``collapse_(model, plan, calib=...)`` will fit them. ``fit=False`` plans
    the algebraic merge.

    ``fit="global"`` (the default with calibration data) fits each site to what its output must be
    for the dense model's stream after it to come out at the same tokens (a transformer block's
    residual stream; a site's own dense output where there is no block stack), on the inputs the
    replacements before it produce, so it also absorbs what those changed; ``fit="local"`` fits
    each site to its own original function on those inputs. ``select`` ranks the channels a PARTIAL
    joint folds: ``"activation"`` (what a linear map of the joint's input leaves unexplained of each
    channel, times its outgoing weight norm) or ``"sensitivity"`` (that remainder weighted, token by
    token, by the gradient of random projections of the model output: first-order Fisher; Linear
    -> act -> Linear sites only). Activation is the default: on all-MiniLM-L6-v2 sensitivity
    measured better at half the FFN FLOPs and worse at three quarters (fitted_encoder.md), and on
    the nonlinear task neither was better beyond the test set's noise (nonlinear_task.md).

    Gated FFN sites (:class:`~lc_kernels.LCGatedMLP`) hold the last ``1/8`` of the calibration
    batches (or rows) out of every fit. With ``target``, widths are allocated by measuring whole
    assignments there (mean KL per token of the next-token distributions through the output
    embedding, else ``||dy|| / ||y||``): one width everywhere (``uniform``), a removed share rising
    with depth (``depth``) and the least summed held-out site error (``lagrangian``), then
    ``allocation_evals`` search moves (one site a step narrower, another a step wider) from the best;
    ``plan.allocation`` lists each with its widths and error. ``allocation="uniform"`` (or
    ``"depth"``, ``"lagrangian"``) measures that assignment alone. The ridge of each site's fit is
    chosen on the held-out rows, and with ``fit=None`` the fit target too (local on the dense
    model's inputs, local in sequence, global in sequence: the best measured is kept).

    Linear -> act -> Linear sites (every site an LCFusedMLP with one activation and no BatchNorm) with
    ``target`` (and no ``max_error``, explicit ``search`` or ``select="sensitivity"``, which the older
    budget search serves) are planned the same way (:mod:`~lc_kernels.planning.partial`): PARTIAL
    widths allocated on the held-out rows, MERGE where the fitted linear map measures better than the
    narrowest PARTIAL.

    ``objective="latency"`` plans on measured time instead of FLOPs: every candidate form is timed
    on the model's device and dtype at the token count of ``example`` (or ``tokens=``), cached per
    device, dtype and shape (:mod:`~lc_kernels.planning.latency`); ``target`` is then the fraction
    of the collapsible sites' measured time to remove.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan_collapse expects an nn.Module, got {type(model).__name__}")
    if any(t.is_meta for t in model.parameters()) and not is_offloaded(model):
        raise ValueError("plan_collapse got a model on the meta device (its slopes and weights hold no values to "
                         "plan from); materialise and load it first (e.g. model.to_empty(device='cpu') and "
                         "load_state_dict)")
    opts = PlanOptions.of(tol=tol, calib=calib, max_error=max_error, target=target, force=force,
                          objective=objective, search=search, fit=fit, forward_fn=forward_fn, round_to=round_to,
                          example=example, tokens=tokens, select=select, allocation=allocation,
                          allocation_evals=allocation_evals)
    return plan_with(model, opts)


def plan_with(model: nn.Module, opts: PlanOptions) -> CollapsePlan:
    """:func:`plan_collapse` with options already validated."""
    gated = gated_sites(model)
    if gated:
        return _gated_plan(model, gated, opts)
    sites = collapsible_sites(model)
    cost = cost_objective(model, opts)
    if opts.calib is None:
        plan = _threshold_plan(sites, opts, cost)
        plan.notes.append("est. error: max |1-alpha| over collapsed joints (no calibration data given)")
        return _note_latency(plan, cost)
    batches = calib_batches(model, opts.calib, forward_fn=opts.forward_fn)
    if allocated(sites, opts):
        with eval_no_grad(model):
            return plan_classic(model, sites, batches, opts)
    if opts.fitted:
        return _note_latency(_fitted_plan(model, sites, batches, opts, cost), cost)
    with eval_no_grad(model):
        cal = Calibration(model, sites, batches, opts.forward_fn)
        plan = budget_plan(cal, opts, cost) if opts.budget else _threshold_plan(sites, opts, cost)
        config = {i: chosen_of(s, sp) for i, (s, sp) in enumerate(zip(sites, plan.sites))}
        for i, sp in enumerate(plan.sites):
            sp.est_error = cal.site_error(i, config[i]) if sp.changes else 0.0
            sp.error_source = ("calib: site not reached" if not cal.inputs[i] else
                               "calib: exact residual" if len(sites[i].acts) == 1 else "calib: float64 re-run")
        plan.measured_error = cal.model_error(config)
    return _note_latency(_calibrated_notes(plan, cal.rows, "from the exact residual (1-alpha)*W2*(base(z)-z) "
                                           "(chains: re-run in float64)"), cost)


def allocated(sites: list[Site], opts: PlanOptions) -> bool:
    """Whether classic sites are planned like gated ones (planning/partial.py: widths allocated by
    held-out measurement, fits from one estimator): a fitted FLOP target, every site an LCFusedMLP with
    one activation and no BatchNorm, and no option only the older path serves (``max_error``, an
    explicit ``search``, ``select="sensitivity"``)."""
    return (opts.fitted and opts.target is not None and opts.max_error is None and not opts.force
            and opts.objective == "flops" and opts.search == "auto" and opts.select == "activation"
            and all(qualifies(s) for s in sites))


def _gated_plan(model: nn.Module, gated: list, opts: PlanOptions) -> CollapsePlan:
    """Gated FFN sites: only fitted forms exist, so calibration data and a budget (or force) are needed."""
    if find_sites(model):
        raise ValueError(f"this model holds both gated FFN sites ({gated[0][0]}, ...) and Linear -> act -> Linear sites "
                         f"({find_sites(model)[0].path}, ...); plan them separately: prepare_ with filter_fn to convert "
                         "one kind at a time")
    if opts.calib is None or opts.fit is False:
        raise ValueError("gated FFN sites (down(act(gate x) * up x)) have no algebraic merge: every collapsed form is "
                         "fitted to calibration data; pass calib= with target= or max_error= (fit=False and the "
                         "tol-only plan do not apply)")
    if not (opts.budget or opts.force):
        raise ValueError("gated FFN sites need a budget: target= (fraction of the gated sites' FLOPs to remove) or "
                         "max_error= (bound on ||dy|| / ||y|| on calib), or force=True (every site linear)")
    if opts.objective != "flops":
        raise ValueError(f"objective={opts.objective!r} is not measured for gated FFN sites yet; plan them with "
                         "objective='flops'")
    if opts.select != "activation":
        raise ValueError(f"select={opts.select!r} is not built for gated FFN sites yet: their kept channels are ranked "
                         "by activation (select='activation')")
    batches = calib_batches(model, opts.calib, forward_fn=opts.forward_fn)
    with eval_no_grad(model):
        return plan_gated(model, gated, batches, opts)


def _threshold_plan(sites: list[Site], opts: PlanOptions, cost) -> CollapsePlan:
    """No budget: each site's joints within ``tol`` of alpha = 1 (or every joint, with force)."""
    return CollapsePlan([plan_site(s, opts.tol, force=opts.force, objective=cost) for s in sites], opts.tol,
                        opts.objective, forced=opts.force)


def cost_objective(model: nn.Module, opts: PlanOptions):
    """What the cost model minimises: ``"flops"`` / ``"params"``, or a measured latency table."""
    if opts.objective != "latency":
        return opts.objective
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    if p is None:
        raise ValueError("objective='latency' needs a model with floating-point weights to time")
    return LatencyTable(p.device, p.dtype, opts.tokens)


def _note_latency(plan: CollapsePlan, cost) -> CollapsePlan:
    if isinstance(cost, LatencyTable):
        plan.notes.append(f"latency: every candidate form timed at {cost.tokens} tokens on {cost.prefix.split('|')[0]} "
                          f"({cost.measured} measured now, the rest from {cost.path})")
    return plan


def _fitted_plan(model: nn.Module, sites: list[Site], batches: list, opts: PlanOptions, cost) -> CollapsePlan:
    with eval_no_grad(model):
        cal = FittedCalibration(model, sites, batches, opts.forward_fn, select=opts.select)
        plan = budget_plan(cal, opts, cost) if opts.budget else _threshold_plan(sites, opts, cost)
        plan.fit, plan.round_to = True, opts.round_to
        engine = SiteStream(model, sites, batches, opts.forward_fn)
        runner = Passes(model, sites, batches, opts.forward_fn)
        while True:
            changes = {i: sp for i, sp in enumerate(plan.sites) if sp.changes}
            blocks, errors = fit_stream(engine, sites, {i: site_decisions(sp) for i, sp in changes.items()},
                                        opts.fit_target)
            measured = measure_fitted(model, sites, blocks, cal, runner)
            if opts.max_error is None or measured.model_error <= opts.max_error or not changes:
                break
            # The search estimated; the sequential fit measures. Over the bound: keep the site whose
            # output moved most, and fit again, until the plan honours max_error.
            worst = max(changes, key=lambda i: errors.get(i, 0.0))
            plan.sites[worst] = build_site_plan(sites[worst], [[] for _ in sites[worst].acts],
                                                [f"kept: fitted in sequence the plan exceeded max_error "
                                                 f"{opts.max_error:g}"] * len(sites[worst].acts), cost)
            plan.notes.append(f"{sites[worst].path} kept after the sequential fit measured "
                              f"{measured.model_error:.3e} > max_error {opts.max_error:g}")
    fit = opts.fit_target
    for i, sp in enumerate(plan.sites):
        sp.est_error = errors.get(i, 0.0) if sp.changes else 0.0
        point = engine.points.get(i, "")
        sp.error_source = ("calib: site not reached" if not cal.inputs[i] else
                           f"calib: fitted in sequence, global target ({point})" if fit == "global" and point else
                           "calib: fitted in sequence, local target")
    plan.measured_error = measured.model_error
    plan.fit_target = fit
    # The plan carries its fits: collapse_ installs them without calibration data (and refits with it).
    fitted_together = tuple(sorted(sites[i].path for i in blocks))
    plan.fitted = {sites[i].path: FittedSite(b, weights_version(sites[i].module), fitted_together)
                   for i, b in blocks.items()}
    how = ("each site fitted to what its output must be for the dense model's stream after it (global target)"
           if fit == "global" else "each site fitted to its own original function on its current inputs (local target)")
    return _calibrated_notes(plan, cal.rows, "with every linearised joint replaced by its least-squares fit (sites "
                             f"fitted in forward order, {engine.kind}; {how})")


def _calibrated_notes(plan: CollapsePlan, rows: int, how: str) -> CollapsePlan:
    """Record the calibration size and say, first in the notes, what the errors mean."""
    plan.calib_rows = rows
    plan.notes[:0] = [
        f"est. error: ||delta|| / ||y|| at each site's output on {rows} calibration rows, {how}",
        f"measured model-output error ||dy|| / ||y|| with the planned sites collapsed together: "
        f"{plan.measured_error:.3e}",
    ]
    return plan
