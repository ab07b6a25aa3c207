"""``lc_kernels::fused_mlp(x, w1, b1, alpha, act, w2, b2)`` = ``sigma_alpha(x @ w1.T + b1) @ w2.T + b2``.

Registration, Triton launcher, CPU kernel, autograd and the Python entry point of one op (paths
as for :mod:`.fused_linear_op`). On CUDA the hidden activation stays on chip;
:func:`~.dispatch.prefer_fused_mlp` says where that beats two ``fused_linear`` calls, and
:func:`mlp_act` (the modules' unchecked entry) follows it.
"""
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from . import dispatch, launch, reference
from .fused_linear_op import cpu_linear_act, linear_act, linear_act_backward, needs_autograd
from .validate import check_operands


def launch_fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``sigma_alpha(x @ w1.T + b1) @ w2.T + b2`` into ``out`` (M, N) with the Triton kernel.

    No validation (see :func:`fused_mlp`); any strides, nothing copied.
    """
    m, k = x.shape
    h, n = w1.shape[0], w2.shape[0]
    if m == 0 or n == 0:
        return out
    _, kernel = launch.tuned_kernels()
    wrap_triton(kernel)[launch.grid(m, n)](
        x, w1, w1 if b1 is None else b1, w1 if alpha is None else alpha, w2, w2 if b2 is None else b2, out,
        m, n, k, h, launch.m_bucket(m),
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1),
        0 if b1 is None else b1.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        w2.stride(0), w2.stride(1),
        0 if b2 is None else b2.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_B1=b1 is not None, HAS_ALPHA=alpha is not None and act != "identity",
        HAS_B2=b2 is not None, INPUT_PRECISION=launch.input_precision(x.dtype),
        DOT_IN_FP32=launch.dot_in_fp32(x.dtype),
    )
    return out


def _triton(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str,
            w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    out = x.new_empty((x.shape[0], w2.shape[0]))
    return launch_fused_mlp(x, w1, b1, alpha, act, w2, b2, out)


_reference_or_triton = launch.op_kernel("fused_mlp", _triton, reference.fused_mlp)


def _body(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str,
          w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    return _reference_or_triton(x, w1, b1, alpha, act, w2, b2)


op = launch.define_op("lc_kernels::fused_mlp", _body)


def cpu_mlp_act(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                act: str, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """The CPU arithmetic: the op's CPU kernel and the no-autograd path of :func:`mlp_act`."""
    return F.linear(cpu_linear_act(x, w1, b1, alpha, act), w2, b2)


op.register_kernel("cpu")(launch.op_kernel("fused_mlp", _triton, cpu_mlp_act))


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, w1, b1, alpha, act, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, alpha, w2)
    ctx.act = act
    ctx.has_b2 = b2 is not None


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, w1, b1, alpha, w2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    z = F.linear(x, w1, b1)
    hidden = reference.collapsible_activation(z, ctx.act, alpha)
    grad_w2 = grad.t() @ hidden if needs[5] else None
    grad_b2 = grad.sum(0) if ctx.has_b2 and needs[6] else None
    grad_x, grad_w1, grad_b1, grad_alpha = linear_act_backward(
        grad @ w2, x, w1, b1 is not None, alpha, ctx.act, z, needs
    )
    return grad_x, grad_w1, grad_b1, grad_alpha, None, grad_w2, grad_b2


op.register_autograd(_backward, setup_context=_setup_context)


def _op(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str,
        w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    return launch.on_rows(torch.ops.lc_kernels.fused_mlp, x, w2.shape[0], w1, b1, alpha, act, w2, b2)


def mlp_act(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    choose_plan: bool = True,
) -> torch.Tensor:
    """The pair ``sigma_alpha(x @ w1.T + b1) @ w2.T + b2`` without operand checks, for the modules.

    Callers checked the operands already (``nn/`` modules: weights when built, ``x`` in forward).
    With ``choose_plan`` (the modules), :func:`~.dispatch.prefer_fused_mlp` chooses on CUDA
    between the fused kernel and two GEMMs; without it (the public op) the fused op runs.
    """
    if torch.compiler.is_exporting():
        # torch.export / ONNX: plain aten ops, so the exported graph needs neither this package
        # nor a translation for its ops (torch.compile still sees the op and its kernels).
        return reference.fused_mlp(x, w1, b1, alpha, act, w2, b2)
    if choose_plan and x.is_cuda:
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not dispatch.prefer_fused_mlp(m, w1.shape[1], w1.shape[0], w2.shape[0], x.device, x.dtype):
            return linear_act(linear_act(x, w1, b1, alpha, act), w2, b2)
    if torch.compiler.is_compiling():
        return _op(x, w1, b1, alpha, act, w2, b2)
    if dispatch.kernel_path(x) == dispatch.ATEN and not needs_autograd(x, w1, b1, alpha, w2, b2):
        # Inference on CPU: the CPU kernel's arithmetic, no custom-op dispatch, nothing saved.
        return cpu_mlp_act(x, w1, b1, alpha, act, w2, b2)
    # The fused Triton kernel, or with autograd one node that saves x (not the hidden tensor)
    # and recomputes the hidden tensor backward.
    return _op(x, w1, b1, alpha, act, w2, b2)


def fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    """``sigma_alpha(x @ w1.T + b1) @ w2.T + b2`` through ``torch.ops.lc_kernels.fused_mlp``.

    ``x`` is ``(..., K)``, ``w1`` ``(H, K)``, ``b1`` ``(H,)`` or ``None``, ``alpha`` ``None`` or
    1-D of 1 or H elements, ``w2`` ``(N, H)``, ``b2`` ``(N,)`` or ``None``; returns ``(..., N)``.
    With ``act="identity"`` and ``alpha=None`` it is the factored low-rank pair.

    Raises:
        TypeError, ValueError: on operands that do not fit, saying what to change.
    """
    check_operands("fused_mlp", x, [("w1", w1, "b1", b1), ("w2", w2, "b2", b2)], alpha, act)
    return mlp_act(x, w1, b1, alpha, act, w2, b2, choose_plan=False)
