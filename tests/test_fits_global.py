"""Second-generation fits on Linear -> act -> Linear sites: global targets through the calibration
engine, sensitivity-ranked channels, and compress fitting each site once."""
import copy

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.planning import find_sites
from lc_kernels.planning import fitting
from lc_kernels.planning.fitting import FittedCalibration, SiteModel, fit_stream
from lc_kernels.planning.inputs import calib_batches
from lc_kernels.planning.layerwise import SiteStream
from lc_kernels.testing import rel_err


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def tiny_bert(seed=0, layers=3):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Model(cfg).eval()


def token_calib(seed=0, batch=8, seq=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -5:] = 0
    return [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]


def two_sites(seed=0):
    """Two LCFusedMLP sites in a plain Sequential (no block stack): the engine runs whole-model passes."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 16), nn.Tanh(), nn.Linear(16, 40), nn.GELU(),
                      nn.Linear(40, 10)).double()
    lc.prepare_(m)
    return m.eval()


def output_on(model, calib):
    with torch.no_grad():
        outs = [model(**b).last_hidden_state[b["attention_mask"].bool()] for b in calib]
    return torch.cat(outs).double()


# ----------------------------------------------------------------------------------------------
# where the global target is taken


@pytest.mark.parametrize("build, where", [(tiny_bert, "input of LayerNorm"), (tiny_gpt2, "block output")])
def test_the_engine_finds_the_stream_after_each_site(build, where):
    """BERT is post-norm: the FFN output is added to the stream at its LayerNorm's input; GPT-2 adds
    it last in the block. Both are found by a random change of the site's output, never by name."""
    model = build()
    lc.prepare_(model)
    sites = find_sites(model)
    batches = calib_batches(model, token_calib())
    engine = SiteStream(model, sites, batches, None)
    assert engine.kind == "layer-by-layer"
    engine.sweep(lambda i, rows: None, global_target=True)
    assert [engine.points[i] for i in range(len(sites))] == [where] * len(sites)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2])
