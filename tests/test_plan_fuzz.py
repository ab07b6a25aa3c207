"""Edited plan JSON and checkpoints: every edit loads and collapses correctly, or is refused clearly.

A real plan (MERGE, FACTOR, KEEP and PARTIAL joints) and a real checkpoint are edited at random, as
a person or a broken tool would: a value swapped for one of another type, a field deleted, a list
cut short, a number pushed out of range, an element repeated, an unknown field added, the text
truncated. Each edited document must either load and do what it says (checked against an
independent reference) or raise ValueError/TypeError with a message, leaving the model exactly as
it was. Any other exception type (IndexError, KeyError, AttributeError, a RuntimeError from a
restored transaction) is a failure.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil

import pytest
import torch
from torch import nn

import lc_kernels as lc
from lc_kernels.nn.mlp import LCFusedMLP
from lc_kernels.planning import CollapsePlan
from lc_kernels.testing import rel_err

TRIALS = 300
POOL = ["x", "", "MERGE", 0, 1, -1, 7, 10 ** 12, 0.5, -0.5, 1e308, float("nan"), float("inf"), True, False, None, [],
        {}, ["x"], [1.0], [0, 0], {"a": 1}]


@pytest.fixture(autouse=True)
def _one(one_thread):
    yield


def build() -> nn.Module:
    """Three sites: an LCChain (4 Linears), a wide LCFusedMLP, a narrow one; float64, so any exact
    collapse matches its reference to 1e-12."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 32), nn.ReLU(),
                         nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 8), nn.Tanh(),
                         nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 8)).double().eval()


def prepared() -> tuple[nn.Module, CollapsePlan]:
    """The model with per-channel slopes, some at 1 and some not, and a plan holding every decision."""
    model = build()
    lc.prepare_(model, per_channel=True, alpha_init=1.0)
    with torch.no_grad():
        model[0].acts[1].alpha[12:] = 0.3  # chain joint 1: half its channels nonlinear
        model[8].act.alpha[40:] = 0.2  # wide MLP: 40 of 64 channels linear
    plan = lc.plan_collapse(model)
    joint = plan["0"].joints[1]
    assert joint.decision == "KEEP"
    joint.decision, joint.linear_channels = "PARTIAL", list(range(12))  # a PARTIAL inside the chain
    assert [j.decision for sp in plan for j in sp.joints] == ["MERGE", "PARTIAL", "MERGE", "PARTIAL", "FACTOR"], plan
    return model, plan


def reference(model: nn.Module, plan: CollapsePlan) -> nn.Module:
    """What the collapsed model must compute: the uncollapsed model with the slope of every channel
    the plan makes linear set to 1 (MERGE/FACTOR: the joint's channels, PARTIAL: its linear_channels)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for sp in plan:
            m = ref.get_submodule(sp.path)
            acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
            for act, j in zip(acts, sp.joints):
                if j.decision != "KEEP":
                    act.alpha[j.linear_channels if j.decision == "PARTIAL" else slice(None)] = 1.0
    return ref


def snapshot(model: nn.Module) -> tuple:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, "_lc_plans" in model.__dict__


def unchanged(model: nn.Module, snap: tuple) -> bool:
    text, state, had_plans = snap
    now = model.state_dict()
    return (repr(model) == text and now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)
            and ("_lc_plans" in model.__dict__) == had_plans)


# ---------------------------------------------------------------------------------------------- edits


PLAUSIBLE = {
    "decision": lambda rng, v: rng.choice(["MERGE", "FACTOR", "KEEP", "PARTIAL", "LINEAR"]),
    "path": lambda rng, v: rng.choice(["0", "8", "12", "1", "0.linears"]),
    "linear_channels": lambda rng, v: sorted(rng.sample(range(70), rng.randint(0, 30))) if rng.random() < 0.8
    else None,
    "kind": lambda rng, v: rng.choice(["LCChain", "LCFusedMLP", "LCGatedMLP"]),
    "forced": lambda rng, v: not v,
    "fit": lambda rng, v: not v,
    "tol": lambda rng, v: rng.choice([0.0, 0.01, 0.5, 1.0]),
    "max_error": lambda rng, v: rng.choice([None, 0.0, 0.1]),
    "target": lambda rng, v: rng.choice([None, 0.5, 1.0]),
    "alpha": lambda rng, v: [rng.choice([1.0, 0.3, 0.2]) for _ in v] if rng.random() < 0.3 else [1.0] * len(v),
    "widths": lambda rng, v: [w + rng.choice([0, 0, 1]) for w in v],
}


def _places(tree, path=()):
    """(path, value) of every node below the root; of a long list of numbers, the list and two elements."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree)) if isinstance(tree, list) else []
    if isinstance(tree, list) and len(tree) > 4 and all(isinstance(v, (int, float)) for v in tree):
        items = [items[0], items[-1]]
    for k, v in items:
        yield path + (k,), v
        yield from _places(v, path + (k,))


