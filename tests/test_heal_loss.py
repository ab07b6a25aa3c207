"""compress(..., heal_loss=fn): healing with the user's own loss (labels allowed), and its guard."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lc_kernels as lc


def task(seed: int = 0, n: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long())  # needs the nonlinearity
    return x, y


def trained() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = task()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_heal_loss_uses_labels_and_lowers_the_task_loss():
    model = trained()
    x, y = task()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    seen = []

    def ce(m, batch):
        xb, yb = batch
        if torch.is_grad_enabled():  # a healing step (the guard evaluates the loss without a graph)
            seen.append(yb)
        return F.cross_entropy(m(xb), yb)

    unhealed_model, healed_model = copy.deepcopy(model), copy.deepcopy(model)
    plain = lc.compress(unhealed_model, x, target=0.6, progress=False)
    healed = lc.compress(healed_model, x, target=0.6, heal_steps=40, heal_data=batches, heal_loss=ce, heal_lr=1e-3,
                         progress=False)
    assert len(seen) == 40 and all(torch.equal(s, batches[k % 8][1]) for k, s in enumerate(seen))
    with torch.no_grad():
        before = float(F.cross_entropy(unhealed_model(x), y))
        after = float(F.cross_entropy(healed_model(x), y))
    # kept only if the mean heal_loss over heal_data fell: a kept round shows as a clear drop
    assert after < 0.95 * before
    assert healed.steps[-1].healed_error is not None


def test_heal_loss_must_return_a_scalar_with_a_graph():
    model = trained()
    x, _ = task()
    with pytest.raises(TypeError, match="heal_loss"):
        lc.compress(model, x, target=0.6, heal_steps=2, heal_loss="ce", progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="scalar tensor with a graph"):
        lc.compress(model, x, target=0.6, heal_steps=2, heal_loss=lambda m, b: 1.0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # all or nothing
