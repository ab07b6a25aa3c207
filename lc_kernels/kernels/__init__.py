"""Triton kernels (``@triton.jit`` code and autotune configs only).

Importing this package imports Triton; ``lc_kernels.ops`` does so lazily, on the first launch.
"""
from .fused_gated_linear import fused_gated_linear_kernel
from .fused_linear import fused_linear_kernel
from .fused_mlp import fused_mlp_kernel

__all__ = ["fused_linear_kernel", "fused_mlp_kernel", "fused_gated_linear_kernel"]
