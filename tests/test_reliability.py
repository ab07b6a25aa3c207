"""Nothing half-done, nothing silently wrong: bad numbers are refused at the door by name, and a
failing fine-tuning step leaves the model (and optimizer) exactly as the last good step left it."""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.cli import main
from lc_kernels.finetune import finetune
from lc_kernels.integrations import handlers, register_handler
from lc_kernels.planning import CollapsePlan

pytestmark = pytest.mark.usefixtures("one_thread")
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- CollapsibleActivation

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_activation_refuses_non_floating_input(dtype):
    act = lc.CollapsibleActivation("relu", 1, 0.5)
    with pytest.raises(TypeError, match=rf"floating-point input, got dtype {dtype}; cast it first"):
        act(torch.tensor([-2, 3]).to(dtype))
    assert torch.equal(act(torch.tensor([-2.0, 3.0])), torch.tensor([-1.0, 3.0]))  # alpha 0.5, not int(0.5)


@pytest.mark.parametrize("init", [NAN, INF, -INF, torch.tensor([0.0, NAN]), [0.1, INF]])
def test_activation_refuses_non_finite_init(init):
    with pytest.raises(ValueError, match="init must be finite"):
        lc.CollapsibleActivation("relu", 2, init)


def test_activation_refuses_non_numeric_init():
    with pytest.raises(TypeError, match="init must be a float or a tensor of floats, got str"):
        lc.CollapsibleActivation("relu", 1, "half")


# ---------------------------------------------------------------- finetune: failing steps

def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 4))
    lc.prepare_(model)
    return model


def _batches(n: int = 3, rows: int = 16) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 8, generator=g)
        out.append((x, x[:, :4].argmax(1)))
    return out


class _Recorder:
    """A loader of ``batches`` that records the model's state_dict (and the optimizer's state) as
    each batch is handed out, i.e. just before each step."""

    def __init__(self, batches: list, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.batches, self.model, self.optimizer = batches, model, optimizer
        self.states, self.opt_states = [], []

    def __iter__(self):
        for b in self.batches:
            self.states.append(copy.deepcopy(self.model.state_dict()))
            if self.optimizer is not None:
                self.opt_states.append(copy.deepcopy(self.optimizer.state_dict()["state"]))
            yield b


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _same(a[k], b[k]) if isinstance(a[k], dict) else
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


class _PoisonStep(torch.optim.SGD):
    """An optimizer whose step leaves a NaN in the first weight from step ``at`` on."""

    def __init__(self, params, at: int):
        super().__init__(params, lr=1e-2, momentum=0.9)
        self.at, self.calls = at, 0

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        self.calls += 1
        if self.calls >= self.at:
            self.param_groups[0]["params"][0][0, 0] = NAN


def _zero_rows():
    return [_batches(1)[0], (torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))]


def _nan_batch():
    x, y = _batches(1)[0]
    return [(x, y), (x * NAN, y)]


@pytest.mark.parametrize("kwargs, data, err, words, failing_step", [
    (dict(lr=1e30), _batches(), FloatingPointError, r"finetune step 2: the loss is nan", 2),
    (dict(), _zero_rows(), ValueError, r"finetune step 2: the loader yielded a batch with 0 rows", 2),
    (dict(), _nan_batch(), FloatingPointError, r"finetune step 2: the loss is nan", 2),
    ("poison", _batches(), FloatingPointError,
     r"finetune step 2: optimizer.step\(\) left NaN or Inf in 0.linears.0.weight", 2),
])
def test_a_failing_step_restores_the_model_and_optimizer(kwargs, data, err, words, failing_step):
    model = _model()
    opt = _PoisonStep(model.parameters(), at=2) if kwargs == "poison" else \
        torch.optim.AdamW(lc.alpha_param_groups(model, **({"lr": 1e-3} | (kwargs or {}))))
    rec = _Recorder(data, model, opt)
    with pytest.raises(err, match=words):
        finetune(model, rec, steps=3, optimizer=opt, progress=False)
    assert len(rec.states) == failing_step
    assert not _same(rec.states[0], rec.states[-1])  # the good steps before it did train
    assert _same(model.state_dict(), rec.states[-1])  # exactly as before the failing step (BatchNorm stats too)
    assert _same(opt.state_dict()["state"], rec.opt_states[-1])
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("kwargs, data, err, words", [
    (dict(strength=INF), _batches(), ValueError, "strength must be a number >= 0 and finite, got inf"),
    (dict(lr=1e30), _batches(), FloatingPointError, "finetune step 2"),
    (dict(), [(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))], ValueError, "step 1: .* 0 rows"),
])
def test_finetune_defaults_never_leave_a_broken_model(kwargs, data, err, words):
    model = _model()
    rec = _Recorder(data, model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=words):
        finetune(model, rec, steps=3, progress=False, **kwargs)
    assert _same(model.state_dict(), rec.states[-1] if rec.states else before)
    if err is ValueError:
        assert _same(model.state_dict(), before)


