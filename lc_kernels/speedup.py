"""``speedup``: the end-to-end speedup a plan predicts beside the one measured, on this device.

Predicted: Amdahl's law. The planned sites take the share of the model's time that forward
hooks measure in place, and run faster by the ratio of their dense to their planned forms in
the latency table the planner uses (:mod:`~lc_kernels.planning.latency`). Measured: the
model and a collapsed copy timed in interleaved rounds at ``example``. Both carry their spread; a
measured ratio whose spread covers 1.0x is reported as "no measurable change".
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from .planning import KEEP, CollapsePlan
from .planning.cost import decisions_cost
from .planning.inputs import calib_batches, run_model
from .planning.latency import LatencyTable
from .planning.options import tokens_of
from .planning.sites import find_sites
from .timing import Ratio, Timing, synchronizer, time_interleaved
from .transforms import collapse_


@dataclass
class SpeedupReport:
    tokens: int
    model_before: Timing
    model_after: Timing
    sites_before_s: float  # the planned sites, from the latency table
    sites_after_s: float
    measured: Ratio
    predicted: float
    site_share: float = 1.0  # of the model's time, spent in the planned sites (timed in place)

    def __str__(self) -> str:
        return "\n".join([
            f"end-to-end at {self.tokens} tokens: model {1e3 * self.model_before.median:.2f} ms "
            f"(IQR {self.model_before.iqr_pct:.0f}%) -> {1e3 * self.model_after.median:.2f} ms "
            f"(IQR {self.model_after.iqr_pct:.0f}%)",
            f"  predicted {self.predicted:.2f}x (the planned sites take {self.site_share:.0%} of the model's time; "
            f"in the latency table they go {1e3 * self.sites_before_s:.2f} -> {1e3 * self.sites_after_s:.2f} ms)",
            f"  measured  {self.measured}",
        ])


def plan_seconds(model: nn.Module, plan: CollapsePlan, table: LatencyTable) -> tuple[float, float]:
    """Seconds of ``plan``'s sites on ``model`` in ``table``: dense, and in their planned forms."""
    sites = {s.path: s for s in find_sites(model)}
    missing = [sp.path for sp in plan.sites if sp.path not in sites]
    if missing:
        raise ValueError(f"the plan's sites {missing} are not uncollapsed sites of this model; "
                         "pass the model the plan was made for, before collapse_")
    before = after = 0.0
    for sp in plan.sites:
        cost = table.for_site(sites[sp.path])
        before += decisions_cost(sp.widths, [KEEP] * len(sp.joints), None, cost)
        after += decisions_cost(sp.widths, [j.decision for j in sp.joints], [j.linear_channels for j in sp.joints],
                                cost)
    return before, after


def speedup(model: nn.Module, plan: CollapsePlan, example: object, *, calib: object = None,
            forward_fn=None, rounds: int = 15, min_time: float = 0.05) -> SpeedupReport:
    """Predicted and measured end-to-end speedup of ``plan`` on ``model`` at ``example``.

    ``model`` is not changed: a copy is collapsed (a fitted plan needs its ``calib``).
    """
    if not isinstance(plan, CollapsePlan):
        raise TypeError(f"plan must be a CollapsePlan, got {type(plan).__name__}")
    plan.validate()
    p = next(t for t in model.parameters() if t.is_floating_point())
    tokens = tokens_of(example)
    before, after = plan_seconds(model, plan, LatencyTable(p.device, p.dtype, tokens))
    collapsed = copy.deepcopy(model)
    collapse_(collapsed, plan, calib=calib, forward_fn=forward_fn, force=True)
    (batch,) = calib_batches(model, [example], forward_fn=forward_fn)
    modes = [(m, m.training) for m in model.modules()]
    model.eval(), collapsed.eval()
    try:
        with torch.inference_mode():
            t = time_interleaved({"before": lambda: run_model(model, batch, 0, forward_fn),
                                  "after": lambda: run_model(collapsed, batch, 0, forward_fn)},
                                 p.device, rounds=rounds, warmup=2, min_time=min_time)
        share = site_share(model, [sp.path for sp in plan.sites], lambda: run_model(model, batch, 0, forward_fn),
                           p.device, min_time)
    finally:
        for m, training in modes:
            m.training = training
    tb, ta = t["before"], t["after"]
    predicted = 1.0 / ((1.0 - share) + share * after / before) if before > 0 else 1.0
    return SpeedupReport(tokens, tb, ta, before, after, Ratio.of(tb, ta), predicted, share)


def site_share(model: nn.Module, paths: list[str], call, device: torch.device, min_time: float) -> float:
    """Share of ``call``'s time spent inside the modules at ``paths``, timed in place by hooks.

    Measured in the model, in the same process state as the end-to-end timing: blocks timed
    alone (the latency table) can sum to more or less than they take inside the model (cache
    and allocator state), so the table gives only the ratio within the sites, never their share.
    """
    sync = synchronizer(device)
    inside = [0.0]
    start: list[float] = []

    def pre(_m, _a):
        sync()
        start.append(time.perf_counter())

    def post(_m, _a, _o):
        sync()
        inside[0] += time.perf_counter() - start.pop()

    handles = []
    try:
        for path in paths:
            m = model.get_submodule(path)
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        with torch.inference_mode():
            call()  # warm-up
            inside[0] = 0.0
            sync()
            t0, n = time.perf_counter(), 0
            while n < 3 or time.perf_counter() - t0 < min_time:
                call()
                n += 1
            sync()
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return min(1.0, inside[0] / total) if total > 0 else 0.0
