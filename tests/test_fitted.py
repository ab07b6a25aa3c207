"""Fitted collapse: least-squares replacements, PARTIAL everywhere, calibration that real models accept."""
import copy
import math

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.algebra import NormalEquations, affine_of, ridge_fit
from lc_kernels.nn.mlp import LCChain, LCFusedMLP
from lc_kernels.ops import reference
from lc_kernels.planning import find_sites
from lc_kernels.planning.fitting import FittedCalibration
from lc_kernels.planning.inputs import calib_batches
from lc_kernels.testing import rel_err


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def mlp(widths, act=nn.GELU, seed=0, alpha=0.0, per_channel=False):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    m = nn.Sequential(*layers).double()
    lc.prepare_(m, alpha_init=alpha, per_channel=per_channel)
    return m.eval()


def output_error(a, b, x):
    with torch.no_grad():
        return rel_err(b(x), a(x))


# ----------------------------------------------------------------------------------------------
# the fit itself


def test_ridge_fit_is_the_exact_map_when_the_data_is_linear():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    x = torch.randn(40, 7, dtype=torch.float64)
    neq = NormalEquations(7, 5, x.device)
    neq.add(x, lin(x).detach())
    for m0_scale in (0.0, 1.0, 3.0):  # any prior: the data pins the map
        m0 = affine_of(lin)
        m0.weight, m0.bias = m0.weight * m0_scale, m0.bias * m0_scale
        got = ridge_fit(neq.ata, neq.aty, m0, ridge=1e-12)
        torch.testing.assert_close(got.weight, affine_of(lin).weight, rtol=1e-7, atol=1e-8)
    exact = ridge_fit(neq.ata, neq.aty, affine_of(lin), ridge=10.0)  # prior == truth: exact for any ridge
    torch.testing.assert_close(exact.weight, affine_of(lin).weight, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("widths", [[6, 24, 5], [6, 20, 12, 18, 4]])
def test_fitted_equals_exact_merge_at_alpha_one(widths):
    model = mlp(widths, alpha=1.0)
    x = torch.randn(300, widths[0], dtype=torch.float64)
    fitted, exact = copy.deepcopy(model), copy.deepcopy(model)
    plan = lc.plan_collapse(fitted, calib=x, force=True)
    assert plan.fit
    lc.collapse_(fitted, plan, calib=x)
    lc.collapse_(exact, lc.plan_collapse(exact, force=True))
    z = torch.randn(50, widths[0], dtype=torch.float64)
    assert output_error(exact, fitted, z) <= 1e-6
    assert output_error(model, fitted, z) <= 1e-6


@pytest.mark.parametrize("widths, per_channel", [([8, 48, 8], False), ([8, 48, 8], True), ([8, 32, 24, 32, 6], False)])
def test_fitted_is_never_worse_than_the_algebraic_merge(widths, per_channel):
    model = mlp(widths, act=nn.ReLU, alpha=0.2, per_channel=per_channel, seed=1)
    x = torch.randn(400, widths[0], dtype=torch.float64)
    fit = lc.plan_collapse(model, calib=x, force=True)
    exact = lc.plan_collapse(model, calib=x, force=True, fit=False)
    assert fit.measured_error <= exact.measured_error + 1e-12
    assert fit.measured_error < 0.9 * exact.measured_error  # and genuinely better on a nonlinear site


@pytest.mark.parametrize("kw", [dict(force=True), dict(target=0.5), dict(max_error=0.2)])
def test_planned_error_is_the_measured_error(kw):
    model = mlp([10, 64, 10, 64, 8], act=nn.ReLU, seed=2)
    x = torch.randn(256, 10, dtype=torch.float64)
    collapsed = copy.deepcopy(model)
    plan = lc.plan_collapse(collapsed, calib=x, **kw)
    lc.collapse_(collapsed, plan, calib=x)
    measured = output_error(model, collapsed, x)
    assert plan.measured_error > 0
    assert abs(measured - plan.measured_error) <= 1e-6 * plan.measured_error


def test_fitted_plan_carries_its_fits():
    """collapse_(model, plan) installs the planned fits without calib (the first API works again),
    with the planned error; a plan from JSON, or weights changed since planning, need calib."""
    model = mlp([8, 32, 16, 8])
    x = torch.randn(64, 8, dtype=torch.float64)
    plan = lc.plan_collapse(model, calib=x, target=0.5)
    carried, refit = copy.deepcopy(model), copy.deepcopy(model)
    lc.collapse_(carried, plan)
    lc.collapse_(refit, plan, calib=x)
    assert abs(output_error(model, carried, x) - plan.measured_error) <= 1e-9 * plan.measured_error
    with torch.no_grad():
        assert torch.allclose(carried(x), refit(x), rtol=0, atol=1e-12)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="decisions only.*pass calib="):
        lc.collapse_(model, lc.CollapsePlan.from_json(plan.to_json()))
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="weights of .* changed since"):
        lc.collapse_(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="fit=True fits replacements to calibration data"):
        lc.plan_collapse(model, fit=True)


