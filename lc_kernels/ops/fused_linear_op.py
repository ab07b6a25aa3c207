"""``lc_kernels::fused_linear(x, weight, bias, alpha, act)`` = ``sigma_alpha(x @ weight.T + bias)``.

Registration, Triton launcher, CPU kernel, autograd and the Python entry point of one op;
``x`` is 2-D inside the op. Where it runs:

* CUDA (unless ``LC_KERNELS_DISABLE_TRITON=1``): ``kernels/fused_linear.py``.
* CPU eager: ``F.linear`` plus the in-place epilogue ``reference.collapsible_activation_``; with
  ``LC_KERNELS_FORCE_TRITON=1`` (and ``TRITON_INTERPRET=1``) the Triton kernel through Triton's
  interpreter instead.
* Nothing to fuse (identity activation): ``F.linear`` (cuBLAS on CUDA) on every path but the
  forced interpreter.
* Eager CPU with nothing requiring grad (``no_grad``, ``inference_mode``, frozen weights): the
  CPU kernel's arithmetic is called directly, with no custom-op dispatch and no autograd context.

:func:`fused_linear` is the public, checked entry; :func:`linear_act` is the same call without the
operand checks, for the modules in ``nn/``, whose weights were checked when the module was built
and whose forward checks the input.
* ``torch.compile``: the op decomposes into its body (see :mod:`.launch`), so Inductor sees the
  Triton kernel on CUDA and the reference's aten ops elsewhere, which it fuses into its loops.
"""
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dispatch, launch, reference
from .validate import check_operands, rows


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
    return launch.launch_gemm(lambda: launch.tuned_kernels()[0], x, weight, bias, alpha, act, out, weight.shape[0])


def _triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
            act: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return launch_fused_linear(x, weight, bias, alpha, act, out)


def _takes_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                  act: str) -> bool:
    path = dispatch.kernel_path(x)
    return not (path == dispatch.ATEN or (act == "identity" and dispatch.plain_gemm_to_aten(path)))


_reference_or_triton = launch.op_kernel("fused_linear", _triton, reference.fused_linear, _takes_triton)


def _body(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
          act: str) -> torch.Tensor:
    # Also the fake kernel and, under torch.compile, the decomposition: off the Triton path the
    # reference's aten ops are what Inductor sees and fuses.
    return _reference_or_triton(x, weight, bias, alpha, act)


op = launch.define_op("lc_kernels::fused_linear", _body)


# Per slope memory (address, bytes): a memoryview of it and the all-zero bytes to compare with.
# The view holds the storage alive, so an address seen again is the same memory; the bytes are
# read on every call, so writes that skip autograd's version counter (``alpha.data.fill_(1)``)
# are seen too. Reading costs no aten call (``bool((alpha == 0).all())`` is two, and a host
# sync on CUDA) and less than ctypes or a numpy reduction, measured between the GEMMs.
_ZERO_VIEWS: dict[tuple[int, int], tuple[memoryview, bytes]] = {}
_MAX_VIEWS = 4096


def _zero_view(alpha: torch.Tensor, key: tuple[int, int]) -> tuple[memoryview, bytes] | None:
    try:
        view = memoryview(alpha.detach().view(torch.uint8).numpy())
    except (TypeError, RuntimeError):  # no numpy, or a tensor numpy cannot view
        return None
    if len(_ZERO_VIEWS) >= _MAX_VIEWS:  # slopes of dropped models: forget them all at once
        _ZERO_VIEWS.clear()
    _ZERO_VIEWS[key] = entry = (view, bytes(key[1]))
    return entry


def alpha_is_zero(alpha: torch.Tensor) -> bool:
    """Whether every slope is +0.0 (``sigma_alpha`` is its base activation), read from memory.

    Contiguous plain CPU tensors only: anything else (and -0.0) answers False, and the general
    formula runs.
    """
    cls = type(alpha)
    if (cls is not torch.nn.Parameter and cls is not torch.Tensor) or not alpha.is_cpu:
        return False
    try:
        key = (alpha.data_ptr(), alpha.nbytes)
    except RuntimeError:  # no storage to read (fake, functional, meta-like tensors)
        return False
    entry = _ZERO_VIEWS.get(key)
    if entry is None:
        if key[0] == 0 or key[1] == 0 or not alpha.is_contiguous():
            return False
        entry = _zero_view(alpha, key)
        if entry is None:
            return False
    view, zeros = entry
    return view.tobytes() == zeros


