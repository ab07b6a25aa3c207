"""Which joints to collapse, and what it costs: sites, cost model, chain DP, CollapsePlan.

Everything here reads the model and never mutates it.

Cost model (per token): a Linear d_in -> d_out costs ``2 * d_in * d_out`` FLOPs and holds
``d_in * d_out`` weights (+ ``d_out`` bias). Joints between Linears are MERGE (multiply the
maps into one Linear), FACTOR (keep both Linears, drop the activation), KEEP (nonlinear), or
PARTIAL (per-channel slopes: linear channels fold into a skip Linear).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

from torch import nn

from .nn.activation import CollapsibleActivation
from .nn.mlp import LCChain, LCFusedMLP

MERGE, FACTOR, KEEP, PARTIAL = "MERGE", "FACTOR", "KEEP", "PARTIAL"
DECISIONS = (MERGE, FACTOR, KEEP, PARTIAL)
OBJECTIVES = ("flops", "params")
PLAN_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# sites


@dataclass
class Site:
    """A read-only view of one collapsible block: its Linear widths and joint activations."""

    path: str
    module: nn.Module
    widths: list[int]
    acts: list[CollapsibleActivation | None]  # None: the joint is already linear (factored)
    biases: list[bool]

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def linears_of(m: nn.Module) -> list[nn.Linear]:
    """The Linears of an LCFusedMLP or LCChain, in order."""
    return [m.fc1, m.fc2] if isinstance(m, LCFusedMLP) else list(m.linears)


def find_sites(model: nn.Module) -> list[Site]:
    """Every uncollapsed LCFusedMLP and every LCChain with a joint left, in module order."""
    sites = []
    for path, m in model.named_modules():
        if isinstance(m, LCFusedMLP) and m.form == "mlp":
            acts = [m.act]
        elif isinstance(m, LCChain) and any(isinstance(a, CollapsibleActivation) for a in m.acts):
            acts = [a if isinstance(a, CollapsibleActivation) else None for a in m.acts]
        else:
            continue
        lins = linears_of(m)
        widths = [lins[0].in_features] + [lin.out_features for lin in lins]
        sites.append(Site(path, m, widths, acts, [lin.bias is not None for lin in lins]))
    return sites


# ----------------------------------------------------------------------------------------------
# cost model


def linear_macs(d_in: int, d_out: int) -> int:
    """Multiply-accumulates per token of a Linear (FLOPs are twice this)."""
    return d_in * d_out


def group_cost(widths: list[int], p: int, q: int, objective: str = "flops") -> int:
    """Cost of the Linears p..q multiplied into one map: FLOPs/token or parameters."""
    d_in, d_out = widths[p], widths[q + 1]
    return 2 * linear_macs(d_in, d_out) if objective == "flops" else d_in * d_out + d_out


def chain_groups(widths: list[int], linear_joint: list[bool], objective: str = "flops") -> list[tuple[int, int]]:
    """Optimal grouping of a chain's Linears: which linear joints to merge, which to factor.

    ``widths`` has n+1 entries for n Linears; ``linear_joint[i]`` says whether the joint after
    Linear i may lose its activation. Only runs connected by linear joints can merge; inside a
    run, the best partition into consecutive groups is a 1-D dynamic program over group
    boundaries (O(n^2)), because a group's cost depends only on its two outer widths.
    Returns the groups as inclusive (first, last) Linear indices.
    """
    n = len(widths) - 1
    if len(linear_joint) != n - 1:
        raise ValueError(f"a chain of {n} Linears has {n - 1} joints, got {len(linear_joint)} flags")
    best = [0] * (n + 1)
    cut = [0] * (n + 1)
    run_start = 0
    for q in range(n):  # best[q + 1]: optimum for Linears 0..q
        if q > 0 and not linear_joint[q - 1]:
            run_start = q
        best[q + 1], cut[q + 1] = min(
            (best[p] + group_cost(widths, p, q, objective), p) for p in range(run_start, q + 1)
        )
    groups, q = [], n
    while q > 0:
        groups.append((cut[q], q - 1))
        q = cut[q]
    return groups[::-1]


def groups_to_decisions(groups: list[tuple[int, int]], linear_joint: list[bool]) -> list[str]:
    """Joint decisions implied by a grouping: inside a group MERGE, linear between groups FACTOR."""
    decisions = []
    for i, lin in enumerate(linear_joint):
        inside = any(p <= i < q for p, q in groups)
        decisions.append(MERGE if inside else FACTOR if lin else KEEP)
    return decisions


def decisions_cost(widths: list[int], decisions: list[str], linear_channels: list[int] | None = None,
                   objective: str = "flops", biases: list[bool] | None = None) -> int:
    """Cost of a site after applying per-joint ``decisions`` (PARTIAL only on 2-Linear sites)."""
    if PARTIAL in decisions:
        d_in, h, d_out = widths
        n_lin = len(linear_channels or [])
        kept = [d_in, h - n_lin, d_out]
        return decisions_cost(kept, [KEEP], objective=objective) + group_cost([d_in, d_out], 0, 0, objective)
    cost, p = 0, 0
    for q in range(len(widths) - 1):
        if q == len(widths) - 2 or decisions[q] != MERGE:
            cost += group_cost(widths, p, q, objective)
            p = q + 1
    return cost


# ----------------------------------------------------------------------------------------------
# plan


@dataclass
class JointPlan:
    """One activation between two Linears: its slopes and what happens to it."""

    alpha: list[float]
    decision: str
    reason: str
    linear_channels: list[int] | None = None  # PARTIAL: channels folded into the skip

    @property
    def deviation(self) -> float:
        """max |1 - alpha| over the joint's channels (the no-data error proxy)."""
        return max(abs(1.0 - a) for a in self.alpha)


