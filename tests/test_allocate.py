"""Allocation of widths over sites judged on held-out rows; out-of-sample ranking errors."""
from __future__ import annotations

import copy
import random

import pytest
import torch

import lc_kernels as lc
from lc_kernels.nn.gated import LCGatedMLP
from lc_kernels.planning.allocate import Option, choose, depth, lagrangian, uniform
from lc_kernels.planning.gated import GatedSite, SiteStream, estimate_site, fit_plan, gated_sites, options
from lc_kernels.planning.inputs import calib_batches, holdout_split
from lc_kernels.planning.layerwise import HeldOut

from test_gated import calib, tiny

transformers = pytest.importorskip("transformers")


def sites_of(n: int, widths=(64, 48, 32, 16, 0), flops_per=10) -> list[list[Option]]:
    rng = random.Random(n)
    return [[Option(w, w * flops_per + 5, 0.0 if w == widths[0] else rng.random() * (widths[0] - w))
             for w in widths] for _ in range(n)]


def saving(opts, sel):
    return sum(o[0].flops - o[c].flops for o, c in zip(opts, sel))


@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
def test_named_assignments_meet_the_budget(target):
    opts = sites_of(7)
    need = target * sum(o[0].flops for o in opts)
    for sel in (uniform(opts, target, need), depth(opts, target, need), lagrangian(opts, need)):
        assert saving(opts, sel) >= need
    # uniform: every site at the same width when the grid allows it
    u = uniform(opts, 0.5, 0.5 * sum(o[0].flops for o in opts))
    assert len({opts[i][c].kept for i, c in enumerate(u)}) <= 2
    # depth: the removed share rises with depth
    d = depth(opts, 0.5, 0.5 * sum(o[0].flops for o in opts))
    assert opts[0][d[0]].kept >= opts[-1][d[-1]].kept


def test_choose_keeps_the_least_measured_and_search_improves_it():
    opts = sites_of(6)
    need_t = 0.5
    # a measured loss the summed per-site errors do not predict: it wants site 0 wide and site 5 narrow
    def evaluate(sel):
        return sum((len(opts[i]) - c) * (1.0 if i < 3 else -0.5) for i, c in enumerate(sel)) * -1 + 100 \
            - 3 * sel[5] + 3 * sel[0]

    sel, tried = choose(opts, need_t, evaluate, evals=40)
    names = [a.name for a in tried]
    assert names[:3] == ["uniform", "depth", "lagrangian"]
    best = min(tried, key=lambda a: a.error)
    assert [opts[i][c].kept for i, c in enumerate(sel)] == best.kept
    named = [a for a in tried if not a.name.startswith("search")]
    assert best.error <= min(a.error for a in named)
    assert any(a.name.startswith("search") and a.error < min(b.error for b in named) for a in tried)
    assert all(a.flops_removed >= need_t - 1e-9 for a in tried)
    sel_u, tried_u = choose(opts, need_t, evaluate, allocation="uniform")
    assert [a.name for a in tried_u] == ["uniform"]
    with pytest.raises(ValueError, match="allocation must be one of"):
        choose(opts, need_t, evaluate, allocation="greedy")


def test_in_sample_and_blended_proposals_are_measured_too():
    opts = sites_of(5)
    for o in opts:  # in sample, the first site looks free to cut: the in-sample lagrangian differs
        for c in o:
            c.fit_err = 0.0 if o is opts[0] else 10 * c.err
    sel, tried = choose(opts, 0.5, lambda sel: float(sum(sel)), evals=0)
    names = [a.name for a in tried]
    assert "lagrangian in-sample" in names and ("blend" in names or "blend in-sample" in names)
    ins = lagrangian(opts, 0.5 * sum(o[0].flops for o in opts), in_sample=True)
    assert ins != lagrangian(opts, 0.5 * sum(o[0].flops for o in opts))


def _overfit_site(rows: int, val_rows: int, seed: int = 0):
    """A gated site whose target is a linear map of its input plus noise: its channels only fit noise."""
    torch.manual_seed(seed)
    m = LCGatedMLP(8, 96, 8, "silu", bias=False).double()
    s = GatedSite.of(m, "site")
    w = torch.randn(8, 8, dtype=torch.float64)

    def make(n):
        x = torch.randn(n, 8, dtype=torch.float64)
        return x, x @ w.T + 0.5 * torch.randn(n, 8, dtype=torch.float64)

    fit = [(*make(rows), None)]
    val = [make(val_rows)]
    return s, fit, val


def test_ranking_errors_are_out_of_sample_where_in_sample_would_choose_wrong():
    s, fit, val = _overfit_site(rows=120, val_rows=400)
    widths = [96, 64, 32, 8, 0]
    e = estimate_site(s, fit, val, widths, ridges=(1e-6,))
    # in sample, every added channel lowers the residual: the widest looks best ...
    assert e.fit_err2[96] < e.fit_err2[32] < e.fit_err2[0]
    # ... held out, the channels only fitted noise: the linear map (no channel) is best
    assert e.val_err2[0] < e.val_err2[32] < e.val_err2[96]
    opts = options([s], [[s.h] + widths], [e])[0]
    assert [o.kept for o in opts] == [96, 96, 64, 32, 8, 0][1:] or opts[0].kept == 96
    # the allocator ranks by the held-out errors: with a budget any PARTIAL would meet, it goes linear
    sel = lagrangian([opts], need=opts[0].flops - opts[-2].flops)
    assert opts[sel[0]].kept == 0
    # a ridge grid chosen on the held-out rows shrinks the noise fit: larger ridge chosen here
    e2 = estimate_site(s, fit, val, widths, ridges=(1e-6, 1e-1))
    assert e2.lam > e.lam and e2.val_err2[96] < e.val_err2[96]