def test_global_target_reproduces_the_dense_stream(build):
    """The global target is what the site must output for the dense stream to come out: with the
    first site replaced (the stream drifted), putting the target in place of the second site's
    output gives the dense model's output of that block, to float rounding."""
    model = build().double()
    lc.prepare_(model)
    sites = find_sites(model)
    calib = [{"input_ids": b["input_ids"]} for b in token_calib()]  # no padding: rows are every token in order
    batches = calib_batches(model, calib)
    engine = SiteStream(model, sites, batches, None)
    crude = nn.Linear(32, 32).double()  # a deliberately poor replacement of site 0
    targets = {}

    def visit(i, rows):
        targets[i] = [t for _, _, t, _ in rows]
        return crude if i == 0 else None

    engine.sweep(visit, global_target=True)
    block = engine.blocks[1]
    for k, b in enumerate(calib):
        outs = []
        grab = block.register_forward_hook(lambda mod, args, out: outs.append(out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            model(**b)  # dense
            h1 = sites[0].module.register_forward_hook(lambda mod, args, out: crude(args[0]))
            h2 = sites[1].module.register_forward_hook(lambda mod, args, out: targets[1][k].view_as(out))
            try:
                model(**b)  # site 0 drifted, site 1 outputs its global target
            finally:
                h1.remove(), h2.remove(), grab.remove()
        assert rel_err(outs[1], outs[0]) < 1e-9


def test_without_a_block_stack_the_global_target_is_the_dense_site_output():
    model = two_sites()
    sites = find_sites(model)
    x = torch.randn(64, 12, dtype=torch.float64)
    batches = calib_batches(model, x)
    engine = SiteStream(model, sites, batches, None)
    assert engine.kind == "whole-model passes"
    crude = nn.Linear(12, 16).double()
    got = {}

    def visit(i, rows):
        got[i] = rows
        return crude if i == 0 else None

    engine.sweep(visit, global_target=True)
    with torch.no_grad():
        dense_second = model[4](torch.tanh(model[0](x)))
        drifted_in = torch.tanh(crude(x))
    (x1, y1, t1, _), = got[1]
    torch.testing.assert_close(x1, drifted_in)
    torch.testing.assert_close(t1, dense_second)
    torch.testing.assert_close(y1, model[4](drifted_in).detach())


def test_one_site_global_equals_local():
    """With nothing changed before a site, its dense stream is its current one: the two fits agree."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 40), nn.GELU(), nn.Linear(40, 10)).double()
    lc.prepare_(m)
    x = torch.randn(200, 10, dtype=torch.float64)
    plans = [lc.plan_collapse(copy.deepcopy(m), calib=x, target=0.4, fit=f) for f in ("local", "global")]
    assert [sp.joints[0].linear_channels for sp in plans[0].sites] == \
        [sp.joints[0].linear_channels for sp in plans[1].sites]
    assert abs(plans[0].measured_error - plans[1].measured_error) <= 1e-9
    assert plans[1].fit_target == "global" and plans[0].fit_target == "local"


def test_global_fit_corrects_drift_on_a_tiny_bert():
    """Three sites folded to half their FLOPs: the later sites fitted to the dense stream leave a
    smaller model-output error than the same sites fitted to their own function."""
    model = tiny_bert(seed=1)
    lc.prepare_(model)
    calib = token_calib(seed=3, batch=16, seq=32)
    err = {}
    for fit in ("local", "global"):
        # search="greedy": the older budget path (fit_stream); with search="auto" a target plan of these
        # sites is allocated on held-out rows (tests/test_partial_sites.py)
        plan = lc.plan_collapse(copy.deepcopy(model), calib=calib, target=0.5, fit=fit, search="greedy")
        err[fit] = plan.measured_error
        assert "global target (input of LayerNorm)" in plan.sites[-1].error_source or fit == "local"
    assert err["global"] < err["local"], err


def test_global_is_the_default_and_planned_error_is_measured():
    model = tiny_bert(seed=2)
    lc.prepare_(model)
    calib = token_calib(seed=1)
    dense = copy.deepcopy(model)
    plan = lc.plan_collapse(model, calib=calib, target=0.4)
    assert plan.fit_target == "global"
    lc.collapse_(model, plan)  # installs the carried fits, no calibration data
    measured = rel_err(output_on(model, calib), output_on(dense, calib))
    assert 0 < measured and abs(measured - plan.measured_error) <= 1e-3 * plan.measured_error + 1e-7


# ----------------------------------------------------------------------------------------------
# sensitivity-ranked channels


def test_sensitivity_scores_are_the_first_order_output_change():
    """For one site at the model's output, d(u . y)/d sigma is u @ W2 per token: the score is
    sqrt(sum_t E_u[(u_t W2[:, c])^2] r_tc^2); with every output direction averaged, E_u[(u W2_c)^2] =
    ||W2[:, c]||^2. Checked against that closed form with many probes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 5)).double()
    lc.prepare_(m)
    x = torch.randn(300, 6, dtype=torch.float64)
    site = find_sites(m)[0]
    cal = FittedCalibration(m, [site], calib_batches(m, x), None, select="sensitivity")
    cal.gradients(probes=400, max_rows=10_000)
    xs, grads = cal._grads[0]
    sm = cal.sites[0]
    got = sm.sensitivity_scores(0, xs, grads)
    # closed form: r_tc from the same regression, weighted by ||W2[:, c]||^2
    beta, _ = sm._explain(0, fitting.FIT_RIDGE)
    z = torch.nn.functional.linear(x, sm.affines[0].weight, sm.affines[0].bias)
    sig = torch.nn.functional.gelu(z)
    r = sig - torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1) @ beta
    want = (r.pow(2).sum(0) * sm.affines[1].weight.pow(2).sum(0)).sqrt()
    assert rel_err(got, want) < 0.15  # Monte Carlo over 400 probes
    assert torch.equal(got.argsort()[:5], want.argsort()[:5]) or rel_err(got, want) < 0.05


