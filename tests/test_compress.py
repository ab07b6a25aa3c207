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
healing = importlib.import_module("lc_kernels.healing")


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
    # The model's error against the dense model, measured here at every unmasked token of both
    # batches (hidden states and pooler output), is the one the report states; the sites collapsed
    # in forward order here (least planned error first), so it is also the plan's measured error.
    d2 = y2 = 0.0
    with torch.no_grad():
        for b in calib:
            mask = b["attention_mask"].bool()
            o0, o1 = original(**b), model(**b)
            y0, y1 = (torch.cat([o.last_hidden_state[mask].reshape(-1), o.pooler_output.reshape(-1)]).double()
                      for o in (o0, o1))
            d2, y2 = d2 + float((y1 - y0).pow(2).sum()), y2 + float(y0.pow(2).sum())
    measured = (d2 / y2) ** 0.5
    assert 0 < measured < 0.05
    assert measured == pytest.approx(report.final_error, rel=1e-6)
    assert [s.path for s in report.steps] == [sp.path for sp in report.plan.sites if sp.changes]
    assert measured == pytest.approx(report.plan.measured_error, rel=1e-6)
    pytest.importorskip("matplotlib")
    report.plot(str(tmp_path / "curve.png"))
    assert os.path.getsize(tmp_path / "curve.png") > 1000


def test_a_harmful_heal_is_undone(monkeypatch):
    # (healing that helps, the trainable set, the guard's best checkpoint: tests/test_healing.py)
    model, x = chain_mlp(seed=1), torch.randn(256, 12)
    original = copy.deepcopy(model)
    plain_model = copy.deepcopy(model)
    plain = lc.compress(plain_model, x, target=0.8, progress=False)
    # Adam at lr 1 moves every weight by about 1 a step: every held-out evaluation is worse than the
    # start, and compress keeps the unhealed model, bit for bit.
    histories, real = [], healing.heal

    def spy(*a, **k):
        result = real(*a, **k)
        histories.append(result.history)
        return result

    monkeypatch.setattr(healing, "heal", spy)
    bad_model = copy.deepcopy(model)
    bad = lc.compress(bad_model, x, target=0.8, heal_steps=60, heal_lr=1.0, heal_eval_every=10, progress=False)
    (start, before), *later = histories[0]
    assert start == 0 and len(later) == 6 and all(v > 2 * before for _, v in later)
    assert bad.heal_steps == 60 and bad.best_step == 0 and bad.heldout_after == bad.heldout_before == before
    assert bad.final_error == plain.final_error
    assert [s.healed_error for s in bad.steps] == [s.model_error for s in bad.steps]
    assert bad_model.state_dict().keys() == plain_model.state_dict().keys()
    assert all(torch.equal(v, plain_model.state_dict()[k]) for k, v in bad_model.state_dict().items())
    with torch.no_grad():
        assert rel_err(bad_model(x), original(x)) == pytest.approx(bad.final_error, rel=1e-6)
    assert "held-out relative squared error before" in str(bad)


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
