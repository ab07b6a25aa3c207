"""Self-describing checkpoints: every checkpoint save_collapsed writes loads back, and a model built
differently (activation, norm position, dropout, slopes, dtype) is refused by name."""
from __future__ import annotations

import json
import os
import random
import re

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.transforms.checkpoint import CHECKPOINT_FORMAT, META, describe_sites

from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

ACTS = {
    "relu": (nn.ReLU, "relu"), "gelu": (nn.GELU, "gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"), "silu": (nn.SiLU, "silu"), "leaky": (lambda: nn.LeakyReLU(0.1), "relu"), "prelu": (nn.PReLU, "relu"),
}


def random_spec(case: int) -> dict:
    """A small Sequential MLP or chain: 2-4 Linears, mixed activations, per-channel PReLU joints,
    BatchNorm1d before or after the activation, dropout."""
    r = random.Random(case)
    n_lin = r.choice([2, 3, 4])
    widths = [r.choice([3, 5, 8, 24]) for _ in range(n_lin + 1)]
    joints = []
    for _ in range(n_lin - 1):
        joints.append({"act": r.choice([*ACTS, "prelu_n"]), "norm": r.choice([None, "pre", "post"]),
                       "drop": r.choice([None, 0.0, 0.2])})
    return {"widths": widths, "joints": joints, "per_channel": case < 6,
            "plan": ["force", "tol", "fit", "prepared", "params", "twice"][case % 6]}


# A dozen seeded random architectures, plus two where most channels of a joint are linear (PARTIAL).
SPECS = [random_spec(c) for c in range(12)] + [
    {"widths": [8, 24, 8], "joints": [{"act": "gelu", "norm": "post", "drop": 0.1}], "per_channel": True,
     "plan": "tol", "partial": True},
    {"widths": [8, 48, 8, 48, 8], "joints": [{"act": "relu", "norm": "pre", "drop": None},
                                             {"act": "prelu", "norm": None, "drop": None},
                                             {"act": "silu", "norm": "post", "drop": 0.2}],
     "per_channel": True, "plan": "target", "partial": True},
]