def test_linear_only_where_it_measures_better_than_the_narrowest_partial():
    s, fit, val = _overfit_site(rows=400, val_rows=200)
    # the target now needs the gated channels: LINEAR cannot reproduce it
    x, _, _ = fit[0]
    h = s.hidden(x)
    fit = [(x, h[:, :8] * 3.0, None)]
    xv = val[0][0]
    val = [(xv, s.hidden(xv)[:, :8] * 3.0)]
    e = estimate_site(s, fit, val, [64, 32, 8, 0])
    assert e.val_err2[0] > e.val_err2[8]
    assert all(o.kept != 0 for o in options([s], [[s.h, 64, 32, 8, 0]], [e])[0])


def test_planner_widths_measure_no_worse_than_uniform_on_the_held_out_slice():
    dense = tiny("llama", num_hidden_layers=4, intermediate_size=64)
    lc.prepare_(dense)
    data = calib(n=8, batch=4, seq=16)
    auto = lc.plan_collapse(dense, calib=data, target=0.5)
    names = [a["name"] for a in auto.allocation]
    assert names[:3] == ["uniform", "depth", "lagrangian"] and len(names) > 3
    best = min(auto.allocation, key=lambda a: a["error"])
    uni = next(a for a in auto.allocation if a["name"] == "uniform")
    assert best["error"] <= uni["error"]
    assert sum(s.flops_before - s.flops_after for s in auto.sites) >= 0.5 * sum(s.flops_before for s in auto.sites)
    assert "allocations measured on held-out calibration rows" in str(auto)
    # measured independently: each plan installed, KL to the dense model on the slice no fit saw
    batches = calib_batches(dense, data)
    _, val_b = holdout_split(batches)
    uni_plan = lc.plan_collapse(dense, calib=data, target=0.5, allocation="uniform")
    assert [a["name"] for a in uni_plan.allocation] == ["uniform"]
    assert len({k for k in uni_plan.allocation[0]["kept"]}) == 1
    out = {}
    for name, plan in (("auto", auto), ("uniform", uni_plan)):
        m = copy.deepcopy(dense)
        lc.collapse_(m, plan)
        ref = dense.lm_head(dense.model(**val_b[0].kwargs).last_hidden_state).log_softmax(-1)
        got = m.lm_head(m.model(**val_b[0].kwargs).last_hidden_state).log_softmax(-1)
        out[name] = float((ref.exp() * (ref - got)).sum(-1).mean())
    assert out["auto"] <= out["uniform"] * 1.0001


def test_held_out_rows_are_never_fitted_on():
    dense = tiny("llama")
    lc.prepare_(dense)
    sites = [GatedSite.of(mod, p) for p, mod in gated_sites(dense)]
    fitted = []
    for held in (calib(n=1, seed=5), calib(n=1, seed=99)):
        batches = calib_batches(dense, calib(n=6) + held)
        fit_b, val_b = holdout_split(batches)
        assert len(val_b) == 1 and val_b[0].kwargs["input_ids"].equal(held[0]["input_ids"])
        with torch.no_grad():
            got, _, errors = fit_plan(SiteStream(dense, sites, fit_b + val_b, None), [24, 0, 40], "local",
                                      n_fit=len(fit_b), lams={0: 1.0, 1: 1.0, 2: 1.0}, prior=False)
        fitted.append((got, errors))
    (a, ea), (b, eb) = fitted
    for i in a:
        for (n, x), (_, y) in zip(a[i].state_dict().items(), b[i].state_dict().items()):
            assert torch.equal(x, y), (i, n)
    assert ea != eb  # the errors are measured on the held-out batch, which differs


def test_a_plan_notes_its_held_out_rows():
    m = tiny("llama")
    lc.prepare_(m)
    plan = lc.plan_collapse(m, calib=calib(n=8), target=0.5, allocation="uniform")
    assert any(n.startswith("held out of every fit: 64 calibration rows") for n in plan.notes)
    one = lc.plan_collapse(m, calib=calib(n=1), target=0.5, allocation="uniform")  # one batch: its rows are cut
    assert any(n.startswith("held out of every fit: 16 calibration rows") for n in one.notes)


def test_allocation_is_validated():
    m = tiny("llama")
    lc.prepare_(m)
    with pytest.raises(ValueError, match="allocation must be None"):
        lc.plan_collapse(m, calib=calib(), target=0.5, allocation="best")
    with pytest.raises(ValueError, match="allocation_evals must be an int"):
        lc.plan_collapse(m, calib=calib(), target=0.5, allocation_evals=-1)


def test_held_out_kl_is_zero_for_the_dense_model_and_positive_otherwise():
    m = tiny("llama")
    lc.prepare_(m)
    sites = [GatedSite.of(mod, p) for p, mod in gated_sites(m)]
    b = calib_batches(m, calib(n=2))
    v = HeldOut(m, sites, b, None)
    assert v.kind == "kl" and v({}) == pytest.approx(0.0, abs=1e-7)
    lin = LCGatedMLP(32, 56, 32, "silu", bias=False)
    assert v({0: lin}) > 1e-4
