"""The PyTorch truth for every op in this package.

One reference, used three times: it is the CPU implementation of the registered ops, the
oracle the tests compare kernels against, and the baseline the benchmarks time.

Activation names (``act``): ``identity``, ``relu``, ``gelu`` (erf), ``gelu_tanh``, ``silu``.
``alpha`` is ``None`` (plain ``base(z)``) or a 1-D tensor of 1 or N elements (N = last dim
of ``z``) giving the collapsible activation ``alpha * z + (1 - alpha) * base(z)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")


def base_activation(z: torch.Tensor, act: str) -> torch.Tensor:
    """``base(z)`` for one of :data:`ACTIVATIONS`."""
    if act == "identity":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def collapsible_activation(z: torch.Tensor, act: str, alpha: torch.Tensor | None) -> torch.Tensor:
    """``alpha * z + (1 - alpha) * base(z)``; ``alpha`` broadcasts along the last dim."""
    if alpha is None or act == "identity":
        return base_activation(z, act)
    a = alpha.to(z.dtype)
    return a * z + (1 - a) * base_activation(z, act)


def base_activation_backward(grad: torch.Tensor, z: torch.Tensor, act: str) -> torch.Tensor:
    """``grad * base'(z)`` through the aten backward ops autograd itself uses for ``base``."""
    if act == "identity":
        return grad
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, z, approximate="tanh")
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def _base_activation_out(z: torch.Tensor, act: str, out: torch.Tensor) -> None:
    if act == "relu":
        torch.clamp_min(z, 0, out=out)
    elif act == "gelu":
        torch.ops.aten.gelu.out(z, out=out)
    elif act == "gelu_tanh":
        torch.ops.aten.gelu.out(z, approximate="tanh", out=out)
    elif act == "silu":
        torch.ops.aten.silu.out(z, out=out)
    else:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


# Elements per row block in collapsible_activation_: a block of z and its base(z) scratch
# (2 x 8 MiB in fp32) fit together in half of a typical 32 MiB L3, so the lerp re-reads both
# from cache and z crosses DRAM once. Each block is two OpenMP regions whose barriers wait on
# descheduled threads under load, so smaller blocks trade robustness for cache reuse; the
# measurements behind this choice are in benchmarks/results/notes.md.
_BLOCK_ELEMS = 1 << 21


def collapsible_activation_(z: torch.Tensor, act: str, alpha: torch.Tensor | None) -> torch.Tensor:
    """:func:`collapsible_activation` for a 2-D ``z`` the caller owns, without extra passes.

    For the forward of the registered ops on CPU, where ``z`` is the fresh output of the first
    GEMM and no autograd history is recorded. Overwrites ``z`` and returns it, except for relu
    with alpha, which returns a new tensor; use the return value. The values match the
    out-of-place formula up to rounding; that formula makes three more full passes over
    ``(M, N)`` memory, each into a fresh allocation (0.71-0.85x of nn.Sequential at the
    shapes above).
    """
    if act == "identity" or z.numel() == 0:
        return z
    if alpha is None:
        _base_activation_out(z, act, z)
        return z
    if act == "relu":
        # alpha * z + (1 - alpha) * relu(z) is PReLU with slope alpha: one pass, like nn.ReLU.
        return F.prelu(z, alpha.to(z.dtype))
    weight = 1 - alpha.to(z.dtype)
    rows = max(1, _BLOCK_ELEMS // z.shape[1])
    scratch = torch.empty((min(rows, z.shape[0]), z.shape[1]), dtype=z.dtype, device=z.device)
    for start in range(0, z.shape[0], rows):
        block = z[start : start + rows]
        base = scratch[: block.shape[0]]
        _base_activation_out(block, act, base)
        block.lerp_(base, weight)  # block + (1 - a) * (base - block) = a * z + (1 - a) * base(z)
    return z


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    act: str = "identity",
) -> torch.Tensor:
    """``Y = sigma_alpha(X @ W.T + b)`` with ``X: (..., K)``, ``W: (N, K)``, ``b: (N,)``."""
    return collapsible_activation(F.linear(x, weight, bias), act, alpha)


def fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    alpha: torch.Tensor | None,
    act: str,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
) -> torch.Tensor:
    """``Y = sigma_alpha(X @ W1.T + b1) @ W2.T + b2``; ``W1: (H, K)``, ``W2: (N, H)``."""
    return F.linear(fused_linear(x, w1, b1, alpha, act), w2, b2)


def fused_gated_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "silu",
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Y = sigma_alpha(X @ W_g.T + b_g) * (X @ W_u.T + b_u)`` with ``w = cat([W_g, W_u])``.

    ``X: (..., K)``, ``w: (2H, K)``, ``b: (2H,)`` (``cat([b_g, b_u])``) or ``None``; ``alpha``
    ``None`` or 1 or H elements, on the gate half only. Returns ``(..., H)``.
    """
    h = w.shape[0] // 2
    z = F.linear(x, w, b)
    # Slices, not chunk(2): chunk returns a single piece when H = 0.
    return collapsible_activation(z[..., :h], act, alpha) * z[..., h:]
