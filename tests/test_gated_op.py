"""``torch.ops.lc_kernels.fused_gated_linear``: the CPU path, the Triton kernel, autograd, opcheck,
torch.compile and errors, each against ``reference.fused_gated_linear`` in float64.

Kernel tests force the Triton path (``LC_KERNELS_FORCE_TRITON=1``; on CPU through Triton's
interpreter, which conftest turns on before Triton is imported; on CUDA natively) on tiny,
awkward shapes: the interpreter runs every program in numpy. They write into NaN-filled outputs
so a tile the kernel forgets to write fails the test.
"""
import pytest
import torch
from conftest import rel_err

from lc_kernels.ops import fused_gated_linear, launch_fused_gated_linear, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_DTYPES = [
    pytest.param(torch.float64, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]
KERNEL_DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]
ALPHAS = ["none", "scalar", "channel"]


@pytest.fixture(autouse=True)
def _default_path(monkeypatch):
    monkeypatch.delenv("LC_KERNELS_FORCE_TRITON", raising=False)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("LC_KERNELS_FORCE_TRITON", "1")


def _operands(m: int, d: int, h: int, dtype: torch.dtype, alpha_kind: str = "channel", bias: bool = True,
              device: str = "cpu"):
    """``x (m, d)``, ``w (2h, d)`` at nn.Linear's scale, ``b (2h,)``, alpha in (-0.5, 1.5) (fp32)."""
    x = torch.randn(m, d, device=device).to(dtype)
    w = (torch.randn(2 * h, d, device=device) / d**0.5).to(dtype)
    b = torch.randn(2 * h, device=device).to(dtype) if bias else None
    a = None if alpha_kind == "none" else torch.rand(1 if alpha_kind == "scalar" else h, device=device) * 2 - 0.5
    return x, w, b, a


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def _ref(x, w, b, act, a) -> torch.Tensor:
    return reference.fused_gated_linear(x.double(), w.double(), _f64(b), act, _f64(a))


