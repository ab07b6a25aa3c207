"""All or nothing: a failure at any site leaves the model exactly as it was; fuzzed round trips."""
import copy
import random

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.testing import rel_err

transforms_collapse = __import__("importlib").import_module("lc_kernels.transforms.collapse")
registry = __import__("importlib").import_module("lc_kernels.integrations.registry")


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def multi_site(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), nn.Tanh(),
        nn.Linear(8, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 16), nn.SiLU(), nn.Linear(16, 8), nn.Tanh(),
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4),
    ).eval()


def snapshot(model):
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, [id(m) for m in model.modules()]


def unchanged(model, snap):
    text, state, ids = snap
    now = model.state_dict()
    return (repr(model) == text and now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)
            and [id(m) for m in model.modules()] == ids)


@pytest.mark.parametrize("fail_at", [0, 1, 2])
@pytest.mark.parametrize("fitted", [False, True])
def test_collapse_failure_at_any_site_restores_the_model(monkeypatch, fail_at, fitted):
    model = multi_site()
    lc.prepare_(model, alpha_init=0.5)
    x = torch.randn(64, 8)
    plan = lc.plan_collapse(model, calib=x if fitted else None, force=True)
    assert len([s for s in plan.sites if s.changes]) == 3
    snap = snapshot(model)
    real, calls = transforms_collapse.install, []

    def flaky(m, parts):
        calls.append(1)
        if len(calls) == fail_at + 1:
            raise RuntimeError("disk on fire")
        return real(m, parts)

    monkeypatch.setattr(transforms_collapse, "install", flaky)
    with pytest.raises(RuntimeError, match="collapse_ failed and the model was restored.*disk on fire"):
        lc.collapse_(model, plan, calib=x if fitted else None, force=True)
    assert unchanged(model, snap)
    monkeypatch.setattr(transforms_collapse, "install", real)
    lc.collapse_(model, plan, calib=x if fitted else None, force=True)  # and it still works afterwards


@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_prepare_failure_at_any_site_restores_the_model(monkeypatch, fail_at):
    model = multi_site()
    snap = snapshot(model)
    seq = __import__("importlib").import_module("lc_kernels.integrations.sequential")
    real_mlp, real_chain, calls = seq.LCFusedMLP.from_modules, seq.LCChain, []

    def count(build):
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == fail_at + 1:
                raise RuntimeError("conversion crashed")
            return build(*a, **k)
        return wrapped

    monkeypatch.setattr(seq, "LCFusedMLP", type("Shim", (), {"from_modules": staticmethod(count(real_mlp))}))
    monkeypatch.setattr(seq, "LCChain", count(real_chain))
    with pytest.raises(RuntimeError, match="prepare_ failed and the model was restored.*conversion crashed"):
        lc.prepare_(model)
    assert unchanged(model, snap)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.sites.append(copy.deepcopy(p.sites[0])), "more than once"),
    (lambda p: setattr(p.sites[0].joints[0], "decision", "FOLD"), "unknown decision 'FOLD'"),
    (lambda p: (setattr(p.sites[0].joints[0], "decision", "PARTIAL"),
                setattr(p.sites[0].joints[0], "linear_channels", [0, 99])), r"in \[0, 32\)"),
    (lambda p: (setattr(p.sites[0].joints[0], "decision", "PARTIAL"),
                setattr(p.sites[0].joints[0], "linear_channels", [])), "non-empty subset"),
])
def test_edited_plans_are_refused_before_anything_changes(edit, match):
    model = multi_site()
    lc.prepare_(model, alpha_init=1.0)
    plan = lc.plan_collapse(model)
    edit(plan)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lc.collapse_(model, plan)
    assert unchanged(model, snap)


def test_the_issue_example_is_refused_and_untouched():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 16),
                      nn.BatchNorm1d(16, track_running_stats=False), nn.ReLU(), nn.Linear(16, 4))
    lc.prepare_(m, alpha_init=1.0)
    m.eval()
    snap = snapshot(m)
    with pytest.raises(ValueError, match="no running statistics"):
        lc.collapse_(m)
    assert unchanged(m, snap) and m[0].form == "mlp"


def test_fp16_overflow_is_refused_with_the_reason():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        m[0].weight.fill_(200.0)
        m[2].weight.fill_(200.0)  # each weight fits fp16; their product over 64 channels (2.56e6) does not
    m = m.half()
    lc.prepare_(m, alpha_init=1.0)
    snap = snapshot(m)
    with pytest.raises(ValueError, match="overflows torch.float16.*model.float"):
        lc.collapse_(m)
    assert unchanged(m, snap)


