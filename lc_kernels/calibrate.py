"""Calibrated planning: exact collapse residuals on real inputs, measured output error, budgets.

Collapsing a joint sets its slope to 1 on the folded channels, so in eval semantics (BatchNorm
folded, dropout off) a collapsed site computes its original output plus an exact residual:
for ``sigma_alpha(z) = alpha*z + (1-alpha)*base(z)`` it is ``W2 @ ((1-alpha) * (z - base(z)))``
with ``z = fc1(x)`` after a pre-activation BatchNorm and ``W2`` holding a post-activation one
(:func:`~lc_kernels.collapse.canonical_affines`). A chain re-runs its Linears in float64 to
carry a residual through the joints that stay nonlinear.

The model-output error of a set of collapses is *measured*: the model runs on the calibration
inputs with every collapsed site's output shifted by its residual, computed from the input that
site actually receives. That is the collapsed model's function (up to the rounding of the
merged weights) without touching a weight or copying the model.
"""
from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .collapse import Affine, canonical_affines
from .ops.reference import base_activation, collapsible_activation
from .planner import (
    KEEP, OBJECTIVES, PARTIAL, CollapsePlan, Site, SitePlan, _check_tol, build_site_plan, collapsible_sites,
    joint_width, plan_site, site_cost,
)

SEARCHES = ("auto", "exhaustive", "greedy")
# 4096 combinations = 12 two-way candidates; each measured combination costs one forward pass
# over calib. 12 MLP sites 64-256-64 on 512 rows (1 CPU thread, 32 ms a pass): max_error stops
# at the first feasible saving level (79 passes, 4 s), target measures every combination that
# meets it (2510 passes, 73 s). Greedy measures each option once, then one pass per move tried.
MAX_EXHAUSTIVE = 4096
# PARTIAL widths offered to a budget on a per-channel site: where the skip removes 1/4, 1/2 and
# 3/4 of what a MERGE would (plus as many channels as are within tol). Each extra width is one
# more option per site in the exhaustive product.
PARTIAL_FRACTIONS = (0.25, 0.5, 0.75)

Chosen = list[list[int]]  # per joint of a site: the channels that become linear


# ----------------------------------------------------------------------------------------------
# calibration inputs


def _input_linear(model: nn.Module) -> nn.Linear | None:
    """The first module holding parameters, when it is a Linear: it fixes the input width and dtype."""
    for m in model.modules():
        if next(m.parameters(recurse=False), None) is not None:
            return m if isinstance(m, nn.Linear) else None
    return None


def calib_batches(model: nn.Module, calib: object) -> list[torch.Tensor]:
    """The calibration inputs as a list of tensors on the model's device, checked against the model.

    ``calib`` is a tensor, a tuple/list whose first element is the input tensor (``(x, y)``),
    or an iterable (e.g. a DataLoader) of either. When the model starts with a Linear, every
    input must be floating point in that Linear's dtype with last dim ``in_features``.
    """
    if isinstance(calib, torch.Tensor) or (isinstance(calib, (tuple, list)) and calib
                                           and isinstance(calib[0], torch.Tensor)):
        items = [calib]
    elif isinstance(calib, (str, bytes, dict)) or not isinstance(calib, Iterable):
        raise TypeError("calib must be a tensor, an (input, ...) tuple, or an iterable/DataLoader of those, "
                        f"got {type(calib).__name__}")
    else:
        items = list(calib)
    if not items:
        raise ValueError(f"calib is empty (an empty {type(calib).__name__}); pass at least one batch of inputs")
    lin = _input_linear(model)
    device = next(model.parameters()).device
    batches = []
    for i, item in enumerate(items):
        x = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calib batch {i}: expected a tensor or an (input, ...) tuple, got {type(item).__name__}")
        if x.numel() == 0:
            raise ValueError(f"calib batch {i} is empty (shape {tuple(x.shape)}); pass at least one row")
        if lin is not None:
            if not x.is_floating_point():
                raise TypeError(f"calib batch {i} has dtype {x.dtype}, expected floating point: the model's first "
                                f"Linear computes in {lin.weight.dtype}; pass x.to({lin.weight.dtype})")
            if x.dim() == 0 or x.shape[-1] != lin.in_features:
                raise ValueError(f"calib batch {i} has shape {tuple(x.shape)}; the model's first Linear expects "
                                 f"last dim {lin.in_features}")
            if x.dtype != lin.weight.dtype:
                raise TypeError(f"calib batch {i} has dtype {x.dtype}, the model computes in {lin.weight.dtype}; "
                                f"cast with x.to({lin.weight.dtype})")
        batches.append(x.to(device))
    return batches


