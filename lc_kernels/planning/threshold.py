"""The threshold planner: no data, joints within ``tol`` of alpha = 1 become linear."""
from __future__ import annotations

from .cost import decisions_cost, decisions_for, site_cost
from .plan import FACTOR, KEEP, PARTIAL, JointPlan, SitePlan
from .sites import Site, joint_width, site_params


def build_site_plan(site: Site, chosen: list[list[int]], reasons: list[str], objective: str = "flops") -> SitePlan:
    """SitePlan for explicit per-joint linear channels (see :func:`decisions_for`), with reasons."""
    decisions, channels = decisions_for(site, chosen, objective)
    joints = []
    for act, d, reason, ch in zip(site.acts, decisions, reasons, channels):
        if act is None:
            joints.append(JointPlan([1.0], d, "already linear"))
            continue
        alpha = act.alpha.detach().float().cpu().tolist()
        if d == FACTOR:
            reason += "; the factored pair is cheaper than one merged Linear"
        joints.append(JointPlan(alpha, d, reason, ch if d == PARTIAL else None))
    # The no-data proxy: the largest |1 - alpha| among the channels that become linear.
    est = max((abs(1 - j.alpha[c if len(j.alpha) > 1 else 0]) for j, act, ch in zip(joints, site.acts, chosen)
               if act is not None and j.decision != KEEP for c in ch), default=0.0)
    n_alpha_after = sum(len(j.alpha) if j.decision == KEEP else
                        (len(j.alpha) - len(j.linear_channels) if len(j.alpha) > 1 else 1) if j.decision == PARTIAL
                        else 0 for j in joints)
    return SitePlan(
        path=site.path, kind=site.kind, widths=list(site.widths), joints=joints,
        params_before=site_params(site),
        params_after=decisions_cost(site.widths, decisions, channels, "params") + n_alpha_after,
        flops_before=decisions_cost(site.widths, [KEEP] * len(joints)),
        flops_after=decisions_cost(site.widths, decisions, channels),
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
