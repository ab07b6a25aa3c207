"""Modules users touch."""
from .activation import CollapsibleActivation
from .gated import LCGatedMLP
from .mlp import LCChain, LCFusedMLP, linears_of

__all__ = ["CollapsibleActivation", "LCChain", "LCFusedMLP", "LCGatedMLP", "linears_of"]