@pytest.mark.parametrize("lr, words", [
    (1e30, r"finetune step 2: the loss is nan .*Lower lr"),
    (1e38, r"finetune step 1: optimizer.step\(\) cannot take a step at learning rate 1e\+39 in the weights' "
           r"dtype .*Lower lr"),
])
def test_a_diverging_learning_rate_is_a_value_error(lr, words):
    # 1e38: Adam's step size lr / (1 - beta1) no longer fits float32 (a RuntimeError from inside the
    # optimizer before); 1e30: the loss is nan on the next step. Both: a ValueError saying to lower lr.
    model = _model()
    rec = _Recorder(_batches(), model)
    with pytest.raises(ValueError, match=words) as e:
        finetune(model, rec, steps=3, lr=lr, progress=False)
    assert isinstance(e.value, FloatingPointError)  # what it was before, still
    assert _same(model.state_dict(), rec.states[-1])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_alpha_param_groups_on_a_model_without_slopes():
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"found no collapsible slopes \(alpha\) in this Sequential: call "
                                         r"lc_kernels.prepare_\(model\) first"):
        lc.alpha_param_groups(plain, lr=1e-3)


def test_a_healthy_run_is_unchanged_by_the_checks():
    model = _model()
    hist = finetune(model, _batches(), steps=6, lr=1e-2, strength=1.0, progress=False)
    assert hist.step == list(range(1, 7)) and all(math.isfinite(v) for v in hist.loss)
    assert all(len(v) == 6 for v in hist.alphas.values())


# ---------------------------------------------------------------- numbers at the door

@pytest.mark.parametrize("kwargs, err, words", [
    (dict(lr=-1e-3), ValueError, r"lr must be a number >= 0 and finite, got -0.001; a negative learning rate"),
    (dict(lr=NAN), ValueError, "lr must be a number >= 0 and finite, got nan"),
    (dict(lr="1e-3"), TypeError, "lr must be a number >= 0, got str"),
    (dict(alpha_lr=-1), ValueError, "alpha_lr must be a number >= 0 and finite, got -1; a negative learning rate"),
    (dict(alpha_lr=INF), ValueError, "alpha_lr must be a number >= 0 and finite, got inf"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a number >= 0 and finite"),
    (dict(strength=INF), ValueError, "strength must be a number >= 0 and finite, got inf"),
    (dict(strength=NAN), ValueError, "strength must be a number >= 0 and finite, got nan"),
    (dict(strength=-1.0), ValueError, "strength must be a number >= 0 and finite, got -1.0"),
    (dict(warmup_steps=-1), ValueError, "warmup_steps must be an int >= 0"),
    (dict(warmup_steps=2.5), ValueError, "warmup_steps must be an int >= 0"),
    (dict(steps=0), ValueError, "steps must be a positive int, got 0"),
    (dict(steps=2.5), ValueError, "steps must be a positive int, got 2.5"),
    (dict(steps=None, epochs=-1), ValueError, "epochs must be a positive int, got -1"),
    (dict(steps=None, epochs=INF), ValueError, "epochs must be a positive int, got inf"),
    (dict(log_every=0), ValueError, "log_every must be a positive int"),
])
def test_finetune_refuses_bad_numbers_before_training(kwargs, err, words):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=words):
        finetune(model, _batches(), **({"steps": 2, "progress": False} | kwargs))
    assert _same(model.state_dict(), before)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(strength=INF), ValueError, "strength must be a number >= 0 and finite, got inf"),
    (dict(strength=NAN), ValueError, "strength must be a number >= 0 and finite, got nan"),
    (dict(strength=-0.5), ValueError, "strength must be a number >= 0 and finite, got -0.5"),
    (dict(strength="1"), TypeError, "strength must be a number >= 0, got str"),
    (dict(strength=True), TypeError, "strength must be a number >= 0, got bool"),
    (dict(strength=1.0, warmup_steps=-3), ValueError, "warmup_steps must be an int >= 0"),
])
def test_regularizer_refuses_bad_numbers(kwargs, err, words):
    with pytest.raises(err, match=words):
        lc.CollapseRegularizer(_model(), **kwargs)


