"""Classic (Linear -> act -> Linear) sites planned by the gated sites' estimator and allocator
(planning/partial.py): widths measured on held-out rows, fits carried by the plan, JSON and
save/load round trips; chains, norm sites and max_error stay on the older path."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.planning.gated import GatedStats
from lc_kernels.planning.inputs import calib_batches, holdout_split
from lc_kernels.planning.partial import ClassicSite
from lc_kernels.planning.sites import find_sites

transformers = pytest.importorskip("transformers")


def tiny_bert(layers: int = 3) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, max_position_embeddings=64)
    m = transformers.BertModel(cfg, add_pooling_layer=False).eval()  # measured output: the last hidden state
    lc.prepare_(m)
    return m


def calib(n: int = 4, batch: int = 4, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 97, (batch, seq), generator=g)} for _ in range(n)]


def hidden(m: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return m(**batch).last_hidden_state.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_classic_site_hidden_and_fits_match_the_module():
    m = tiny_bert(1)
    site = ClassicSite(m.encoder.layer[0].intermediate, "encoder.layer.0.intermediate")
    x = torch.randn(10, 32)
    mod = site.module
    want = mod.act(mod.fc1(x)).double()
    assert torch.allclose(site.hidden_rows(x), want, rtol=1e-6, atol=1e-6)
    kept = torch.tensor([1, 5, 9])
    assert torch.allclose(site.hidden_rows(x, kept), want[:, kept], rtol=1e-6, atol=1e-6)
    # the joint fit [h_K, x, 1] -> y maps exactly onto fc2 / skip / fc2.bias of the PARTIAL form
    st = GatedStats(site)
    st.add(x, mod(x))
    fit, _, _ = st.fit(kept, prior=False)
    rep = site.build(kept, fit)
    assert rep.form == "partial" and rep.fc1.out_features == 3 and mod.form == "mlp"
    h = site.hidden_rows(x.double().float(), kept)
    by_hand = h @ fit.weight[:, :3].T + x.double() @ fit.weight[:, 3:].T + fit.bias
    assert torch.allclose(rep(x).double(), by_hand, rtol=1e-5, atol=1e-5)
    merged = site.build(torch.zeros(0, dtype=torch.long), st.fit(torch.zeros(0, dtype=torch.long), prior=False)[0])
    assert merged.form == "merged"
    assert site.flops(0) == 2 * 32 * 32 and site.flops(64) == 2 * (32 * 64 + 64 * 32)


def test_planner_widths_measure_no_worse_than_uniform_on_the_held_out_slice():
    dense = tiny_bert(4)
    data = calib(n=8)
    auto = lc.plan_collapse(dense, calib=data, target=0.5)
    names = [a["name"] for a in auto.allocation]
    assert names[:3] == ["uniform", "depth", "lagrangian"] and len(names) > 3
    assert auto.fit_inputs in ("dense", "sequential") and auto.search == "measured"
    assert all(sp.kind == "LCFusedMLP" and sp.decision in ("KEEP", "PARTIAL", "MERGE") for sp in auto)
    best = min(auto.allocation, key=lambda a: a["error"])
    uni = next(a for a in auto.allocation if a["name"] == "uniform")
    assert best["error"] <= uni["error"]
    assert auto.flops_before - auto.flops_after >= 0.5 * auto.flops_before
    uni_plan = lc.plan_collapse(dense, calib=data, target=0.5, allocation="uniform")
    assert [a["name"] for a in uni_plan.allocation] == ["uniform"]
    assert len(set(uni_plan.allocation[0]["kept"])) == 1
    # measured independently: each plan installed, the final hidden state on the slice no fit saw
    _, val_b = holdout_split(calib_batches(dense, data))
    out = {}
    for name, plan in (("auto", auto), ("uniform", uni_plan)):
        m = copy.deepcopy(dense)
        lc.collapse_(m, plan)
        errs = [(hidden(m, b.kwargs) - hidden(dense, b.kwargs)).pow(2).sum() for b in val_b]
        out[name] = math.sqrt(float(sum(errs)) / float(sum(hidden(dense, b.kwargs).pow(2).sum() for b in val_b)))
    assert out["auto"] <= out["uniform"] * 1.0001


@pytest.mark.parametrize("fit", ["local", "global"])
def test_plan_then_collapse_reproduces_the_measured_error(fit):
    dense = tiny_bert()
    data = calib()
    plan = lc.plan_collapse(dense, calib=data, target=0.5, fit=fit)
    assert plan.fit_target == fit and plan.fit_inputs is not None
    assert set(plan.fitted) == {sp.path for sp in plan if sp.changes}
    m = copy.deepcopy(dense)
    lc.collapse_(m, plan)  # the plan carries its fits: no calib needed
    d2 = sum(float((hidden(m, b) - hidden(dense, b)).pow(2).sum()) for b in data)
    y2 = sum(float(hidden(dense, b).pow(2).sum()) for b in data)
    assert math.isclose(math.sqrt(d2 / y2), plan.measured_error, rel_tol=1e-5)
    assert 0 < plan.measured_error < 1
    # the installed forms are the planned decisions
    for sp in plan:
        mod = m.get_submodule(sp.path)
        assert mod.form == {"KEEP": "mlp", "PARTIAL": "partial", "MERGE": "merged"}[sp.decision]


def test_json_plan_refits_the_same_and_save_load_round_trips(tmp_path):
    dense = tiny_bert()
    data = calib()
    plan = lc.plan_collapse(dense, calib=data, target=0.5)
    again = lc.CollapsePlan.from_json(plan.to_json())
    assert again.fitted == {} and [s.decision for s in again] == [s.decision for s in plan]
    assert again.fit_inputs == plan.fit_inputs
    with pytest.raises(ValueError, match="carries no fitted replacements"):
        lc.collapse_(copy.deepcopy(dense), again)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    lc.collapse_(a, plan)
    lc.collapse_(b, again, calib=data)  # refitted on the same data by the same planner: the same model
    assert rel(hidden(a, data[0]), hidden(b, data[0])) <= 1e-5
    lc.save_collapsed(a, tmp_path)
    torch.manual_seed(7)
    fresh = tiny_bert()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # other weights: everything must come from the checkpoint
    back = lc.load_collapsed(fresh, tmp_path)
    assert [s.decision for s in back] == [s.decision for s in plan]
    assert torch.equal(fresh.eval()(**data[1]).last_hidden_state, a(**data[1]).last_hidden_state)


def test_sequential_mlp_and_the_older_path_where_it_still_applies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 12), nn.Linear(12, 40), nn.ReLU(),
                          nn.Linear(40, 12))
    lc.prepare_(model)
    assert len(find_sites(model)) == 2
    data = [torch.randn(32, 12) for _ in range(8)]
    plan = lc.plan_collapse(model, calib=data, target=0.5, allocation="uniform")
    assert [a["name"] for a in plan.allocation] == ["uniform"] and plan.fit_inputs is not None
    m = copy.deepcopy(model)
    lc.collapse_(m, plan)
    with torch.no_grad():
        y = torch.cat([model(x) for x in data])
        e = float((torch.cat([m(x) for x in data]) - y).double().norm() / y.double().norm())
    assert math.isclose(e, plan.measured_error, rel_tol=1e-5)
    # options only the older path serves: max_error, an explicit search, sensitivity-ranked channels
    for kw in ({"max_error": 0.5}, {"target": 0.5, "search": "greedy"}, {"target": 0.5, "select": "sensitivity"}):
        old = lc.plan_collapse(model, calib=data, **kw)
        assert old.allocation == [] and old.fit_inputs is None, kw
    # a chain (three Linears) is not a single-joint site: the whole model stays on the older path
    chain = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 12))
    lc.prepare_(chain)
    old = lc.plan_collapse(chain, calib=data, target=0.5)
    assert old.allocation == [] and old.fit_inputs is None