@dataclass
class SitePlan:
    """The plan for one site (an LCFusedMLP or an LCChain)."""

    path: str
    kind: str
    widths: list[int]
    joints: list[JointPlan]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    est_error: float | None = None
    error_source: str = "|1-alpha| proxy"

    @property
    def decision(self) -> str:
        ds = [j.decision for j in self.joints]
        return ds[0] if len(ds) == 1 else "/".join(ds)

    @property
    def changes(self) -> bool:
        return any(j.decision != KEEP for j in self.joints)


@dataclass
class CollapsePlan:
    """Per-site decisions with their cost and estimated error. ``print(plan)`` shows a table."""

    sites: list[SitePlan]
    tol: float
    objective: str = "flops"
    forced: bool = False
    max_error: float | None = None
    target: float | None = None
    notes: list[str] = field(default_factory=list)
    measured_error: float | None = None  # ||dy|| / ||y|| at the model output, all sites collapsed together
    calib_rows: int | None = None
    search: str | None = None  # "exhaustive" or "greedy" when a budget decided

    def __iter__(self) -> Iterator[SitePlan]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, path: str) -> SitePlan:
        for s in self.sites:
            if s.path == path:
                return s
        raise KeyError(f"no site {path!r} in this plan; sites: {[s.path for s in self.sites]}")

    @property
    def flops_before(self) -> int:
        return sum(s.flops_before for s in self.sites)

    @property
    def flops_after(self) -> int:
        return sum(s.flops_after for s in self.sites)

    @property
    def params_before(self) -> int:
        return sum(s.params_before for s in self.sites)

    @property
    def params_after(self) -> int:
        return sum(s.params_after for s in self.sites)

    def joint_counts(self) -> tuple[int, int]:
        """(joints made linear, all joints)."""
        joints = [j for s in self.sites for j in s.joints]
        return sum(j.decision in (MERGE, FACTOR) for j in joints), len(joints)

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "CollapsePlan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a CollapsePlan (format {got!r}, expected {PLAN_FORMAT}); was it written by to_json()?")
        try:
            sites = [SitePlan(**{**s, "joints": [JointPlan(**j) for j in s["joints"]]}) for s in d["sites"]]
            rest = {k: v for k, v in d.items() if k not in ("format", "sites")}
            return cls(sites=sites, **rest)
        except (KeyError, TypeError) as e:
            raise ValueError(f"corrupt CollapsePlan: {e}") from e

    @classmethod
    def from_json(cls, s: str) -> "CollapsePlan":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"CollapsePlan JSON does not parse: {e}") from e
        return cls.from_dict(d)

    def __str__(self) -> str:
        head = ("site", "alpha", "decision", "params", "FLOPs/token", "est. error", "reason")
        rows = []
        for s in self.sites:
            alphas = ", ".join(_fmt_alpha(j) for j in s.joints)
            err = "-" if s.est_error is None else f"{s.est_error:.2e}"
            reasons = _fmt_reasons(s.joints)
            rows.append((s.path, alphas, s.decision, f"{_si(s.params_before)} -> {_si(s.params_after)}",
                         f"{_si(s.flops_before)} -> {_si(s.flops_after)}", err, reasons))
        lin, total = self.joint_counts()
        ratio = self.flops_before / max(self.flops_after, 1)
        measured = "" if self.measured_error is None else f"{self.measured_error:.2e} (model)"
        rows.append(("TOTAL", "", f"{lin}/{total} linear", f"{_si(self.params_before)} -> {_si(self.params_after)}",
                     f"{_si(self.flops_before)} -> {_si(self.flops_after)}", measured, f"{ratio:.2f}x fewer FLOPs"))
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        sep = "  ".join("-" * w for w in widths)
        lines = [f"CollapsePlan(tol={self.tol}, objective={self.objective}"
                 + (f", max_error={self.max_error}" if self.max_error is not None else "")
                 + (f", target={self.target}" if self.target is not None else "")
                 + (f", search={self.search}" if self.search is not None else "") + ")",
                 fmt(head), sep, *map(fmt, rows[:-1]), sep, fmt(rows[-1]), *self.notes]
        return "\n".join(lines)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= 10 * scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _fmt_reasons(joints: list[JointPlan]) -> str:
    distinct = list(dict.fromkeys(j.reason for j in joints))
    if len(distinct) == 1:
        return distinct[0]
    return "; ".join(f"j{i}: {j.reason}" for i, j in enumerate(joints))


