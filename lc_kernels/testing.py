"""Helpers shared by the tests, the benchmarks and the demo: one definition of each comparison."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives NaN."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()
