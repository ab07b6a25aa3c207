"""Modules users touch."""
from .activation import CollapsibleActivation
from .mlp import LCChain, LCFusedMLP

__all__ = ["CollapsibleActivation", "LCChain", "LCFusedMLP"]
