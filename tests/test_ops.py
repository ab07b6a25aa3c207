"""The registered ops on their default path: CPU eager, autograd, opcheck, torch.compile, errors."""
import pytest
import torch
from conftest import rel_err

from lc_kernels.ops import dispatch, fused_linear, fused_mlp, prefer_fused_mlp, reference

DTYPES = [
    pytest.param(torch.float64, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]
ALPHAS = ["none", "scalar", "channel"]


@pytest.fixture(autouse=True)
def _default_path(monkeypatch):
    monkeypatch.delenv("LC_KERNELS_FORCE_TRITON", raising=False)


def _alpha(kind: str, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    if kind == "none":
        return None
    return (torch.rand(1 if kind == "scalar" else n, dtype=dtype) * 2 - 0.5)


def _mlp_operands(k: int, h: int, n: int, alpha_kind: str, dtype: torch.dtype, bias: bool = True):
    w1, w2 = torch.randn(h, k) / k**0.5, torch.randn(n, h) / h**0.5
    b1, b2 = (torch.randn(h), torch.randn(n)) if bias else (None, None)
    cast = [None if t is None else t.to(dtype) for t in (w1, b1, w2, b2)]
    return cast[0], cast[1], _alpha(alpha_kind, h), cast[2], cast[3]


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_cpu_path_matches_float64_reference(dtype, rtol, act, alpha_kind):
    w1, b1, a, w2, b2 = _mlp_operands(24, 40, 9, alpha_kind, dtype)
    x = torch.randn(3, 5, 24).to(dtype)
    y = fused_linear(x, w1, b1, a, act)
    assert y.shape == (3, 5, 40) and y.dtype == dtype
    assert rel_err(y, reference.fused_linear(x.double(), w1.double(), b1.double(), _f64(a), act)) <= rtol
    y = fused_mlp(x, w1, b1, a, act, w2, b2)
    assert y.shape == (3, 5, 9) and y.dtype == dtype
    ref = reference.fused_mlp(x.double(), w1.double(), b1.double(), _f64(a), act, w2.double(), b2.double())
    assert rel_err(y, ref) <= rtol


@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_inplace_epilogue_blocks_match_formula(monkeypatch, act, alpha_kind):
    """Several row blocks with a partial last one give the out-of-place formula's values."""
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 40)  # 13 rows of 7: blocks of 5, 5, 3 rows
    z = torch.randn(13, 7, dtype=torch.float64)
    a = _alpha(alpha_kind, 7, torch.float64)
    want = reference.collapsible_activation(z, act, a)
    got = reference.collapsible_activation_(z.clone(), act, a)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_edge_shapes():
    w1, b1, a, w2, b2 = _mlp_operands(6, 8, 3, "channel", torch.float32)
    assert fused_linear(torch.randn(0, 6), w1, b1, a, "gelu").shape == (0, 8)
    assert fused_mlp(torch.randn(4, 0, 6), w1, b1, a, "gelu", w2, b2).shape == (4, 0, 3)
    x = torch.randn(6)
    assert rel_err(fused_mlp(x, w1, b1, a, "silu", w2, b2), reference.fused_mlp(x, w1, b1, a, "silu", w2, b2)) <= 1e-6


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_backward_matches_autograd_of_reference(act, alpha_kind, bias):
    """Both ops' registered backward, random upstream gradient, float64."""
    w1, b1, a, w2, b2 = _mlp_operands(11, 13, 5, alpha_kind, torch.float64, bias)
    a = _f64(a)
    x = torch.randn(2, 7, 11, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x, w1, b1, a, w2, b2) if t is not None]

    def grads(fn, out_dim):
        y = fn()
        return torch.autograd.grad(y, leaves, torch.randn(2, 7, out_dim, dtype=torch.float64), allow_unused=True)

    for ours, ref, out_dim in [
        (lambda: fused_linear(x, w1, b1, a, act), lambda: reference.fused_linear(x, w1, b1, a, act), 13),
        (lambda: fused_mlp(x, w1, b1, a, act, w2, b2), lambda: reference.fused_mlp(x, w1, b1, a, act, w2, b2), 5),
    ]:
        state = torch.random.get_rng_state()
        got = grads(ours, out_dim)
        torch.random.set_rng_state(state)
        want = grads(ref, out_dim)
        for g, r in zip(got, want):
            if r is None or (act == "identity" and r.abs().max() == 0):
                assert g is None or g.abs().max() == 0  # alpha has no effect on identity
            else:
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_backward_skips_frozen_weights():
    """Only x and alpha train (frozen model, learned slopes): grads exist for exactly those."""
    w1, b1, a, w2, b2 = _mlp_operands(8, 12, 4, "channel", torch.float32)
    x = torch.randn(5, 8, requires_grad=True)
    a.requires_grad_()
    g = torch.randn(5, 4)
    got = torch.autograd.grad(fused_mlp(x, w1, b1, a, "gelu", w2, b2), (x, a), g)
    want = torch.autograd.grad(reference.fused_mlp(x, w1, b1, a, "gelu", w2, b2), (x, a), g)
    for gg, gw in zip(got, want):
        assert rel_err(gg, gw) <= 1e-5