def _fmt_alpha(j: JointPlan) -> str:
    a = j.alpha
    s = f"{a[0]:.3f}" if len(a) == 1 else f"[{min(a):.2f}..{max(a):.2f}]"
    if j.linear_channels is not None:
        s += f" {len(j.linear_channels)}/{len(a)} lin"
    return s


# ----------------------------------------------------------------------------------------------
# planning


def _check_tol(tol: object) -> float:
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0 (max |1 - alpha| to collapse), got {tol!r}")
    return float(tol)


def site_params(site: Site) -> int:
    """Parameters the site holds now (Linears, slopes, BatchNorm affine terms)."""
    return sum(p.numel() for p in site.module.parameters())


def joint_width(site: Site, i: int) -> int:
    """Hidden width at joint ``i`` (the output width of Linear ``i``)."""
    return site.widths[i + 1]


def decisions_for(site: Site, chosen: list[list[int]], objective: str = "flops") -> tuple[list[str], list[int] | None]:
    """Per-joint decisions and PARTIAL channels when ``chosen[i]`` channels of joint i become linear.

    A joint with every channel chosen (or no activation left) is linear: the chain DP picks
    MERGE or FACTOR. A strict, non-empty subset is PARTIAL (two-Linear sites only); empty is KEEP.
    """
    linear_joint, partial = [], None
    for i, (act, ch) in enumerate(zip(site.acts, chosen)):
        full = act is None or len(ch) == joint_width(site, i)
        if ch and not full:
            if len(site.acts) != 1:
                raise ValueError(f"site {site.path!r}: partial collapse needs a two-Linear site, joint {i} of a chain")
            partial = sorted(ch)
        linear_joint.append(full)
    decisions = groups_to_decisions(chain_groups(site.widths, linear_joint, objective), linear_joint)
    if partial is not None:
        decisions = [PARTIAL]
    return decisions, partial


def site_cost(site: Site, chosen: list[list[int]], objective: str = "flops") -> int:
    """Cost (``objective``) of the site once the ``chosen`` channels are linear."""
    decisions, partial = decisions_for(site, chosen, objective)
    return decisions_cost(site.widths, decisions, partial, objective)


def build_site_plan(site: Site, chosen: list[list[int]], reasons: list[str], objective: str = "flops") -> SitePlan:
    """SitePlan for explicit per-joint linear channels (see :func:`decisions_for`), with reasons."""
    decisions, partial = decisions_for(site, chosen, objective)
    joints = []
    for act, d, reason in zip(site.acts, decisions, reasons):
        if act is None:
            joints.append(JointPlan([1.0], d, "already linear"))
            continue
        alpha = act.alpha.detach().float().cpu().tolist()
        if d == FACTOR:
            reason += "; the factored pair is cheaper than one merged Linear"
        joints.append(JointPlan(alpha, d, reason, partial if d == PARTIAL else None))
    # The no-data proxy: the largest |1 - alpha| among the channels that become linear.
    est = max((abs(1 - j.alpha[c if len(j.alpha) > 1 else 0]) for j, act, ch in zip(joints, site.acts, chosen)
               if act is not None and j.decision != KEEP for c in ch), default=0.0)
    n_alpha_after = sum(len(j.alpha) for j in joints if j.decision == KEEP)
    if partial is not None:
        n_alpha_after = len(joints[0].alpha) - len(partial)
    return SitePlan(
        path=site.path, kind=site.kind, widths=list(site.widths), joints=joints,
        params_before=site_params(site),
        params_after=decisions_cost(site.widths, decisions, partial, "params") + n_alpha_after,
        flops_before=decisions_cost(site.widths, [KEEP] * len(joints)),
        flops_after=decisions_cost(site.widths, decisions, partial),
        est_error=est,
    )