def _flat_output(out: object) -> torch.Tensor:
    """Every floating-point tensor in the model's output, flattened into one float64 vector."""
    if isinstance(out, torch.Tensor):
        parts = [out] if out.is_floating_point() else []
    elif isinstance(out, dict):
        parts = [_flat_output(v) for v in out.values() if v is not None]
    elif isinstance(out, (tuple, list)):
        parts = [_flat_output(v) for v in out if v is not None]
    else:
        parts = []
    parts = [p.detach().reshape(-1).to(torch.float64) for p in parts]
    if not parts:
        raise TypeError(f"the model's output ({type(out).__name__}) holds no floating-point tensor to measure")
    return torch.cat(parts)


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


# ----------------------------------------------------------------------------------------------
# residuals


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

    def __init__(self, model: nn.Module, sites: list[Site], batches: list[torch.Tensor]):
        self.model, self.batches = model, batches
        self.sites = [SiteMath.of(s) for s in sites]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in sites]
        self._y2 = [0.0] * len(sites)
        self._cache: dict[tuple, float] = {}
        self.passes = 0

        def capture(i: int):
            def hook(mod, args, kwargs, out):
                # A copy: a later in-place op on the activations must not change what was recorded.
                self.inputs[i].append((args[0] if args else kwargs["x"]).detach().clone())
                self._y2[i] += float(out.detach().to(torch.float64).pow(2).sum())
            return hook

        handles = [s.module.register_forward_hook(capture(i), with_kwargs=True) for i, s in enumerate(sites)]
        try:
            self.reference = [_flat_output(self._forward(b, i)) for i, b in enumerate(batches)]
        finally:
            for h in handles:
                h.remove()
        y2 = sum(float(r.pow(2).sum()) for r in self.reference)
        if not math.isfinite(y2) or y2 == 0:
            raise ValueError(f"the model's output on calib has norm {math.sqrt(y2)}; a relative error needs a "
                             "finite, non-zero output")
        self.y_norm = math.sqrt(y2)
        self.rows = sum(b.shape[0] if b.dim() > 1 else 1 for b in batches)

    def _forward(self, x: torch.Tensor, i: int) -> object:
        try:
            return self.model(x)
        except RuntimeError as e:
            raise ValueError(f"the model's forward failed on calib batch {i} of shape {tuple(x.shape)}: {e}") from e

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
            def hook(mod, args, kwargs, out):
                x = args[0] if args else kwargs["x"]
                return out + self.sites[i].residual(x, config[i]).to(out.dtype)
            return hook

        handles = [self.sites[i].site.module.register_forward_hook(shift(i), with_kwargs=True) for i in config]
        try:
            d2 = sum(float((_flat_output(self._forward(b, k)) - ref).pow(2).sum())
                     for k, (b, ref) in enumerate(zip(self.batches, self.reference)))
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
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


# ----------------------------------------------------------------------------------------------
# budget search


@dataclass
class Unit:
    """One collapsible joint and its alternatives: ``options[0]`` keeps it, later ones save more."""

    site: int
    joint: int
    options: list[list[int]]


