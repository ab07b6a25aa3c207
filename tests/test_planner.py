"""Planner: exact calibrated errors, PARTIAL, optimal chains, budgets, report and JSON."""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import random

import pytest
import torch
from conftest import rel_err
from torch import nn

import lc_kernels as lc
from lc_kernels.cli import plan as plan_report
from lc_kernels.planning import find_sites
from lc_kernels.planning.cost import chain_groups, decisions_cost, groups_to_decisions
from lc_kernels.planning.plan import FACTOR, KEEP, MERGE, PARTIAL, CollapsePlan

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every matrix here is at most 64 wide: OpenMP hand-offs cost more than the maths (a
    # busy machine, a thread waiting for a descheduled peer costs more than the whole product).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def randomise_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so folding them is really tested."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


def set_alphas(model: nn.Module, values: list[float]) -> None:
    acts = [m for m in model.modules() if isinstance(m, lc.CollapsibleActivation)]
    for a, v in zip(acts, values):
        a.alpha.data.fill_(v)


def mlp(d_in: int, h: int, d_out: int, act: str = "gelu", norm: str | None = None) -> nn.Sequential:
    """Sequential(Linear, [BN], act, Dropout, [BN], Linear) in float64, prepared."""
    mods: list[nn.Module] = [nn.Linear(d_in, h)]
    if norm == "pre":
        mods.append(nn.BatchNorm1d(h))
    mods += [ACTS[act](), nn.Dropout(0.2)]
    if norm == "post":
        mods.append(nn.BatchNorm1d(h))
    mods.append(nn.Linear(h, d_out))
    model = nn.Sequential(nn.Sequential(*mods)).double()
    lc.prepare_(model)
    randomise_norms(model)
    return model


def chain(widths: list[int], norm_at: int | None = 0) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            if i == norm_at:
                mods.append(nn.BatchNorm1d(widths[i + 1]))
            mods.append(list(ACTS.values())[i % 3]())
    model = nn.Sequential(nn.Sequential(*mods)).double()
    lc.prepare_(model)
    randomise_norms(model)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def collapsed_error(model: nn.Module, plan: CollapsePlan, x: torch.Tensor) -> float:
    """Relative change of the model output when ``plan`` is really applied (to a copy)."""
    c = copy.deepcopy(model).eval()  # BatchNorm folds with eval semantics: compared in eval mode below
    lc.collapse_(c, plan)
    return rel_err(outputs(c, x), outputs(copy.deepcopy(model), x))


# ----------------------------------------------------------------------------------------------
# exact error estimate


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("norm", [None, "pre", "post"])
def test_site_estimate_equals_collapse(act, norm):
    model = mlp(12, 40, 7, act, norm)
    set_alphas(model, [0.6])
    model.train()  # planning must use eval semantics and leave the mode alone
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(300, 12, dtype=torch.float64)
    plan = lc.plan_collapse(model, fit=False, calib=x, force=True)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    measured = collapsed_error(model, plan, x)
    est = plan.sites[0].est_error
    assert est > 1e-3 and plan.sites[0].error_source == "calib: exact residual"
    assert abs(est - measured) / measured <= 1e-4
    assert abs(plan.measured_error - measured) / measured <= 1e-4


def test_chain_estimate_equals_collapse():
    model = chain([10, 24, 16, 20, 6], norm_at=0)
    set_alphas(model, [0.97, 0.4, 0.99])
    x = torch.randn(200, 10, dtype=torch.float64)
    plan = lc.plan_collapse(model, tol=0.05, fit=False, calib=x)
    assert [j.decision for j in plan.sites[0].joints][1] == KEEP
    measured = collapsed_error(model, plan, x)
    assert measured > 1e-4
    assert abs(plan.sites[0].est_error - measured) / measured <= 1e-4
    assert abs(plan.measured_error - measured) / measured <= 1e-4


def test_model_error_is_measured_jointly():
    # Two sites in series: the second sees the first's change, so errors do not add.
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), nn.Tanh(),
                          nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8)).double()
    lc.prepare_(model)
    set_alphas(model, [0.5, 0.3])
    x = torch.randn(200, 8, dtype=torch.float64)
    plan = lc.plan_collapse(model, fit=False, calib=x, force=True)
    measured = collapsed_error(model, plan, x)
    assert abs(plan.measured_error - measured) / measured <= 1e-4


