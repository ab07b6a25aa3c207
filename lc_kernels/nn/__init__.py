"""Modules users touch."""
from .activation import CollapsibleActivation
from .mlp import LCChain, LCFusedMLP, linears_of

__all__ = ["CollapsibleActivation", "LCChain", "LCFusedMLP", "linears_of"]
