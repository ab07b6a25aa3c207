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


# ---------------------------------------------------------------- LCGatedMLP: the same checks

from lc_kernels.nn.gated import LCGatedMLP  # noqa: E402
from lc_kernels.ops import fused_gated_linear_op, reference  # noqa: E402


class _LlamaLikeMLP(nn.Module):
    """What LCGatedMLP replaces: transformers' LlamaMLP forward, ``down(silu(gate x) * up x)``."""

    def __init__(self, d: int = 24, h: int = 40):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _gated(kind: str, d: int = 24, h: int = 40, k: int = 16) -> LCGatedMLP:
    """An LCGatedMLP of each form with random weights (``alpha`` 0 unless the kind says)."""
    if kind == "gated":
        src = _LlamaLikeMLP(d, h)
        return LCGatedMLP.from_modules(src.gate_proj, src.up_proj, src.down_proj, "silu").eval()
    if kind in ("packed", "packed_alpha"):
        m = LCGatedMLP(d, h, packed=True, bias=True, alpha_init=0.3 if kind == "packed_alpha" else 0.0)
        return m.eval()
    form = "linear" if kind == "linear" else "partial"
    spec = dict(form=form, in_features=d, hidden_features=h, out_features=d, kept=0 if form == "linear" else k,
                rank=8 if kind == "partial_lowrank" else None, act=None if form == "linear" else "silu",
                num_alphas=0 if form == "linear" else 1, packed=True, bias=kind == "linear")
    m = LCGatedMLP.empty(spec)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        if form == "partial":
            m.act.alpha.fill_(0.25 if kind == "partial_alpha" else 0.0)
    return m.eval()


def _gated_ref(m: LCGatedMLP, x: torch.Tensor) -> torch.Tensor:
    """The block in float64 through ops/reference.py, whatever its form."""
    x = x.double()
    mods = {n: {k: (None if v is None else v.double()) for k, v in mod._parameters.items()}
            for n, mod in m.named_children()}
    y = 0
    if m.form != "linear":
        if "gate_up_proj" in mods:
            gu = mods["gate_up_proj"]
            w, b = gu["weight"], gu["bias"]
        else:
            w = torch.cat([mods["gate_proj"]["weight"], mods["up_proj"]["weight"]])
            b = None
        h = reference.fused_gated_linear(x, w, b, m.act.base, mods["act"]["alpha"])
        y = F.linear(h, mods["down_proj"]["weight"], mods["down_proj"]["bias"])
    if m.form != "gated":
        s = x if "skip_in" not in mods else F.linear(x, mods["skip_in"]["weight"])
        y = y + F.linear(s, mods["skip"]["weight"], mods["skip"]["bias"])
    return y


GATED_KINDS = ["gated", "packed", "packed_alpha", "partial", "partial_alpha", "partial_lowrank", "linear"]


