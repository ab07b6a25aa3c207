"""Budget search: which joints (and PARTIAL widths) to collapse under ``max_error`` or ``target``."""
from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from .calibration import Calibration, Chosen
from .fitting import FittedCalibration
from .cost import cost_model, site_cost
from .options import PlanOptions
from .plan import CollapsePlan
from .sites import joint_width
from .threshold import build_site_plan


# 4096 combinations = 12 two-way candidates; each measured combination costs one forward pass
# over calib. max_error stops at the first feasible saving level (few passes), target measures
# every combination that meets it (thousands of passes at this size: benchmarks/results/notes.md
# has timings). Greedy measures each option once, then one pass per move tried.
MAX_EXHAUSTIVE = 4096

# PARTIAL widths offered to a budget on a per-channel site: where the skip removes 1/4, 1/2 and
# 3/4 of what a MERGE would (plus as many channels as are within tol). Each extra width is one
# more option per site in the exhaustive product.
PARTIAL_FRACTIONS = (0.25, 0.5, 0.75)


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
            no_saving[i] = (f"collapsing saves no {_name(objective)}: hidden width {h} <= "
                            f"{d_in}*{d_out}/({d_in}+{d_out}) makes one merged Linear no cheaper")
    return units, no_saving


# Kept-width fractions a fitted plan offers per joint (of what a full collapse would save).
FITTED_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def _round_kept(h: int, k_linear: int, round_to: int) -> int:
    """Folded channels when the kept width ``h - k_linear`` is rounded to a multiple of ``round_to``."""
    if round_to <= 1 or h <= round_to:
        return k_linear
    kept = max(round_to, min(h - round_to, round_to * round((h - k_linear) / round_to)))
    return h - kept


def _units_fitted(cal: FittedCalibration, opts: PlanOptions, objective) -> tuple[list[Unit], dict[int, str]]:
    """Every joint of every site, with PARTIAL widths whose channels the data chooses (any alpha)."""
    units, no_saving = [], {}
    for i, sm in enumerate(cal.sites):
        site = sm.site
        for j, act in enumerate(site.acts):
            if act is None:
                continue
            h = joint_width(site, j)
            none = [[] for _ in site.acts]

            def cost(ch: list[int]) -> float:
                chosen = [list(c) for c in none]
                chosen[j] = ch
                return site_cost(site, chosen, objective)

            keep = cost([])
            full = list(range(h))
            options = []
            if cal.inputs[i]:
                order = cal.scores(i, j).argsort().tolist()
                most = keep - cost(full)
                counts = {_round_kept(h, bisect.bisect_left(range(h), f * max(most, 0), key=lambda k: keep - cost(
                    order[:k])), opts.round_to) for f in FITTED_FRACTIONS}
                options += [sorted(order[:k]) for k in sorted(counts) if 0 < k < h and keep - cost(order[:k]) > 0]
            if cost(full) < keep or len(site.acts) > 1:
                options.append(full)  # in a chain a linear joint may unlock a merge further on
            if options:
                units.append(Unit(i, j, [[]] + options))
            elif len(site.acts) == 1:
                d_in, _, d_out = site.widths
                no_saving[i] = (f"collapsing saves no {_name(objective)}: hidden width {h} <= "
                                f"{d_in}*{d_out}/({d_in}+{d_out}) makes one merged Linear no cheaper")
    return units, no_saving


def budget_plan(cal: Calibration | FittedCalibration, opts: PlanOptions, cost=None) -> CollapsePlan:
    """The plan a ``max_error`` / ``target`` budget chooses (see :func:`~lc_kernels.plan_collapse`);
    ``cost`` is the cost model's objective (a measured latency table for ``objective="latency"``)."""
    tol, max_error, target, search = opts.tol, opts.max_error, opts.target, opts.search
    objective = opts.objective if cost is None else cost
    units, no_saving = (_units_fitted(cal, opts, objective) if isinstance(cal, FittedCalibration)
                        else _units(cal, tol, objective))
    s = Search(cal, units, objective)
    total = s.saving(s.full)
    # target is a fraction of the collapsible sites' dense cost (FLOPs, or measured time), the same
    # meaning in the planner, compress, the CLI and every report.
    dense = sum(site_cost(sm.site, [[] for _ in sm.site.acts], objective) for sm in cal.sites)
    if target is not None and total == 0:
        raise ValueError(f"target {target:g} cannot be met: no site's collapse saves {_name(objective)} under the cost model")
    if target is not None and target * dense > total * (1 + 1e-9):
        raise ValueError(f"target {target:g} asks to remove {target:.0%} of the collapsible sites' {_name(objective)}, "
                         f"but collapsing every site removes at most {total / dense:.1%}; lower target (or use "
                         "max_error=)")
    n = s.n_combinations()
    if search == "exhaustive" and n > MAX_EXHAUSTIVE:
        raise ValueError(f"exhaustive search over {n} combinations exceeds {MAX_EXHAUSTIVE} forward passes; "
                         "use search='greedy' (or 'auto')")
    used = "exhaustive" if search == "exhaustive" or (search == "auto" and n <= MAX_EXHAUSTIVE) else "greedy"
    need = None if target is None else min(target * dense, total)
    combo = (s.exhaustive if used == "exhaustive" else s.greedy)(need, max_error)
    err = s.error(combo)
    if target is not None and max_error is not None and err > max_error:
        raise ValueError(f"no plan meets max_error {max_error:g} and target {target:g}: the least-error plan the {used} search found removing {target:.0%} of "
                         f"the collapsible {_name(objective)} has measured error {err:.3e} > {max_error:g}; raise max_error "
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
                        tol, opts.objective, max_error=max_error, target=target, search=used)
    saved = s.saving(combo)
    plan.notes += [
        f"search: {used} over {len(units)} candidate joints ({n} combinations, {cal.passes} forward passes"
        + (f"; exhaustive up to {MAX_EXHAUSTIVE})" if used == "greedy" else ")"),
        (f"removes {saved / dense if dense else 0:.1%} of the collapsible sites' {opts.objective} ({saved} of {dense} "
         f"per token; collapsing everything would remove {total / dense if dense else 0:.1%}); "
         if isinstance(objective, str) else
         f"removes {saved / dense if dense else 0:.1%} of the collapsible sites' measured time "
         f"({1e3 * saved:.3f} of {1e3 * dense:.3f} ms per call); ") + "tol does not block a site under a budget",
    ]
    return plan


def _name(objective) -> str:
    return getattr(cost_model(objective), "name", "latency")
