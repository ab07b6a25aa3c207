"""The cost model, one owner for FLOPs and parameters (planner, demo, bench and report use it).

Per token, a Linear d_in -> d_out costs ``2 * d_in * d_out`` FLOPs and holds ``d_in * d_out``
weights (+ ``d_out`` bias). A chain's best grouping into merged Linears is a dynamic program.
"""
from __future__ import annotations

import math

from torch import nn

from .plan import FACTOR, KEEP, MERGE, PARTIAL
from .sites import Site, joint_width


def linear_macs(d_in: int, d_out: int) -> int:
    """Multiply-accumulates per token of a Linear (FLOPs are twice this)."""
    return d_in * d_out


class CountCost:
    """FLOPs per token or parameters: the counting cost models.

    Every cost model answers the same three questions — ``for_site(site)`` (its view for one site),
    ``linear(d_in, d_out, joint)`` (a Linear, with joint ``joint``'s activation fused after it or
    None) and ``partial(d_in, kept, d_out, joint)`` (a PARTIAL block: a ``d_in -> kept -> d_out``
    MLP plus a ``d_in -> d_out`` skip) — so the planner never asks which one it holds; the measured
    :class:`~lc_kernels.planning.latency.LatencyTable` is the third.
    """

    def __init__(self, name: str):
        self.name = name

    def for_site(self, site: Site) -> "CountCost":
        return self

    def linear(self, d_in: int, d_out: int, joint: int | None = None) -> float:
        return 2 * linear_macs(d_in, d_out) if self.name == "flops" else d_in * d_out + d_out

    def partial(self, d_in: int, kept: int, d_out: int, joint: int | None = None) -> float:
        mlp = 2 * (d_in * kept + kept * d_out) if self.name == "flops" else d_in * kept + kept + kept * d_out + d_out
        return mlp + self.linear(d_in, d_out)


COUNTS = {"flops": CountCost("flops"), "params": CountCost("params")}


def cost_model(objective):
    """The cost model an ``objective`` names (``"flops"``, ``"params"``) or is (a latency table)."""
    return COUNTS[objective] if isinstance(objective, str) else objective


def group_cost(widths: list[int], p: int, q: int, objective="flops") -> float:
    """Cost of the Linears p..q multiplied into one map under the cost model ``objective``
    (joint ``q``'s activation fused in, unless it is the site's last Linear)."""
    return cost_model(objective).linear(widths[p], widths[q + 1], q if q < len(widths) - 2 else None)


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


def _per_joint(decisions: list[str], linear_channels) -> list[list[int] | None]:
    """``linear_channels`` per joint: a flat list names the channels of the (single) PARTIAL joint."""
    if linear_channels is None:
        return [None] * len(decisions)
    if all(isinstance(c, int) for c in linear_channels):
        return [list(linear_channels) if d == PARTIAL else None for d in decisions]
    return list(linear_channels)


def partial_conflict(decisions: list[str]) -> int | None:
    """The first PARTIAL joint whose next non-MERGE joint is PARTIAL too (they would share a group)."""
    last = None
    for i, d in enumerate(decisions):
        if d == MERGE:
            continue
        if d == PARTIAL and last == PARTIAL:
            return i
        last = d
    return None


def decisions_cost(widths: list[int], decisions: list[str], linear_channels=None,
                   objective="flops", biases: list[bool] | None = None) -> float:
    """Cost of a site after applying per-joint ``decisions``.

    MERGE runs multiply into one Linear; a PARTIAL joint ``q`` between groups ``p..q`` and
    ``q+1..r`` keeps ``k`` channels: a ``d_p -> k -> d_r`` MLP plus a ``d_p -> d_r`` skip.
    ``linear_channels``: per joint (or, for one PARTIAL joint, a flat list) the folded channels.
    """
    channels = _per_joint(decisions, linear_channels)
    n = len(widths) - 1
    groups, p = [], 0
    for q in range(n):
        if q == n - 1 or decisions[q] != MERGE:
            groups.append((p, q))
            p = q + 1
    cost, g = 0, 0
    while g < len(groups):
        p, q = groups[g]
        if q < n - 1 and decisions[q] == PARTIAL:
            _, r = groups[g + 1]
            k = widths[q + 1] - len(channels[q] or [])
            cost += cost_model(objective).partial(widths[p], k, widths[r + 1], q)
            g += 2
            continue
        cost += group_cost(widths, p, q, objective)
        g += 1
    return cost


def site_objective(objective, site: Site):
    """``objective`` as seen for ``site``: a latency table becomes the site's view of it, which
    times every joint with that joint's own activation."""
    return cost_model(objective).for_site(site)


def decisions_for(site: Site, chosen: list[list[int]], objective: str = "flops"
                  ) -> tuple[list[str], list[list[int] | None]]:
    """Per-joint decisions and folded channels when ``chosen[i]`` channels of joint i become linear.

    A joint with every channel chosen (or no activation left) is linear: the chain DP picks
    MERGE or FACTOR. A strict, non-empty subset is PARTIAL; empty is KEEP.
    """
    objective = site_objective(objective, site)
    linear_joint, channels = [], []
    for i, (act, ch) in enumerate(zip(site.acts, chosen)):
        full = act is None or len(ch) == joint_width(site, i)
        linear_joint.append(full)
        channels.append(sorted(ch) if ch and not full else None)
    decisions = groups_to_decisions(chain_groups(site.widths, linear_joint, objective), linear_joint)
    decisions = [PARTIAL if c is not None else d for d, c in zip(decisions, channels)]
    return decisions, channels


def site_cost(site: Site, chosen: list[list[int]], objective: str = "flops") -> float:
    """Cost (``objective``) of the site once the ``chosen`` channels are linear; inf when the
    choice cannot be built (adjacent PARTIAL joints)."""
    objective = site_objective(objective, site)
    decisions, channels = decisions_for(site, chosen, objective)
    if partial_conflict(decisions) is not None:
        return math.inf
    return decisions_cost(site.widths, decisions, channels, objective)


def linear_flops(model: nn.Module) -> int:
    """FLOPs per token (or per sample for flat inputs) of every ``nn.Linear`` the model holds."""
    return sum(2 * linear_macs(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
