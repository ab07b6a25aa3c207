"""Launchers, input validation and ``torch.library`` registrations for the fused ops.

``lc_kernels::fused_linear(x, weight, bias, alpha, act)`` = ``sigma_alpha(x @ weight.T + bias)``
and ``lc_kernels::fused_mlp(x, w1, b1, alpha, act, w2, b2)`` =
``sigma_alpha(x @ w1.T + b1) @ w2.T + b2``, with ``x`` 2-D inside the ops.

Where each path runs:

* CUDA (unless ``LC_KERNELS_DISABLE_TRITON=1``): the Triton kernels in ``lc_kernels/kernels``.
* CPU eager: the registered CPU kernel, ``F.linear`` plus the in-place epilogue
  ``reference.collapsible_activation_``; with ``LC_KERNELS_FORCE_TRITON=1`` (and
  ``TRITON_INTERPRET=1``) the Triton kernels through Triton's interpreter instead.
* ``torch.compile``: ``triton_op`` decomposes the op into its Python body, which emits the
  Triton kernels on CUDA and the plain aten ops of ``reference`` elsewhere, so Inductor fuses
  the CPU epilogue into its own loops.

This module imports Triton only on the first launch, so it works where Triton is not
installed. Where Triton is installed, ``torch.library.triton_op`` itself imports it (and
``torch._inductor``) when the ops are registered, to scan the op bodies for kernels.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from .. import _config
from . import reference

__all__ = ["fused_linear", "fused_mlp", "prefer_fused_mlp", "launch_fused_linear", "launch_fused_mlp"]


# ----------------------------------------------------------------------------------------------
# Validation (public boundary)
# ----------------------------------------------------------------------------------------------

def _use_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s op runs the Triton kernels (CUDA, or CPU forced through the interpreter)."""
    if _config.disable_triton():
        return False
    if x.is_cuda:
        return True
    if _config.force_triton() and x.device.type == "cpu":
        if not _config.triton_interpret():
            raise RuntimeError(
                "LC_KERNELS_FORCE_TRITON=1 runs the Triton kernels on CPU tensors through Triton's "
                "interpreter, but TRITON_INTERPRET is not set; export TRITON_INTERPRET=1 before "
                "Python starts (Triton reads it once, at import)"
            )
        return True
    return False


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _check_operand(op: str, name: str, t: Any, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(
            f"{op}: x is on {x.device} but {name} is on {t.device}; move the module or the input "
            f"so both are on one device (e.g. module.to(x.device))"
        )


def _validate(
    op: str,
    x: Any,
    layers: Sequence[tuple[str, Any, str, Any]],
    alpha: Any,
    act: str,
) -> None:
    """Check the operands of a chain of linear layers; ``layers`` holds ``(w name, w, b name, b)``.

    ``alpha`` and ``act`` belong to the first layer's output. Raises ``TypeError`` or
    ``ValueError`` saying what arrived, what was expected and what to do.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: x must be floating point (float32, float16 or bfloat16), got {x.dtype}; "
            f"convert it with x.float()"
        )
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (..., K), got a scalar")
    if act not in reference.ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {act!r}; expected one of {reference.ACTIVATIONS}")
    if x.dtype == torch.float64 and _use_triton(x):
        raise TypeError(
            f"{op}: float64 runs on the PyTorch path only and x {_describe(x)} would go to the "
            f"Triton kernels (tl.dot has no float64); use float32, or LC_KERNELS_DISABLE_TRITON=1"
        )
    width = x.shape[-1]
    width_of = "x's last dim"
    for w_name, w, b_name, b in layers:
        _check_operand(op, w_name, w, x, 2)
        if w.dtype != x.dtype:
            raise TypeError(
                f"{op}: {w_name} is {w.dtype} but x is {x.dtype}; cast one of them "
                f"(e.g. x.to({w_name}.dtype) or module.to(x.dtype))"
            )
        if w.shape[1] != width:
            raise ValueError(
                f"{op}: {w_name} {tuple(w.shape)} needs {width_of} = {w.shape[1]}, got {width} "
                f"(x {tuple(x.shape)}); pass an input whose features match the layer"
            )
        if b is not None:
            _check_operand(op, b_name, b, x, 1)
            if b.dtype != x.dtype:
                raise TypeError(f"{op}: {b_name} is {b.dtype} but x is {x.dtype}; cast it to {x.dtype}")
            if b.shape[0] != w.shape[0]:
                raise ValueError(
                    f"{op}: {b_name} has {b.shape[0]} elements but {w_name} {tuple(w.shape)} has "
                    f"{w.shape[0]} outputs; pass a bias of shape ({w.shape[0]},)"
                )
        width, width_of = w.shape[0], f"{w_name}'s output dim"
    if alpha is not None:
        _check_operand(op, "alpha", alpha, x, 1)
        if not alpha.is_floating_point():
            raise TypeError(f"{op}: alpha must be floating point, got {alpha.dtype}")
        hidden = layers[0][1].shape[0]
        if alpha.numel() not in (1, hidden):
            raise ValueError(
                f"{op}: alpha must hold 1 (shared) or {hidden} (per channel) elements, got shape "
                f"{tuple(alpha.shape)}; pass alpha of shape (1,) or ({hidden},)"
            )


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(M, K)``: a view whenever the leading dims allow, strides kept for the kernel."""
    return x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------

@functools.cache
def _tuned_kernels() -> tuple[Any, Any]:
    """The autotuned kernels, built on first use so Triton is imported only when a kernel runs."""
    import triton

    from ..kernels import fused_linear as fl
    from ..kernels import fused_mlp as fm

    interpret = _config.triton_interpret()
    linear = triton.autotune(
        configs=fl.INTERPRETER_CONFIGS if interpret else fl.CONFIGS, key=fl.AUTOTUNE_KEY
    )(fl.fused_linear_kernel)
    mlp = triton.autotune(
        configs=fm.INTERPRETER_CONFIGS if interpret else fm.CONFIGS, key=fm.AUTOTUNE_KEY
    )(fm.fused_mlp_kernel)
    return linear, mlp


def _m_bucket(m: int) -> int:
    """Autotune key for M: next power of two in [16, 4096], so a new batch size reuses a tuning.

    A comparison loop rather than bit tricks keeps it valid for symbolic sizes under compile.
    """
    bucket = 16
    while bucket < m and bucket < 4096:
        bucket *= 2
    return bucket


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's own matmul setting: "highest" (the default) keeps IEEE fp32
    # products, anything else allows TF32 as F.linear would.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 tiles as raw bits (see fused_linear_kernel).
    return dtype == torch.bfloat16 and _config.triton_interpret()


def _grid(m: int, n: int) -> Callable[[dict], tuple[int]]:
    def grid(meta: dict) -> tuple[int]:
        return ((m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"] * ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]),)

    return grid


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
    kernel, _ = _tuned_kernels()
    # Absent bias/alpha: any valid pointer; the constexpr flags compile its loads away.
    wrap_triton(kernel)[_grid(m, n)](
        x, weight, weight if bias is None else bias, weight if alpha is None else alpha, out,
        m, n, k, _m_bucket(m),
        x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1),
        0 if bias is None else bias.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=bias is not None, HAS_ALPHA=alpha is not None and act != "identity",
        INPUT_PRECISION=_input_precision(x.dtype), DOT_IN_FP32=_dot_in_fp32(x.dtype),
    )
    return out


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
    _, kernel = _tuned_kernels()
    wrap_triton(kernel)[_grid(m, n)](
        x, w1, w1 if b1 is None else b1, w1 if alpha is None else alpha, w2, w2 if b2 is None else b2, out,
        m, n, k, h, _m_bucket(m),
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1),
        0 if b1 is None else b1.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        w2.stride(0), w2.stride(1),
        0 if b2 is None else b2.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_B1=b1 is not None, HAS_ALPHA=alpha is not None and act != "identity",
        HAS_B2=b2 is not None, INPUT_PRECISION=_input_precision(x.dtype), DOT_IN_FP32=_dot_in_fp32(x.dtype),
    )
    return out


def _triton_fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str
) -> torch.Tensor:
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return launch_fused_linear(x, weight, bias, alpha, act, out)