def test_without_calib_falls_back_to_alpha_proxy():
    model = mlp(6, 16, 4)
    set_alphas(model, [0.98])
    plan = lc.plan_collapse(model)
    assert plan.sites[0].error_source == "|1-alpha| proxy"
    assert plan.sites[0].est_error == pytest.approx(0.02, abs=1e-6) and plan.measured_error is None
    assert "no calibration data" in str(plan)


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "loader", "list_of_tuples"])
def test_calib_formats_agree(wrap):
    model = mlp(6, 16, 4)
    set_alphas(model, [0.5])
    x = torch.randn(64, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    calib = {"tensor": x, "tuple": (x, y),
             "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10),
             "list_of_tuples": [(x[:30], y[:30]), (x[30:], y[30:])]}[wrap]
    ref = lc.plan_collapse(model, fit=False, calib=x, force=True)
    plan = lc.plan_collapse(model, fit=False, calib=calib, force=True)
    assert plan.calib_rows == 64
    assert plan.sites[0].est_error == pytest.approx(ref.sites[0].est_error, rel=1e-12)


# ----------------------------------------------------------------------------------------------
# per-channel partial collapse


@pytest.mark.parametrize("d_in, h, d_out", [(8, 32, 8), (16, 48, 4), (5, 20, 30)])
def test_partial_chosen_exactly_where_cost_model_says(d_in, h, d_out):
    x = torch.randn(50, d_in)
    for k in range(0, h + 1):
        model = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, d_out))
        lc.prepare_(model, per_channel=True)
        site = model[0]
        alpha = torch.zeros(h)
        alpha[torch.randperm(h)[:k]] = 1.0
        site.act.alpha.data.copy_(alpha)
        joint = lc.plan_collapse(model, tol=1e-6).sites[0].joints[0]
        expected = MERGE if k == h else PARTIAL if 0 < k and k * (d_in + d_out) > d_in * d_out else KEEP
        assert joint.decision == expected, (k, joint.reason)
        if expected == PARTIAL:
            assert sorted(joint.linear_channels) == sorted(torch.nonzero(alpha).flatten().tolist())
            ref = outputs(model, x)
            lc.collapse_(model)
            assert site.form == "partial" and site.fc1.out_features == h - k
            assert rel_err(outputs(model, x), ref) <= 1e-5


def test_partial_estimate_uses_folded_channels_only():
    d_in, h, d_out = 6, 40, 6
    model = nn.Sequential(nn.Linear(d_in, h), nn.BatchNorm1d(h), nn.SiLU(), nn.Linear(h, d_out))
    lc.prepare_(model, per_channel=True)
    model = model.double()
    randomise_norms(model)
    alpha = torch.zeros(h, dtype=torch.float64)
    alpha[:30] = 0.97
    model[0].act.alpha.data.copy_(alpha)
    x = torch.randn(200, d_in, dtype=torch.float64)
    plan = lc.plan_collapse(model, tol=0.05, fit=False, calib=x)
    assert plan.sites[0].decision == PARTIAL and plan.sites[0].joints[0].linear_channels == list(range(30))
    measured = collapsed_error(model, plan, x)
    assert abs(plan.sites[0].est_error - measured) / measured <= 1e-4
    full = lc.plan_collapse(model, fit=False, calib=x, force=True)
    assert plan.sites[0].est_error < 0.2 * full.sites[0].est_error


# ----------------------------------------------------------------------------------------------
# chains: dynamic program == brute force


@pytest.mark.parametrize("objective", ["flops", "params"])
def test_chain_dp_equals_brute_force(objective):
    rng = random.Random(0)
    for n in range(2, 9):  # Linears per chain
        for _ in range(12):
            widths = [rng.randint(1, 40) for _ in range(n + 1)]
            linear = [rng.random() < 0.6 for _ in range(n - 1)]
            dp = decisions_cost(widths, groups_to_decisions(chain_groups(widths, linear, objective), linear),
                                objective=objective)
            brute = min(
                decisions_cost(widths, [c if lin else KEEP for c, lin in zip(choice, linear)], objective=objective)
                for choice in itertools.product((MERGE, FACTOR), repeat=n - 1)
            )
            assert dp == brute, (widths, linear)


# ----------------------------------------------------------------------------------------------
# budgets


def three_site_model() -> nn.Sequential:
    """Three MLP sites whose merge saves FLOPs, slopes from far to near 1."""
    model = nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 8), nn.Tanh(),
                          nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8), nn.Tanh(),
                          nn.Linear(8, 40), nn.SiLU(), nn.Linear(40, 4)).double()
    lc.prepare_(model)
    set_alphas(model, [0.3, 0.8, 0.95])
    return model


