"""A drop-in costs no more than what it replaces: counted, not timed.

Per module call at serving time: one check of the input, no autograd context or saved tensors
under ``no_grad`` / ``inference_mode``, the same aten calls as ``nn.Sequential`` at alpha = 0, and
on CUDA plain GEMMs on ``F.linear`` (cuBLAS), never the Triton launcher. Timings live in
``benchmarks/overhead.py``; these counts fail the moment a change adds work to the hot path.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import lc_kernels as lc
from lc_kernels import _config
from lc_kernels.nn.mlp import LCChain, LCFusedMLP
from lc_kernels.ops import dispatch, fused_linear_op, fused_mlp_op
from conftest import rel_err

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@pytest.fixture(autouse=True)
def _default_path(monkeypatch):
    monkeypatch.delenv("LC_KERNELS_FORCE_TRITON", raising=False)
    monkeypatch.delenv("LC_KERNELS_DISABLE_TRITON", raising=False)


class OpLog(TorchDispatchMode):
    """Every op that reaches the dispatcher below autograd, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(fn, *args) -> list[str]:
    fn(*args)  # warm: first-call caches are not per-call cost
    with OpLog() as log:
        fn(*args)
    return log.ops


def _pair(act: str, d: int = 24, h: int = 64) -> tuple[nn.Sequential, LCFusedMLP]:
    seq = nn.Sequential(nn.Linear(d, h), ACTS[act](), nn.Linear(h, d)).eval()
    return seq, LCFusedMLP.from_sequential(copy.deepcopy(seq)).eval()


def _partial(d: int = 24, h: int = 32) -> LCFusedMLP:
    m = LCFusedMLP(d, h, d, act="gelu", alpha_init=0.3).eval()
    m.skip = nn.Linear(d, d, bias=False)
    m.form = "partial"
    return m


# ---------------------------------------------------------------- no autograd at inference

