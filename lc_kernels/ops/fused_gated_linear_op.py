"""``lc_kernels::fused_gated_linear(x, w, b, act, alpha)`` = ``sigma_alpha(x @ W_g.T + b_g) * (x @ W_u.T + b_u)``.

``w = cat([W_g, W_u])`` is ``(2H, K)`` (Phi-3's ``gate_up_proj`` layout; Llama's separate
``gate_proj`` / ``up_proj`` concatenated once), ``b = cat([b_g, b_u])`` or ``None``, ``alpha``
acts on the gate half. Registration, Triton launcher, CPU kernel, autograd and the Python entry
point of one op; ``x`` is 2-D inside the op. Paths as for :mod:`.fused_linear_op`:

* CUDA (unless ``LC_KERNELS_DISABLE_TRITON=1``): ``kernels/fused_gated_linear.py``, one pass
  over ``x`` for both halves.
* CPU eager: one packed GEMM ``F.linear(x, w, b)`` to ``(M, 2H)``, the activation in place on
  its gate half, the product into the ``(M, H)`` output; with ``LC_KERNELS_FORCE_TRITON=1``
  (and ``TRITON_INTERPRET=1``) the Triton kernel through Triton's interpreter instead.
* ``torch.compile``: the op decomposes into its body (see :mod:`.launch`).
"""
import functools
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from .. import _config
from . import launch, reference
from .dispatch import use_triton
from .validate import check_gated_operands, check_raw_input, rows

try:
    from torch._library import triton as _torch_triton_registry
except ImportError:  # pragma: no cover
    _torch_triton_registry = None

QUALNAME = "lc_kernels::fused_gated_linear"


@functools.cache
def tuned_kernel() -> Any:
    """The autotuned kernel, built on first use so Triton is imported only when it runs."""
    import triton

    from ..kernels import fused_gated_linear as fg

    interpret = _config.triton_interpret()
    kernel = triton.autotune(
        configs=fg.INTERPRETER_CONFIGS if interpret else fg.CONFIGS, key=fg.AUTOTUNE_KEY,
        prune_configs_by=None if interpret else fg.PRUNE,
    )(fg.fused_gated_linear_kernel)
    if _torch_triton_registry is not None:
        # What triton_op records at registration: AOTAutograd's cache keys include kernel source.
        _torch_triton_registry.triton_ops_to_kernels[QUALNAME] = [fg.fused_gated_linear_kernel]
    return kernel