def build(spec: dict, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    w, layers = spec["widths"], []
    for i, j in enumerate(spec["joints"]):
        layers.append(nn.Linear(w[i], w[i + 1]))
        act = nn.PReLU(w[i + 1]) if j["act"] == "prelu_n" else ACTS[j["act"]][0]()
        bn = nn.BatchNorm1d(w[i + 1])
        layers += [bn, act] if j["norm"] == "pre" else [act]
        if j["drop"] is not None:
            layers.append(nn.Dropout(j["drop"]))
        if j["norm"] == "post":
            layers.append(bn)
    layers.append(nn.Linear(w[-2], w[-1]))
    model = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a misplaced norm shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
    return model.eval()


def prepared(spec: dict, seed: int) -> nn.Sequential:
    model = build(spec, seed)
    lc.prepare_(model, per_channel=spec["per_channel"])
    r = random.Random(seed)
    with torch.no_grad():  # some joints (or most channels) at alpha = 1, others far from it
        for a in [m for m in model.modules() if isinstance(m, lc.CollapsibleActivation)]:
            a.alpha.uniform_(0.1, 0.6)
            if spec.get("partial") or r.random() < 0.7:
                part = spec.get("partial") or r.random() < 0.5
                a.alpha[: max(1, a.alpha.numel() * 3 // 4) if part else None] = 1.0
    return model


def collapse(model: nn.Module, spec: dict, x: torch.Tensor) -> None:
    kind = spec["plan"]
    if kind == "force":
        lc.collapse_(model, lc.plan_collapse(model, force=True))
    elif kind == "tol":
        lc.collapse_(model, lc.plan_collapse(model, tol=0.05))
    elif kind == "fit":
        lc.collapse_(model, lc.plan_collapse(model, calib=x, max_error=0.5), calib=x)
    elif kind == "target":
        lc.collapse_(model, lc.plan_collapse(model, calib=x, target=0.3), calib=x)
    elif kind == "params":
        lc.collapse_(model, lc.plan_collapse(model, tol=0.05, objective="params"))
    elif kind == "twice":  # two plans in sequence: the second one sees the collapsed site
        lc.collapse_(model, lc.plan_collapse(model, tol=0.05))
        if lc.planning.find_sites(model):
            lc.collapse_(model, lc.plan_collapse(model, force=True))


@pytest.mark.parametrize("case", range(len(SPECS)))
def test_every_checkpoint_loads_back(tmp_path, case):
    spec = SPECS[case]
    x = torch.randn(64, spec["widths"][0])
    model = prepared(spec, seed=case)
    collapse(model, spec, x)
    with torch.no_grad():
        want = model(x)
    lc.save_collapsed(model, tmp_path)
    fresh = build(spec, seed=1000 + case)  # same architecture, other weights
    lc.load_collapsed(fresh, tmp_path)
    with torch.no_grad():
        assert rel_err(fresh.eval()(x), want) <= 1e-5, spec
    # A loaded model knows its whole prepared architecture, collapsed sites included.
    (desc,) = describe_sites(fresh).values()
    assert all(j[k] is not None for j in desc["joints"] for k in ("activation", "slopes", "norm", "dropout"))
    # ... and saving the loaded model writes a checkpoint that loads again.
    again = tmp_path / "again"
    lc.save_collapsed(fresh, again)
    other = build(spec, seed=2000 + case)
    lc.load_collapsed(other, again)
    with torch.no_grad():
        assert rel_err(other.eval()(x), want) <= 1e-5, spec


@pytest.mark.parametrize("case", range(len(SPECS)))
def test_checkpoint_records_the_prepared_architecture(tmp_path, case):
    spec = SPECS[case]
    model = prepared(spec, seed=case)
    lc.save_collapsed(model, tmp_path)
    meta = json.load(open(os.path.join(tmp_path, META)))
    assert meta["format"] == CHECKPOINT_FORMAT
    (site, desc), = meta["architecture"].items()
    assert desc["widths"] == spec["widths"] and desc["dtype"] == "float32"
    assert desc["kind"] == ("LCFusedMLP" if len(spec["widths"]) == 3 else "LCChain")
    for j, (got, want) in enumerate(zip(desc["joints"], spec["joints"])):
        width = spec["widths"][j + 1]
        base = "relu" if want["act"] == "prelu_n" else ACTS[want["act"]][1]
        slopes = width if want["act"] == "prelu_n" or spec["per_channel"] else 1
        assert got == {"activation": base, "slopes": slopes,
                       "norm": "none" if want["norm"] is None else "BatchNorm1d", "norm_position": want["norm"],
                       "dropout": "none" if want["drop"] is None else want["drop"], "fit": None}
    assert meta["prepared"] == {site: [j["slopes"] for j in desc["joints"]]}


def test_collapsed_checkpoint_records_fit_and_what_survives(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    lc.prepare_(model)
    with torch.no_grad():
        model[0].acts[0].alpha.fill_(1.0)  # MERGE: the activation is folded away
        model[0].acts[1].alpha.fill_(0.3)  # KEEP: the activation stays
    lc.collapse_(model, tol=0.05)
    lc.save_collapsed(model, tmp_path)
    joints = json.load(open(os.path.join(tmp_path, META)))["architecture"]["0"]["joints"]
    assert [(j["activation"], j["slopes"], j["fit"]) for j in joints] == [("relu", 1, "exact"), ("gelu", 1, None)]  # prepare_ recorded it
    x = torch.randn(32, 8)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    calib = torch.randn(64, 8)
    fitted = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    lc.load_collapsed(fresh, tmp_path)
    assert torch.equal(fresh.eval()(x), model(x))
    lc.prepare_(fitted)
    with torch.no_grad():
        fitted[0].acts[0].alpha.fill_(0.9)
        fitted[0].acts[1].alpha.fill_(0.3)
    lc.collapse_(fitted, lc.plan_collapse(fitted, calib=calib, max_error=0.5), calib=calib)
    lc.save_collapsed(fitted, tmp_path / "fitted")
    joints = json.load(open(os.path.join(tmp_path, "fitted", META)))["architecture"]["0"]["joints"]
    assert {j["fit"] for j in joints} <= {"least-squares", None} and "least-squares" in {j["fit"] for j in joints}


def _mlp(act=nn.ReLU, *, norm=None, drop=None, prelu=False, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm1d(16)
    joint = [bn, act()] if norm == "pre" else [act()]
    joint += [nn.Dropout(drop)] if drop is not None else []
    joint += [bn] if norm == "post" else []
    tail = [nn.PReLU(16) if prelu else nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(nn.Linear(8, 16), *joint, nn.Linear(16, 16), *tail).eval()


@pytest.mark.parametrize("saved, other, words", [
    (dict(act=nn.ReLU), dict(act=nn.GELU),
     "site '0': the checkpoint's joint 0 activation is relu, the model's is gelu"),
    (dict(norm="post"), dict(norm="pre"), "joint 0 has BatchNorm1d after the activation, the model's has BatchNorm1d "
                                          "before the activation"),
    (dict(norm="post"), dict(), "joint 0 has BatchNorm1d after the activation, the model's has no norm"),
    (dict(drop=0.1), dict(drop=0.3), "joint 0 has dropout p=0.1, the model's has dropout p=0.3"),
    (dict(drop=0.1), dict(), "joint 0 has dropout p=0.1, the model's has no dropout"),
    (dict(prelu=True), dict(), "joint 1 has 16 slopes, the model's has 1"),
])
def test_a_differently_built_model_is_refused_and_left_unchanged(tmp_path, saved, other, words):
    model = _mlp(**saved)
    lc.prepare_(model)
    with torch.no_grad():
        model[0].acts[0].alpha.fill_(0.3)
    lc.collapse_(model, tol=0.05)  # nothing collapses: the joints are live, and must match
    lc.save_collapsed(model, tmp_path)
    fresh = _mlp(**other, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(words)):
        lc.load_collapsed(fresh, tmp_path)
    assert set(fresh.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert not any(isinstance(m, lc.LCChain) for m in fresh.modules())


def test_dtype_mismatch_is_refused(tmp_path):
    model = _mlp().double()
    lc.prepare_(model)
    lc.save_collapsed(model, tmp_path)
    with pytest.raises(ValueError, match=r"weights are float64, the model's float32 \(cast the model first"):
        lc.load_collapsed(_mlp(seed=1), tmp_path)
    fresh = _mlp(seed=1).double()
    lc.load_collapsed(fresh, tmp_path)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))


def test_mixed_scalar_and_per_channel_chain_round_trips(tmp_path):
    def build_chain():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.PReLU(16), nn.Linear(16, 4))

    model = build_chain()
    lc.prepare_(model)
    assert [a.num_parameters for a in model[0].acts] == [1, 16]
    lc.save_collapsed(model, tmp_path)
    assert json.load(open(os.path.join(tmp_path, META)))["prepared"] == {"0": [1, 16]}
    fresh = build_chain()
    lc.load_collapsed(fresh, tmp_path)
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), model(x))


def test_save_onto_an_existing_file_is_refused(tmp_path):
    model = _mlp()
    lc.prepare_(model)
    target = tmp_path / "taken"
    target.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is an existing file; save_collapsed writes a directory"):
        lc.save_collapsed(model, target)
    assert target.read_text() == "not a checkpoint"
    with pytest.raises(TypeError, match="expects a directory path"):
        lc.save_collapsed(model, 3)


def test_format_1_checkpoints_still_load(tmp_path):
    model = _mlp(prelu=True)
    lc.prepare_(model, per_channel=True)
    with torch.no_grad():
        model[0].acts[0].alpha.fill_(1.0)
    lc.collapse_(model, tol=0.05)
    lc.save_collapsed(model, tmp_path)
    path = os.path.join(tmp_path, META)
    meta = json.load(open(path))
    meta["format"] = "lc_kernels.collapsed/1"
    meta["prepared"] = {p: max(n) for p, n in meta.pop("prepared").items()}  # /1: one count per site
    del meta["architecture"]
    json.dump(meta, open(path, "w"))
    fresh = _mlp(prelu=True, seed=3)
    lc.load_collapsed(fresh, tmp_path)
    x = torch.randn(7, 8)
    assert torch.equal(fresh.eval()(x), model(x))


def _chain(first=nn.ReLU, second=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), first(), nn.Linear(16, 16), second(), nn.Linear(16, 4)).eval()


def test_a_collapsed_chain_checks_the_activations_it_still_has(tmp_path):
    model = _chain()
    lc.prepare_(model)
    with torch.no_grad():
        model[0].acts[0].alpha.fill_(1.0)  # MERGE
        model[0].acts[1].alpha.fill_(0.3)  # KEEP: still computes relu
    lc.collapse_(model, tol=0.05)
    lc.save_collapsed(model, tmp_path)
    kept_differs = _chain(second=nn.GELU, seed=1)
    before = {k: v.clone() for k, v in kept_differs.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape("site '0': the checkpoint's joint 1 activation is relu, "
                                                   "the model's is gelu")):
        lc.load_collapsed(kept_differs, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in kept_differs.state_dict().items())
    # prepare_ recorded the merged joint's activation before the collapse folded it: refused too.
    merged_differs = _chain(first=nn.GELU, seed=2)
    with pytest.raises(ValueError, match=re.escape("joint 0 activation is relu, the model's is gelu")):
        lc.load_collapsed(merged_differs, tmp_path)
    same = _chain(seed=3)
    lc.load_collapsed(same, tmp_path)
    x = torch.randn(9, 8)
    assert torch.equal(same.eval()(x), model(x))