def test_max_error_is_the_brute_force_optimum():
    model = three_site_model()
    x = torch.randn(200, 8, dtype=torch.float64)
    sites = find_sites(model)
    # Independent oracle: really collapse every subset of sites on a copy and measure.
    force = lc.plan_collapse(model, force=True)
    options = []
    for subset in itertools.product((False, True), repeat=len(sites)):
        p = copy.deepcopy(force)
        p.sites = [s for s, on in zip(p.sites, subset) if on]
        options.append((sum(s.flops_before - s.flops_after for s in p.sites), collapsed_error(model, p, x) if p.sites
                        else 0.0))
    for e in (0.0, 0.04, 0.07, 0.1, 0.12, 0.15, 0.2):
        plan = lc.plan_collapse(model, fit=False, calib=x, max_error=e)
        best = max(s for s, err in options if err <= e)
        assert plan.search == "exhaustive" and plan.max_error == e
        assert plan.flops_before - plan.flops_after == best
        assert plan.measured_error <= e
        assert collapsed_error(model, plan, x) <= e * (1 + 1e-9)  # collapse_ does not refuse budget plans


def test_budget_ignores_tol():
    model = three_site_model()
    x = torch.randn(100, 8, dtype=torch.float64)
    plan = lc.plan_collapse(model, tol=0.0, fit=False, calib=x, max_error=10.0)
    assert all(s.decision == MERGE for s in plan.sites)
    assert "tol does not block" in str(plan)
    lc.collapse_(model, tol=0.0, calib=x, max_error=10.0)  # collapse_ plans with the budget and does not refuse
    assert not find_sites(model)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_target_is_met_with_least_error(t):
    """target = the fraction of the collapsible sites' dense FLOPs to remove."""
    model = three_site_model()
    x = torch.randn(200, 8, dtype=torch.float64)
    plan = lc.plan_collapse(model, fit=False, calib=x, target=t)
    greedy = lc.plan_collapse(model, fit=False, calib=x, target=t, search="greedy")
    for p in (plan, greedy):
        assert p.flops_before - p.flops_after >= t * p.flops_before
        assert abs(p.measured_error - collapsed_error(model, p, x)) <= 1e-4 * max(p.measured_error, 1e-12)
    assert plan.measured_error <= greedy.measured_error + 1e-15


def test_target_beyond_what_collapsing_everything_removes_is_refused():
    model = three_site_model()
    x = torch.randn(200, 8, dtype=torch.float64)
    everything = lc.plan_collapse(model, force=True)
    most = 1 - everything.flops_after / everything.flops_before
    assert most < 1.0
    with pytest.raises(ValueError, match=f"removes at most {most:.1%}"):
        lc.plan_collapse(model, fit=False, calib=x, target=1.0)
    plan = lc.plan_collapse(model, fit=False, calib=x, target=most)
    assert plan.flops_after == everything.flops_after


def test_chain_budget_and_greedy_never_beat_exhaustive():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 40), nn.GELU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 30), nn.SiLU(),
                          nn.Linear(30, 5), nn.Tanh(), nn.Linear(5, 32), nn.GELU(), nn.Linear(32, 6)).double()
    lc.prepare_(model)
    set_alphas(model, [0.9, 0.5, 0.8, 0.7])
    x = torch.randn(150, 6, dtype=torch.float64)
    for e in (0.02, 0.1, 0.3):
        ex = lc.plan_collapse(model, fit=False, calib=x, max_error=e, search="exhaustive")
        gr = lc.plan_collapse(model, fit=False, calib=x, max_error=e, search="greedy")
        for p in (ex, gr):
            assert p.measured_error <= e
            assert collapsed_error(model, p, x) <= e * (1 + 1e-9)
        assert ex.flops_after <= gr.flops_after


def test_budget_chooses_partial_on_per_channel_site():
    d_in, h, d_out = 8, 64, 8
    model = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, d_out)).double()
    lc.prepare_(model, per_channel=True)
    alpha = torch.zeros(h, dtype=torch.float64)
    alpha[:40] = 1.0
    model[0].act.alpha.data.copy_(alpha)
    x = torch.randn(200, d_in, dtype=torch.float64)
    plan = lc.plan_collapse(model, tol=0.0, fit=False, calib=x, max_error=1e-12)
    joint = plan.sites[0].joints[0]
    assert joint.decision == PARTIAL and set(joint.linear_channels) <= set(range(40))
    assert len(joint.linear_channels) * (d_in + d_out) > d_in * d_out
    assert plan.measured_error <= 1e-12
    assert collapsed_error(model, plan, x) <= 1e-12


