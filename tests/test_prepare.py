import pytest
import torch
from torch import nn

import lc_kernels as lc
from conftest import rel_err


def _acts():
    return [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.PReLU(), nn.PReLU(24),
            nn.LeakyReLU(0.3)]


@pytest.mark.parametrize("act", _acts(), ids=lambda a: repr(a))
def test_prepare_keeps_outputs(act):
    with torch.no_grad():
        if isinstance(act, nn.PReLU):
            act.weight.uniform_(0.05, 0.5)
    model = nn.Sequential(nn.Linear(10, 24), act, nn.Linear(24, 5)).eval()
    x = torch.randn(33, 10)
    y0 = model(x)
    sites = lc.prepare_(model)
    assert sites == ["0"] and isinstance(model[0], lc.LCFusedMLP)
    assert rel_err(model(x), y0) <= 1e-6


def test_prepare_reuses_the_original_weights():
    fc1, fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
    model = nn.Sequential(fc1, nn.ReLU(), fc2)
    lc.prepare_(model)
    assert model[0].fc1 is fc1 and model[0].fc2 is fc2
    assert set(model.state_dict()) == {"0.fc1.weight", "0.fc1.bias", "0.act.alpha", "0.fc2.weight", "0.fc2.bias"}


def test_nested_chains_batchnorm_dropout_and_skips():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                      nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)),
        nn.Tanh(),
        # Sigmoid has no collapsible form; an unknown module (Identity) between Linears ends a run
        nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 4), nn.SiLU(), nn.Identity(), nn.Linear(4, 3)),
    )
    model.train()
    model(torch.randn(16, 3, 4))  # give BatchNorm real running statistics
    model.eval()
    x = torch.randn(20, 3, 4)
    y0 = model(x)
    sites = lc.prepare_(model)
    assert list(sites) == ["1.0"]
    assert isinstance(model[1][0], lc.LCChain) and len(model[1][0].linears) == 4
    reasons = dict(sites.skipped)
    assert "Sigmoid" in reasons["3.1"]
    assert rel_err(model(x), y0) <= 1e-6
    # keys of untouched modules do not move
    assert {"3.0.weight", "3.2.weight", "3.5.weight"} <= set(model.state_dict())


def test_filter_fn_and_per_channel():
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6), nn.Tanh(),
                          nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 2))
    sites = lc.prepare_(model, filter_fn=lambda m, path: m.out_features == 10, per_channel=True)
    assert list(sites) == ["4"]
    assert ("0", "excluded by filter_fn") in sites.skipped
    assert model[4].act.num_parameters == 10


def test_alpha_init_moves_toward_identity():
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 6))
    lc.prepare_(model, alpha_init=1.0)
    x = torch.randn(5, 6)
    fc1, fc2 = model[0].fc1, model[0].fc2
    torch.testing.assert_close(model(x), fc2(fc1(x)))


@pytest.mark.parametrize("bad, err, match", [
    ("model", TypeError, "expects an nn.Module, got str"),
])
def test_prepare_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        lc.prepare_(bad)


def test_prepare_bad_alpha_init():
    with pytest.raises(ValueError, match="alpha_init must be a finite float"):
        lc.prepare_(nn.Sequential(nn.Linear(2, 2)), alpha_init=float("nan"))


def test_lcfusedmlp_constructor_and_from_sequential():
    m = lc.LCFusedMLP(8, 32, act="silu", num_alphas=32)
    assert m(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    seq = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.BatchNorm1d(16), nn.Linear(16, 4)).eval()
    x = torch.randn(9, 8)
    torch.testing.assert_close(lc.LCFusedMLP.from_sequential(seq).eval()(x), seq(x))
    with pytest.raises(ValueError, match=r"expects exactly Sequential\(Linear"):
        lc.LCFusedMLP.from_sequential(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)))
    with pytest.raises(ValueError, match="num_alphas must be 1"):
        lc.LCFusedMLP(8, 32, num_alphas=7)
    with pytest.raises(ValueError, match="fc1 produces 16 features but fc2 expects 12"):
        lc.LCFusedMLP.from_modules(nn.Linear(8, 16), "relu", nn.Linear(12, 4))
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        lc.LCFusedMLP(8, 16, act="swish")


@pytest.mark.parametrize("x, err, match", [
    (torch.randn(3, 7), ValueError, r"last dim 8, got shape \(3, 7\)"),
    (torch.ones(3, 8, dtype=torch.long), TypeError, "floating-point input, got dtype torch.int64"),
    ([1.0] * 8, TypeError, "expects a torch.Tensor, got list"),
])
def test_forward_bad_input(x, err, match):
    with pytest.raises(err, match=match):
        lc.LCFusedMLP(8, 16)(x)


def test_empty_batch_forward():
    assert lc.LCFusedMLP(8, 16)(torch.randn(0, 8)).shape == (0, 8)
