import copy
import warnings

import pytest
import torch
from torch import nn

import lc_kernels as lc
from conftest import rel_err


def _set_alpha(model, value):
    for m in model.modules():
        if isinstance(m, lc.CollapsibleActivation):
            m.alpha.data.fill_(value)


def _trained_bn(model, shape):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("norm", [None, "pre", "post"])
def test_merge_at_alpha_one_is_exact(act, norm):
    d_in, h, d_out = 24, 96, 20  # h > d_in*d_out/(d_in+d_out): MERGE is cheaper
    acts = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU()}
    layers = [nn.Linear(d_in, h), acts[act], nn.Dropout(0.3), nn.Linear(h, d_out)]
    if norm == "pre":
        layers.insert(1, nn.BatchNorm1d(h))
    elif norm == "post":
        layers.insert(3, nn.BatchNorm1d(h))
    model = _trained_bn(nn.Sequential(*layers), (64, d_in))
    lc.prepare_(model)
    _set_alpha(model, 1.0)
    x = torch.randn(50, d_in)
    y = model(x)
    plan = lc.collapse_(model)
    assert plan.sites[0].decision == "MERGE" and model[0].form == "merged"
    assert rel_err(model(x), y) <= 1e-5
    assert sum(p.numel() for p in model.parameters()) == d_in * d_out + d_out


def test_factor_when_cheaper():
    model = nn.Sequential(nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 64))
    lc.prepare_(model, alpha_init=1.0)
    x = torch.randn(7, 64)
    y = model(x)
    plan = lc.plan_collapse(model)
    assert plan.sites[0].decision == "FACTOR" and plan.flops_after == plan.flops_before
    lc.collapse_(model, plan)
    assert model[0].form == "factored" and not hasattr(model[0], "act")
    assert rel_err(model(x), y) <= 1e-5


def test_chain_collapses_as_far_as_its_linear_joints_allow():
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64),
                          nn.SiLU(), nn.Linear(64, 8)).eval()
    lc.prepare_(model)
    chain = model[0]
    chain.acts[1].alpha.data.fill_(1.0)
    chain.acts[2].alpha.data.fill_(0.98)
    x = torch.randn(40, 16)
    plan = lc.plan_collapse(model, tol=0.05)
    assert [j.decision for j in plan.sites[0].joints] == ["KEEP", "MERGE", "MERGE"]
    chain.acts[2].alpha.data.fill_(1.0)  # exactness is claimed at alpha = 1
    plan = lc.plan_collapse(model, tol=0.05)
    y = model(x)
    lc.collapse_(model, plan)
    assert len(chain.linears) == 2 and [m.out_features for m in chain.linears] == [64, 8]
    assert isinstance(chain.acts[0], lc.CollapsibleActivation)
    assert rel_err(model(x), y) <= 1e-5


def test_out_of_tol_is_kept_with_reason_and_force_collapses():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    lc.prepare_(model, alpha_init=0.7)
    plan = lc.plan_collapse(model, tol=0.05)
    assert plan.sites[0].decision == "KEEP"
    assert "|1-alpha|=0.300 > tol 0.05" in plan.sites[0].joints[0].reason
    assert "|1-alpha|=0.300 > tol 0.05" in str(plan)
    lc.collapse_(model, plan)  # KEEP: nothing changes
    assert model[0].form == "mlp"
    forced = lc.collapse_(model, force=True)
    assert model[0].form == "merged" and "forced" in forced.sites[0].joints[0].reason