# ----------------------------------------------------------------------------------------------
# report and JSON


def test_report_and_json_round_trip():
    model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8), nn.Tanh(),
                          nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    lc.prepare_(model, filter_fn=lambda m, p: p == "0", per_channel=True)
    lc.prepare_(model)
    model[0].act.alpha.data[:40] = 0.99
    plan = lc.plan_collapse(model, tol=0.05, fit=False, calib=torch.randn(50, 8, dtype=torch.float64))
    text = str(plan)
    for piece in ("PARTIAL", "40/64 lin", "TOTAL", "(model)", "calibration rows", "measured model-output error"):
        assert piece in text
    back = CollapsePlan.from_json(plan.to_json())
    assert back == plan and str(back) == text


def test_plan_for_another_model_is_refused():
    x = torch.randn(20, 8, dtype=torch.float64)
    plan = lc.plan_collapse(three_site_model(), calib=x, max_error=1.0)
    other = nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 8)).double()
    lc.prepare_(other)
    with pytest.raises(ValueError, match="does not exist in this model"):
        lc.collapse_(other, plan)
    wider = three_site_model()
    wider[0].fc2 = nn.Linear(48, 8).double()
    wider[0].fc1 = nn.Linear(8, 50).double()
    with pytest.raises(ValueError, match=r"expects widths \[8, 48, 8\], the model has \[8, 50, 8\]"):
        lc.collapse_(wider, plan)
    moved = three_site_model()
    set_alphas(moved, [0.1])
    with pytest.raises(ValueError, match="alpha changed since the plan was made"):
        lc.collapse_(moved, plan)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("calib, exc, match", [
    (torch.randn(4, 5, dtype=torch.float64), ValueError, r"shape \(4, 5\).*expects last dim 8"),
    (torch.randn(4, 8), TypeError, r"dtype torch.float32, the model computes in torch.float64"),
    (torch.ones(4, 8, dtype=torch.long), TypeError, r"dtype torch.int64.*floating"),
    (torch.empty(0, 8, dtype=torch.float64), ValueError, r"batch 0 is empty"),
    ([], ValueError, r"calib is empty"),
    (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 8)), batch_size=4), ValueError,
     r"calib is empty \(an empty DataLoader\)"),
    ("data.pt", TypeError, r"calib must be a tensor.*got str"),
    ([("x", 1)], TypeError, r"calib batch 0: expected a tensor"),
])
def test_bad_calibration(calib, exc, match):
    with pytest.raises(exc, match=match):
        lc.plan_collapse(three_site_model(), calib=calib)


@pytest.mark.parametrize("kwargs, match", [
    (dict(target=0.0), r"target is the fraction .* in \(0, 1\]; got 0.0"),
    (dict(target=1.5), r"in \(0, 1\]; got 1.5"),
    (dict(target=float("nan")), r"target must be a finite number, got nan"),
    (dict(max_error=-0.1), r"max_error bounds .* must be >= 0, got -0.1"),
    (dict(max_error=float("nan")), r"max_error must be a finite number, got nan"),
    (dict(max_error=0.1, force=True), r"force=True collapses every joint"),
    (dict(max_error=0.1, search="best"), r"search must be one of"),
])
def test_bad_budget(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lc.plan_collapse(three_site_model(), calib=torch.randn(10, 8, dtype=torch.float64), **kwargs)


def test_budget_needs_calib_and_feasible_bounds():
    with pytest.raises(ValueError, match="measured on calibration data: pass calib="):
        lc.plan_collapse(three_site_model(), max_error=0.1)
    x = torch.randn(50, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no plan meets max_error 1e-06 and target 0.9"):
        lc.plan_collapse(three_site_model(), calib=x, max_error=1e-6, target=0.9)
    narrow = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16)).double()
    lc.prepare_(narrow)
    with pytest.raises(ValueError, match="target 0.5 cannot be met: no site's collapse saves flops"):
        lc.plan_collapse(narrow, fit=False, calib=torch.randn(10, 16, dtype=torch.float64), target=0.5)


# ----------------------------------------------------------------------------------------------
# lc-kernels plan


