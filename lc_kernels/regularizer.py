"""The LayerCollapse regularizer: pull every collapsible slope toward 1."""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import nn

from .nn.activation import CollapsibleActivation


def collapsible_activations(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool] | None = None
                            ) -> list[tuple[str, CollapsibleActivation]]:
    """(path, module) for every CollapsibleActivation in ``model`` that ``filter_fn`` admits."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, CollapsibleActivation) and (filter_fn is None or filter_fn(m, n))]


def check_nonneg(name: str, value: object, hint: str = "") -> float:
    """``value`` as a float if it is a finite real number >= 0, else an error naming ``name``.

    A negative learning rate runs gradient ascent and an infinite strength makes the first
    loss inf: both are refused here, before anything trains.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__} {value!r}{hint}")
    if not math.isfinite(value) or value < 0:
        why = "; a negative learning rate climbs the loss" if value < 0 and "lr" in name else ""
        raise ValueError(f"{name} must be a number >= 0 and finite, got {value!r}{why}{hint}")
    return float(value)


def _check_steps(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (0: no ramp), got {value!r}")
    return int(value)


def _loss(acts: list[CollapsibleActivation]) -> torch.Tensor:
    # One mean per activation (per-channel slopes are averaged), summed: each joint weighs the
    # same whatever its width. Stays on device: no .item(), no host sync.
    return torch.stack([(1 - a.alpha).pow(2).mean() for a in acts]).sum()


def collapse_loss(model: nn.Module) -> torch.Tensor:
    """``sum over activations of mean over channels of (1 - alpha)^2`` (differentiable scalar)."""
    acts = [m for _, m in collapsible_activations(model)]
    if not acts:
        raise ValueError("the model has no CollapsibleActivation: call lc_kernels.prepare_(model) first")
    return _loss(acts)


class CollapseRegularizer:
    """``reg()`` returns ``strength * ramp * collapse_loss``; use as ``loss = task + reg()``.

    ``warmup_steps`` ramps the strength linearly from 0 over that many training calls (calls
    made with grad enabled count as steps). ``filter_fn(module, path)`` picks which
    activations are regularized, e.g. only the last k joints as in the paper.
    The set of activations is taken at construction; call :meth:`refresh` after changing
    the model (e.g. after ``collapse_``).
    """

    def __init__(self, model: nn.Module, strength: float, warmup_steps: int = 0,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None):
        strength = check_nonneg("strength", strength, " (0 turns the regularizer off)")
        warmup_steps = _check_steps("warmup_steps", warmup_steps)
        self.model, self.strength, self.warmup_steps, self.filter_fn = model, strength, warmup_steps, filter_fn
        self.steps = 0
        self.refresh()

    def refresh(self) -> None:
        """Re-collect the regularized activations from the model."""
        self.named = collapsible_activations(self.model, self.filter_fn)
        if not self.named:
            raise ValueError("no CollapsibleActivation selected: call lc_kernels.prepare_(model) first "
                             "(or loosen filter_fn)")

    @property
    def scale(self) -> float:
        """The strength in force now, after warm-up."""
        if self.warmup_steps == 0:
            return self.strength
        return self.strength * min(1.0, (self.steps + 1) / self.warmup_steps)

    def __call__(self) -> torch.Tensor:
        out = _loss([m for _, m in self.named]) * self.scale
        if torch.is_grad_enabled():
            self.steps += 1
        return out

    def alphas(self) -> dict[str, float]:
        """Mean slope per regularized activation (host sync: for logging, not the hot loop)."""
        return {n: m.alpha.detach().mean().item() for n, m in self.named}


def alpha_param_groups(model: nn.Module, lr: float, *, alpha_lr: float | None = None,
                       weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups that let alpha travel: its own (larger) lr and no weight decay.

    Adam moves a parameter by about its lr per step whatever the gradient, and alpha must
    travel about 1: at lr 1e-3 it stalls near 0.7 after 1000 steps. Weight decay would pull
    alpha toward 0, i.e. back to the nonlinearity. Default ``alpha_lr`` is ``10 * lr``.
    """
    lr = check_nonneg("lr", lr)
    alpha_lr = None if alpha_lr is None else check_nonneg("alpha_lr", alpha_lr)
    weight_decay = check_nonneg("weight_decay", weight_decay)
    alpha_ids = {id(m.alpha) for _, m in collapsible_activations(model)}
    alphas = [p for p in model.parameters() if id(p) in alpha_ids]
    if not alphas:
        raise ValueError(f"alpha_param_groups found no collapsible slopes (alpha) in this {type(model).__name__}: "
                         "call lc_kernels.prepare_(model) first, then build the optimizer; a model without slopes "
                         "needs no separate group (pass model.parameters())")
    rest = [p for p in model.parameters() if id(p) not in alpha_ids]
    return [
        {"params": rest, "lr": lr, "weight_decay": weight_decay},
        {"params": alphas, "lr": alpha_lr if alpha_lr is not None else 10 * lr, "weight_decay": 0.0},
    ]
