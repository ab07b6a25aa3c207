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
