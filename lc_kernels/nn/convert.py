"""Turning user activation modules into :class:`CollapsibleActivation` without changing outputs."""
from __future__ import annotations

import torch
from torch import nn

from .activation import CollapsibleActivation, check_base

# Activation modules that become collapsible, and how: (base name, initial alpha or None for
# "use alpha_init"). PReLU / LeakyReLU already are relu interpolations: their slope is alpha.
_SIMPLE = {nn.ReLU: "relu", nn.SiLU: "silu"}


def to_collapsible(
    act: nn.Module | str, width: int, *, alpha_init: float = 0.0, per_channel: bool = False
) -> CollapsibleActivation:
    """Convert ``act`` to a :class:`CollapsibleActivation` that computes the same function.

    Raises ``TypeError`` for activations that have no exact interpolating form (Tanh,
    Sigmoid, custom modules); the caller decides whether that means "skip" or "error".
    """
    n = width if per_channel else 1
    if isinstance(act, CollapsibleActivation):
        if act.num_parameters not in (1, width):
            raise ValueError(f"CollapsibleActivation has {act.num_parameters} slopes but the hidden width is {width}")
        return act
    if isinstance(act, str):
        return CollapsibleActivation(check_base(act), n, alpha_init)
    if type(act) in _SIMPLE:
        return CollapsibleActivation(_SIMPLE[type(act)], n, alpha_init)
    if type(act) is nn.GELU:
        base = {"none": "gelu", "tanh": "gelu_tanh"}[act.approximate]
        return CollapsibleActivation(base, n, alpha_init)
    if type(act) is nn.LeakyReLU:
        return CollapsibleActivation("relu", n, float(act.negative_slope))
    if type(act) is nn.PReLU:
        w = act.weight.detach().to(torch.float32).reshape(-1)
        if w.numel() not in (1, width):
            raise ValueError(f"PReLU has {w.numel()} slopes but the hidden width is {width}")
        m = CollapsibleActivation("relu", w.numel() if w.numel() > 1 else n, w)
        return m
    raise TypeError(
        f"{type(act).__name__} has no exact collapsible form; supported: ReLU, GELU (both "
        "approximations), SiLU, PReLU, LeakyReLU"
    )


def is_activation(m: nn.Module) -> bool:
    """Heuristic: a parameter-light module that is neither a Linear, a norm nor a dropout."""
    return not isinstance(m, (nn.Linear, nn.Dropout, nn.BatchNorm1d, nn.Sequential, nn.Identity)) and (
        type(m).__module__.startswith("torch.nn.modules.activation") or isinstance(m, CollapsibleActivation)
    )