def _check(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert not out.isnan().any(), "NaN in the output (unwritten tile or NaN arithmetic)"
    assert rel_err(out, ref) <= rtol


# ---------------------------------------------------------------------------------------------
# reference


def test_reference_is_the_gated_formula():
    x, w, b, a = _operands(4, 6, 5, torch.float64)
    g, u = x @ w[:5].t() + b[:5], x @ w[5:].t() + b[5:]
    want = (a * g + (1 - a) * torch.nn.functional.silu(g)) * u
    torch.testing.assert_close(reference.fused_gated_linear(x, w, b, "silu", a), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(reference.fused_gated_linear(x, w), torch.nn.functional.silu(g - b[:5]) * (u - b[5:]))


# ---------------------------------------------------------------------------------------------
# CPU path


@pytest.mark.parametrize("h", [1, 17, 70])
@pytest.mark.parametrize("d", [1, 33])
@pytest.mark.parametrize("m", [1, 63, 257])
@pytest.mark.parametrize("dtype, rtol", CPU_DTYPES)
def test_cpu_awkward_shapes(dtype, rtol, m, d, h):
    if dtype == torch.bfloat16 and h == 1:
        # One channel: every element shares its gate and up weights, so a draw that puts the
        # channel near a zero of act_alpha(g) or of u leaves no well-conditioned element to
        # average over (300 seeds at (1, 33, 1): median 3e-3, p99 5e-2, from bf16 rounding of
        # z alone). DESIGN's norm-wise 1e-2 needs channels; fp32/fp64 cover h = 1.
        pytest.skip("bf16 at h = 1 is ill-conditioned for a norm-wise relative error")
    x, w, b, a = _operands(m, d, h, dtype)
    y = fused_gated_linear(x, w, b, "silu", a)
    assert y.shape == (m, h) and y.dtype == dtype and y.is_contiguous()
    _check(y, _ref(x, w, b, "silu", a), rtol)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
@pytest.mark.parametrize("dtype, rtol", CPU_DTYPES)
def test_cpu_activations_alphas_bias(dtype, rtol, act, alpha_kind, bias):
    x, w, b, a = _operands(63, 33, 17, dtype, alpha_kind, bias)
    _check(fused_gated_linear(x, w, b, act, a), _ref(x, w, b, act, a), rtol)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_cpu_in_place_epilogue_blocks(monkeypatch, act):
    """Several row blocks of the in-place epilogue on the strided gate half (13 rows of 7: blocks
    of 5, 5, 3 rows)."""
    monkeypatch.setattr(reference, "_BLOCK_ELEMS", 40)
    x, w, b, a = _operands(13, 9, 7, torch.float64)
    _check(fused_gated_linear(x, w, b, act, a), _ref(x, w, b, act, a), 1e-12)


@pytest.mark.parametrize("dtype, rtol", CPU_DTYPES)
def test_cpu_non_contiguous_and_leading_dims(dtype, rtol):
    d, h = 33, 17
    _, w, b, a = _operands(1, d, h, dtype)
    x = torch.randn(d, 2, 31).to(dtype).permute(1, 2, 0)  # (2, 31, d), last-dim stride 62
    assert not x.is_contiguous()
    y = fused_gated_linear(x, w[:, :], b, "gelu_tanh", a)
    assert y.shape == (2, 31, h)
    _check(y, _ref(x, w, b, "gelu_tanh", a), rtol)
    x = torch.randn(40, 2 * d).to(dtype)[::3, ::2]  # strided rows and columns
    w_t = w.t().contiguous().t()  # column-major weight
    _check(fused_gated_linear(x, w_t, None, "relu", a[:1]), _ref(x, w_t, None, "relu", a[:1]), rtol)
    x = torch.randn(d).to(dtype)  # 1-D input: one row
    assert fused_gated_linear(x, w, b).shape == (h,)


def test_edge_shapes():
    x, w, b, a = _operands(4, 6, 5, torch.float32)
    assert fused_gated_linear(x[:0], w, b, "gelu", a).shape == (0, 5)
    assert fused_gated_linear(x.expand(3, 4, 6)[:, :0], w, b).shape == (3, 0, 5)
    assert fused_gated_linear(x, w[:0], b[:0]).shape == (4, 0)


def test_registered_op_defaults_to_silu_without_bias():
    x, w, _, _ = _operands(5, 8, 6, torch.float32)
    _check(torch.ops.lc_kernels.fused_gated_linear(x, w), _ref(x, w, None, "silu", None), 1e-5)


def test_inference_mode():
    x, w, b, a = _operands(9, 12, 10, torch.float32)
    w.requires_grad_()
    with torch.inference_mode():
        y = fused_gated_linear(x, w, b, "gelu", a)
    assert y.is_inference() and not y.requires_grad
    _check(y, _ref(x, w.detach(), b, "gelu", a), 1e-5)


def test_no_graph_without_grad():
    """No input requires grad (or grad mode is off): no autograd node, nothing saved."""
    x, w, b, a = _operands(3, 4, 5, torch.float32)
    assert fused_gated_linear(x, w, b, "silu", a).grad_fn is None
    w.requires_grad_()
    assert fused_gated_linear(x, w, b, "silu", a).grad_fn is not None
    with torch.no_grad():
        assert fused_gated_linear(x, w, b, "silu", a).grad_fn is None


# ---------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_backward_matches_autograd_of_reference(act, alpha_kind, bias):
    """Registered backward, random upstream gradient, float64: grads for x, w, b and alpha."""
    x, w, b, a = _operands(14, 11, 13, torch.float64, alpha_kind, bias)
    x = x.reshape(2, 7, 11)
    leaves = [t.double().requires_grad_() for t in (x, w, b, a) if t is not None]
    args = iter(leaves)
    x, w = next(args), next(args)
    b = next(args) if bias else None
    a = next(args) if alpha_kind != "none" else None
    g = torch.randn(2, 7, 13, dtype=torch.float64)
    got = torch.autograd.grad(fused_gated_linear(x, w, b, act, a), leaves, g, allow_unused=True)
    want = torch.autograd.grad(reference.fused_gated_linear(x, w, b, act, a), leaves, g, allow_unused=True)
    for gg, gw in zip(got, want):
        if gw is None:  # alpha with identity: the reference never reads it
            assert gg is None or gg.abs().max() == 0
        else:
            torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-10)


def test_backward_only_requested_grads():
    """Frozen weights, trained slopes: grads for x and alpha only, and they match."""
    x, w, b, a = _operands(6, 8, 5, torch.float32)
    x.requires_grad_()
    a.requires_grad_()
    g = torch.randn(6, 5)
    got = torch.autograd.grad(fused_gated_linear(x, w, b, "gelu", a), (x, a), g)
    want = torch.autograd.grad(reference.fused_gated_linear(x, w, b, "gelu", a), (x, a), g)
    for gg, gw in zip(got, want):
        assert rel_err(gg, gw) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Triton kernel (interpreter on CPU)


def _nan(m: int, h: int, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    out = torch.full((h, m) if transposed else (m, h), float("nan"), dtype=dtype, device=DEVICE)
    return out.t() if transposed else out


@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_kernel_epilogues(forced, act, alpha_kind):
    # 19 rows, 17 gate channels and K = 21: two 16-wide tiles on every axis, the last partial.
    m, d, h = 19, 21, 17
    x, w, b, a = _operands(m, d, h, torch.float32, alpha_kind, device=DEVICE)
    out = launch_fused_gated_linear(x, w, b, act, a, _nan(m, h, torch.float32))
    _check(out, _ref(x, w, b, act, a), 1e-5)


@pytest.mark.parametrize("m, d, h", [(1, 1, 1), (3, 33, 17), (18, 5, 1)])
@pytest.mark.parametrize("dtype, rtol", KERNEL_DTYPES)
def test_kernel_strided_dtypes(forced, dtype, rtol, m, d, h):
    """Transposed x, column-sliced w, strided bias and alpha, transposed output: no copies."""
    x = torch.randn(d, m, device=DEVICE).to(dtype).t()
    w = (torch.randn(2 * h, 2 * d, device=DEVICE) / d**0.5).to(dtype)[:, ::2]
    b = torch.randn(4 * h, device=DEVICE).to(dtype)[::2]
    a = (torch.rand(2 * h, device=DEVICE) * 2 - 0.5)[::2]
    out = launch_fused_gated_linear(x, w, b, "gelu", a, _nan(m, h, dtype, transposed=True))
    _check(out, _ref(x, w, b, "gelu", a), rtol)


def test_kernel_without_bias_scalar_alpha(forced):
    x, w, _, a = _operands(5, 20, 9, torch.float32, "scalar", device=DEVICE)
    out = launch_fused_gated_linear(x, w, None, "silu", a, _nan(5, 9, torch.float32))
    _check(out, _ref(x, w, None, "silu", a), 1e-5)


def test_op_runs_the_kernel_on_forced_path(forced, monkeypatch):
    """The public entry point reaches the kernel (leading dims, M = 0) and its backward works."""
    from lc_kernels.ops import fused_gated_linear_op as mod

    launched = []
    real = mod.launch_fused_gated_linear
    monkeypatch.setattr(mod, "launch_fused_gated_linear", lambda *args: launched.append(1) or real(*args))
    x, w, b, a = _operands(6, 10, 7, torch.float32, device=DEVICE)
    x = x.reshape(2, 3, 10)
    leaves = [t.requires_grad_() for t in (x, w, b, a)]
    y = fused_gated_linear(x, w, b, "relu", a)
    assert launched and y.shape == (2, 3, 7)
    _check(y, _ref(x.detach(), w.detach(), b.detach(), "relu", a.detach()), 1e-5)
    g = torch.randn(2, 3, 7, device=DEVICE)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(reference.fused_gated_linear(x, w, b, "relu", a), leaves, g)
    for gg, gw in zip(got, want):
        assert rel_err(gg, gw) <= 1e-5
    assert fused_gated_linear(x[:, :0], w, b, "relu", a).shape == (2, 0, 7)


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile


@pytest.mark.slow
def test_opcheck():
    for alpha_kind, act, bias in [("none", "silu", False), ("scalar", "gelu", True), ("channel", "relu", True),
                                  ("channel", "identity", True)]:
        x, w, b, a = _operands(4, 6, 5, torch.float32, alpha_kind, bias)
        args = [t.requires_grad_() if t is not None else None for t in (x, w, b, a)]
        torch.library.opcheck(torch.ops.lc_kernels.fused_gated_linear.default, (args[0], args[1], args[2], act, args[3]))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    from torch._inductor.utils import run_and_get_code

    _, w, b, a = _operands(1, 16, 12, torch.float32)
    params = [t.requires_grad_() for t in (w, b, a)]
    w_down = torch.randn(16, 12) / 12**0.5

    def f(x):
        return fused_gated_linear(x, w, b, "silu", a) @ w_down.t() + x

    compiled = torch.compile(f, fullgraph=True, dynamic=True)  # fullgraph: a graph break raises
    _, codes = run_and_get_code(compiled, torch.randn(8, 16, requires_grad=True))
    # Off CUDA the op decomposes into the reference's aten ops, which Inductor fuses.
    assert codes and not any("lc_kernels" in code for code in codes)
    for m in (8, 5):
        x = torch.randn(m, 16, requires_grad=True)
        g = torch.randn(m, 16)
        y, want = compiled(x), f(x)
        assert rel_err(y, want) <= 1e-5
        for got, ref in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(want, [x, *params], g)):
            assert rel_err(got, ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton path under torch.compile needs CUDA")
def test_compile_fullgraph_on_cuda_matches_eager():
    """On CUDA the decomposed op is the Triton kernel through wrap_triton, inside one graph."""
    x, w, b, a = _operands(37, 64, 48, torch.float32, device="cuda")
    params = [t.requires_grad_() for t in (w, b, a)]

    def f(x):
        return fused_gated_linear(x, w, b, "gelu", a)

    compiled = torch.compile(f, fullgraph=True)
    x.requires_grad_()
    g = torch.randn(37, 48, device="cuda")
    y, want = compiled(x), f(x)
    assert rel_err(y, want) <= 1e-5
    for got, ref in zip(torch.autograd.grad(y, [x, *params], g), torch.autograd.grad(want, [x, *params], g)):
        assert rel_err(got, ref) <= 1e-5


# ---------------------------------------------------------------------------------------------
# errors


def _bad_calls():
    x, w, b = torch.randn(4, 6), torch.randn(10, 6), torch.randn(10)
    return [
        (lambda: fused_gated_linear(x, torch.randn(9, 6)), ValueError, r"even number 2H of rows, got shape \(9, 6\)"),
        (lambda: fused_gated_linear(x, w, b, "gelu", torch.rand(10)), ValueError,
         r"alpha must hold 1 \(shared\) or 5 .* got shape \(10,\); pass alpha of shape \(1,\) or \(5,\)"),
        (lambda: fused_gated_linear(x, w, b, torch.rand(5)), TypeError, r"act must be a str, .* got Tensor; .* pass alpha by keyword"),
        (lambda: fused_gated_linear(x, w, b, "swish"), ValueError, r"unknown activation 'swish'"),
        (lambda: fused_gated_linear(torch.randn(4, 7), w), ValueError, r"w \(10, 6\) needs x's last dim = 6, got 7"),
        (lambda: fused_gated_linear(x, w, torch.randn(5)), ValueError, r"b has 5 elements .* shape \(10,\)"),
        (lambda: fused_gated_linear(x.double(), w), TypeError, r"w is torch.float32 but x is torch.float64"),
        (lambda: fused_gated_linear(x.long(), w), TypeError, r"x must be floating point"),
        (lambda: fused_gated_linear(x, w.numpy()), TypeError, r"w must be a torch.Tensor, got ndarray"),
        (lambda: fused_gated_linear(x, w, b, "silu", torch.rand(1, 5)), ValueError, r"alpha must be 1-D"),
        (lambda: fused_gated_linear(x, w, b, "silu", torch.ones(5, dtype=torch.long)), TypeError,
         r"alpha must be floating point"),
        (lambda: torch.ops.lc_kernels.fused_gated_linear(x[None], w), ValueError, r"takes a 2-D x of shape \(M, K\)"),
    ]


@pytest.mark.parametrize("call, exc, match", _bad_calls())
def test_errors_say_what_arrived_and_what_to_do(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