def test_statistics_do_not_grow_with_tokens():
    model = mlp([8, 32, 8, 32, 8])
    sizes = []
    for n in (50, 5000):
        cal = FittedCalibration(model, find_sites(model), calib_batches(model, torch.randn(n, 8, dtype=torch.float64)),
                                None)
        st = cal.sites[0].stats
        sizes.append(sum(t.numel() for d in (st.ata, st.atz, st.ats, st.sig2) for t in d.values()))
    assert sizes[0] == sizes[1]


# ----------------------------------------------------------------------------------------------
# PARTIAL everywhere


def chain_reference(chain: LCChain, x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch of a collapsed chain: Linear / activation, partial blocks as MLP + skip."""
    skips = chain._modules.get("skips") or {}
    lins, h, i = list(chain.linears), x, 0
    while i < len(lins):
        if str(i) in skips:
            inner = chain.acts[i]
            z = torch.nn.functional.linear(h, lins[i].weight, lins[i].bias)
            z = reference.collapsible_activation(z, inner.base, inner.alpha)
            y = torch.nn.functional.linear(z, lins[i + 1].weight, lins[i + 1].bias) + h @ skips[str(i)].weight.T
            i += 2
        else:
            y = torch.nn.functional.linear(h, lins[i].weight, lins[i].bias)
            i += 1
        if i - 1 < len(chain.acts):
            a = chain.acts[i - 1]
            y = y if isinstance(a, nn.Identity) else reference.collapsible_activation(y, a.base, a.alpha)
        h = y
    return h


def test_partial_inside_a_chain():
    model = mlp([12, 64, 64, 64, 5], act=nn.ReLU, seed=3)
    x = torch.randn(400, 12, dtype=torch.float64)
    collapsed = copy.deepcopy(model)
    plan = lc.plan_collapse(collapsed, calib=x, target=0.5)
    decisions = [j.decision for j in plan.sites[0].joints]
    assert "PARTIAL" in decisions, plan
    lc.collapse_(collapsed, plan, calib=x)
    chain = collapsed[0]
    assert isinstance(chain, LCChain) and chain._modules.get("skips")
    z = torch.randn(33, 12, dtype=torch.float64)
    torch.testing.assert_close(chain(z), chain_reference(chain, z), rtol=1e-12, atol=1e-12)
    for j in plan.sites[0].joints:
        if j.decision == "PARTIAL":
            kept = 64 - len(j.linear_channels)
            assert kept % 8 == 0  # round_to=8
    assert output_error(model, collapsed, x) == pytest.approx(plan.measured_error, rel=1e-6)


def test_adjacent_partial_joints_are_refused():
    model = mlp([6, 16, 16, 4], act=nn.ReLU)
    plan = lc.plan_collapse(model, force=True)
    for j in plan.sites[0].joints:
        j.decision, j.linear_channels = "PARTIAL", [0, 1]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="share a group of Linears"):
        lc.collapse_(model, plan, force=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def partial_reference(m: LCFusedMLP, x: torch.Tensor) -> torch.Tensor:
    z = reference.collapsible_activation(x @ m.fc1.weight.T + m.fc1.bias, m.act.base, m.act.alpha)
    return z @ m.fc2.weight.T + m.fc2.bias + x @ m.skip.weight.T


def tiny_bert(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def bert_calib(seed=0, batch=6, seq=20):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(batch):
        mask[b, seq - 3 * b:] = 0  # ragged padding
    return {"input_ids": ids, "attention_mask": mask}


def _integration_models():
    out = []
    transformers = pytest.importorskip("transformers")
    out.append(("bert", tiny_bert(), bert_calib()))
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    out.append(("gpt2", gpt2, bert_calib()))
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2,
                                                           num_heads=4, mlp_ratio=3, num_classes=5).eval()
    out.append(("timm", vit, torch.randn(4, 3, 16, 16)))
    return out


@pytest.mark.parametrize("name", ["bert", "gpt2", "timm"])
def test_partial_in_every_integration(name):
    _, model, calib = next(m for m in _integration_models() if m[0] == name)
    sites = lc.prepare_(model)
    assert sites
    collapsed = copy.deepcopy(model)
    plan = lc.plan_collapse(collapsed, calib=calib, target=0.3)
    assert any(sp.decision == "PARTIAL" for sp in plan.sites), plan
    lc.collapse_(collapsed, plan, calib=calib)
    for sp in plan.sites:
        m = collapsed.get_submodule(sp.path)
        if sp.decision == "PARTIAL":
            assert m.form == "partial"
            x = torch.randn(3, 5, m.in_features)
            torch.testing.assert_close(m(x), partial_reference(m, x), rtol=1e-5, atol=1e-6)
    # The collapsed model's error against the dense one, measured here on what the model outputs at
    # its unmasked tokens (hidden states, BERT's pooler output, ViT's logits), is the plan's.
    with torch.no_grad():
        y0, y1 = (_measured_output(m(**calib) if isinstance(calib, dict) else m(calib), calib)
                  for m in (model, collapsed))
    assert torch.isfinite(y1).all()
    measured = rel_err(y1, y0)
    assert 0 < measured < 0.05
    # collapse_ with calib fits the plan's decisions again: the same normal equations solved by another
    # route (a prefix of one Cholesky factor in the plan, a direct solve here) differ by float rounding
    # (2e-6 of the error measured on the ViT), far below any change of decision.
    assert abs(measured - plan.measured_error) <= 1e-5 * plan.measured_error


def _measured_output(out, calib) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.double().reshape(-1)
    mask = calib["attention_mask"].bool()
    parts = [out.last_hidden_state[mask].reshape(-1)]
    if getattr(out, "pooler_output", None) is not None:
        parts.append(out.pooler_output.reshape(-1))
    return torch.cat(parts).double()


# ----------------------------------------------------------------------------------------------
# calibration real models accept


def test_dict_tuple_and_masked_calibration_on_tiny_bert():
    model = tiny_bert()
    lc.prepare_(model)
    calib = bert_calib()
    by_dict = lc.plan_collapse(model, calib=calib, target=0.5)
    by_tuple = lc.plan_collapse(model, calib=(calib["input_ids"], calib["attention_mask"]), target=0.5)
    assert by_dict.measured_error == pytest.approx(by_tuple.measured_error, rel=1e-9)
    # Padding never enters a fit or an error: change what sits under the mask, nothing moves.
    noisy = {"input_ids": calib["input_ids"].clone(), "attention_mask": calib["attention_mask"]}
    noisy["input_ids"][calib["attention_mask"] == 0] = 5
    again = lc.plan_collapse(model, calib=noisy, target=0.5)
    assert again.measured_error == pytest.approx(by_dict.measured_error, rel=1e-9)
    assert [s.est_error for s in again.sites] == pytest.approx([s.est_error for s in by_dict.sites], rel=1e-9)
    assert by_dict.calib_rows == int(calib["attention_mask"].sum())
    # an iterable of dicts, and forward_fn for anything else
    loader = [bert_calib(seed=s) for s in range(2)]
    assert lc.plan_collapse(model, calib=loader, target=0.5).calib_rows == sum(int(b["attention_mask"].sum())
                                                                               for b in loader)
    custom = lc.plan_collapse(model, calib=[("x", calib)], target=0.5,
                              forward_fn=lambda m, batch: m(**batch[1]).last_hidden_state)
    assert math.isfinite(custom.measured_error)


def test_collapse_with_dict_calibration_matches_the_plan():
    model = tiny_bert(seed=1)
    lc.prepare_(model)
    calib = bert_calib(seed=1)
    collapsed = copy.deepcopy(model)
    plan = lc.plan_collapse(collapsed, calib=calib, target=0.6)
    lc.collapse_(collapsed, plan, calib=calib)
    mask = calib["attention_mask"].bool()
    with torch.no_grad():
        y0 = model(**calib)
        y1 = collapsed(**calib)
    ref = torch.cat([y0.last_hidden_state[mask].reshape(-1), y0.pooler_output.reshape(-1)]).double()
    got = torch.cat([y1.last_hidden_state[mask].reshape(-1), y1.pooler_output.reshape(-1)]).double()
    assert abs(rel_err(got, ref) - plan.measured_error) <= 1e-5 * max(plan.measured_error, 1e-12)


@pytest.mark.parametrize("calib, exc, match", [
    ([], ValueError, "calib is empty"),
    (torch.full((4, 8), float("nan"), dtype=torch.float64), ValueError, "NaN or Inf"),
    (torch.randn(4, 9, dtype=torch.float64), ValueError, r"expects last dim 8"),
    (torch.randn(4, 8, dtype=torch.float32), TypeError, "cast with x.to"),
    ({"input": torch.randn(4, 8, dtype=torch.float64), "attention_mask": torch.ones(3, 2)}, ValueError,
     r"the model's forward failed on calib batch 0 \(tensors of shapes \[\(4, 8\), \(3, 2\)\]\)"),
])
def test_bad_calibration_is_refused(calib, exc, match):
    model = mlp([8, 16, 8])
    with pytest.raises(exc, match=match):
        lc.plan_collapse(model, calib=calib, target=0.5)


def test_mask_must_match_the_inputs():
    model = tiny_bert()
    lc.prepare_(model)
    calib = bert_calib()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(6, 19\) but the inputs have"):
        lc.plan_collapse(model, calib={**calib, "attention_mask": calib["attention_mask"][:, 1:]}, target=0.5)
    with pytest.raises(ValueError, match="masks every token"):
        lc.plan_collapse(model, calib={**calib, "attention_mask": torch.zeros_like(calib["attention_mask"])},
                         target=0.5)
    with pytest.raises(ValueError, match="only 0"):
        lc.plan_collapse(model, calib={**calib, "attention_mask": calib["attention_mask"] * 2}, target=0.5)