# base(z) in place through the bindings nn.ReLU / nn.GELU / nn.SiLU themselves call: one aten call
# each, as in nn.Sequential. ``torch.ops.aten.gelu.out(z, out=z)`` (the reference's form) is the
# same kernel behind the OpOverload Python layer, which measured as costly as a 32-wide GELU.
_BASE_INPLACE: dict[str, Callable[[torch.Tensor], Any]] = {
    "identity": lambda z: z,
    "relu": torch.relu_,
    "gelu": torch._C._nn.gelu_,
    "gelu_tanh": lambda z: torch._C._nn.gelu_(z, approximate="tanh"),
    "silu": torch._C._nn.silu_,
}


_BASE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch._C._nn.gelu,
    "gelu_tanh": lambda z: torch._C._nn.gelu(z, approximate="tanh"),
    "silu": torch._C._nn.silu,
}


def cpu_linear_act(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str
) -> torch.Tensor:
    """The CPU arithmetic, on ``(..., K)`` inputs: the op's CPU kernel and the no-autograd path.

    One function for both, so a forward gives bitwise the same result with and without grad
    (self-distillation's teacher runs without, its student with, and starts at zero loss). The
    epilogue works in place on F.linear's fresh output, so it makes no pass over (M, N) memory
    that ``nn.Sequential(Linear, act)`` does not; at alpha = 0 it makes the same aten calls.
    """
    return activate_(F.linear(x, weight, bias), alpha, act)


def activate_(z: torch.Tensor, alpha: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """``sigma_alpha(z)`` on a pre-activation the caller owns, in place where it can be (use the
    return value): :func:`cpu_linear_act`'s epilogue, also for column slices of a wider GEMM's
    output (``ops.partial``'s shared form)."""
    if alpha is None or act == "identity" or alpha_is_zero(alpha):
        _BASE_INPLACE[act](z)
        return z
    if act != "relu" and z.numel() <= reference._BLOCK_ELEMS:
        # One block of the reference's loop, in two aten calls instead of its seven (scratch,
        # slices, cast, 1 - alpha): base(z) + alpha * (z - base(z)) is lerp with weight alpha.
        return _BASE[act](z).lerp_(z, alpha if alpha.dtype == z.dtype else alpha.to(z.dtype))
    if z.dim() == 2:
        return reference.collapsible_activation_(z, act, alpha)
    return reference.collapsible_activation_(rows(z), act, alpha).view(z.shape)


op.register_kernel("cpu")(launch.op_kernel("fused_linear", _triton, cpu_linear_act, _takes_triton))


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
    launch.save_linear_inputs(ctx, x, weight, bias, alpha, act)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, weight, bias, alpha, z = launch.recompute_linear(ctx)
    return (*linear_act_backward(grad, x, weight, bias is not None, alpha, ctx.act, z, ctx.needs_input_grad), None)


op.register_autograd(_backward, setup_context=_setup_context)


def needs_autograd(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call on ``tensors`` records autograd history: grad mode is on and one requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
        act: str) -> torch.Tensor:
    return launch.on_rows(torch.ops.lc_kernels.fused_linear, x, weight.shape[0], weight, bias, alpha, act)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    act: str = "identity",
) -> torch.Tensor:
    """:func:`fused_linear` without the operand checks: for callers that checked them already.

    The modules in ``nn/`` call this: their weights were checked when the module was built and
    their forward checks ``x`` (width, dtype, device), so the op's ~30 checks per call (~15 µs,
    a tenth of a 16-token MLP on CPU) would only repeat them.
    """
    if torch.compiler.is_exporting():
        # torch.export / ONNX: plain aten ops, so the exported graph needs neither this package
        # nor a translation for its ops (torch.compile still sees the op and its kernels).
        return reference.fused_linear(x, weight, bias, alpha, act)
    if torch.compiler.is_compiling():
        # The op's decomposition picks the path while AOTAutograd traces (see launch.py).
        return _op(x, weight, bias, alpha, act)
    path = dispatch.kernel_path(x)
    if act == "identity" and dispatch.plain_gemm_to_aten(path):
        # Nothing to fuse: F.linear (cuBLAS on CUDA) without the custom-op dispatch, which at
        # 16 rows on CPU costs a quarter of the GEMM's time.
        return F.linear(x, weight, bias)
    if path == dispatch.ATEN and not needs_autograd(x, weight, bias, alpha):
        return cpu_linear_act(x, weight, bias, alpha, act)
    return _op(x, weight, bias, alpha, act)


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
    return linear_act(x, weight, bias, alpha, act)
