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

from . import launch, reference
from .validate import check_gated_operands

QUALNAME = "lc_kernels::fused_gated_linear"


@functools.cache
def tuned_kernel() -> Any:
    """The autotuned kernel, built on first use so Triton is imported only when it runs."""
    from ..kernels import fused_gated_linear as fg

    return launch.autotuned(fg, fg.fused_gated_linear_kernel, QUALNAME)


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
    return launch.launch_gemm(tuned_kernel, x, w, b, alpha, act, out, w.shape[0] // 2)


def _triton(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str,
            alpha: Optional[torch.Tensor]) -> torch.Tensor:
    out = x.new_empty((x.shape[0], w.shape[0] // 2))
    return launch_fused_gated_linear(x, w, b, act, alpha, out)


_reference_or_triton = launch.op_kernel("fused_gated_linear", _triton, reference.fused_gated_linear)


def _body(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, act: str = "silu",
          alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Also the fake kernel and, under torch.compile, the decomposition: off the Triton path the
    # reference's aten ops are what Inductor sees and fuses.
    return _reference_or_triton(x, w, b, act, alpha)


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


op.register_kernel("cpu")(launch.op_kernel("fused_gated_linear", _triton, cpu_gated_linear))


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
    x, w, b, act, alpha = inputs
    launch.save_linear_inputs(ctx, x, w, b, alpha, act)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    # [g, u] recomputed: the forward overwrites the gate half in place (see launch.recompute_linear).
    x, w, b, alpha, z = launch.recompute_linear(ctx)
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
    return launch.on_rows(torch.ops.lc_kernels.fused_gated_linear, x, w.shape[0] // 2, w, b, act, alpha)