MODEL_PY = """
from torch import nn

def build():
    return nn.Sequential(nn.Linear(8, 48), nn.GELU(), nn.Linear(48, 8), nn.Tanh(), nn.Linear(8, 64), nn.ReLU(),
                         nn.Linear(64, 4))
"""


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    plan_report.add_arguments(parser)
    return plan_report.run(parser.parse_args(list(argv)))


def test_cli_plan_from_state_dict_and_directory(tmp_path, capsys):
    (tmp_path / "arch.py").write_text(MODEL_PY)
    spec = f"{tmp_path / 'arch.py'}:build"
    model = plan_report.build_model(spec)
    lc.prepare_(model)
    set_alphas(model, [0.97, 0.5])
    torch.save(model.state_dict(), tmp_path / "prepared.pt")
    torch.save((torch.randn(64, 8), torch.zeros(64)), tmp_path / "calib.pt")

    assert cli(str(tmp_path / "prepared.pt"), "--model", spec, "--calib", str(tmp_path / "calib.pt"),
               "--calib-rows", "40", "--max-error", "0.05", "--json", str(tmp_path / "plan.json")) == 0
    out = capsys.readouterr().out
    assert "max_error=0.05" in out and "on 40 calibration rows" in out
    saved = CollapsePlan.from_dict(json.loads((tmp_path / "plan.json").read_text())["plan"])
    assert saved.measured_error <= 0.05
    assert "global target" in out  # the default fit
    assert cli(str(tmp_path / "prepared.pt"), "--model", spec, "--calib", str(tmp_path / "calib.pt"),
               "--target", "0.3", "--fit", "local", "--select", "sensitivity") == 0
    assert "(local target)" in capsys.readouterr().out

    lc.collapse_(model, tol=0.05)
    lc.save_collapsed(model, tmp_path / "ckpt")
    assert cli(str(tmp_path / "ckpt")) == 0
    out = capsys.readouterr().out
    assert "1 plan(s) applied" in out and "MERGE" in out
    assert cli(str(tmp_path / "ckpt"), "--model", spec) == 0
    assert "KEEP" in capsys.readouterr().out  # the site left nonlinear is planned again


def test_cli_errors(tmp_path, capsys):
    torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
    assert cli(str(tmp_path / "sd.pt")) == 2
    assert "state-dict file holds no architecture: pass --model" in capsys.readouterr().err
    assert cli(str(tmp_path / "sd.pt"), "--model", "nocolon") == 2
    assert "--model expects MODULE:FACTORY" in capsys.readouterr().err
    (tmp_path / "arch.py").write_text(MODEL_PY)
    assert cli(str(tmp_path / "sd.pt"), "--model", f"{tmp_path / 'arch.py'}:build") == 2
    assert "no collapsible slopes" in capsys.readouterr().err
    assert cli(str(tmp_path / "sd.pt"), "--calib", "x.pt") == 2
    assert "--calib, --max-error and --target run the model" in capsys.readouterr().err


def test_cli_plan_reads_a_save_pretrained_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert len(lc.prepare_(model)) == 2
    lc.save_pretrained(model, tmp_path / "llama")

    assert cli(str(tmp_path / "llama"), "--json", str(tmp_path / "plan.json")) == 0
    out = capsys.readouterr().out
    assert "save_pretrained directory, 2 sites (2 LCGatedMLP gated)" in out
    assert "model.layers.1.mlp: LCGatedMLP gated" in out and "lc.plan_collapse(lc.load_pretrained(path)" in out
    assert json.loads((tmp_path / "plan.json").read_text()) == {"applied": [], "plan": None}

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                                                n_positions=64)).eval()
    assert len(lc.prepare_(gpt2)) == 2
    lc.save_pretrained(gpt2, tmp_path / "gpt2")
    assert cli(str(tmp_path / "gpt2")) == 0  # rebuilt from config.json alone, its sites planned
    out = capsys.readouterr().out
    assert "2 sites (2 LCFusedMLP mlp)" in out and "KEEP" in out

    assert cli(str(tmp_path / "llama"), "--model", "x:y") == 2
    assert "save_pretrained directory: its config.json names the architecture" in capsys.readouterr().err
    assert cli(str(tmp_path / "llama"), "--target", "0.5") == 2
    assert "lc.plan_collapse(lc.load_pretrained(path)" in capsys.readouterr().err
    (tmp_path / "llama" / "config.json").write_text("{")
    assert cli(str(tmp_path / "llama")) == 2
    assert "config.json is corrupt" in capsys.readouterr().err
