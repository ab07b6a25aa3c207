"""The Triton kernels against the float64 reference.

On CPU they run through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1`` before
Triton is imported; ``LC_KERNELS_FORCE_TRITON=1`` routes CPU tensors to the kernels), on CUDA
natively. Shapes are tiny and awkward (no multiple of the 16-wide interpreter tile) because the
interpreter runs every program in numpy. The launchers write into NaN-filled outputs so a
tile the kernel forgets to write fails the test.
"""
import pytest
import torch
from conftest import rel_err

from lc_kernels.ops import fused_linear, fused_mlp, reference
from lc_kernels.ops import launch_fused_linear, launch_fused_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-2, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
]
ALPHAS = ["none", "scalar", "channel"]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("LC_KERNELS_FORCE_TRITON", "1")


def _weight(n: int, k: int, dtype: torch.dtype, sliced: bool = False) -> torch.Tensor:
    """``(n, k)`` at nn.Linear's scale; ``sliced`` gives a column stride of 2 (a view)."""
    w = torch.randn(n, 2 * k if sliced else k, device=DEVICE) / k**0.5
    return (w[:, ::2] if sliced else w).to(dtype)


def _input(m: int, k: int, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """``(m, k)``; ``transposed`` gives the column-major view of a ``(k, m)`` tensor."""
    x = torch.randn(k, m, device=DEVICE).t() if transposed else torch.randn(m, k, device=DEVICE)
    return x.to(dtype)


def _alpha(kind: str, n: int) -> torch.Tensor | None:
    """Slopes in (-0.5, 1.5): both sides of the interpolation, per channel with stride 2."""
    if kind == "none":
        return None
    if kind == "scalar":
        return torch.rand(1, device=DEVICE) * 2 - 0.5
    return (torch.rand(2 * n, device=DEVICE) * 2 - 0.5)[::2]


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


def _nan(m: int, n: int, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    out = torch.full((n, m) if transposed else (m, n), float("nan"), dtype=dtype, device=DEVICE)
    return out.t() if transposed else out


def _check(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    assert not out.isnan().any(), "kernel left NaN (unwritten tile or NaN arithmetic)"
    assert rel_err(out, ref) <= rtol


@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_fused_linear_epilogues(act, alpha_kind):
    m, n, k = 63, 23, 29
    x, w = _input(m, k, torch.float32), _weight(n, k, torch.float32)
    b, a = torch.randn(n, device=DEVICE), _alpha(alpha_kind, n)
    out = launch_fused_linear(x, w, b, a, act, _nan(m, n, torch.float32))
    _check(out, reference.fused_linear(x.double(), w.double(), b.double(), _f64(a), act), 1e-5)


@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_fused_linear_without_bias(act):
    m, n, k = 3, 17, 35
    x, w, a = _input(m, k, torch.float32), _weight(n, k, torch.float32), _alpha("channel", n)
    out = launch_fused_linear(x, w, None, a, act, _nan(m, n, torch.float32))
    _check(out, reference.fused_linear(x.double(), w.double(), None, a.double(), act), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 3, 63, 130])
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_fused_linear_strided_shapes(dtype, rtol, m):
    """Transposed x, column-sliced W, strided bias and alpha, transposed output: no copies."""
    n, k = 21, 19
    x, w = _input(m, k, dtype, transposed=True), _weight(n, k, dtype, sliced=True)
    b = torch.randn(2 * n, device=DEVICE).to(dtype)[::2]
    a = _alpha("channel", n)
    out = launch_fused_linear(x, w, b, a, "gelu", _nan(m, n, dtype, transposed=True))
    _check(out, reference.fused_linear(x.double(), w.double(), b.double(), a.double(), "gelu"), rtol)


@pytest.mark.parametrize("alpha_kind", ALPHAS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_fused_mlp_epilogues(act, alpha_kind):
    # H = 37 spans three 16-wide hidden chunks (the last one partial), N = 19 two column tiles.
    m, k, h, n = 63, 29, 37, 19
    x, w1, w2 = _input(m, k, torch.float32), _weight(h, k, torch.float32), _weight(n, h, torch.float32)
    b1, b2, a = torch.randn(h, device=DEVICE), torch.randn(n, device=DEVICE), _alpha(alpha_kind, h)
    out = launch_fused_mlp(x, w1, b1, a, act, w2, b2, _nan(m, n, torch.float32))
    ref = reference.fused_mlp(x.double(), w1.double(), b1.double(), _f64(a), act, w2.double(), b2.double())
    _check(out, ref, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 3, 63, 130])
@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_fused_mlp_strided_shapes(dtype, rtol, m):
    k, h, n = 19, 33, 7
    x = _input(m, k, dtype, transposed=True)
    w1, w2 = _weight(h, k, dtype, sliced=True), _weight(n, h, dtype).t().contiguous().t()
    b1, b2, a = torch.randn(h, device=DEVICE).to(dtype), None, _alpha("scalar", h)
    out = launch_fused_mlp(x, w1, b1, a, "silu", w2, b2, _nan(m, n, dtype, transposed=True))
    ref = reference.fused_mlp(x.double(), w1.double(), b1.double(), a.double(), "silu", w2.double(), None)
    _check(out, ref, rtol)


@pytest.mark.parametrize("dtype, rtol", DTYPES)
def test_fused_mlp_factored_low_rank(dtype, rtol):
    """FACTOR form: identity activation, no alpha, rank 5 between 40 and 24 features."""
    m, k, r, n = 33, 40, 5, 24
    x, a_mat, b_mat = _input(m, k, dtype), _weight(r, k, dtype), _weight(n, r, dtype)
    b2 = torch.randn(n, device=DEVICE).to(dtype)
    out = launch_fused_mlp(x, a_mat, None, None, "identity", b_mat, b2, _nan(m, n, dtype))
    ref = (x.double() @ a_mat.double().t()) @ b_mat.double().t() + b2.double()
    _check(out, ref, rtol)


def test_ops_run_the_kernels_on_forced_cpu_path():
    """The public entry points with leading dims, M = 1 and M = 0 reach the kernels."""
    k, h, n = 20, 18, 11
    w1, w2 = _weight(h, k, torch.float32), _weight(n, h, torch.float32)
    b1, a = torch.randn(h, device=DEVICE), _alpha("channel", h)
    x = torch.randn(2, 5, k, device=DEVICE)
    y = fused_linear(x, w1, b1, a, "gelu_tanh")
    assert y.shape == (2, 5, h)
    assert rel_err(y, reference.fused_linear(x.double(), w1.double(), b1.double(), a.double(), "gelu_tanh")) <= 1e-5
    y = fused_mlp(x[0, :1], w1, b1, a, "relu", w2, None)
    assert y.shape == (1, n)
    assert rel_err(y, reference.fused_mlp(x[0, :1].double(), w1.double(), b1.double(), a.double(), "relu", w2.double(), None)) <= 1e-5
    assert fused_mlp(x[:, :0], w1, b1, a, "relu", w2, None).shape == (2, 0, n)
    assert fused_linear(x[:0], w1).shape == (0, 5, h)


def test_backward_on_forced_path_matches_reference():
    """Gradients (a PyTorch backward) around the Triton forward, random upstream gradient."""
    m, k, h, n = 7, 12, 10, 6
    leaves = [_input(m, k, torch.float32), _weight(h, k, torch.float32), torch.randn(h, device=DEVICE),
              _alpha("channel", h), _weight(n, h, torch.float32), torch.randn(n, device=DEVICE)]
    leaves = [t.requires_grad_() for t in leaves]
    x, w1, b1, a, w2, b2 = leaves
    g = torch.randn(m, n, device=DEVICE)
    got = torch.autograd.grad(fused_mlp(x, w1, b1, a, "gelu", w2, b2), leaves, g)
    want = torch.autograd.grad(reference.fused_mlp(x, w1, b1, a, "gelu", w2, b2), leaves, g)
    for gg, gw in zip(got, want):
        assert rel_err(gg, gw) <= 1e-5
