import json
import os

import pytest
import torch
from torch import nn

import lc_kernels as lc


def build(seed=0, hidden=48):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.GELU(),
        nn.Linear(hidden, 12), nn.Tanh(),
        nn.Sequential(nn.Linear(12, 40), nn.SiLU(), nn.Dropout(0.1), nn.Linear(40, 5)),
    ).eval()


def collapsed(tmp_path, seed=0):
    model = build(seed)
    lc.prepare_(model, per_channel=True)
    with torch.no_grad():
        model[0].acts[1].alpha.fill_(1.0)
        model[0].acts[0].alpha.uniform_(0.1, 0.5)
        a = model[7][0].act.alpha
        a.fill_(0.3)
        a[:30] = 1.0  # 30 of 40 channels linear: PARTIAL beats KEEP (30 * 17 > 12 * 5)
    plan = lc.collapse_(model)
    assert [s.decision for s in plan] == ["KEEP/MERGE", "PARTIAL"]
    lc.save_collapsed(model, tmp_path)
    return model


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    model = collapsed(tmp_path)
    x = torch.randn(17, 10)
    fresh = build(seed=123)  # same architecture, other weights
    plan = lc.load_collapsed(fresh, tmp_path)
    assert plan.sites[1].decision == "PARTIAL"
    assert torch.equal(fresh.eval()(x), model(x))
    assert sorted(os.listdir(tmp_path)) == ["lc_collapse.json", "model.safetensors"]


def test_prepared_model_round_trip(tmp_path):
    model = build()
    lc.prepare_(model)
    lc.save_collapsed(model, tmp_path)
    fresh = build(seed=5)
    assert lc.load_collapsed(fresh, tmp_path) is None
    x = torch.randn(3, 10)
    assert torch.equal(fresh(x), model(x))


def _unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and set(before) == set(
        model.state_dict())


def test_wrong_architecture_is_refused_and_model_untouched(tmp_path):
    collapsed(tmp_path)
    other = build(hidden=32)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"plan site '0' expects widths \[10, 48, 48, 12\], the model has \[10, 32, 32, 12\]"):
        lc.load_collapsed(other, tmp_path)
    assert _unchanged(other, before)


def test_missing_site_is_named(tmp_path):
    collapsed(tmp_path)
    other = build()
    other[7] = nn.Identity()
    with pytest.raises(ValueError, match=r"checkpoint sites \['7.0'\] were not found"):
        lc.load_collapsed(other, tmp_path)


def test_shape_mismatch_in_weights_is_named(tmp_path):
    collapsed(tmp_path)
    from safetensors.torch import load_file, save_file

    f = os.path.join(tmp_path, "model.safetensors")
    t = load_file(f)
    t["7.0.skip.weight"] = torch.zeros(5, 11)
    save_file(t, f)
    fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=r"7.0: 7.0.skip.weight has shape \(5, 11\) in the checkpoint, \(5, 12\)"):
        lc.load_collapsed(fresh, tmp_path)
    assert _unchanged(fresh, before)


@pytest.mark.parametrize("damage, match", [
    (lambda d: open(os.path.join(d, "model.safetensors"), "r+b").truncate(100), "corrupt or truncated"),
    (lambda d: open(os.path.join(d, "lc_collapse.json"), "w").write("{not json"), "is corrupt"),
    (lambda d: os.remove(os.path.join(d, "lc_collapse.json")), "lc_collapse.json is missing"),
    (lambda d: json.dump({"format": "other"}, open(os.path.join(d, "lc_collapse.json"), "w")), "has format 'other'"),
])
def test_corrupt_checkpoint(tmp_path, damage, match):
    collapsed(tmp_path)
    damage(tmp_path)
    fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        lc.load_collapsed(fresh, tmp_path)
    assert _unchanged(fresh, before)


def test_tied_weights_are_stored_once(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 6))
    model[3].weight = model[0].weight
    lc.prepare_(model)
    lc.save_collapsed(model, tmp_path)
    meta = json.load(open(os.path.join(tmp_path, "lc_collapse.json")))
    assert meta["aliases"] == {"3.weight": "0.fc1.weight"}
    fresh = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 6))
    lc.load_collapsed(fresh, tmp_path)
    x = torch.randn(2, 6)
    assert torch.equal(fresh(x), model(x))


def test_save_needs_sites(tmp_path):
    with pytest.raises(ValueError, match="no LayerCollapse sites"):
        lc.save_collapsed(nn.Linear(2, 2), tmp_path)
