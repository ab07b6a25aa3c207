"""``lc_kernels::fused_linear(x, weight, bias, alpha, act)`` = ``sigma_alpha(x @ weight.T + bias)``.

Registration, Triton launcher, CPU kernel, autograd and the Python entry point of one op;
``x`` is 2-D inside the op. Where it runs:

* CUDA (unless ``LC_KERNELS_DISABLE_TRITON=1``): ``kernels/fused_linear.py``.
* CPU eager: ``F.linear`` plus the in-place epilogue ``reference.collapsible_activation_``; with
  ``LC_KERNELS_FORCE_TRITON=1`` (and ``TRITON_INTERPRET=1``) the Triton kernel through Triton's
  interpreter instead.
* ``torch.compile``: the op decomposes into its body (see :mod:`.launch`), so Inductor sees the
  Triton kernel on CUDA and the reference's aten ops elsewhere, which it fuses into its loops.
"""
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from . import launch, reference
from .dispatch import use_triton
from .validate import check_operands, check_raw_input, rows


def launch_fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``sigma_alpha(x @ weight.T + bias)`` into ``out`` (M, N) with the Triton kernel.

    No validation: callers pass operands checked by :func:`fused_linear`. Every operand and
    ``out`` may have any strides; nothing is copied.
    """
    m, k = x.shape
    n = weight.shape[0]
    if m == 0 or n == 0:
        return out
    kernel, _ = launch.tuned_kernels()
    # Absent bias/alpha: any valid pointer; the constexpr flags compile its loads away.
    wrap_triton(kernel)[launch.grid(m, n)](
        x, weight, weight if bias is None else bias, weight if alpha is None else alpha, out,
        m, n, k, launch.m_bucket(m),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=bias is not None, HAS_ALPHA=alpha is not None and act != "identity",
        INPUT_PRECISION=launch.input_precision(x.dtype), DOT_IN_FP32=launch.dot_in_fp32(x.dtype),
    )
    return out


def _triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
            act: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return launch_fused_linear(x, weight, bias, alpha, act, out)


def _body(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    # Also the fake kernel and, under torch.compile, the decomposition: off the Triton path the
    # reference's aten ops are what Inductor sees and fuses.
    check_raw_input("fused_linear", x)
    if use_triton(x):
        return _triton(x, weight, bias, alpha, act)
    return reference.fused_linear(x, weight, bias, alpha, act)


op = launch.define_op("lc_kernels::fused_linear", _body)


def cpu_linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str
) -> torch.Tensor:
    """The CPU kernel's arithmetic: in place on F.linear's fresh output, so the epilogue makes no
    pass over (M, N) memory that ``nn.Sequential(Linear, act)`` does not."""
    return reference.collapsible_activation_(F.linear(x, weight, bias), act, alpha)


@op.register_kernel("cpu")
def _cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    check_raw_input("fused_linear", x)
    if use_triton(x):
        return _triton(x, weight, bias, alpha, act)
    return cpu_linear_act(x, weight, bias, alpha, act)


def linear_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    alpha: Optional[torch.Tensor],
    act: str,
    z: torch.Tensor,
    needs: Sequence[bool],
) -> tuple:
    """Grads of ``sigma_alpha(z)``, ``z = x @ weight.T + b``, for ``(x, weight, b, alpha)``."""
    base_grad = reference.base_activation_backward(grad, z, act)
    grad_alpha = None
    if alpha is None or act == "identity":
        grad_z = base_grad
    else:
        a = alpha.to(z.dtype)
        grad_z = base_grad + a * (grad - base_grad)  # a * g + (1 - a) * base'(z) * g
        if needs[3]:
            grad_alpha = (grad * (z - reference.base_activation(z, act))).sum(0)
            if alpha.numel() == 1:
                grad_alpha = grad_alpha.sum()
            grad_alpha = grad_alpha.reshape(alpha.shape).to(alpha.dtype)
    grad_x = grad_z @ weight if needs[0] else None
    grad_w = grad_z.t() @ x if needs[1] else None
    grad_b = grad_z.sum(0) if has_bias and needs[2] else None
    return grad_x, grad_w, grad_b, grad_alpha


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, alpha, act = inputs
    ctx.save_for_backward(x, weight, bias, alpha)
    ctx.act = act


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, bias, alpha = ctx.saved_tensors
    # Recomputing z costs one GEMM in training but lets the forward overwrite z in place, so
    # inference pays no extra (M, N) buffer or pass for the ability to train.
    z = F.linear(x, weight, bias)
    return (*linear_act_backward(grad, x, weight, bias is not None, alpha, ctx.act, z, ctx.needs_input_grad), None)


op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    act: str = "identity",
) -> torch.Tensor:
    """``sigma_alpha(x @ weight.T + bias)`` through ``torch.ops.lc_kernels.fused_linear``.

    Args:
        x: ``(..., K)`` floating-point input (float32, float16, bfloat16; float64 on CPU).
        weight: ``(N, K)``, same dtype and device as ``x``.
        bias: ``(N,)`` or ``None``.
        alpha: ``None`` for plain ``base(z)``, or a 1-D tensor of 1 (shared) or N (per
            channel, along the last dim) elements for ``alpha * z + (1 - alpha) * base(z)``.
        act: one of ``reference.ACTIVATIONS``.

    Returns:
        ``(..., N)``. Differentiable in ``x``, ``weight``, ``bias`` and ``alpha``.

    Raises:
        TypeError, ValueError: on operands that do not fit, saying what to change.
    """
    check_operands("fused_linear", x, [("weight", weight, "bias", bias)], alpha, act)
    if torch.compiler.is_exporting():
        # torch.export / ONNX: plain aten ops, so the exported graph needs neither this package
        # nor a translation for its ops (torch.compile still sees the op and its kernels).
        return reference.fused_linear(x, weight, bias, alpha, act)
    if alpha is None and act == "identity" and not use_triton(x):
        # Nothing to fuse: the op's kernel would call F.linear. Calling it here skips the
        # custom-op dispatch, which at 16 rows on CPU costs a quarter of the GEMM's time.
        return F.linear(x, weight, bias)
    y = torch.ops.lc_kernels.fused_linear(rows(x), weight, bias, alpha, act)
    return y.reshape(*x.shape[:-1], weight.shape[0])