@pytest.mark.parametrize("kwargs, err, words", [
    (dict(lr=-1.0), ValueError, "lr must be a number >= 0 and finite, got -1.0; a negative learning rate"),
    (dict(lr=INF), ValueError, "lr must be a number >= 0 and finite, got inf"),
    (dict(lr=1e-3, alpha_lr=-1), ValueError, "alpha_lr must be a number >= 0 and finite, got -1"),
    (dict(lr=1e-3, alpha_lr=NAN), ValueError, "alpha_lr must be a number >= 0 and finite, got nan"),
    (dict(lr=1e-3, weight_decay=-1), ValueError, "weight_decay must be a number >= 0 and finite, got -1"),
    (dict(lr=None), TypeError, "lr must be a number >= 0, got NoneType"),
])
def test_alpha_param_groups_refuses_bad_numbers(kwargs, err, words):
    with pytest.raises(err, match=words):
        lc.alpha_param_groups(_model(), **kwargs)


# ---------------------------------------------------------------- register_handler

@pytest.mark.parametrize("bad, words", [
    ("x", "register_handler expects a function handler\\(module, path, opts\\), got str 'x'"),
    (None, "got NoneType None"),
    (lambda module: None, "cannot be called as handler\\(module, path, opts\\)"),
])
def test_register_handler_refuses_and_prepare_still_works(bad, words):
    before = handlers()
    with pytest.raises(TypeError, match=words):
        register_handler(bad)
    assert handlers() == before
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    assert lc.prepare_(model) == ["0"] and isinstance(model[0], lc.LCFusedMLP)


# ---------------------------------------------------------------- CollapsePlan indexing

def _plan() -> CollapsePlan:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Tanh(),
                          nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)))
    lc.prepare_(model)
    return lc.plan_collapse(model)


@pytest.mark.parametrize("key, path", [(0, "0"), (1, "4.0"), (-1, "4.0"), (-2, "0"), ("4.0", "4.0")])
def test_plan_is_a_sequence_and_a_mapping(key, path):
    assert _plan()[key].path == path


def test_plan_slices_are_lists():
    plan = _plan()
    assert [s.path for s in plan[1:]] == ["4.0"] and isinstance(plan[:], list) and plan[5:] == []


@pytest.mark.parametrize("key, err, words", [
    (2, IndexError,
     r"site index 2 is out of range for a plan of 2 sites \(valid: -2..1, or a path of \['0', '4.0'\]\)"),
    (-3, IndexError, "site index -3 is out of range"),
    ("4", KeyError, r"no site '4' in this plan; sites: \['0', '4.0'\]"),
    (1.0, TypeError, "indexed by site position \\(int\\), site path \\(str\\) or a slice, got float 1.0"),
    (True, TypeError, "got bool True"),
    (None, TypeError, "got NoneType None"),
])
def test_plan_index_errors(key, err, words):
    with pytest.raises(err, match=words):
        _plan()[key]


