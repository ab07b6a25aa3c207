"""Gated FFN sites (decoder LLMs): conversion, fitted forms, layer-by-layer calibration, compress."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lc_kernels as lc
from lc_kernels.nn.gated import LCGatedMLP
from lc_kernels.ops.reference import collapsible_activation
from lc_kernels.planning.gated import GatedSite, GatedStats, SiteStream, fit_plan, gated_sites, measure
from lc_kernels.planning.inputs import calib_batches
from lc_kernels.planning.layerwise import site_hooks

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def tiny(kind: str, dtype=torch.float32, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = {**CFG, **kw}
    if kind == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    elif kind == "qwen2":
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    elif kind == "phi3":
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg, pad_token_id=0))
    elif kind == "gemma":
        m = transformers.GemmaForCausalLM(transformers.GemmaConfig(**cfg, head_dim=8))
    else:
        raise ValueError(kind)
    return m.to(dtype).eval()


def calib(n: int = 3, seed: int = 1, batch: int = 4, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 97, (batch, seq), generator=g)} for _ in range(n)]


def final_hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


@pytest.mark.parametrize("kind, base, packed", [("llama", "silu", False), ("qwen2", "silu", False),
                                                ("phi3", "silu", True), ("gemma", "gelu_tanh", False)])
def test_prepare_converts_gated_ffns_losslessly(kind, base, packed):
    m = tiny(kind)
    ids = calib(1)[0]["input_ids"]
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    keys = set(m.state_dict())
    sites = lc.prepare_(m)
    assert list(sites) == [f"model.layers.{i}.mlp" for i in range(3)]
    mlp = m.model.layers[0].mlp
    assert isinstance(mlp, LCGatedMLP) and mlp.act.base == base and mlp.packed == packed
    # the original Linears are reused: every key stays, only the slopes are new
    assert set(m.state_dict()) - keys == {f"model.layers.{i}.mlp.act.alpha" for i in range(3)}
    assert keys - set(m.state_dict()) == {f"model.layers.{i}.mlp.act_fn" for i in range(0)}  # nothing lost
    with torch.no_grad():
        assert rel(m(input_ids=ids).logits, ref) <= 1e-6


class _ScaledFFN(nn.Module):
    """Named like a Llama MLP, but its forward scales the product: it must be left alone."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(2.0 * self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 2)
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        w = self.router(x).softmax(-1)
        return sum(w[..., i:i + 1] * e(x) for i, e in enumerate(self.experts))


