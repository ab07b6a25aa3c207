import copy

import pytest
import torch
from torch import nn

import lc_kernels as lc
from conftest import rel_err


def _model():
    m = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 40), nn.SiLU(), nn.Linear(40, 9),
                      nn.Tanh(), nn.Sequential(nn.Linear(9, 30), nn.ReLU(), nn.Linear(30, 5)))
    lc.prepare_(m, per_channel=True)
    with torch.no_grad():
        for a in m.modules():
            if isinstance(a, lc.CollapsibleActivation):
                a.alpha.uniform_(0.1, 0.6)
    return m


def _grads(model, x, g):
    out = model(x)
    params = [p for p in model.parameters()]
    return out, torch.autograd.grad(out, [x, *params], g)


@pytest.mark.slow
@pytest.mark.parametrize("collapsed", [False, True])
def test_fullgraph_compile_matches_eager_forward_and_backward(collapsed):
    model = _model()
    if collapsed:
        with torch.no_grad():
            model[0].acts[1].alpha.fill_(1.0)
            a = model[6][0].act.alpha
            a[:25] = 1.0  # PARTIAL
        plan = lc.collapse_(model)
        assert [s.decision for s in plan] == ["KEEP/MERGE", "PARTIAL"]
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)
    x = torch.randn(17, 12, requires_grad=True)
    g = torch.randn(17, 5)  # random upstream gradient
    y, grads = _grads(model, x, g)
    yc, grads_c = _grads(compiled, x, g)
    assert rel_err(yc, y) <= 1e-5
    for a, b in zip(grads_c, grads):
        assert rel_err(a, b) <= 1e-5


def test_eval_forward_routes_through_registered_ops(monkeypatch):
    calls = []
    real = torch.ops.lc_kernels.fused_mlp
    monkeypatch.setattr(torch.ops.lc_kernels, "fused_mlp", lambda *a: calls.append(1) or real(*a))
    m = lc.LCFusedMLP(8, 16).eval()
    m(torch.randn(3, 8))
    assert calls
