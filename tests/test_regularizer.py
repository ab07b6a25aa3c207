import pytest
import torch
from torch import nn

import lc_kernels as lc


def _model(per_channel=False):
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    lc.prepare_(m, per_channel=per_channel)
    return m


def test_loss_value_and_gradient_pull_alpha_toward_one():
    m = _model(per_channel=True)
    acts = [a for a in m.modules() if isinstance(a, lc.CollapsibleActivation)]
    acts[0].alpha.data.copy_(torch.linspace(0, 1, 16))
    acts[1].alpha.data.fill_(1.5)
    expected = ((1 - torch.linspace(0, 1, 16)) ** 2).mean() + 0.25
    loss = lc.collapse_loss(m)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert (acts[0].alpha.grad[:-1] < 0).all()  # descent raises alpha below 1 ...
    assert (acts[1].alpha.grad > 0).all()  # ... and lowers it above 1


def test_training_with_regularizer_reaches_one():
    m = _model()
    reg = lc.CollapseRegularizer(m, strength=1.0)
    opt = torch.optim.Adam(lc.alpha_param_groups(m, 1e-3, alpha_lr=5e-2))
    for _ in range(200):
        opt.zero_grad()
        reg().backward()
        opt.step()
    assert all(abs(a - 1) < 0.05 for a in reg.alphas().values())


def test_warmup_ramps_strength():
    reg = lc.CollapseRegularizer(_model(), strength=2.0, warmup_steps=4)
    scales = []
    for _ in range(6):
        scales.append(reg.scale)
        reg()
    assert scales == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    with torch.no_grad():
        reg()
    assert reg.steps == 6  # calls without grad are not training steps


def test_filter_fn_selects_joints():
    m = _model()
    reg = lc.CollapseRegularizer(m, 1.0, filter_fn=lambda mod, path: path.endswith("acts.1"))
    assert list(reg.alphas()) == ["0.acts.1"]
    torch.testing.assert_close(reg(), torch.tensor(1.0))


def test_alpha_param_groups_keep_alpha_out_of_weight_decay():
    m = _model()
    groups = lc.alpha_param_groups(m, 1e-3, weight_decay=0.1)
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in groups[1]["params"]} == {id(a.alpha) for a in m.modules()
                                                    if isinstance(a, lc.CollapsibleActivation)}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(m.parameters()))


def test_errors():
    with pytest.raises(ValueError, match="call lc_kernels.prepare_"):
        lc.collapse_loss(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="strength must be a number >= 0"):
        lc.CollapseRegularizer(_model(), -1.0)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        lc.collapse_loss("model")


@pytest.mark.slow
def test_regularizer_under_torch_compile():
    m = _model(per_channel=True)
    reg = lc.CollapseRegularizer(m, 0.5)
    x = torch.randn(4, 6)

    def step(x):
        return m(x).square().mean() + reg()

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))
    grads = torch.autograd.grad(compiled(x), [a.alpha for a in m.modules() if isinstance(a, lc.CollapsibleActivation)])
    ref = torch.autograd.grad(step(x), [a.alpha for a in m.modules() if isinstance(a, lc.CollapsibleActivation)])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
