"""lc_kernels.finetune: the plain-PyTorch fine-tuning loop with the collapse regularizer."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lc_kernels as lc
from lc_kernels.finetune import FinetuneHistory, finetune

from conftest import rel_err


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 8)
    return x, (x[:, :4].argmax(1))


def loader(batch_size: int = 16, labels: bool = True) -> DataLoader:
    x, y = data()
    return DataLoader(TensorDataset(x, y) if labels else TensorDataset(x), batch_size=batch_size)


def test_alphas_travel_to_one_and_collapse_keeps_accuracy():
    model = mlp()
    lc.prepare_(model)
    hist = finetune(model, loader(), steps=150, lr=1e-2, alpha_lr=5e-2, strength=1.0, warmup_steps=20,
                    progress=False)
    assert isinstance(hist, FinetuneHistory)
    assert hist.step == list(range(1, 151))
    assert set(hist.alphas) == {"0.acts.0", "0.acts.1"}
    assert all(len(v) == 150 and v[0] < 0.06 and v[-1] > 0.95 for v in hist.alphas.values())
    x, _ = data()
    model.eval()
    with torch.no_grad():
        before = model(x)
        lc.collapse_(model, tol=0.05)
        after = model(x)
    assert rel_err(after, before) < 0.05
    assert isinstance(model[0], lc.LCChain) and len(model[0].linears) == 1  # three Linears, one map


def test_strength_ramps_over_warmup():
    model = mlp()
    lc.prepare_(model)
    hist = finetune(model, loader(), steps=8, lr=1e-3, strength=2.0, warmup_steps=4, progress=False)
    assert hist.strength == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0])
    reg = [r / s for r, s in zip(hist.reg_loss, hist.strength)]
    assert all(r > 0 for r in reg)


def test_self_distillation_needs_no_labels_and_starts_at_zero_loss():
    model = mlp()
    lc.prepare_(model)
    hist = finetune(model, loader(labels=False), steps=30, lr=1e-3, alpha_lr=2e-2, strength=1.0,
                    teacher="self", progress=False)
    assert hist.task_loss[0] == 0.0  # the copy equals the model before the first step
    assert all(v[-1] > 0.3 for v in hist.alphas.values())


def test_alpha_is_kept_out_of_weight_decay():
    """One step at zero gradient (student == teacher, no regularizer): only weight decay acts."""
    model = mlp()
    lc.prepare_(model, alpha_init=0.5)
    w0 = model[0].linears[0].weight.detach().clone()
    finetune(model, loader(labels=False), steps=1, lr=1e-2, weight_decay=0.5, strength=0.0, teacher="self",
             progress=False)
    assert all(a.alpha.item() == 0.5 for a in model.modules() if isinstance(a, lc.CollapsibleActivation))
    assert torch.allclose(model[0].linears[0].weight, w0 * (1 - 1e-2 * 0.5), rtol=1e-6, atol=0)
    assert not torch.equal(model[0].linears[0].weight, w0)


def test_epochs_log_every_mode_and_progress_bar():
    model = mlp()
    lc.prepare_(model)
    model.eval()
    hist = finetune(model, loader(batch_size=32), epochs=3, lr=1e-3, log_every=4, progress=True)
    assert hist.step == [4, 6]  # 2 batches per epoch, the last step is always logged
    assert not model.training


class HFStyle(nn.Module):
    """Takes keyword inputs and returns an object with .loss and .logits, like a HF model."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> SimpleNamespace:
        logits = self.net(inputs)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SimpleNamespace(loss=loss, logits=logits)


def test_mapping_batches_use_the_model_loss():
    model = HFStyle()
    lc.prepare_(model)
    x, y = data()
    batches = [{"inputs": x[i:i + 16], "labels": y[i:i + 16]} for i in range(0, 64, 16)]
    hist = finetune(model, batches, steps=6, lr=1e-3, strength=0.0, progress=False)
    with torch.no_grad():
        first = nn.functional.cross_entropy(model(x[:16]).logits, y[:16])
    assert hist.task_loss[0] > first.item()  # it trained on the model's own loss


def test_custom_loss_fn_receives_output_and_labels():
    model = mlp()
    lc.prepare_(model)
    seen = []

    def loss_fn(out, target):
        seen.append((out.shape, target.shape))
        return nn.functional.cross_entropy(out, target)

    finetune(model, loader(), steps=2, loss_fn=loss_fn, progress=False)
    assert seen == [((16, 4), (16,))] * 2


def test_bad_input():
    model = mlp()
    lc.prepare_(model)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        finetune(model, loader(), progress=False)
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        finetune(model, loader(), steps=1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        finetune(model, loader(), steps=0, progress=False)
    with pytest.raises(TypeError, match="teacher must be"):
        finetune(model, loader(), steps=1, teacher=3, progress=False)
    with pytest.raises(ValueError, match="teacher must be"):
        finetune(model, loader(), steps=1, teacher="original", progress=False)
    with pytest.raises(ValueError, match="no labels"):
        finetune(model, loader(labels=False), steps=1, progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        finetune(model, [], steps=1, progress=False)
    with pytest.raises(TypeError, match="needs a loader with len"):
        finetune(model, iter([1]), epochs=1, progress=False)
    with pytest.raises(ValueError, match="lr must be"):
        finetune(model, loader(), steps=1, lr=float("nan"), progress=False)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        finetune("model", loader(), steps=1, progress=False)
    with pytest.raises(ValueError, match="prepare_"):
        finetune(mlp(), loader(), steps=1, progress=False)


def test_diverging_loss_stops_with_a_clear_error():
    model = mlp()
    lc.prepare_(model)
    x, y = data()
    bad = [(x[:16] * float("inf"), y[:16])]
    with pytest.raises(FloatingPointError, match="step 1"):
        finetune(model, bad, steps=3, progress=False)