@pytest.mark.parametrize("shape", [(16, 24), (2, 3, 24), (1, 24)], ids=["2d", "3d", "one_token"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gated_aten_calls_at_alpha_zero_match_llama_mlp(shape, mode):
    """Uncollapsed at alpha = 0: LlamaMLP's calls (3 linear, silu, mul), the activation and the
    product in place, no lerp; the packed layout one GEMM fewer, its gate half sliced."""
    src = _LlamaLikeMLP()
    m = LCGatedMLP.from_modules(*copy.deepcopy([src.gate_proj, src.up_proj, src.down_proj]), "silu").eval()
    x = torch.randn(*shape)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        ref_ops, lc_ops = _ops(src, x), _ops(m, x)
        assert len(lc_ops) == len(ref_ops), (ref_ops, lc_ops)
        in_place = {"aten.silu_.default": "aten.silu.default", "aten.mul_.Tensor": "aten.mul.Tensor"}
        assert Counter(in_place.get(op, op) for op in lc_ops) == Counter(ref_ops), (ref_ops, lc_ops)
        assert set(in_place) <= set(lc_ops)
        assert torch.equal(m(x), src(x))
        packed = LCGatedMLP(24, 40, packed=True).eval()  # Llama's widths, no bias
        ops = Counter(_ops(packed, x))
        gemms = {"aten.linear.default", "aten.t.default", "aten.mm.default", "aten.view.default",
                 "aten._unsafe_view.default"}  # F.linear, decomposed under no_grad
        assert set(ops) <= gemms | {"aten.slice.Tensor", *in_place}, ops
        assert ops["aten.slice.Tensor"] == 2 and all(ops[op] == 1 for op in in_place), ops
        assert rel_err(packed(x), _gated_ref(packed, x)) <= 1e-5


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("alpha_kind", ["none", "zero", "scalar", "channel"])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("rows", [1, 63, 1100], ids=["m1", "m63", "two_blocks"])
def test_gated_product_in_place_matches_reference(act, alpha_kind, dtype, rtol, rows):
    """No-grad CPU path of the gated op: the product lives in the GEMM's (M, 2H) buffer at alpha
    None or 0 (no (M, H) allocation), and every path matches the float64 reference; the
    registered op gives the same values in a fresh contiguous output."""
    h, k = (1024, 8) if rows == 1100 else (48, 40)  # 1100 x 2048: past activate_'s 2^21 block
    x = torch.randn(rows, 1, k).to(dtype)
    w, b = (torch.randn(2 * h, k) / k**0.5).to(dtype), torch.randn(2 * h).to(dtype)
    alpha = {"none": None, "zero": torch.zeros(1), "scalar": torch.rand(1) * 2 - 0.5,
             "channel": torch.rand(h) * 2 - 0.5}[alpha_kind]
    alpha = None if alpha is None else alpha.to(dtype)
    with torch.no_grad():
        out = fused_gated_linear_op.gated_linear_act(x, w, b, act, alpha)
        op_out = torch.ops.lc_kernels.fused_gated_linear(x.reshape(rows, k), w, b, act, alpha)
    ref = reference.fused_gated_linear(x.double(), w.double(), b.double(), act,
                                       None if alpha is None else alpha.double())
    assert out.shape == (rows, 1, h) and out.dtype == dtype
    assert rel_err(out, ref) <= rtol
    assert op_out.is_contiguous() and torch.equal(op_out, out.reshape(rows, h))
    if alpha_kind in ("none", "zero"):
        assert out.untyped_storage().nbytes() == rows * 2 * h * out.element_size()  # the GEMM's buffer


@pytest.mark.parametrize("kind", GATED_KINDS)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "frozen"])
def test_gated_inference_builds_no_graph_and_matches_the_training_path(kind, mode):
    m = _gated(kind)
    x = torch.randn(2, 5, 24)
    ref = m(x)  # grad enabled, parameters require grad: the autograd path
    assert ref.grad_fn is not None
    assert rel_err(ref, _gated_ref(m, x)) <= 1e-5
    if mode == "frozen":
        m.requires_grad_(False)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "frozen": torch.enable_grad}[mode]
    packs = []
    with ctx(), torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        with OpLog() as log:
            out = m(x)
    assert out.grad_fn is None and packs == []
    assert not [op for op in log.ops if op.startswith("lc_kernels.")], "the autograd-wrapped op ran"
    assert not [op for op in log.ops if "lerp" in op] or kind.endswith("alpha")
    if kind in ("gated", "packed", "linear"):
        assert torch.equal(out, ref.detach())  # the same arithmetic with and without grad
    else:  # PARTIAL: addmm_ in place without grad, y + F.linear under autograd: rounding apart
        assert rel_err(out, ref.detach()) <= 1e-6


def _partial_mlp(d: int = 24, h: int = 32) -> LCFusedMLP:
    m = _partial(d, h)
    with torch.no_grad():
        m.act.alpha.zero_()
    return m


