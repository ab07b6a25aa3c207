"""Operand checks at the ops' public boundary: errors say what arrived, what was expected, what to do."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from . import dispatch, reference


def describe(t: torch.Tensor) -> str:
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


def check_operands(
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
    if x.dtype == torch.float64 and dispatch.use_triton(x):
        raise TypeError(
            f"{op}: float64 runs on the PyTorch path only and x {describe(x)} would go to the "
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


def check_raw_input(op: str, x: torch.Tensor) -> None:
    """The registered ops take ``x`` as ``(M, K)``: refuse anything else instead of guessing."""
    if x.dim() != 2:
        raise ValueError(
            f"torch.ops.lc_kernels.{op} takes a 2-D x of shape (M, K), got shape {tuple(x.shape)}; "
            f"flatten the leading dims (x.flatten(0, -2)) or call lc_kernels.ops.{op}, which does"
        )


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(M, K)``: a view whenever the leading dims allow, strides kept for the kernel."""
    return x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)


def check_gated_operands(op: str, x: Any, w: Any, b: Any, act: Any, alpha: Any) -> None:
    """Check the operands of a gated linear: ``w`` stacks ``[W_g; W_u]`` as ``(2H, K)``, ``b`` is
    ``(2H,)`` or ``None``, ``alpha`` (gate half only) holds 1 or H elements.

    Raises ``TypeError`` or ``ValueError`` saying what arrived, what was expected and what to do.
    """
    if not isinstance(act, str):
        # The gated op takes (x, w, b, act, alpha), fused_linear (x, weight, bias, alpha, act):
        # a tensor here is most likely alpha passed in act's place.
        raise TypeError(
            f"{op}: act must be a str, one of {reference.ACTIVATIONS}, got {type(act).__name__}; the "
            f"argument order is (x, w, b, act, alpha): pass alpha by keyword (alpha=...)"
        )
    check_operands(op, x, [("w", w, "b", b)], None, act)
    if w.shape[0] % 2:
        raise ValueError(
            f"{op}: w must stack the gate and up weights as cat([W_g, W_u]), an even number 2H of "
            f"rows, got shape {tuple(w.shape)}; pass torch.cat([w_gate, w_up]) of two (H, K) weights"
        )
    if alpha is not None:
        _check_operand(op, "alpha", alpha, x, 1)
        if not alpha.is_floating_point():
            raise TypeError(f"{op}: alpha must be floating point, got {alpha.dtype}")
        hidden = w.shape[0] // 2
        if alpha.numel() not in (1, hidden):
            raise ValueError(
                f"{op}: alpha must hold 1 (shared) or {hidden} (per gate channel, H = w.shape[0] // 2) "
                f"elements, got shape {tuple(alpha.shape)}; pass alpha of shape (1,) or ({hidden},)"
            )