def _parent(tree, path):
    for k in path[:-1]:
        tree = tree[k]
    return tree


def edit(tree, rng: random.Random) -> str:
    """One random edit of ``tree`` in place; returns what it did (shown when a trial fails)."""
    places = list(_places(tree))
    path, value = rng.choice(places)
    parent, key = _parent(tree, path), path[-1]
    kind = rng.choice(["swap", "swap", "delete", "truncate", "number", "duplicate", "unknown", "plausible",
                       "plausible", "plausible"])
    if kind == "plausible":  # a value of the right type that a careless hand edit might write
        fields = [(p, v) for p, v in places if p[-1] in PLAUSIBLE]
        if not fields:
            return "nothing plausible to edit"
        path, value = rng.choice(fields)
        _parent(tree, path)[path[-1]] = PLAUSIBLE[path[-1]](rng, value)
    elif kind == "swap":
        parent[key] = copy.deepcopy(rng.choice(POOL))
    elif kind == "delete":
        del parent[key]
    elif kind == "truncate":
        lists = [(p, v) for p, v in places if isinstance(v, (list, str)) and v]
        if not lists:
            return "nothing to truncate"
        path, value = rng.choice(lists)
        _parent(tree, path)[path[-1]] = value[:rng.randrange(len(value))]
    elif kind == "number":
        numbers = [(p, v) for p, v in places if isinstance(v, (int, float)) and not isinstance(v, bool)]
        path, value = rng.choice(numbers)
        _parent(tree, path)[path[-1]] = rng.choice([value + 1, value - 1, -value - 1, value * 1000, 0, 2 ** 40,
                                                    float(value) + 0.5])
    elif kind == "duplicate":
        lists = [(p, v) for p, v in places if isinstance(v, list) and v]
        path, value = rng.choice(lists)
        value.append(copy.deepcopy(rng.choice(value)))
    else:
        dicts = [(p, v) for p, v in places if isinstance(v, dict)]
        path, value = rng.choice(dicts)
        value["bogus"] = rng.choice(POOL)
    return f"{kind} at {'/'.join(map(str, path))}"


def edited(doc: dict, rng: random.Random) -> tuple[str, list[str]]:
    """The document as text after 1-3 random edits (sometimes the text itself cut short)."""
    tree = copy.deepcopy(doc)
    done = [edit(tree, rng) for _ in range(rng.randint(1, 3))]
    text = json.dumps(tree)
    if rng.random() < 0.05:
        text = text[:rng.randrange(len(text))]
        done.append("text truncated")
    return text, done


def refused_clearly(e: BaseException) -> bool:
    return isinstance(e, (ValueError, TypeError)) and len(str(e)) > 20


# ---------------------------------------------------------------------------------------------- plans


