"""``lc_kernels::fused_gated_linear(x, w, b, act, alpha)`` = ``sigma_alpha(x @ W_g.T + b_g) * (x @ W_u.T + b_u)``.

``w = cat([W_g, W_u])`` is ``(2H, K)`` (Phi-3's ``gate_up_proj`` layout; Llama's separate
``gate_proj`` / ``up_proj`` concatenated once), ``b = cat([b_g, b_u])`` or ``None``, ``alpha``
acts on the gate half. Registration, Triton launcher, CPU kernel, autograd and the Python entry
point of one op; ``x`` is 2-D inside the op. Paths as for :mod:`.fused_linear_op`:

* CUDA (unless ``LC_KERNELS_DISABLE_TRITON=1``): ``kernels/fused_gated_linear.py``, one pass
  over ``x`` for both halves.
* CPU eager: one packed GEMM ``F.linear(x, w, b)`` to ``(M, 2H)``, the activation in place on
  its gate half (``fused_linear_op.activate_``: the base activation alone where alpha is None or
  all +0.0, read from memory, no lerp), the product in place (``gate.mul_(up)``); with
  ``LC_KERNELS_FORCE_TRITON=1`` (and ``TRITON_INTERPRET=1``) the Triton kernel through Triton's
  interpreter instead.
* Eager CPU with nothing requiring grad: the CPU kernel's arithmetic is called directly
  (:func:`gated_linear_act`), with no custom-op dispatch and no autograd context, and returns the
  gate half of the GEMM's ``(M, 2H)`` buffer (row stride 2H): no ``(M, H)`` allocation at all.
* ``torch.compile``: the op decomposes into its body (see :mod:`.launch`).

:func:`fused_gated_linear` is the public, checked entry; :func:`gated_linear_act` is the same call
without the operand checks, for ``nn.LCGatedMLP``, whose weights were checked when it was built and
whose forward checks the input.
"""
import functools
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dispatch, launch, reference
from .fused_linear_op import activate_, needs_autograd
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


def _activated_gate(z: torch.Tensor, act: str,
                    alpha: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(sigma_alpha(gate), up, in_place)`` from ``z = [gate | up]`` (``(..., 2H)``, a buffer the
    caller owns). ``activate_`` works in place on the gate half (``in_place``) at alpha None or
    +0.0 (the base activation alone, no lerp) and past 2^21 elements; alpha != 0 below that (lerp
    into ``base(gate)``) and relu with alpha (PReLU) return a fresh ``(..., H)`` tensor."""
    h = z.shape[-1] // 2
    gate = z[..., :h]
    activated = activate_(gate, alpha, act)
    return activated, z[..., h:], activated is gate


def cpu_gated_linear(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str, alpha: Optional[torch.Tensor]
) -> torch.Tensor:
    """The no-grad CPU arithmetic (:func:`gated_linear_act`): one packed GEMM, then the activation
    and the product in place (``mul_``) on whichever ``(..., H)`` tensor holds the activated gate.
    At alpha None or 0 that is the GEMM's gate half, returned as a view (row stride 2H, a valid
    BLAS operand for the next GEMM): no ``(..., H)`` buffer, and the calls of a Llama MLP's first
    half with its two GEMMs packed into one (``linear``, ``silu_``, ``mul_``).
    """
    activated, up, _ = _activated_gate(F.linear(x, w, b), act, alpha)
    return activated.mul_(up)


def _cpu_kernel(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: str,
                alpha: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's CPU kernel: :func:`cpu_gated_linear`'s values bit for bit, in a fresh contiguous
    ``(M, H)`` output, which is what the fake kernel promises (opcheck compares strides): where
    the activation ran in place on the GEMM's gate half, the product goes into a new output
    (``torch.mul(out=)``, the same single pass as ``mul_``); else into the fresh activated tensor."""
    activated, up, in_place = _activated_gate(F.linear(x, w, b), act, alpha)
    if in_place:
        return torch.mul(activated, up, out=x.new_empty(activated.shape))
    return activated.mul_(up)


op.register_kernel("cpu")(launch.op_kernel("fused_gated_linear", _triton, _cpu_kernel))


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


def gated_linear_act(
    x: torch.Tensor,
    w: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    act: str = "silu",
    alpha: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`fused_gated_linear` without the operand checks, for callers that checked them
    (``nn.LCGatedMLP`` checks ``x`` once per call, its weights when it was built).

    Eager CPU with nothing requiring grad returns the gate half of the GEMM's ``(..., 2H)``
    buffer (row stride 2H, a valid BLAS operand for the next GEMM); every other path returns a
    fresh tensor.
    """
    if torch.compiler.is_exporting():
        # torch.export / ONNX: plain aten ops, so the exported graph needs neither this package
        # nor a translation for its ops.
        return reference.fused_gated_linear(x, w, b, act, alpha)
    if (not torch.compiler.is_compiling() and dispatch.kernel_path(x) == dispatch.ATEN
            and not needs_autograd(x, w, b, alpha)):
        return cpu_gated_linear(x, w, b, act, alpha)
    return launch.on_rows(torch.ops.lc_kernels.fused_gated_linear, x, w.shape[0] // 2, w, b, act, alpha)


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
    return gated_linear_act(x, w, b, act, alpha)
