"""Registered ops ``torch.ops.lc_kernels.fused_linear`` / ``fused_mlp`` and their Python entry points.

One file per op (``fused_linear_op.py``, ``fused_mlp_op.py``: registration, CPU kernel,
autograd, wrapper); operand checks in ``validate.py``; which path and plan runs in
``dispatch.py``; ``reference.py`` is the PyTorch truth they are checked against. Importing this
package registers the ops; it does not import Triton or Inductor.
"""
from . import reference
from .dispatch import prefer_fused_mlp, use_triton
from .fused_gated_linear_op import fused_gated_linear, launch_fused_gated_linear
from .fused_linear_op import fused_linear, launch_fused_linear
from .fused_mlp_op import fused_mlp, launch_fused_mlp

__all__ = ["fused_linear", "fused_mlp", "prefer_fused_mlp", "use_triton", "launch_fused_linear", "launch_fused_mlp",
           "fused_gated_linear", "launch_fused_gated_linear", "reference"]