class _Block(nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.mlp = ffn

    def forward(self, x):
        return x + self.mlp(x)


def test_skipped_names_every_ffn_left_alone():
    model = nn.Sequential(_Block(_ScaledFFN()), _Block(_Experts()))
    before = copy.deepcopy(model.state_dict())
    sites = lc.prepare_(model)
    assert list(sites) == []
    reasons = dict(sites.skipped)
    assert "not down(act(gate x) * up x)" in reasons["0.mlp"]
    assert "register_handler" in reasons["1.mlp"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="left alone"):
        lc.compress(model, torch.randn(4, 8), target=0.5, progress=False)


def test_fit_from_the_gram_matrix_matches_direct_least_squares():
    torch.manual_seed(0)
    m = LCGatedMLP(6, 20, act="silu", bias=True).double()
    site = GatedSite.of(m, "m")
    x = torch.randn(400, 6, dtype=torch.float64)
    h = site.hidden(x)
    y = F.linear(h, site.wd, site.bd)
    st = GatedStats(site)
    st.add(x[:150], y[:150])
    st.add(x[150:], y[150:])
    kept = torch.tensor([1, 4, 7, 9, 15])
    fit, err2, tt = st.fit(kept, ridge=1e-12)
    a = torch.cat([h[:, kept], x, torch.ones(400, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    assert torch.allclose(torch.cat([fit.weight.T, fit.bias[None]]), sol, rtol=1e-6, atol=1e-8)
    assert math.isclose(err2, float((a @ sol - y).pow(2).sum()), rel_tol=1e-6)
    assert math.isclose(tt, float(y.pow(2).sum()), rel_tol=1e-12)
    # every prefix of the channel order from one factorisation = its own least squares
    order = st.order()
    errs = st.prefix_errors([0, 3, 8], ridge=1e-12)
    for k, e in errs.items():
        ak = torch.cat([x, torch.ones(400, 1, dtype=torch.float64), h[:, order[:k]]], 1)
        r = ak @ torch.linalg.lstsq(ak, y).solution - y
        assert math.isclose(e, float(r.pow(2).sum()), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_partial_and_linear_equal_plain_pytorch(kind):
    m = tiny(kind)
    lc.prepare_(m)
    plan = lc.plan_collapse(m, calib=calib(), force=True)
    assert all(sp.decision == "LINEAR" for sp in plan.sites)
    sites = [GatedSite.of(mod, p) for p, mod in gated_sites(m)]
    with torch.no_grad():
        fitted, channels, _ = fit_plan(SiteStream(m, sites, calib_batches(m, calib()), None), [24, 0, 40], "local")
    assert [fitted[i].form for i in range(3)] == ["partial", "linear", "partial"]
    x = torch.randn(5, 7, 32)
    for reps in (plan.fitted.values(), fitted.values()):
        for rep in reps:
            with torch.no_grad():
                got = rep(x)
                if rep.form == "linear":
                    want = F.linear(x, rep.skip.weight, rep.skip.bias)
                else:
                    k = rep.kept_features
                    w = rep.gate_up_proj.weight
                    hid = collapsible_activation(F.linear(x, w[:k]), "silu", rep.act.alpha) * F.linear(x, w[k:])
                    want = F.linear(hid, rep.down_proj.weight, rep.down_proj.bias) + F.linear(x, rep.skip.weight)
                    assert k in (24, 40)
            assert rel(got, want) <= 1e-6


@pytest.mark.parametrize("fit", ["local", "global"])
def test_planned_error_is_measured_after_collapse(fit):
    m = tiny("llama")
    lc.prepare_(m)
    dense = copy.deepcopy(m)
    data = calib()
    plan = lc.plan_collapse(m, calib=data, target=0.5, fit=fit)
    assert plan.fit_target == fit
    removed = 1 - plan.flops_after / plan.flops_before
    assert removed >= 0.5
    lc.collapse_(m, plan)  # the plan carries its fits: no calib needed
    d2 = sum(float((final_hidden(m, b["input_ids"]).double() - final_hidden(dense, b["input_ids"]).double())
                   .pow(2).sum()) for b in data)
    y2 = sum(float(final_hidden(dense, b["input_ids"]).double().pow(2).sum()) for b in data)
    assert math.isclose(math.sqrt(d2 / y2), plan.measured_error, rel_tol=1e-5)
    assert 0 < plan.measured_error < 1


def test_layer_by_layer_equals_whole_model_passes_float64():
    """The same widths fitted in sequence by streaming block by block and by whole-model passes."""
    m = tiny("llama", dtype=torch.float64)
    lc.prepare_(m)
    data = calib()
    sites = [GatedSite.of(mod, p) for p, mod in gated_sites(m)]
    kept = [24, 0, 40]  # PARTIAL, LINEAR, PARTIAL
    got = {}
    for engine in ("layers", "model"):
        stream = SiteStream(m, sites, calib_batches(m, data), None, engine)
        with torch.no_grad():
            got[engine] = fit_plan(stream, kept, "local")
        assert stream.kind == ("layer-by-layer" if engine == "layers" else "whole-model passes")
    (fa, ca, ea), (fb, cb, eb) = got["layers"], got["model"]
    assert sorted(fa) == sorted(fb) == [0, 1, 2]
    for i in fa:
        assert torch.equal(ca[i], cb[i])
        sa, sb = fa[i].state_dict(), fb[i].state_dict()
        for k in sa:
            assert rel(sa[k], sb[k]) <= 1e-6, (i, k)
        assert math.isclose(ea[i], eb[i], rel_tol=1e-6)
    err_a, _ = measure(m, sites, calib_batches(m, data), None, fa)
    err_b, _ = measure(m, sites, calib_batches(m, data), None, fb)
    assert math.isclose(err_a, err_b, rel_tol=1e-6)


def test_fitted_skip_beats_dropping_the_channels():
    """The joint refit is least squares: on the inputs it was fitted on (the upstream sites already
    replaced), better than the same kept channels with their original down weights and no skip."""
    m = tiny("llama")
    lc.prepare_(m)
    data = calib()
    sites = [GatedSite.of(mod, p) for p, mod in gated_sites(m)]
    with torch.no_grad():
        fitted, channels, _ = fit_plan(SiteStream(m, sites, calib_batches(m, data), None), [24, 24, 24], "local")
    seen = {i: [] for i in fitted}
    mods = {i: s.module for i, s in enumerate(sites)}
    with torch.no_grad(), site_hooks(mods, lambda: None, replace=fitted,
                                     observe={i: (lambda x, y, b, i=i: seen[i].append(x)) for i in fitted}):
        for b in data:
            m(input_ids=b["input_ids"])
    for i, site in enumerate(sites):
        inp, kept = torch.cat(seen[i]), channels[i]
        with torch.no_grad():
            y = F.linear(site.hidden(inp), site.wd, site.bd)
            dropped = F.linear(site.hidden(inp)[..., kept], site.wd[:, kept], site.bd)
            assert rel(fitted[i](inp).double(), y) < 0.9 * rel(dropped, y)


def test_plan_json_carries_decisions_not_fits():
    m = tiny("llama")
    lc.prepare_(m)
    data = calib()
    plan = lc.plan_collapse(m, calib=data, target=0.5)
    again = lc.CollapsePlan.from_json(plan.to_json())
    assert again.fitted == {} and [s.decision for s in again] == [s.decision for s in plan]
    with pytest.raises(ValueError, match="carries no fitted replacement"):
        lc.collapse_(copy.deepcopy(m), again)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    lc.collapse_(a, plan)
    lc.collapse_(b, again, calib=data)  # refitted on the same data: the same model
    ids = data[0]["input_ids"]
    assert rel(final_hidden(a, ids), final_hidden(b, ids)) <= 1e-5


def test_gated_refusals_are_clear():
    m = tiny("llama")
    lc.prepare_(m)
    with pytest.raises(ValueError, match="no algebraic merge"):
        lc.plan_collapse(m)
    with pytest.raises(ValueError, match="need a budget"):
        lc.plan_collapse(m, calib=calib())
    with pytest.raises(ValueError, match="not measured for gated"):
        lc.plan_collapse(m, calib=calib(), target=0.5, objective="latency", tokens=8)
    with pytest.raises(TypeError, match="'local' or 'global'"):
        lc.plan_collapse(m, calib=calib(), target=0.5, fit="everywhere")
    plan = lc.plan_collapse(m, calib=calib(), target=0.5)
    with torch.no_grad():
        m.model.layers[1].mlp.act.alpha.fill_(0.5)
    with pytest.raises(ValueError, match="alpha changed"):
        lc.collapse_(m, plan)


def test_compress_generate_and_heal_with_user_loss():
    m = tiny("llama")
    data = calib()
    ids = data[0]["input_ids"]
    calls = []

    def lm_loss(model, batch):
        if torch.is_grad_enabled():  # a healing step; the guard evaluates it without a graph
            calls.append(1)
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        return out.loss

    plain = copy.deepcopy(m)
    lc.compress(plain, data, target=0.5, progress=False)
    report = lc.compress(m, data, target=0.5, heal_steps=4, heal_loss=lm_loss, heal_lr=1e-3, progress=False)
    assert len(calls) == 4 and report.heal_steps == 4
    assert report.flops_removed >= 0.5
    with torch.no_grad():  # a round that raises the user's loss on heal_data is undone
        loss = lambda mod: sum(float(mod(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in data)  # noqa
        assert loss(m) <= loss(plain) + 1e-6
    assert "PARTIAL" in str(report) or "LINEAR" in str(report)
    out = m.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


class _W123(nn.Module):
    """The generic naming: ``w2(silu(w1 x) * w3 x)`` (Mixtral experts, many reference codes)."""

    def __init__(self, d=16, h=40):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False), nn.Linear(d, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def test_generic_w1_w2_w3_naming_and_biases():
    torch.manual_seed(0)
    model = nn.Sequential(_Block(_W123()), _Block(_W123()))
    x = torch.randn(6, 16)
    ref = model(x)
    sites = lc.prepare_(model)
    assert list(sites) == ["0.mlp", "1.mlp"]
    assert model[0].mlp.gate_proj is not None and model[0].mlp.act.base == "silu"
    assert rel(model(x), ref) <= 1e-6
    m = tiny("llama", mlp_bias=True)  # gate, up and down with biases
    ids = calib(1)[0]["input_ids"]
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    lc.prepare_(m)
    assert m.model.layers[0].mlp.gate_proj.bias is not None
    with torch.no_grad():
        assert rel(m(input_ids=ids).logits, ref) <= 1e-6
    plan = lc.plan_collapse(m, calib=calib(), target=0.5)
    lc.collapse_(m, plan)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=ids).logits).all()


def test_max_error_is_honoured_as_measured():
    m = tiny("llama")
    lc.prepare_(m)
    data = calib()
    loose = lc.plan_collapse(m, calib=data, target=0.5)
    bound = 0.5 * loose.measured_error
    plan = lc.plan_collapse(m, calib=data, max_error=bound)
    assert plan.measured_error <= bound
    dense = copy.deepcopy(m)
    lc.collapse_(m, plan)
    d2 = sum(float((final_hidden(m, b["input_ids"]).double() - final_hidden(dense, b["input_ids"]).double())
                   .pow(2).sum()) for b in data)
    y2 = sum(float(final_hidden(dense, b["input_ids"]).double().pow(2).sum()) for b in data)
    assert math.sqrt(d2 / y2) <= bound * (1 + 1e-6)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_offloaded_model_plans_and_collapses_like_the_loaded_one(kind):
    """accelerate's cpu_offload keeps weights on meta until a hook loads them: the layer-by-layer
    calibration runs through those hooks and gives the same plan and model."""
    accelerate = pytest.importorskip("accelerate")
    m = tiny(kind)
    lc.prepare_(m)
    ref = copy.deepcopy(m)
    accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    assert any(p.is_meta for p in m.parameters())
    ids = calib()[0]["input_ids"]
    assert rel(final_hidden(m, ids), final_hidden(ref, ids)) == 0.0
    plan, plan_ref = (lc.plan_collapse(x, calib=calib(), target=0.5) for x in (m, ref))
    assert plan.measured_error == pytest.approx(plan_ref.measured_error, rel=1e-9)
    assert [s.decision for s in plan] == [s.decision for s in plan_ref]
    lc.collapse_(m, plan)
    lc.collapse_(ref, plan_ref)
    assert rel(final_hidden(m, ids), final_hidden(ref, ids)) <= 1e-6


def test_compress_of_an_llm_is_all_or_nothing_without_copying_its_weights():
    """A failure late in compress (here: the user's healing loss) restores the model exactly; the
    transaction holds the structure by reference and copies no weight (none is written in place)."""
    m = tiny("llama")
    ids = calib(1)[0]["input_ids"]
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    params = {n: p for n, p in m.named_parameters()}
    state = {n: p.detach().clone() for n, p in params.items()}

    def boom(model, batch):
        raise RuntimeError("user loss failed")

    with pytest.raises(RuntimeError, match="restored as it was"):
        lc.compress(m, calib(), target=0.5, heal_steps=2, heal_loss=boom, progress=False)
    assert not any(isinstance(x, LCGatedMLP) for x in m.modules())
    assert all(p is params[n] and torch.equal(p, state[n]) for n, p in m.named_parameters())
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref)


def test_kl_healing_is_kept_only_when_the_kl_on_calib_falls():
    """Distilling through the output embedding: the round is judged by the KL to the dense model's
    next-token distribution on calib; the report carries the error after the round (or the unhealed
    one when it was undone)."""
    m = tiny("llama")
    report = lc.compress(m, calib(), target=0.5, heal_steps=4, heal_lr=1e-3, progress=False)
    step = report.steps[-1]
    assert report.heal_steps == 4 and step.healed_error is not None
    assert report.final_error == step.healed_error
    assert math.isfinite(report.final_error)