def launch_fused_gated_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor],
    act: str,
    alpha: Optional[torch.Tensor],
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``sigma_alpha(x @ W_g.T + b_g) * (x @ W_u.T + b_u)`` into ``out`` (M, H) with the
    Triton kernel.

    No validation: callers pass operands checked by :func:`fused_gated_linear`. Every operand
    and ``out`` may have any strides; nothing is copied.
    """
    m, k = x.shape
    h = w.shape[0] // 2
    if m == 0 or h == 0:
        return out
    # Absent bias/alpha: any valid pointer; the constexpr flags compile its loads away.
    wrap_triton(tuned_kernel())[launch.grid(m, h)](
        x, w, w if b is None else b, w if alpha is None else alpha, out,
        m, h, k, launch.m_bucket(m),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        0 if b is None else b.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=b is not None, HAS_ALPHA=alpha is not None and act != "identity",
        INPUT_PRECISION=launch.input_precision(x.dtype), DOT_IN_FP32=launch.dot_in_fp32(x.dtype),
    )
    return out


def _triton(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str,
            alpha: Optional[torch.Tensor]) -> torch.Tensor:
    out = x.new_empty((x.shape[0], w.shape[0] // 2))
    return launch_fused_gated_linear(x, w, b, act, alpha, out)


def _body(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "silu",
    alpha: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # Also the fake kernel and, under torch.compile, the decomposition: off the Triton path the
    # reference's aten ops are what Inductor sees and fuses.
    check_raw_input("fused_gated_linear", x)
    if use_triton(x):
        return _triton(x, w, b, act, alpha)
    return reference.fused_gated_linear(x, w, b, act, alpha)


op = launch.define_op(QUALNAME, _body)


def cpu_gated_linear(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str, alpha: Optional[torch.Tensor]
) -> torch.Tensor:
    """The CPU kernel's arithmetic: one packed GEMM, the epilogue in place on its gate half and
    the product written straight into the output, so the only buffers are the GEMM's
    ``(M, 2H)`` and the ``(M, H)`` result (the out-of-place reference allocates three more
    ``(M, H)`` tensors with alpha)."""
    h = w.shape[0] // 2
    z = F.linear(x, w, b)
    gate, up = z[:, :h], z[:, h:]
    activated = reference.collapsible_activation_(gate, act, alpha)
    if activated is gate:
        return torch.mul(gate, up, out=x.new_empty((x.shape[0], h)))
    # relu with alpha: PReLU already returned a fresh (M, H) tensor; it becomes the output.
    return activated.mul_(up)


@op.register_kernel("cpu")
def _cpu(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "silu",
    alpha: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    check_raw_input("fused_gated_linear", x)
    if use_triton(x):
        return _triton(x, w, b, act, alpha)
    return cpu_gated_linear(x, w, b, act, alpha)


def gated_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    has_bias: bool,
    act: str,
    alpha: Optional[torch.Tensor],
    z: torch.Tensor,
    needs: Sequence[bool],
) -> tuple:
    """Grads of ``sigma_alpha(g) * u``, ``[g, u] = x @ w.T + b``, for ``(x, w, b, act, alpha)``."""
    h = w.shape[0] // 2
    gate, up = z[:, :h], z[:, h:]
    grad_z = torch.empty_like(z)
    # d/du: grad * sigma_alpha(g), written into the up half of grad_z.
    torch.mul(grad, reference.collapsible_activation(gate, act, alpha), out=grad_z[:, h:])
    grad_act = grad * up
    base_grad = reference.base_activation_backward(grad_act, gate, act)
    grad_alpha = None
    if alpha is None or act == "identity":
        grad_z[:, :h] = base_grad
    else:
        a = alpha.to(z.dtype)
        grad_z[:, :h] = base_grad + a * (grad_act - base_grad)  # a * g' + (1 - a) * base'(g) * g'
        if needs[4]:
            grad_alpha = (grad_act * (gate - reference.base_activation(gate, act))).sum(0)
            if alpha.numel() == 1:
                grad_alpha = grad_alpha.sum()
            grad_alpha = grad_alpha.reshape(alpha.shape).to(alpha.dtype)
    grad_x = grad_z @ w if needs[0] else None
    grad_w = grad_z.t() @ x if needs[1] else None
    grad_b = grad_z.sum(0) if has_bias and needs[2] else None
    return grad_x, grad_w, grad_b, None, grad_alpha


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    # Called only when an input requires grad (torch.library's autograd kernel skips it
    # otherwise), so inference saves nothing.
    x, w, b, act, alpha = inputs
    ctx.save_for_backward(x, w, b, alpha)
    ctx.act = act


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, w, b, alpha = ctx.saved_tensors
    # Recomputing [g, u] costs one GEMM in training but lets the forward overwrite the gate half
    # in place, so inference pays no extra (M, 2H) buffer for the ability to train.
    z = F.linear(x, w, b)
    return gated_linear_backward(grad, x, w, b is not None, ctx.act, alpha, z, ctx.needs_input_grad)


op.register_autograd(_backward, setup_context=_setup_context)


def fused_gated_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "silu",
    alpha: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sigma_alpha(x @ W_g.T + b_g) * (x @ W_u.T + b_u)`` through
    ``torch.ops.lc_kernels.fused_gated_linear``.

    Args:
        x: ``(..., K)`` floating-point input (float32, float16, bfloat16; float64 on CPU).
        w: ``(2H, K)`` = ``torch.cat([W_g, W_u])``, same dtype and device as ``x``.
        b: ``(2H,)`` = ``torch.cat([b_g, b_u])``, or ``None``.
        act: the gate's activation, one of ``reference.ACTIVATIONS`` (``"silu"``: SwiGLU,
            ``"gelu_tanh"``: GeGLU as in Gemma).
        alpha: ``None`` for plain ``act(g)``, or a 1-D tensor of 1 (shared) or H (per channel)
            elements for ``alpha * g + (1 - alpha) * act(g)``.

    Returns:
        ``(..., H)``. Differentiable in ``x``, ``w``, ``b`` and ``alpha``.

    Raises:
        TypeError, ValueError: on operands that do not fit, saying what to change.
    """
    check_gated_operands("fused_gated_linear", x, w, b, act, alpha)
    if torch.compiler.is_exporting():
        # torch.export / ONNX: plain aten ops, as for fused_linear.
        return reference.fused_gated_linear(x, w, b, act, alpha)
    y = torch.ops.lc_kernels.fused_gated_linear(rows(x), w, b, act, alpha)
    return y.reshape(*x.shape[:-1], w.shape[0] // 2)
