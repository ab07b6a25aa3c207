"""Serving: every form exports through torch.export and ONNX (onnxruntime), and strip_ leaves plain torch."""
import copy

import pytest
import torch
from torch import nn

import lc_kernels as lc
from conftest import error_without_lc_kernels, strip_and_compare
from lc_kernels.testing import rel_err

from test_fitted import bert_calib, tiny_bert

FORMS = ["alpha0.3", "merge", "factor", "partial", "chain", "chain_partial", "per_channel"]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def build(form: str, dtype=torch.float32) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if form in ("chain", "chain_partial"):
        model = nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64),
                              nn.ReLU(), nn.Linear(64, 6))
    elif form == "factor":
        model = nn.Sequential(nn.Linear(32, 4), nn.GELU(), nn.Linear(4, 32))
    else:
        model = nn.Sequential(nn.Linear(12, 48), nn.GELU(), nn.Linear(48, 12))
    lc.prepare_(model, alpha_init=0.3 if form == "alpha0.3" else 0.0, per_channel=form == "per_channel")
    model.eval()
    x = torch.randn(64, 12 if form != "factor" else 32)
    if form in ("merge", "factor", "chain"):
        lc.collapse_(model, lc.plan_collapse(model, force=True))
    elif form in ("partial", "chain_partial"):
        plan = lc.plan_collapse(model, calib=x, target=0.5)
        assert "PARTIAL" in " ".join(sp.decision for sp in plan.sites), plan
        lc.collapse_(model, plan, calib=x)
    return model.to(dtype), x.to(dtype)


def _fresh(model, n, seq=None):
    width = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    shape = (n, width) if seq is None else (n, seq, width)
    return torch.randn(*shape, dtype=next(model.parameters()).dtype)


@pytest.mark.parametrize("form", FORMS)
def test_torch_export_is_plain_aten(form):
    model, x = build(form)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("lc_kernels" in t for t in targets), targets
    z = _fresh(model, 9)
    with torch.no_grad():
        assert rel_err(ep.module()(z), model(z)) <= 1e-6


# Each ONNX export takes seconds: every form in float32, the 16-bit path on the forms that differ.
ONNX_CASES = [(f, torch.float32) for f in FORMS] + [(f, torch.float16) for f in ("alpha0.3", "partial", "chain_partial")]


@pytest.mark.parametrize("form, dtype", ONNX_CASES)
def test_onnx_runs_in_onnxruntime_with_dynamic_batch(form, dtype):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, x = build(form, dtype)
    x3 = x.reshape(8, 8, -1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    onnx_program = torch.onnx.export(model, (x3,), dynamo=True, dynamic_shapes=({0: batch, 1: seq},), verbose=False)
    sess = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    z = _fresh(model, 3, seq=13)  # another batch and sequence length than the export example
    (got,) = sess.run(None, {sess.get_inputs()[0].name: z.numpy()})
    with torch.no_grad():
        want = model(z)
    assert rel_err(torch.from_numpy(got).float(), want.float()) <= TOL[dtype]


def test_tiny_bert_compressed_exports_to_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    model = tiny_bert()
    calib = bert_calib()
    lc.compress(model, calib, target=0.5, progress=False)
    ids, mask = calib["input_ids"], calib["attention_mask"]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    program = torch.onnx.export(model, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    other = bert_calib(seed=3, batch=3, seq=11)
    got = sess.run(None, {"input_ids": other["input_ids"].numpy(), "attention_mask": other["attention_mask"].numpy()})
    with torch.no_grad():
        want = model(**other).last_hidden_state
    assert rel_err(torch.from_numpy(got[0]), want) <= 1e-5


@pytest.mark.parametrize("form", FORMS)
def test_strip_keeps_outputs_and_needs_no_lc_kernels(form, tmp_path):
    model, x = build(form)
    before = strip_and_compare(model, x)
    assert error_without_lc_kernels(model, x, before, tmp_path) <= 1e-6


def test_strip_a_bert():
    model = tiny_bert()
    calib = bert_calib()
    lc.compress(model, calib, target=0.5, progress=False)
    with torch.no_grad():
        before = model(**calib).last_hidden_state
    lc.strip_(model)
    with torch.no_grad():
        assert rel_err(model(**calib).last_hidden_state, before) <= 1e-6


def test_chain_runs_through_the_ops_with_unchanged_outputs_and_gradients(monkeypatch):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    ref = copy.deepcopy(seq)
    lc.prepare_(seq, alpha_init=0.25)
    for m in ref:
        if isinstance(m, (nn.GELU, nn.ReLU)):
            m.forward = (lambda f: (lambda x: 0.25 * x + 0.75 * f(x)))(m.forward)
    calls = []
    real = torch.ops.lc_kernels.fused_linear
    monkeypatch.setattr(torch.ops.lc_kernels, "fused_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 4, dtype=torch.float64)
    y = seq(x)
    (gx,) = torch.autograd.grad(y, x, g)
    assert len(calls) == 2  # both joints; the last Linear has nothing to fuse and runs F.linear
    x2 = x.detach().clone().requires_grad_(True)
    y2 = ref(x2)
    (gx2,) = torch.autograd.grad(y2, x2, g)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx2, rtol=1e-12, atol=1e-12)