FORMS = {
    "mlp_gelu": lambda: _pair("gelu")[1],
    "mlp_alpha": lambda: LCFusedMLP(24, 64, act="silu", alpha_init=0.3).eval(),
    "partial": _partial,
    "chain": lambda: LCChain([nn.Linear(24, 32), nn.Linear(32, 32), nn.Linear(32, 8)], ["gelu", "relu"],
                             alpha_init=0.25).eval(),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
def test_inference_builds_no_graph_and_saves_nothing(form, mode):
    m = FORMS[form]()
    x = torch.randn(2, 5, 24)
    ref = m(x)  # grad enabled, parameters require grad: the autograd path
    assert ref.grad_fn is not None
    if mode == "frozen":  # grad mode on, but nothing requires grad
        m.requires_grad_(False)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "frozen": torch.enable_grad}[mode]
    packs = []
    with ctx(), torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        with OpLog() as log:
            out = m(x)
    assert out.grad_fn is None
    assert packs == []
    assert not [op for op in log.ops if op.startswith("lc_kernels.")], "the autograd-wrapped op ran"
    # Bitwise: self-distillation's teacher runs without grad, its student with, from zero loss.
    assert torch.equal(out, ref.detach())


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha_kind", ["none", "zero", "scalar", "channel"])
@pytest.mark.parametrize("act", ["identity", "relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("rows", [1, 63, 1100], ids=["m1", "m63", "two_blocks"])
def test_inference_path_matches_reference(act, alpha_kind, dtype, rtol, rows):
    """The no-autograd CPU path (in-place base, lerp, or the reference's blocked loop past 2^21
    elements) against the float64 reference."""
    n, k = (2048, 8) if rows == 1100 else (96, 40)
    x = torch.randn(rows, 1, k).to(dtype)  # 3-D: leading dims kept
    w, b = (torch.randn(n, k) / k**0.5).to(dtype), torch.randn(n).to(dtype)
    alpha = {"none": None, "zero": torch.zeros(1), "scalar": torch.rand(1) * 2 - 0.5,
             "channel": torch.rand(n) * 2 - 0.5}[alpha_kind]
    with torch.no_grad():
        out = fused_linear_op.linear_act(x, w, b, None if alpha is None else alpha.to(dtype), act)
    ref = fused_linear_op.reference.fused_linear(x.double(), w.double(), b.double(),
                                                 None if alpha is None else alpha.to(dtype).double(), act)
    assert out.shape == (rows, 1, n) and out.dtype == dtype
    assert rel_err(out, ref) <= rtol


def test_saved_tensor_hook_sees_the_training_path():
    """Control for the test above: the hook does count what the autograd path saves."""
    m = LCFusedMLP(24, 64, act="gelu").eval()
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        m(torch.randn(3, 24))
    assert packs


# ---------------------------------------------------------------- same aten work at alpha = 0

@pytest.mark.parametrize("shape", [(16, 24), (2, 3, 24), (1, 24)], ids=["2d", "3d", "one_token"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_aten_calls_at_alpha_zero_match_sequential(act, shape, mode):
    seq, m = _pair(act)
    x = torch.randn(*shape)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        seq_ops, lc_ops = _ops(seq, x), _ops(m, x)
        assert len(lc_ops) == len(seq_ops), (seq_ops, lc_ops)
        assert all(op.startswith("aten.") for op in lc_ops), lc_ops
        assert torch.equal(m(x), seq(x))


@pytest.mark.parametrize("act", list(ACTS))
def test_per_channel_alpha_zero_also_matches(act):
    seq = nn.Sequential(nn.Linear(24, 64), ACTS[act](), nn.Linear(64, 24)).eval()
    m = LCFusedMLP.from_sequential(copy.deepcopy(seq), per_channel=True).eval()
    x = torch.randn(16, 24)
    with torch.no_grad():
        assert len(_ops(m, x)) == len(_ops(seq, x))
        assert torch.equal(m(x), seq(x))


def test_alpha_written_behind_autograds_back_is_seen():
    """alpha = 0 is read from memory every call: ``.data`` writes skip the version counter."""
    seq, m = _pair("gelu")
    x = torch.randn(8, 24)
    with torch.no_grad():
        assert torch.equal(m(x), seq(x))
        version = m.act.alpha._version
        m.act.alpha.data.fill_(0.4)
        assert m.act.alpha._version == version  # the case a version-keyed cache would miss
        z = seq[0](x)
        want = seq[2](0.4 * z + 0.6 * F.gelu(z))
        assert rel_err(m(x), want) <= 1e-6
        m.act.alpha.data.zero_()
        assert torch.equal(m(x), seq(x))


def test_alpha_is_zero_reads_the_current_memory():
    is_zero = fused_linear_op.alpha_is_zero
    a = nn.Parameter(torch.zeros(64))
    assert is_zero(a)
    with torch.no_grad():
        a[63] = 1e-30  # one channel off zero
    assert not is_zero(a)
    a.data = torch.zeros(64)  # new storage, version counter untouched
    assert is_zero(a)
    assert is_zero(torch.zeros(3, dtype=torch.bfloat16)) and not is_zero(torch.ones(3, dtype=torch.bfloat16))
    assert not is_zero(torch.zeros(8)[::2])  # not contiguous: the general formula runs
    assert not is_zero(torch.tensor([-0.0]))  # -0.0 too (still correct, one pass more)
    assert not is_zero(torch.tensor([float("nan")]))


def test_partial_accumulates_fc2_onto_the_skip():
    """PARTIAL: skip GEMM writes the output, fc2's GEMM adds into it (addmm_), no separate add."""
    m = _partial()
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        ops = _ops(m, x)
        z = m.fc1(x)
        a = m.act.alpha
        want = m.skip(x) + m.fc2(a * z + (1 - a) * F.gelu(z))
        assert rel_err(m(x), want) <= 1e-6
    assert "aten.addmm_.default" in ops
    assert not [op for op in ops if op.startswith("aten.add.")], ops


# ---------------------------------------------------------------- one checked entry per call

def test_module_forward_skips_the_operand_checks(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("operand checks ran inside a module call")

    monkeypatch.setattr(fused_linear_op, "check_operands", refuse)
    monkeypatch.setattr(fused_mlp_op, "check_operands", refuse)
    x = torch.randn(3, 24)
    for m in (_pair("gelu")[1], _partial(), FORMS["chain"]()):
        m(x).sum().backward()  # autograd path
        with torch.no_grad():
            m(x)
    with pytest.raises(AssertionError, match="operand checks ran"):
        lc.ops.fused_linear(x, torch.randn(8, 24))  # the public op still checks


def test_module_checks_input_dtype_and_width():
    m = LCFusedMLP(24, 64)
    with pytest.raises(TypeError, match=r"holds torch.float32 weights but x is torch.float64"):
        m(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expects input with last dim 24"):
        m(torch.randn(3, 25))
    with pytest.raises(TypeError, match=r"fc2.weight is torch.float64"):
        LCFusedMLP.from_modules(nn.Linear(4, 8), "gelu", nn.Linear(8, 4).double())


def test_env_flags_parsed_once_and_changes_noticed(monkeypatch):
    first = _config.flags()
    assert _config.flags() is first  # cached: nothing parsed while the environment is unchanged
    monkeypatch.setenv("LC_KERNELS_DISABLE_TRITON", "1")
    assert _config.flags().disable_triton and _config.disable_triton()
    monkeypatch.delenv("LC_KERNELS_DISABLE_TRITON")
    assert not _config.flags().disable_triton


# ---------------------------------------------------------------- CUDA: plain GEMMs on cuBLAS

def _fake_cuda(module: nn.Module) -> nn.Module:
    """``module`` with every parameter replaced by a fake CUDA tensor; call inside FakeTensorMode."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.empty(p.shape, dtype=p.dtype, device="cuda")
    return module


def test_plain_gemms_on_cuda_go_to_f_linear_not_triton(monkeypatch):
    """Fake CUDA tensors run the real dispatch code; the launchers and F.linear are spied on."""
    calls = Counter()
    real_linear = F.linear

    def spy_linear(*args, **kwargs):
        calls["F.linear"] += 1
        return real_linear(*args, **kwargs)

    def spy_launch(name):
        def launch(*args):
            calls[name] += 1
            return args[-1]  # the output buffer, unwritten (fake tensors have no data)

        return launch

    monkeypatch.setattr(F, "linear", spy_linear)
    monkeypatch.setattr(fused_linear_op, "launch_fused_linear", spy_launch("triton fused_linear"))
    monkeypatch.setattr(fused_mlp_op, "launch_fused_mlp", spy_launch("triton fused_mlp"))
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)  # an H100's SMs, without asking CUDA

    d, h, tokens = 768, 3072, 4096  # a ViT-B MLP: prefer_fused_mlp picks two GEMMs here
    merged = LCFusedMLP(d, h)
    merged.fc = nn.Linear(d, d)
    merged.form = "merged"
    factored = LCFusedMLP(d, h, act="identity")
    factored.form = "factored"
    partial = _partial(d, h // 2)
    keep = LCFusedMLP(d, h, act="gelu", alpha_init=0.3)

    def run(m: nn.Module | None, *op_args) -> Counter:
        with FakeTensorMode():  # tensors made here are fake: device "cuda", no data, no GPU
            x = torch.empty(tokens, d, device="cuda")
            assert x.is_cuda and dispatch.kernel_path(x) == dispatch.TRITON
            if m is None:
                args = [torch.empty(t.shape, device="cuda") if isinstance(t, torch.Tensor) else t
                        for t in (torch.empty(d, d), *op_args)]
                calls.clear()
                out = lc.ops.fused_linear(x, *args)
            else:
                m = _fake_cuda(m)
                calls.clear()
                out = m(x)
            assert out.shape == (tokens, d) and out.is_cuda
        return Counter(calls)

    assert run(merged) == {"F.linear": 1}
    assert run(factored) == {"F.linear": 2}  # both GEMMs of the low-rank pair
    assert run(partial) == {"triton fused_linear": 1, "F.linear": 1}  # fc1 + gelu fused; skip on cuBLAS
    assert run(keep) == {"triton fused_linear": 1, "F.linear": 1}  # fc2 has nothing to fuse
    assert run(None) == {"F.linear": 1}  # the public op: no bias, no activation
    assert run(None, torch.empty(d)) == {"F.linear": 1}
    assert run(None, torch.empty(d), torch.empty(1), "gelu") == {"triton fused_linear": 1}