@pytest.mark.parametrize("kind", ["mlp", "mlp_shared", "gated", "gated_shared", "gated_lowrank", "gated_alpha_shared"])
def test_partial_accumulates_in_place_on_every_inference_form(kind, monkeypatch):
    """Both PARTIAL forms (separate GEMMs; one GEMM over [W1; S]) of both modules: the second GEMM
    accumulates onto the skip's output in place (addmm_), no out-of-place addmm, no add."""
    form = dispatch.SHARED if kind.endswith("shared") else dispatch.SEPARATE
    monkeypatch.setattr(dispatch, "partial_form", lambda *args, **kwargs: form)
    if kind.startswith("mlp"):
        m = _partial_mlp()
    else:
        m = _gated({"gated": "partial", "gated_shared": "partial", "gated_lowrank": "partial_lowrank",
                    "gated_alpha_shared": "partial_alpha"}[kind])
    x = torch.randn(3, 7, 24)
    with torch.inference_mode():  # F.linear stays one call (no_grad decomposes it into addmm)
        ops = _ops(m, x)
        out = m(x)
        if kind.startswith("mlp"):
            want = m.skip(x) + m.fc2(F.gelu(m.fc1(x)))
        else:
            want = _gated_ref(m, x)
    assert rel_err(out, want) <= 1e-5
    assert ops.count("aten.addmm_.default") == 1, ops
    assert not [op for op in ops if op.startswith(("aten.add.", "aten.addmm.default"))], ops
    assert (ops.count("aten.linear.default") == 1) == (form == dispatch.SHARED and "lowrank" not in kind), ops


def test_gated_forward_checks_once(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("operand checks ran inside a module call")

    monkeypatch.setattr(fused_gated_linear_op, "check_gated_operands", refuse)
    x = torch.randn(3, 24)
    for kind in GATED_KINDS:
        m = _gated(kind)
        m(x).sum().backward()  # autograd path
        with torch.no_grad():
            m(x)
    with pytest.raises(AssertionError, match="operand checks ran"):
        lc.ops.fused_gated_linear(x, torch.randn(8, 24))  # the public op still checks
    m = _gated("packed")
    with pytest.raises(TypeError, match=r"LCGatedMLP holds torch.float32 weights but x is torch.float64"):
        m(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"LCGatedMLP expects input with last dim 24"):
        m(torch.randn(3, 25))


def test_gated_forms_on_cuda_call_the_gated_kernel_and_cublas(monkeypatch):
    """Fake CUDA tensors through LCGatedMLP's real dispatch: the packed gate/up GEMM on the Triton
    gated kernel, every other GEMM on F.linear (cuBLAS), PARTIAL's down_proj accumulated (addmm_)."""
    calls = Counter()
    real_linear = F.linear

    def spy_linear(*args, **kwargs):
        calls["F.linear"] += 1
        return real_linear(*args, **kwargs)

    def spy_launch(*args):
        calls["triton fused_gated_linear"] += 1
        return args[-1]

    monkeypatch.setattr(F, "linear", spy_linear)
    monkeypatch.setattr(fused_gated_linear_op, "launch_fused_gated_linear", spy_launch)

    def run(kind: str) -> Counter:
        m = _gated(kind, d=64, h=96, k=32)
        with FakeTensorMode(), torch.inference_mode():
            m = _fake_cuda(m)
            x = torch.empty(3, 5, 64, device="cuda")
            calls.clear()
            with OpLog() as log:
                out = m(x)
            assert out.shape == (3, 5, 64) and out.is_cuda
        return Counter(calls), log.ops

    assert run("gated")[0] == {"F.linear": 3}
    assert run("packed")[0] == {"triton fused_gated_linear": 1, "F.linear": 1}
    got, ops = run("partial")
    assert got == {"triton fused_gated_linear": 1, "F.linear": 1} and "aten.addmm_.default" in ops
    assert run("partial_lowrank")[0] == {"triton fused_gated_linear": 1, "F.linear": 2}
    assert run("linear")[0] == {"F.linear": 1}


def test_gated_from_modules_checks_the_weights_once():
    with pytest.raises(TypeError, match=r"down_proj is torch.float64 on cpu but the gate is torch.float32"):
        LCGatedMLP.from_modules(nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4).double())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gated", "packed_alpha", "partial", "partial_lowrank"])
def test_gated_compile_fullgraph_matches_eager(kind):
    """The module's forward (hook checks, dict reads, the unchecked op entry) traces in one graph,
    forward and backward, and inference under the compiled graph matches too."""
    m = _gated(kind)
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True)  # a graph break raises
    x = torch.randn(2, 5, 24, requires_grad=True)
    g = torch.randn(2, 5, 24)
    y, want = compiled(x), m(x)
    assert rel_err(y, want) <= 1e-5
    got = torch.autograd.grad(y, [x, *compiled.parameters()], g)
    ref = torch.autograd.grad(want, [x, *m.parameters()], g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5
    with torch.no_grad():
        assert rel_err(compiled(x), _gated_ref(m, x)) <= 1e-5