def _op_samples():
    for alpha_kind, act, bias in [("none", "identity", False), ("scalar", "gelu", True), ("channel", "relu", True)]:
        w1, b1, a, w2, b2 = _mlp_operands(6, 10, 3, alpha_kind, torch.float32, bias)
        x = torch.randn(4, 6, requires_grad=True)
        params = [t.requires_grad_() if t is not None else None for t in (w1, b1, a, w2, b2)]
        yield x, *params, act


@pytest.mark.slow
def test_opcheck_both_ops():
    for x, w1, b1, a, w2, b2, act in _op_samples():
        torch.library.opcheck(torch.ops.lc_kernels.fused_linear.default, (x, w1, b1, a, act))
        torch.library.opcheck(torch.ops.lc_kernels.fused_mlp.default, (x, w1, b1, a, act, w2, b2))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_and_inlines_the_cpu_path():
    from torch._inductor.utils import run_and_get_code

    w1, b1, a, w2, b2 = _mlp_operands(16, 24, 6, "channel", torch.float32)
    params = [t.requires_grad_() for t in (w1, b1, a, w2, b2)]

    def f(x):
        return fused_mlp(x, w1, b1, a, "gelu", w2, b2) + fused_linear(x, w2 @ w1, None, a[:1], "silu")

    compiled = torch.compile(f, fullgraph=True, dynamic=True)  # one graph serves both batch sizes
    x = torch.randn(8, 16, requires_grad=True)
    _, codes = run_and_get_code(compiled, x)
    # Off CUDA the ops decompose into the reference's aten ops, which Inductor fuses into its
    # own loops instead of calling the opaque op.
    assert codes and not any("lc_kernels" in code for code in codes)
    for m in (8, 5):
        x = torch.randn(m, 16, requires_grad=True)
        g = torch.randn(m, 6)
        y, want = compiled(x), f(x)
        assert rel_err(y, want) <= 1e-5
        for got, ref in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(want, [x, *params], g)):
            assert rel_err(got, ref) <= 1e-5


def _bad_calls():
    w, b, x = torch.randn(8, 6), torch.randn(8), torch.randn(4, 6)
    w2 = torch.randn(3, 8)
    return [
        (lambda: fused_linear(x.long(), w), TypeError, r"x must be floating point .* got torch.int64"),
        (lambda: fused_linear(x.double(), w), TypeError, r"weight is torch.float32 but x is torch.float64"),
        (lambda: fused_linear(x, w, b.half()), TypeError, r"bias is torch.float16"),
        (lambda: fused_linear(x.to("meta"), w), ValueError, r"x is on meta but weight is on cpu"),
        (lambda: fused_linear(torch.randn(4, 7), w), ValueError, r"weight \(8, 6\) needs x's last dim = 6, got 7"),
        (lambda: fused_linear(x, w, torch.randn(7)), ValueError, r"bias has 7 elements .* shape \(8,\)"),
        (lambda: fused_linear(x, w, b, torch.rand(3), "gelu"), ValueError, r"alpha must hold 1 .* or 8 .* got shape \(3,\)"),
        (lambda: fused_linear(x, w, b, torch.rand(1, 8), "gelu"), ValueError, r"alpha must be 1-D"),
        (lambda: fused_linear(x, w, act="tanh"), ValueError, r"unknown activation 'tanh'"),
        (lambda: fused_linear(x, w.numpy()), TypeError, r"weight must be a torch.Tensor, got ndarray"),
        (lambda: fused_mlp(x, w, b, None, "gelu", torch.randn(3, 5), None), ValueError, r"w2 \(3, 5\) needs w1's output dim = 5, got 8"),
        (lambda: fused_mlp(x, w, b, None, "gelu", w2, torch.randn(4)), ValueError, r"b2 has 4 elements"),
        (lambda: fused_mlp(x, w, b, torch.rand(3), "relu", w2, None), ValueError, r"fused_mlp: alpha must hold 1"),
    ]


@pytest.mark.parametrize("call, exc, match", _bad_calls())
def test_errors_say_what_arrived_and_what_to_do(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_force_triton_needs_interpreter_and_float32(monkeypatch):
    x, w = torch.randn(4, 6), torch.randn(8, 6)
    monkeypatch.setenv("LC_KERNELS_FORCE_TRITON", "1")
    with pytest.raises(TypeError, match="float64 runs on the PyTorch path only"):
        fused_linear(x.double(), w.double())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="export TRITON_INTERPRET=1"):
        fused_linear(x, w)


def test_prefer_fused_mlp_rule(monkeypatch):
    assert prefer_fused_mlp(4096, 768, 3072, 768, torch.device("cpu"))
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)  # H100 SXM
    cuda = torch.device("cuda")
    assert prefer_fused_mlp(4096, 768, 64, 768, cuda)  # rank-64 FACTOR pair: hidden traffic dominates
    assert prefer_fused_mlp(4096, 768, 3072, 10, cuda)  # narrow classifier output: one column tile
    assert not prefer_fused_mlp(4096, 768, 3072, 768, cuda)  # KEEP MLP: 6x recomputed first GEMM
    assert not prefer_fused_mlp(512, 768, 3072, 768, cuda)  # same at 512 tokens
    assert prefer_fused_mlp(16, 768, 64, 768, cuda)  # launch-bound: one kernel instead of two
