"""Healing after compression (lc_kernels/healing.py through lc.compress): the schedule, the trainable
set, the held-out guard that keeps the best checkpoint, all or nothing, adapters merged back."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lc_kernels as lc
from lc_kernels import healing
from lc_kernels.nn.gated import LCGatedMLP

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, max_position_embeddings=64,
                                   initializer_range=0.2)  # peakier next-token distributions than 0.02
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n: int, seed: int, batch: int = 4, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (batch, seq), generator=g)} for _ in range(n)]


def mean_kl(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        kls = [F.kl_div(torch.log_softmax(student(**b).logits, -1).flatten(0, 1),
                        torch.log_softmax(teacher(**b).logits, -1).flatten(0, 1), log_target=True,
                        reduction="batchmean") for b in batches]
    return float(sum(kls) / len(kls))


def task(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = task(0, 512)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def labeled(seed: int, n: int = 1024, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = task(seed, n)
    return list(zip(x.split(size), y.split(size)))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    steps, warmup = 100, 10
    f = [healing.lr_factor(s, steps, warmup) for s in range(steps)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup] == 1.0
    mid = warmup + (steps - warmup) // 2
    assert f[mid] == pytest.approx(0.5)
    assert f[warmup + 30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # monotone decay
    assert 0 < f[-1] < 1e-3  # to about 0
    assert healing.default_warmup(200) == 20 and healing.default_warmup(3) == 1
    assert healing.lr_factor(0, 5, 0) == 1.0  # no warm-up: cosine from the first step


def test_kl_healing_lowers_the_heldout_kl_and_trains_only_the_sites(monkeypatch):
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    calib, heal, test = tokens(8, seed=1), tokens(24, seed=2), tokens(6, seed=3)
    seen: dict = {}
    real_adamw = torch.optim.AdamW

    class SpyAdamW(real_adamw):
        def __init__(self, params, **kw):
            params = list(params)
            seen["optimizer"] = {id(p) for p in params}
            super().__init__(params, **kw)

    real_loss = healing.distillation_loss

    def spy_loss(m, *a, **k):
        if torch.is_grad_enabled() and "grad_flags" not in seen:
            seen["grad_flags"] = {n for n, p in m.named_parameters() if p.requires_grad}
        return real_loss(m, *a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(healing, "distillation_loss", spy_loss)
    plain = copy.deepcopy(dense)
    lc.compress(plain, calib, target=0.5, progress=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = lc.compress(model, calib, target=0.5, heal_steps=40, heal_data=heal, heal_lr=3e-3, progress=False)
    assert report.heal_signal == "KL" and report.heal_trainable == "sites" and report.heal_steps == 40
    assert report.best_step > 0 and report.heldout_best < 0.95 * report.heldout_before  # measured 0.240 -> 0.206
    assert report.heldout_after == report.heldout_best
    assert mean_kl(model, dense, test) < mean_kl(plain, dense, test)  # and on text neither fitted nor healed on
    # the trainable set: the compressed sites' weights, never their slopes, nothing else of the model
    sites = [s.path for s in report.steps]
    expected = {f"{s}.{n}" for s in sites for n, _ in model.get_submodule(s).named_parameters()
                if not n.endswith("alpha")}
    assert seen["grad_flags"] == expected
    assert seen["optimizer"] == {id(model.get_parameter(n)) for n in expected}
    assert all(p.grad is None for p in model.parameters())  # no .grad anywhere once compress returns
    now = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: f for n, f in flags.items() if n in now} == {n: f for n, f in now.items() if n in flags}  # restored
    assert all(now.values())  # the new sites' tensors too: the user's next training finds them trainable
    assert "held-out KL before" in str(report)


@pytest.mark.parametrize("trainable", ["skip", "all"])
def test_other_trainable_sets(monkeypatch, trainable):
    model = tiny_llama()
    seen = {}
    real_adamw = torch.optim.AdamW

    class SpyAdamW(real_adamw):
        def __init__(self, params, **kw):
            params = list(params)
            seen["optimizer"] = {id(p) for p in params}
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    report = lc.compress(model, tokens(8, seed=1), target=0.5, heal_steps=4, heal_data=tokens(4, seed=2),
                         heal_lr=1e-3, heal_trainable=trainable, progress=False)
    names = {n for n, p in model.named_parameters() if id(p) in seen["optimizer"]}
    if trainable == "skip":
        # only the fitted maps: skips and down projections, never the kept gate / up channels
        assert names and all(n.split(".")[-2] in ("skip", "skip_in", "down_proj") for n in names)
        assert {n.split(".")[-2] for n in names} >= {"skip"}
    else:
        assert names == {n for n, _ in model.named_parameters() if not n.endswith("alpha")}
    assert all(p.grad is None for p in model.parameters())
    assert report.heal_trainable == trainable


def _ce_switching(turn_at: int | None):
    """The user's loss: cross-entropy; from training step ``turn_at`` on it maximises it instead (a
    run that helps, then hurts). The guard evaluates it without a graph: always the plain loss."""
    calls = []

    def loss(m, batch):
        x, y = batch
        ce = F.cross_entropy(m(x), y)
        if not torch.is_grad_enabled():
            return ce
        calls.append(1)
        return -ce if turn_at is not None and len(calls) > turn_at else ce

    return loss, calls


def test_the_guard_keeps_the_best_heldout_checkpoint(monkeypatch):
    model = trained_mlp()
    x, _ = task(0, 512)
    checkpoints = {}
    real = healing.heal

    def spy(m, loss, n, evaluate, **kw):
        def watched(mod):
            v = evaluate(mod)
            checkpoints[len(checkpoints)] = (v, state(mod))
            return v
        return real(m, loss, n, watched, **kw)

    monkeypatch.setattr(healing, "heal", spy)
    ce, calls = _ce_switching(turn_at=6)
    report = lc.compress(model, x, target=0.6, heal_steps=20, heal_data=labeled(1), heal_loss=ce, heal_lr=3e-3,
                         heal_eval_every=2, progress=False)
    assert len(calls) == 20
    values = [v for v, _ in checkpoints.values()]
    best = min(range(len(values)), key=values.__getitem__)
    assert 0 < best < len(values) - 1 and values[-1] > values[best]  # better first, then worse
    assert report.best_step == 2 * best and report.heldout_best == values[best] == report.heldout_after
    assert same(state(model), checkpoints[best][1])  # the model is the best checkpoint, bit for bit


def test_healing_that_only_hurts_leaves_the_unhealed_model():
    model = trained_mlp()
    x, _ = task(0, 512)
    plain = copy.deepcopy(model)
    lc.compress(plain, x, target=0.6, progress=False)
    ce, calls = _ce_switching(turn_at=0)  # every step makes the loss worse
    report = lc.compress(model, x, target=0.6, heal_steps=10, heal_data=labeled(1), heal_loss=ce, heal_lr=1e-2,
                         progress=False)
    assert len(calls) == 10 and report.best_step == 0
    assert report.heldout_after == report.heldout_before == report.heldout_best
    assert same(state(model), state(plain))
    assert report.final_error == report.steps[-1].model_error
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind, trainable", [("mlp", "sites"), ("llama", "sites"), ("llama", "adapters")])
def test_a_failure_mid_healing_restores_the_model(kind, trainable):
    model = trained_mlp() if kind == "mlp" else tiny_llama()
    before, structure = state(model), repr(model)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    calls = []

    def boom(m, batch):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("the user's loss failed at step 3")
        if kind == "mlp":
            x, y = batch
            return F.cross_entropy(m(x), y)
        return m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    calib = task(0, 512)[0] if kind == "mlp" else tokens(8, seed=1)
    data = labeled(1) if kind == "mlp" else tokens(8, seed=2)
    with pytest.raises(RuntimeError, match="restored as it was"):
        lc.compress(model, calib, target=0.6, heal_steps=10, heal_data=data, heal_loss=boom, heal_lr=1e-2,
                    heal_trainable=trainable, progress=False)
    assert len(calls) == 3
    assert repr(model) == structure and same(state(model), before)
    assert all(p is params[n] and p.requires_grad == flags[n] and p.grad is None for n, p in model.named_parameters())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, LCGatedMLP) for m in model.modules())


def test_adapters_merge_back_into_the_weights():
    dense = tiny_llama()
    calib, heal = tokens(8, seed=1), tokens(24, seed=2)
    plain, model = copy.deepcopy(dense), copy.deepcopy(dense)
    lc.compress(plain, calib, target=0.5, progress=False)
    report = lc.compress(model, calib, target=0.5, heal_steps=40, heal_data=heal, heal_lr=1e-2,
                         heal_trainable="adapters", heal_rank=4, progress=False)
    assert report.heal_trainable == "adapters" and report.best_step > 0
    assert report.heldout_after < report.heldout_before
    # the served model has exactly the modules and tensors it has without adapters
    assert repr(model) == repr(plain)
    assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
    assert state(model).keys() == state(plain).keys()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    changed = [n for n, v in state(model).items() if not torch.equal(v, state(plain)[n])]
    sites = [s.path for s in report.steps]
    assert changed and all(any(n.startswith(s + ".") for s in sites) and n.endswith("weight") for n in changed)
    assert all(p.grad is None for p in model.parameters())


def test_distillation_without_an_output_embedding_heals_on_heal_data():
    model = trained_mlp()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    calib = list(torch.randn(1024, 12, generator=g).split(64))
    heal = list(torch.randn(4096, 12, generator=g).split(256))
    report = lc.compress(model, calib, target=0.6, heal_steps=60, heal_data=heal, heal_lr=1e-3, progress=False)
    assert report.heal_signal == "relative squared error"
    assert report.best_step > 0 and report.heldout_after < 0.95 * report.heldout_before  # measured 0.0044 -> 0.0038
    xt = torch.randn(2048, 12, generator=g)
    plain = copy.deepcopy(dense)
    lc.compress(plain, calib, target=0.6, progress=False)
    with torch.no_grad():
        err = lambda m: float((m(xt) - dense(xt)).norm() / dense(xt).norm())  # noqa: E731
        assert err(model) < err(plain)


@pytest.mark.parametrize("kw, match", [
    (dict(heal_trainable="everything"), "heal_trainable must be one of"),
    (dict(heal_rank=0), "heal_rank must be an int >= 1"),
    (dict(heal_warmup=-1), "heal_warmup must be an int >= 0"),
    (dict(heal_warmup=50), r"heal_warmup \(50\) must be at most heal_steps"),
    (dict(heal_eval_every=0), "heal_eval_every must be an int >= 1"),
    (dict(heal_temperature=0.0), "heal_temperature must be > 0"),
    (dict(heal_clip=-1.0), "heal_clip must be > 0"),
])
def test_bad_healing_options_are_refused_before_anything_changes(kw, match):
    model = trained_mlp()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        lc.compress(model, task(0, 64)[0], target=0.5, heal_steps=10, progress=False, **kw)
    assert same(state(model), before) and not any(isinstance(m, lc.LCFusedMLP) for m in model.modules())