def _triton_fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    out = x.new_empty((x.shape[0], w2.shape[0]))
    return launch_fused_mlp(x, w1, b1, alpha, act, w2, b2, out)


# ----------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------

@triton_op("lc_kernels::fused_linear", mutates_args=())
def _fused_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    # Also the fake kernel and, under torch.compile, the decomposition: off the Triton path the
    # reference's aten ops are what Inductor sees and fuses.
    if _use_triton(x):
        return _triton_fused_linear(x, weight, bias, alpha, act)
    return reference.fused_linear(x, weight, bias, alpha, act)


@triton_op("lc_kernels::fused_mlp", mutates_args=())
def _fused_mlp_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    if _use_triton(x):
        return _triton_fused_mlp(x, w1, b1, alpha, act, w2, b2)
    return reference.fused_mlp(x, w1, b1, alpha, act, w2, b2)


def _cpu_fused_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: Optional[torch.Tensor], act: str
) -> torch.Tensor:
    # In place on F.linear's fresh output: the epilogue then makes no pass over (M, N) memory
    # that nn.Sequential(Linear, act, Linear) does not (see reference.collapsible_activation_).
    return reference.collapsible_activation_(F.linear(x, weight, bias), act, alpha)


@_fused_linear_op.register_kernel("cpu")
def _fused_linear_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    if _use_triton(x):
        return _triton_fused_linear(x, weight, bias, alpha, act)
    return _cpu_fused_linear(x, weight, bias, alpha, act)