def test_collapse_refuses_a_plan_beyond_its_bound_and_leaves_model_unchanged():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    lc.prepare_(model, alpha_init=0.7)
    plan = lc.plan_collapse(model, tol=0.05)
    plan.sites[0].joints[0].decision = "MERGE"  # edited by hand past its bound
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"collapse refused.*0 joint 0: MERGE at \|1-alpha\|=0.300 > tol 0.05"):
        lc.collapse_(model, plan)
    assert model[0].form == "mlp"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_that_does_not_match_the_model():
    a = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    b = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    lc.prepare_(a, alpha_init=1.0)
    lc.prepare_(b, alpha_init=1.0)
    with pytest.raises(ValueError, match=r"expects widths \[8, 32, 8\], the model has \[8, 16, 8\]"):
        lc.collapse_(b, lc.plan_collapse(a))
    plan = lc.plan_collapse(a)
    a[0].act.alpha.data.fill_(0.5)
    with pytest.raises(ValueError, match="alpha changed since the plan was made"):
        lc.collapse_(a, plan)
    with pytest.raises(ValueError, match="does not exist in this model"):
        lc.collapse_(nn.Linear(2, 2), plan)


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    lc.prepare_(model, alpha_init=1.0)
    model[0].fc2.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"site '0': fc2.weight holds NaN"):
        lc.collapse_(model)
    assert model[0].form == "mlp"


def test_plan_table_and_bad_options():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(ValueError, match="no collapsible sites: run lc_kernels.prepare_"):
        lc.plan_collapse(model)
    lc.prepare_(model, alpha_init=1.0)
    text = str(lc.plan_collapse(model))
    for word in ("site", "alpha", "decision", "params", "FLOPs", "TOTAL", "MERGE", "1.000"):
        assert word in text
    with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
        lc.plan_collapse(model, tol=-1)
    with pytest.raises(TypeError, match="either a plan or planning options"):
        lc.collapse_(model, lc.plan_collapse(model), tol=0.1)


def test_half_precision_merge_casts_back_once():
    # A chain of three bf16 Linears merged into one. Cast back once means the float64 products
    # W3 W2 W1 and W3 (W2 b1 + b2) + b3, rounded to bf16 one time: exactly what is checked. The
    # last bias cancels the rest of the merged bias up to a remainder below bf16's resolution, so
    # bf16 arithmetic (each matmul's result rounded to bf16 before the next step) loses it: the two
    # roundings differ by more than 50% on the bias and in over 20% of the weight's entries.
    torch.manual_seed(0)
    bf = torch.bfloat16
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).to(bf)
    with torch.no_grad():
        w1, b1, w2, b2, w3 = (t.double() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias,
                                                    model[4].weight))
        model[4].bias.copy_(-(w3 @ (w2 @ b1 + b2)).to(bf))
    lc.prepare_(model, alpha_init=1.0)
    lins = list(model[0].linears)
    w = [lin.weight.detach() for lin in lins]
    b = [lin.bias.detach() for lin in lins]
    once_w = (w[2].double() @ w[1].double() @ w[0].double()).to(bf)
    once_b = (w[2].double() @ (w[1].double() @ b[0].double() + b[1].double()) + b[2].double()).to(bf)
    bf16_w, bf16_b = (w[2] @ w[1]) @ w[0], w[2] @ (w[1] @ b[0] + b[1]) + b[2]
    assert rel_err(bf16_b.double(), once_b.double()) > 0.5  # the two roundings are told apart here
    assert (bf16_w != once_w).double().mean() > 0.2
    x = torch.randn(10, 16, dtype=bf)
    lc.collapse_(model)
    fc = model[0].linears[0]
    assert len(model[0].linears) == 1 and fc.weight.dtype == bf
    assert torch.equal(fc.weight, once_w) and torch.equal(fc.bias, once_b)
    assert model(x).dtype == bf


def test_batchnorm_folded_in_train_mode_warns():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
        lc.prepare_(m, alpha_init=1.0)
        m(torch.randn(64, 8))  # real running statistics
        return m
    model, x = build(), torch.randn(32, 8)
    with torch.no_grad():
        train_before = model(x)
    with pytest.warns(UserWarning, match=r"BatchNorm at \['0'\] was folded with its running statistics .* "
                                         r"train-mode outputs change .* model.eval\(\) before collapse_"):
        plan = lc.collapse_(model)
    assert any("train-mode outputs change" in n for n in plan.notes)
    with torch.no_grad():
        assert rel_err(model(x), train_before) > 1e-3  # what the warning says: train-mode outputs did change
    quiet = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = lc.collapse_(quiet)  # in eval mode folding is exact: no warning
    assert not any("train" in n for n in plan.notes)