class Search:
    """Savings (cost model) and measured error of combinations: one option index per unit."""

    def __init__(self, cal: Calibration, units: list[Unit], objective: str):
        self.cal, self.units, self.objective = cal, units, objective
        self._cost: dict[tuple, int] = {}
        self.keep = tuple(0 for _ in units)
        self.full = tuple(len(u.options) - 1 for u in units)

    def config(self, combo: tuple[int, ...]) -> dict[int, Chosen]:
        cfg: dict[int, Chosen] = {}
        for u, o in zip(self.units, combo):
            if o:
                site = self.cal.sites[u.site].site
                cfg.setdefault(u.site, [[] for _ in site.acts])[u.joint] = u.options[o]
        return cfg

    def _site_cost(self, i: int, chosen: Chosen) -> int:
        key = (i, tuple(map(tuple, chosen)))
        if key not in self._cost:
            self._cost[key] = site_cost(self.cal.sites[i].site, chosen, self.objective)
        return self._cost[key]

    def saving(self, combo: tuple[int, ...]) -> int:
        cfg = self.config(combo)
        return sum(self._site_cost(i, [[]] * len(c)) - self._site_cost(i, c) for i, c in cfg.items())

    def error(self, combo: tuple[int, ...]) -> float:
        return self.cal.model_error(self.config(combo))

    def n_combinations(self) -> int:
        return math.prod(len(u.options) for u in self.units)

    def exhaustive(self, need: float | None, max_error: float | None) -> tuple[int, ...]:
        """The optimum over every combination (see :func:`plan_with_budget`)."""
        combos = itertools.product(*(range(len(u.options)) for u in self.units))
        if need is not None:
            return min((c for c in combos if self.saving(c) >= need), key=lambda c: (self.error(c), -self.saving(c)))
        # Largest saving first: the first saving level with a feasible combination wins, so only
        # the combinations at or above the optimum's saving are measured.
        for _, group in itertools.groupby(sorted(combos, key=self.saving, reverse=True), key=self.saving):
            feasible = [(e, c) for e, c in ((self.error(c), c) for c in group) if e <= max_error]
            if feasible:
                return min(feasible)[1]
        return self.keep  # unreachable: keeping everything has error 0

    def greedy(self, need: float | None, max_error: float | None) -> tuple[int, ...]:
        """Raise one unit at a time, best measured single-unit error per unit of saving first.

        With ``max_error`` a move is kept only when the combined set, measured, stays within the
        bound, so the result always honours it. With ``need`` moves are taken until the saving
        reaches it (a move saving nothing on its own may unlock a chain merge, so it is allowed
        there, after every move that saves); then any unit is lowered while the saving still
        meets ``need`` and the measured error drops, which undoes early picks the later ones
        made unnecessary.
        """
        cur = self.keep
        rejected: set[tuple[int, int]] = set()

        def single(u: int, o: int) -> float:
            return self.error(_with(self.keep, u, o))

        while need is None or self.saving(cur) < need:
            base = self.saving(cur)
            moves = []
            for u, unit in enumerate(self.units):
                for o in range(cur[u] + 1, len(unit.options)):
                    ds = self.saving(_with(cur, u, o)) - base
                    if (u, o) in rejected or ds < 0 or (ds == 0 and need is None):
                        continue
                    de = single(u, o) - single(u, cur[u])
                    moves.append((ds == 0, de / ds if ds else de, -ds, u, o))
            for *_, u, o in sorted(moves):
                if need is not None or self.error(_with(cur, u, o)) <= max_error:
                    cur = _with(cur, u, o)
                    break
                rejected.add((u, o))
            else:
                break
        while need is not None:
            lower = [t for u, now in enumerate(cur) for o in range(now) if self.saving(t := _with(cur, u, o)) >= need]
            best = min(lower, key=self.error, default=None)
            if best is None or self.error(best) >= self.error(cur):
                break
            cur = best
        return cur