@_fused_mlp_op.register_kernel("cpu")
def _fused_mlp_cpu(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    act: str,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
) -> torch.Tensor:
    if _use_triton(x):
        return _triton_fused_mlp(x, w1, b1, alpha, act, w2, b2)
    return F.linear(_cpu_fused_linear(x, w1, b1, alpha, act), w2, b2)


# ----------------------------------------------------------------------------------------------
# Autograd (a PyTorch backward; the forward keeps no pre-activation)
# ----------------------------------------------------------------------------------------------

def _linear_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    alpha: Optional[torch.Tensor],
    act: str,
    z: torch.Tensor,
    needs: Sequence[bool],
) -> tuple[Optional[torch.Tensor], ...]:
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


def _fused_linear_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, weight, bias, alpha, act = inputs
    ctx.save_for_backward(x, weight, bias, alpha)
    ctx.act = act


def _fused_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    x, weight, bias, alpha = ctx.saved_tensors
    # Recomputing z costs one GEMM in training but lets the forward overwrite z in place, so
    # inference pays no extra (M, N) buffer or pass for the ability to train.
    z = F.linear(x, weight, bias)
    return (*_linear_act_backward(grad, x, weight, bias is not None, alpha, ctx.act, z, ctx.needs_input_grad), None)


def _fused_mlp_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, w1, b1, alpha, act, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, alpha, w2)
    ctx.act = act
    ctx.has_b2 = b2 is not None


def _fused_mlp_backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    x, w1, b1, alpha, w2 = ctx.saved_tensors
    needs = ctx.needs_input_grad
    z = F.linear(x, w1, b1)
    hidden = reference.collapsible_activation(z, ctx.act, alpha)
    grad_w2 = grad.t() @ hidden if needs[5] else None
    grad_b2 = grad.sum(0) if ctx.has_b2 and needs[6] else None
    grad_x, grad_w1, grad_b1, grad_alpha = _linear_act_backward(
        grad @ w2, x, w1, b1 is not None, alpha, ctx.act, z, needs
    )
    return grad_x, grad_w1, grad_b1, grad_alpha, None, grad_w2, grad_b2