def plan_site(site: Site, tol: float, *, force: bool = False, objective: str = "flops") -> SitePlan:
    """Threshold plan for one site: joints within ``tol`` of alpha = 1 become linear.

    On a two-Linear site with per-channel slopes that stays nonlinear, the channels within
    ``tol`` fold into a skip Linear when that is cheaper (|L| * (d_in + d_out) > d_in * d_out).
    """
    chosen, reasons = [], []
    for i, act in enumerate(site.acts):
        width = joint_width(site, i)
        if act is None:
            chosen.append(list(range(width)))
            reasons.append("already linear")
            continue
        alpha = act.alpha.detach().float().cpu().tolist()
        dev = max(abs(1 - a) for a in alpha)
        if dev <= tol:
            chosen.append(list(range(width)))
            reasons.append(f"|1-alpha| <= tol {tol:g}")
        elif force:
            chosen.append(list(range(width)))
            reasons.append(f"forced: |1-alpha|={dev:.3f} > tol {tol:g}")
        else:
            chosen.append([])
            reasons.append(f"|1-alpha|={dev:.3f} > tol {tol:g}")
    if len(site.acts) == 1 and not chosen[0] and site.acts[0].num_parameters > 1:
        lin_ch = [c for c, a in enumerate(site.acts[0].alpha.detach().float().cpu().tolist()) if abs(1 - a) <= tol]
        d_in, h, d_out = site.widths
        if lin_ch and site_cost(site, [lin_ch], objective) < site_cost(site, [[]], objective):
            chosen[0] = lin_ch
            reasons[0] = f"{len(lin_ch)}/{h} channels within tol {tol:g} fold into a skip Linear"
        elif lin_ch:
            reasons[0] += f"; {len(lin_ch)} linear channels too few to pay for a {d_in}x{d_out} skip"
    return build_site_plan(site, chosen, reasons, objective)


def collapsible_sites(model: nn.Module) -> list[Site]:
    """:func:`find_sites`, or a ValueError saying what to do when there are none."""
    sites = find_sites(model)
    if not sites:
        raise ValueError(
            "the model has no collapsible sites: run lc_kernels.prepare_(model) first "
            "(or it is fully collapsed already)"
        )
    return sites


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
) -> CollapsePlan:
    """Decide, per site, which joints become linear; reads the model, never changes it.

    A joint whose slopes are all within ``tol`` of 1 collapses (MERGE or FACTOR, whichever
    the cost model prefers; chains are solved optimally by dynamic programming). ``force=True``
    collapses every joint regardless of ``tol`` and says so in each reason.

    ``calib`` (a batch, an ``(input, ...)`` tuple, or an iterable of those) replaces the
    ``|1-alpha|`` proxy by the exact error of each collapse at its site's output and measures
    the model-output error of the whole plan. ``max_error`` (most savings with measured
    ``||dy|| / ||y|| <= max_error``) and ``target`` (least error removing at least that
    fraction of collapsible FLOPs) let the budget decide instead of ``tol``; ``search`` is
    ``"auto"`` (exhaustive when small), ``"exhaustive"`` or ``"greedy"``. See
    :func:`lc_kernels.calibrate.plan_with_budget`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan_collapse expects an nn.Module, got {type(model).__name__}")
    tol = _check_tol(tol)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if calib is not None or max_error is not None or target is not None:
        from .calibrate import plan_with_budget  # calibrated planning lives one layer down

        return plan_with_budget(model, tol=tol, calib=calib, max_error=max_error, target=target,
                                force=force, objective=objective, search=search)
    plan = CollapsePlan([plan_site(s, tol, force=force, objective=objective) for s in collapsible_sites(model)], tol,
                        objective, forced=force)
    plan.notes.append("est. error: max |1-alpha| over collapsed joints (no calibration data given)")
    return plan