def _with(combo: tuple[int, ...], u: int, o: int) -> tuple[int, ...]:
    """``combo`` with unit ``u`` at option ``o``."""
    return combo[:u] + (o,) + combo[u + 1:]


def _units(cal: Calibration, tol: float, objective: str) -> tuple[list[Unit], dict[int, str]]:
    """Candidate units per joint, and why a two-Linear site offers none (its collapse saves nothing)."""
    units, no_saving = [], {}
    for i, sm in enumerate(cal.sites):
        site = sm.site
        if len(site.acts) > 1:
            units += [Unit(i, j, [[], list(range(joint_width(site, j)))])
                      for j, act in enumerate(site.acts) if act is not None]
            continue
        act, (d_in, h, d_out) = site.acts[0], site.widths
        keep = site_cost(site, [[]], objective)
        options = []
        if act.num_parameters > 1 and cal.inputs[i]:
            order = cal.channel_scores(i).argsort().tolist()
            merge_saving = keep - site_cost(site, [list(range(h))], objective)

            def saving(k: int) -> int:
                return keep - site_cost(site, [order[:k]], objective)

            counts = {sum(abs(1 - a) <= tol for a in act.alpha.detach().float().cpu().tolist())}
            counts |= {bisect.bisect_left(range(h), f * merge_saving, key=saving) for f in PARTIAL_FRACTIONS}
            options += [sorted(order[:k]) for k in sorted(counts) if 0 < k < h and saving(k) > 0]
        if site_cost(site, [list(range(h))], objective) < keep:
            options.append(list(range(h)))
        if options:
            units.append(Unit(i, 0, [[]] + options))
        else:
            no_saving[i] = (f"collapsing saves no {objective}: hidden width {h} <= "
                            f"{d_in}*{d_out}/({d_in}+{d_out}) makes one merged Linear no cheaper")
    return units, no_saving


# ----------------------------------------------------------------------------------------------
# entry point