_fused_linear_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup_context)
_fused_mlp_op.register_autograd(_fused_mlp_backward, setup_context=_fused_mlp_setup_context)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

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
            channel) elements for ``alpha * z + (1 - alpha) * base(z)``.
        act: one of ``reference.ACTIVATIONS``.

    Returns:
        ``(..., N)``. Differentiable in ``x``, ``weight``, ``bias`` and ``alpha``.

    Raises:
        TypeError, ValueError: on operands that do not fit, saying what to change.
    """
    _validate("fused_linear", x, [("weight", weight, "bias", bias)], alpha, act)
    y = torch.ops.lc_kernels.fused_linear(_rows(x), weight, bias, alpha, act)
    return y.reshape(*x.shape[:-1], weight.shape[0])


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
    With ``act="identity"`` and ``alpha=None`` it is the factored low-rank pair. On CUDA the
    hidden activation stays on chip (see :func:`prefer_fused_mlp` for when that pays).

    Raises:
        TypeError, ValueError: on operands that do not fit, saying what to change.
    """
    _validate("fused_mlp", x, [("w1", w1, "b1", b1), ("w2", w2, "b2", b2)], alpha, act)
    y = torch.ops.lc_kernels.fused_mlp(_rows(x), w1, b1, alpha, act, w2, b2)
    return y.reshape(*x.shape[:-1], w2.shape[0])


# H100 SXM datasheet: dense bf16 989 TFLOP/s, HBM3 3.35 TB/s; ~3 us per eager kernel launch.
# Not yet timed on a GPU in this project: a roofline estimate, to be replaced by measurement.
_PEAK_FLOPS = 989e12
_PEAK_BYTES = 3.35e12
_LAUNCH_S = 3e-6
# GEMM output tile of fused_linear's large configs and fused_mlp's largest, for occupancy.
_LINEAR_TILE = (128, 128)
_MLP_TILE = (64, 128)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_seconds(flops: int, elems: int, tiles: int, sms: int) -> float:
    """Roofline time of one kernel (2-byte elements), slowed by the share of idle SMs."""
    return max(flops / _PEAK_FLOPS, 2 * elems / _PEAK_BYTES) * max(1.0, sms / max(tiles, 1))


def prefer_fused_mlp(M: int, K: int, H: int, N: int, device: torch.device | str) -> bool:
    """Whether ``fused_mlp`` beats two ``fused_linear`` calls for ``(M, K) -> H -> N``.

    Cost rule on CUDA, a roofline estimate of both plans (2-byte activations):

    * two calls: ``2MKH`` FLOPs moving ``MK + HK + MH`` elements, then ``2MHN`` FLOPs moving
      ``MH + NH + MN``, plus one more launch;
    * fused: never writes or re-reads the ``(M, H)`` hidden tensor, but recomputes
      ``X @ W1.T`` for each of the ``ceil(N / 128)`` output column tiles:
      ``2MH(K * tiles + N)`` FLOPs moving ``MK + HK + NH + MN``;

    each slowed by ``SMs / tiles`` when its grid cannot fill the GPU (the fused grid has
    ``H / 128`` times fewer tiles). Why: the fused kernel only pays where the hidden tensor's
    traffic and the launch outweigh recomputation, e.g. a 768 -> 64 -> 768 FACTOR pair at 4096
    tokens (3.8 us fused vs 10.6 us + launch: the rank-64 GEMM fills 32 of 132 SMs) or narrow
    outputs; a 768 -> 3072 -> 768 KEEP MLP
    (136 us fused vs 39 us) stays on two GEMMs.

    Off CUDA both plans run the same aten work (two GEMMs, in-place epilogue) and the fused op
    is one dispatch instead of two, so this returns True.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return True
    sms = _sm_count(device)
    lm, ln = _LINEAR_TILE
    fm, fn = _MLP_TILE
    n_tiles = -(-N // fn)
    two = (
        _kernel_seconds(2 * M * K * H, M * K + H * K + M * H, -(-M // lm) * -(-H // ln), sms)
        + _kernel_seconds(2 * M * H * N, M * H + N * H + M * N, -(-M // lm) * -(-N // ln), sms)
        + _LAUNCH_S
    )
    fused = _kernel_seconds(2 * M * H * (K * n_tiles + N), M * K + H * K + N * H + M * N, -(-M // fm) * n_tiles, sms)
    return fused < two