# ---------------------------------------------------------------- CLI numbers

@pytest.mark.parametrize("argv, option", [
    (["demo", "--epochs", "-1"], "--epochs"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--epochs", "two"], "--epochs"),
    (["demo", "--tol", "-0.1"], "--tol"),
    (["demo", "--tol", "nan"], "--tol"),
    (["demo", "--max-error", "-1"], "--max-error"),
    (["demo", "--lr", "inf"], "--lr"),
    (["demo", "--alpha-lr", "-1e-2"], "--alpha-lr"),
    (["demo", "--strength", "nan"], "--strength"),
    (["demo", "--latency-batch", "0"], "--latency-batch"),
    (["demo", "--last-k", "0"], "--last-k"),
    (["demo", "--widths", "64", "-5", "10"], "--widths"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--widths", "32", "10"], "--widths"),
    (["plan", "ckpt", "--tol", "-1"], "--tol"),
    (["plan", "ckpt", "--max-error", "nan"], "--max-error"),
    (["plan", "ckpt", "--target", "0"], "--target"),
    (["plan", "ckpt", "--target", "1.5"], "--target"),
    (["plan", "ckpt", "--calib-rows", "0"], "--calib-rows"),
    (["bench", "--threads", "-1"], "--threads"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--tokens", "0"], "--tokens"),
    (["bench", "--batch", "-2"], "--batch"),
    (["bench", "--repeats", "1"], "--repeats"),
    (["bench", "--warmup", "-1"], "--warmup"),
    (["bench", "--min-time", "nan"], "--min-time"),
    (["bench", "--min-time", "0"], "--min-time"),
    (["bench", "--peak-size", "0"], "--peak-size"),
])
def test_cli_refuses_nonsense_numbers_with_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("content, words", [
    ("module", r"refuses to unpickle it \(it pickles torch.nn.modules.container.Sequential\); save tensors only"),
    ("object", r"refuses to unpickle it \(it pickles [\w.]*Opaque\)"),
    ("empty", r"is not a readable torch.save file \(EOFError\)"),
    ("garbage", r"is not a readable torch.save file"),
])
def test_cli_plan_on_a_file_it_will_not_unpickle_is_one_line_and_exit_2(content, words, tmp_path, capsys):
    (tmp_path / "arch.py").write_text("from torch import nn\n\ndef build():\n"
                                      "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    path = tmp_path / "model.pt"
    if content == "module":
        torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), path)
    elif content == "object":
        torch.save({"w": _Opaque()}, path)
    else:
        path.write_bytes(b"" if content == "empty" else b"not a zip, not a pickle")
    assert main(["plan", str(path), "--model", f"{tmp_path / 'arch.py'}:build"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lc-kernels plan: error: CHECKPOINT {path}")
    assert re.search(words, err), err
    prepared = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lc.prepare_(prepared)
    torch.save(prepared.state_dict(), tmp_path / "sd.pt")
    assert main(["plan", str(tmp_path / "sd.pt"), "--model", f"{tmp_path / 'arch.py'}:build", "--calib", str(path)]) \
        == 2  # the same file as calibration data
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lc-kernels plan: error: --calib {path}") and re.search(words, err)


class _Opaque:
    pass


def test_a_module_on_meta_prints_and_says_it_holds_no_slopes():
    """``print(model)`` after ``model.to("meta")`` (how big models are built before loading) works;
    it used to raise from ``alpha.item()``."""
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    lc.prepare_(m, per_channel=True)
    one = lc.LCFusedMLP(8, 16, 8)
    for mod in (m.to("meta"), one.to("meta")):
        text = repr(mod)
        assert "alpha on meta (no values)" in text and "LC" in text
    y = one(torch.randn(2, 8, device="meta"))  # shape inference on meta still runs
    assert y.shape == (2, 8) and y.is_meta