def _check_number(name: str, v: object) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def plan_with_budget(
    model: nn.Module,
    *,
    tol: float = 0.05,
    calib: object = None,
    max_error: float | None = None,
    target: float | None = None,
    force: bool = False,
    objective: str = "flops",
    search: str = "auto",
) -> CollapsePlan:
    """Plan with calibration data: exact per-site errors, measured model error, optional budget.

    Without a budget the decisions are :func:`~lc_kernels.planner.plan_collapse`'s (``tol``,
    ``force``); each site's ``est_error`` becomes ``||delta|| / ||y_site||`` of its planned
    collapse on ``calib`` and ``measured_error`` the model-output error with all of them.

    ``max_error=e`` chooses, over joints (per-channel two-Linear sites also over PARTIAL
    widths), the set saving the most ``objective`` with measured model-output error
    ``||dy|| / ||y|| <= e``; ``target=t`` in (0, 1] the set with the least measured error that
    removes at least ``t`` of what collapsing everything would. Given both, the target plan
    must also meet ``e``. ``search="auto"`` is exhaustive up to ``MAX_EXHAUSTIVE``
    combinations and greedy above; the notes say which ran. ``tol`` does not block a site
    under a budget. The model is run in eval mode under ``torch.no_grad`` and left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan_with_budget expects an nn.Module, got {type(model).__name__}")
    tol = _check_tol(tol)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if max_error is not None and (_check_number("max_error", max_error) < 0):
        raise ValueError(f"max_error bounds ||dy|| / ||y|| and must be >= 0, got {max_error!r}")
    if target is not None and not 0 < _check_number("target", target) <= 1:
        raise ValueError(f"target is the fraction of collapsible {objective} to remove, in (0, 1]; got {target!r}")
    budget = max_error is not None or target is not None
    if budget and calib is None:
        raise ValueError("max_error and target are measured on calibration data: pass calib= (a batch of typical "
                         "inputs, an (input, target) tuple or a DataLoader)")
    if budget and force:
        raise ValueError("force=True collapses every joint, a budget chooses which: pass one of them")
    sites = collapsible_sites(model)
    with eval_no_grad(model):
        cal = Calibration(model, sites, calib_batches(model, calib))
        if budget:
            plan = _budget_plan(cal, tol, max_error, target, objective, search)
        else:
            plan = CollapsePlan([plan_site(s, tol, force=force, objective=objective) for s in sites], tol, objective,
                                forced=force)
        config = {i: chosen_of(s, sp) for i, (s, sp) in enumerate(zip(sites, plan.sites))}
        for i, sp in enumerate(plan.sites):
            sp.est_error = cal.site_error(i, config[i]) if sp.changes else 0.0
            sp.error_source = ("calib: site not reached" if not cal.inputs[i] else
                               "calib: exact residual" if len(sites[i].acts) == 1 else "calib: float64 re-run")
        plan.measured_error = cal.model_error(config)
    plan.calib_rows = cal.rows
    plan.notes[:0] = [
        f"est. error: ||delta|| / ||y|| at each site's output on {cal.rows} calibration rows, from the exact "
        "residual (1-alpha)*W2*(base(z)-z) (chains: re-run in float64)",
        f"measured model-output error ||dy|| / ||y|| with the planned sites collapsed together: "
        f"{plan.measured_error:.3e}",
    ]
    return plan


def _budget_plan(cal: Calibration, tol: float, max_error: float | None, target: float | None, objective: str,
                 search: str) -> CollapsePlan:
    units, no_saving = _units(cal, tol, objective)
    s = Search(cal, units, objective)
    total = s.saving(s.full)
    if target is not None and total == 0:
        raise ValueError(f"target {target:g} cannot be met: no site's collapse saves {objective} under the cost model")
    n = s.n_combinations()
    if search == "exhaustive" and n > MAX_EXHAUSTIVE:
        raise ValueError(f"exhaustive search over {n} combinations exceeds {MAX_EXHAUSTIVE} forward passes; "
                         "use search='greedy' (or 'auto')")
    used = "exhaustive" if search == "exhaustive" or (search == "auto" and n <= MAX_EXHAUSTIVE) else "greedy"
    need = None if target is None else target * total
    combo = (s.exhaustive if used == "exhaustive" else s.greedy)(need, max_error)
    err = s.error(combo)
    if target is not None and max_error is not None and err > max_error:
        raise ValueError(f"no plan meets max_error {max_error:g} and target {target:g}: the least-error plan the {used} search found removing {target:.0%} of "
                         f"the collapsible {objective} has measured error {err:.3e} > {max_error:g}; raise max_error "
                         "or lower target")

    chosen: dict[int, Chosen] = {i: [[] for _ in sm.site.acts] for i, sm in enumerate(cal.sites)}
    reasons: dict[int, list[str]] = {i: ["kept by the budget"] * len(sm.site.acts) for i, sm in enumerate(cal.sites)}
    for i, why in no_saving.items():
        reasons[i] = [why]
    for u, o in zip(units, combo):
        if o:
            ch, h = u.options[o], joint_width(cal.sites[u.site].site, u.joint)
            chosen[u.site][u.joint] = ch
            reasons[u.site][u.joint] = "chosen by the budget" + (
                f": its {len(ch)}/{h} lowest-residual channels fold into a skip Linear" if len(ch) < h else "")
    plan = CollapsePlan([build_site_plan(sm.site, chosen[i], reasons[i], objective) for i, sm in enumerate(cal.sites)],
                        tol, objective, max_error=max_error, target=target, search=used)
    saved = s.saving(combo)
    plan.notes += [
        f"search: {used} over {len(units)} candidate joints ({n} combinations, {cal.passes} forward passes"
        + (f"; exhaustive up to {MAX_EXHAUSTIVE})" if used == "greedy" else ")"),
        f"removes {saved / total if total else 0:.1%} of the collapsible {objective} ({saved} of {total} per token); "
        "tol does not block a site under a budget",
    ]
    return plan