def test_the_unedited_plan_round_trips_and_collapses_exactly():
    model, plan = prepared()
    again = CollapsePlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    ref, x = reference(model, again), torch.randn(64, 8, dtype=torch.float64)
    lc.collapse_(model, again)
    assert model[8].form == "partial" and model[12].form == "factored" and "skips" in model[0]._modules
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_edited_plan_json_loads_and_collapses_correctly_or_is_refused(seed):
    base, plan = prepared()
    doc = plan.to_dict()
    rng = random.Random(seed)
    x = torch.randn(32, 8, dtype=torch.float64)
    outcomes = {"json": 0, "collapse": 0, "ok": 0}
    for _ in range(TRIALS // 3):
        text, done = edited(doc, rng)
        try:
            loaded = CollapsePlan.from_json(text)
        except Exception as e:  # noqa: BLE001 - the point: which type
            assert isinstance(e, ValueError) and str(e), (done, repr(e))
            outcomes["json"] += 1
            continue
        str(loaded)  # printing a plan that loaded never fails
        model = copy.deepcopy(base)
        snap = snapshot(model)
        try:
            lc.collapse_(model, loaded)
        except Exception as e:  # noqa: BLE001
            assert refused_clearly(e), (done, repr(e))
            assert unchanged(model, snap), done
            outcomes["collapse"] += 1
            continue
        ref = reference(base, loaded)
        with torch.no_grad():
            err = rel_err(model(x), ref(x))
        assert math.isfinite(err) and err < 1e-12, (done, err)
        outcomes["ok"] += 1
    # The fuzz exercises all three outcomes (else it tests nothing).
    assert all(n >= 5 for n in outcomes.values()), outcomes


@pytest.mark.parametrize("edit_fn, match", [
    (lambda d: d.__setitem__("tol", "0.05"), r"plan.tol must be a number, got str '0.05'"),
    (lambda d: d["sites"][0]["joints"][0].__setitem__("alpha", ["x"]), r"alpha has 1 slopes|alpha\[0\] must be"),
    (lambda d: d["sites"][1]["joints"][0].__setitem__("alpha", ["x"]), r"joints\[0\].alpha\[0\] must be a number"),
    (lambda d: d["sites"][1]["joints"][0].__setitem__("linear_channels", None),
     r"sites\[1\].joints\[0\].linear_channels is null: PARTIAL needs a strict, non-empty subset of the 64"),
    (lambda d: d["sites"][0].__setitem__("joints", d["sites"][0]["joints"][:2]),
     r"sites\[0\] has widths \[8, 32, 24, 32, 8\] and 2 joints"),
    (lambda d: d["sites"][0].pop("joints"), r"sites\[0\]: missing \['joints'\]"),
    (lambda d: d.__setitem__("sites", {"0": 1}), r"plan.sites must be a list, got dict"),
    (lambda d: d["sites"][2]["joints"][0].__setitem__("decision", "FOLD"), r"unknown decision 'FOLD'"),
    (lambda d: d["sites"][2]["joints"][0].__setitem__("decision", "LINEAR"), r"unknown decision 'LINEAR'"),
    (lambda d: d["sites"][1]["joints"][0].__setitem__("linear_channels", [0, 64]), r"distinct ints in \[0, 64\)"),
    (lambda d: d.__setitem__("objective", "speed"), r"plan.objective is 'speed', expected one of"),
    (lambda d: d.__setitem__("colour", "red"), r"plan: unknown \['colour'\]"),
    (lambda d: d["sites"][0].__setitem__("widths", [8, "32", 24, 32, 8]), r"widths\[1\] must be an integer"),
])
def test_each_edit_the_issue_names_gets_a_clear_error(edit_fn, match):
    _, plan = prepared()
    doc = plan.to_dict()
    edit_fn(doc)
    with pytest.raises(ValueError, match=r"corrupt CollapsePlan: .*" + match):
        CollapsePlan.from_dict(doc)


def test_a_plan_edited_in_python_is_refused_at_collapse():
    model, plan = prepared()
    snap = snapshot(model)
    plan.sites[1].joints[0].alpha = ["x"] * 64
    with pytest.raises(TypeError, match=r"plan.sites\[1\].joints\[0\].alpha\[0\] must be a number, got str"):
        lc.collapse_(model, plan)
    plan.sites[1].joints[0].alpha = [1.0] * 64
    plan.tol = "0.05"
    with pytest.raises(TypeError, match="plan.tol must be a number"):
        lc.collapse_(model, plan)
    assert unchanged(model, snap)


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, plan = prepared()
    lc.collapse_(model, plan)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    lc.save_collapsed(model, path)
    return model, path


def test_a_checkpoint_holding_nan_is_refused(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = checkpoint
    bad = tmp_path / "nan"
    shutil.copytree(path, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["8.skip.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors")
    fresh = build()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=r"model.safetensors holds NaN or Inf in 1 tensor\(s\): \['8.skip.weight'\]"):
        lc.load_collapsed(fresh, bad)
    assert unchanged(fresh, snap)


@pytest.mark.parametrize("seed", range(2))
def test_edited_checkpoint_metadata_loads_the_same_model_or_is_refused(checkpoint, tmp_path, seed):
    saved, path = checkpoint
    meta = json.loads((path / "lc_collapse.json").read_text())
    x = torch.randn(32, 8, dtype=torch.float64)
    with torch.no_grad():
        want = saved(x)
    work = tmp_path / "edited"
    shutil.copytree(path, work)
    rng = random.Random(100 + seed)
    outcomes = {"refused": 0, "ok": 0}
    for _ in range(TRIALS // 4):
        text, done = edited(meta, rng)
        (work / "lc_collapse.json").write_text(text)
        fresh = build()
        snap = snapshot(fresh)
        try:
            lc.load_collapsed(fresh, work)
        except Exception as e:  # noqa: BLE001
            assert refused_clearly(e), (done, repr(e))
            assert unchanged(fresh, snap), done
            outcomes["refused"] += 1
            continue
        with torch.no_grad():
            assert torch.equal(fresh(x), want), done  # the weights come from the file: the very same model
        outcomes["ok"] += 1
    assert all(n >= 5 for n in outcomes.values()), outcomes
    os.remove(work / "lc_collapse.json")
