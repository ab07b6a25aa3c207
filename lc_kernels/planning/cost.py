"""The cost model, one owner for FLOPs and parameters (planner, demo, bench and report use it).

Per token, a Linear d_in -> d_out costs ``2 * d_in * d_out`` FLOPs and holds ``d_in * d_out``
weights (+ ``d_out`` bias). A chain's best grouping into merged Linears is a dynamic program.
"""
from __future__ import annotations

from torch import nn

from .plan import FACTOR, KEEP, MERGE, PARTIAL
from .sites import Site, joint_width


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


def linear_flops(model: nn.Module) -> int:
    """FLOPs per token (or per sample for flat inputs) of every ``nn.Linear`` the model holds."""
    return sum(2 * linear_macs(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
