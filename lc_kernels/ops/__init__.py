"""Registered ops ``torch.ops.lc_kernels.fused_linear`` / ``fused_mlp`` and their Python entry points.

``reference`` holds the PyTorch truth they are checked against. Importing this package
registers the ops; it does not import Triton.
"""
from . import reference
from .fused import fused_linear, fused_mlp, prefer_fused_mlp

__all__ = ["fused_linear", "fused_mlp", "prefer_fused_mlp", "reference"]