def test_sensitivity_select_plans_and_is_validated():
    model = tiny_bert(seed=1)
    lc.prepare_(model)
    calib = token_calib(seed=3, batch=16, seq=32)
    plans = {s: lc.plan_collapse(copy.deepcopy(model), calib=calib, target=0.5, select=s)
             for s in ("activation", "sensitivity")}
    part = [[j.linear_channels for j in sp.joints] for sp in plans["sensitivity"].sites]
    assert part != [[j.linear_channels for j in sp.joints] for sp in plans["activation"].sites]
    default = lc.plan_collapse(copy.deepcopy(model), calib=calib, target=0.5)  # select="activation"
    assert [[j.linear_channels for j in sp.joints] for sp in default.sites] == \
        [[j.linear_channels for j in sp.joints] for sp in plans["activation"].sites]
    assert plans["sensitivity"].measured_error > 0
    with pytest.raises(ValueError, match="select must be one of"):
        lc.plan_collapse(model, calib=calib, target=0.5, select="fisher")


# ----------------------------------------------------------------------------------------------
# compress fits each site once


def test_compress_fits_each_site_once(monkeypatch):
    """compress installs the plan's own fits: collapse_ fits nothing again (classic sites at a target
    are planned by planning/partial.py, which carries its fits; the older fit_stream is not run)."""
    import lc_kernels.transforms.collapse as collapse_mod
    model = tiny_bert(seed=1)
    calib = token_calib(seed=3, batch=16, seq=32)
    refits = []
    monkeypatch.setattr(collapse_mod, "refit_classic", lambda *a, **k: refits.append(1))
    solves = []
    real = fitting._BlockEquations.solve
    monkeypatch.setattr(fitting._BlockEquations, "solve", lambda self, ridge: (solves.append(self.b), real(self, ridge)))
    calls = []
    real_stream = fitting.fit_stream
    monkeypatch.setattr(fitting, "fit_stream", lambda *a, **k: (calls.append(1), real_stream(*a, **k))[1])
    import lc_kernels.planning as planning
    monkeypatch.setattr(planning, "fit_stream", fitting.fit_stream)
    report = lc.compress(model, calib, target=0.5, progress=False)
    changed_blocks = sum(1 for sp in report.plan.sites if sp.changes for j in sp.joints if j.decision != "KEEP")
    assert not calls and not solves and not refits and changed_blocks > 0 and report.plan.fit_inputs is not None
    assert abs(report.final_error - report.plan.measured_error) <= 1e-3 * report.plan.measured_error


def test_fit_stream_matches_the_planned_fit():
    """collapse_ with calib refits through the same engine: the same data gives the same model."""
    model = tiny_bert(seed=2)
    lc.prepare_(model)
    calib = token_calib(seed=1)
    plan = lc.plan_collapse(model, calib=calib, target=0.4)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    lc.collapse_(a, plan)
    lc.collapse_(b, plan, calib=calib)
    assert rel_err(output_on(a, calib), output_on(b, calib)) < 1e-6


def test_sensitivity_without_a_gradient_path_falls_back_to_activation():
    """A forward_fn that runs the model under no_grad gives no gradients: the plan ranks channels
    by activation, exactly as select='activation' does."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 40), nn.GELU(), nn.Linear(40, 10)).double()
    lc.prepare_(m)
    x = torch.randn(200, 10, dtype=torch.float64)

    def no_grad_forward(model, batch):
        with torch.no_grad():
            return model(batch)

    plans = [lc.plan_collapse(copy.deepcopy(m), calib=x, target=0.4, select=s, forward_fn=no_grad_forward,
                              search="greedy")  # the older path, where select="sensitivity" is served
             for s in ("activation", "sensitivity")]
    assert plans[0].sites[0].joints[0].linear_channels == plans[1].sites[0].joints[0].linear_channels