@pytest.mark.parametrize("value, lost", [(2e-5, "100%"), (1e-4, "12%")])
def test_fp16_underflow_is_refused_with_the_reason(value, lost):
    # The overflow check's twin. Each weight is an fp16 number; their product over 16 channels
    # (6.4e-9, 1.6e-7) is nonzero in float64 but below fp16's smallest normal (6.1e-5): cast back,
    # it becomes 0, or a subnormal 12% away from it. The biases stay large: the weights alone decide.
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        m[0].weight.fill_(value)
        m[2].weight.fill_(value)
    m = m.half()
    lc.prepare_(m, alpha_init=1.0)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=rf"site '0': the collapsed map of Linears 0..1 \(merged\) underflows "
                                         rf"torch.float16: casting its float64 weight back loses {lost} of it.*"
                                         r"model.float\(\) before collapse_"):
        lc.collapse_(m)
    assert unchanged(m, snap)


def test_ordinary_half_precision_rounding_is_not_underflow():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        m[0].weight.fill_(1e-3)  # product 1.6e-5: subnormal in fp16, but 270 subnormal steps: 0.2% rounding
        m[2].weight.fill_(1e-3)
        m[0].bias.zero_()
    m = m.half()
    lc.prepare_(m, alpha_init=1.0)
    lc.collapse_(m)
    assert rel_err(m[0].fc.weight.double(), torch.full((8, 8), 1.6e-5, dtype=torch.float64)) < 1e-2
    zero = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).half()
    with torch.no_grad():
        zero[0].weight.zero_()  # a product that is exactly 0 in float64 loses nothing
    lc.prepare_(zero, alpha_init=1.0)
    lc.collapse_(zero)
    assert not zero[0].fc.weight.any()


def test_meta_device_models_get_a_clear_error():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(ValueError, match="meta device"):
        lc.prepare_(m)
    prepared = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    lc.prepare_(prepared, alpha_init=1.0)
    prepared.to("meta")  # moved there after prepare_: planning and collapse_ refuse before reading a slope
    ids = [id(m) for m in prepared.modules()]  # (repr of a meta CollapsibleActivation fails: nn/activation.py)
    with pytest.raises(ValueError, match="plan_collapse got a model on the meta device"):
        lc.plan_collapse(prepared)
    with pytest.raises(ValueError, match="collapse_ got a model on the meta device"):
        lc.collapse_(prepared)
    with pytest.raises(ValueError, match="collapse_ got a model on the meta device"):
        lc.collapse_(prepared, tol=0.1)
    assert prepared[0].form == "mlp" and [id(m) for m in prepared.modules()] == ids


def _random_model(rng: random.Random) -> tuple[nn.Module, int]:
    widths = [rng.choice([6, 8, 12])] + [rng.choice([16, 24, 32]) for _ in range(rng.randint(1, 3))] + [rng.choice([4, 8])]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            w = widths[i + 1]
            act = rng.choice([nn.ReLU(), nn.GELU(), nn.SiLU(), nn.PReLU(w), nn.LeakyReLU(0.2)])
            if rng.random() < 0.3:
                layers += [nn.BatchNorm1d(w), act] if rng.random() < 0.5 else [act, nn.BatchNorm1d(w)]
            else:
                layers.append(act)
    return nn.Sequential(*layers).eval(), widths[0]


@pytest.mark.parametrize("seed", range(10))
def test_fuzz_plan_collapse_save_load_within_the_bound(seed, tmp_path):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, d = _random_model(rng)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    original = copy.deepcopy(model)
    lc.prepare_(model, per_channel=rng.random() < 0.3)
    x = torch.randn(200, d)
    bound = rng.choice([0.05, 0.2, 0.5])
    fit = rng.random() < 0.7
    plan = lc.plan_collapse(model, calib=x, max_error=bound, fit=fit)
    lc.collapse_(model, plan, calib=x if fit else None)
    with torch.no_grad():
        err = rel_err(model(x), original(x))
    assert err <= bound * (1 + 1e-5) + 1e-7, (plan, err)
    assert abs(err - plan.measured_error) <= 1e-5 * max(err, 1e-6) + 1e-7
    lc.save_collapsed(model, tmp_path / "ckpt")
    fresh = copy.deepcopy(original)
    lc.load_collapsed(fresh, tmp_path / "ckpt")
    z = torch.randn(17, d)
    with torch.no_grad():
        assert rel_err(fresh.eval()(z), model(z)) <= 1e-6
