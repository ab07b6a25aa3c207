"""lc.compress: prepare, fitted plan, collapse site by site, heal; the report; all or nothing."""
import copy
import importlib
import os

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.testing import rel_err

from test_fitted import bert_calib, tiny_bert

compress_mod = importlib.import_module("lc_kernels.compress")  # lc_kernels.compress is the function


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def chain_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 5)).eval()


def test_compress_an_mlp_from_scratch():
    model, x = chain_mlp(), torch.randn(300, 12)
    original = copy.deepcopy(model)
    report = lc.compress(model, x, target=0.5, progress=False)
    assert report.prepared == ["0"]
    assert report.flops_after < report.flops_before
    with torch.no_grad():
        measured = rel_err(model(x), original(x))
    assert measured == pytest.approx(report.final_error, rel=1e-5)
    assert report.curve[0] == (0.0, 0.0) and len(report.curve) == len(report.steps) + 1
    text = str(report)
    for word in ("step", "site", "decision", "planned err", "model err", "TOTAL", "FLOPs removed"):
        assert word in text


def test_compress_plans_on_measured_latency(monkeypatch):
    from lc_kernels.planning.latency import LatencyTable
    real = LatencyTable.__init__
    monkeypatch.setattr(LatencyTable, "__init__", lambda self, *a, **k: real(self, *a, **{**k, "rounds": 2,
                                                                                         "min_time": 0.0}))
    model, x = chain_mlp(), torch.randn(300, 12)
    original = copy.deepcopy(model)
    report = lc.compress(model, x, target=0.5, objective="latency", example=x[:64], progress=False)
    assert report.plan.objective == "latency"
    assert any("latency: every candidate form timed at 64 tokens" in n for n in report.plan.notes)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) == pytest.approx(report.final_error, rel=1e-5)


def test_compress_a_bert_with_masked_dict_calibration(tmp_path):
    model = tiny_bert()
    original = copy.deepcopy(model)
    calib = [bert_calib(seed=s) for s in range(2)]
    report = lc.compress(model, calib, target=0.6, progress=False)
    assert [s.path for s in report.steps]  # something collapsed
    assert sorted(s.planned_error for s in report.steps) == [s.planned_error for s in report.steps]  # least first
    flops = [c[0] for c in report.curve]
    assert flops == sorted(flops)
    mask = calib[0]["attention_mask"].bool()
    with torch.no_grad():
        y0, y1 = original(**calib[0]).last_hidden_state, model(**calib[0]).last_hidden_state
    assert rel_err(y1[mask], y0[mask]) < 0.5
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "curve.png"))
    assert os.path.getsize(tmp_path / "curve.png") > 1000


def test_healing_never_makes_calibration_error_worse():
    model, x = chain_mlp(seed=1), torch.randn(256, 12)
    plain = lc.compress(copy.deepcopy(model), x, target=0.8, progress=False)
    healed = lc.compress(copy.deepcopy(model), x, target=0.8, heal_steps=60, heal_lr=1e-3, progress=False)
    assert healed.heal_steps == 60
    assert healed.final_error <= plain.final_error + 1e-12
    for s in healed.steps:
        assert s.healed_error <= s.model_error + 1e-12


def test_a_failing_compress_leaves_the_model_as_it_was(monkeypatch):
    model, x = chain_mlp(), torch.randn(100, 12)
    lc.prepare_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    real, calls = compress_mod.collapse_, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            real(*a, **k)  # the first site collapses, then the next step fails
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(compress_mod, "collapse_", flaky)
    with pytest.raises(RuntimeError, match="compress failed and the model was restored.*injected failure"):
        lc.compress(model, x, target=0.5, progress=False)
    assert repr(model) == structure
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(calib=None, target=0.5), ValueError, "pass calib"),
    (dict(target=None), ValueError, "needs a budget"),
    (dict(target=0.5, heal_steps=-1), ValueError, "heal_steps must be an int >= 0"),
    (dict(target=0.5, heal_lr=0.0), ValueError, "heal_lr must be > 0"),
    (dict(target=0.5, heal_lr=float("nan")), ValueError, "heal_lr must be a finite number"),
    (dict(target=1.5), ValueError, r"target is the fraction"),
    (dict(target=0.5, objective="latency"), ValueError, "pass example="),
])
def test_bad_arguments(kwargs, exc, match):
    model = chain_mlp()
    kwargs = {"calib": torch.randn(20, 12), **kwargs}
    before = repr(model)
    with pytest.raises(exc, match=match):
        lc.compress(model, progress=False, **kwargs)
    assert repr(model) == before  # not even prepared
