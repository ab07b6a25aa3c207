"""``prepare_``: make every Linear -> activation -> Linear site of a model collapsible, in place."""
from __future__ import annotations

import logging
import math

from torch import nn

from ..integrations import PrepareOptions, PreparedSites, handlers, unrecognised_ffns
from ..integrations.registry import FilterFn
from .atomic import atomic
from .describe import PREPARED_KEY, _describe_untouched

log = logging.getLogger(__name__)


def prepare_(
    model: nn.Module,
    *,
    filter_fn: FilterFn | None = None,
    alpha_init: float = 0.0,
    per_channel: bool = False,
) -> PreparedSites:
    """Make every Linear -> activation -> Linear site collapsible, in place.

    ReLU, GELU (erf and tanh), SiLU, PReLU and LeakyReLU become :class:`CollapsibleActivation`
    (PReLU and LeakyReLU keep their slope as alpha); at ``alpha_init=0`` the model computes
    the same function. Runs of three or more Linears become one :class:`LCChain`. Other
    activations are left alone and listed in ``result.skipped`` with the reason.
    ``filter_fn(first_linear, site_path) -> bool`` selects sites. Returns the converted paths.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_ expects an nn.Module, got {type(model).__name__}")
    if not isinstance(alpha_init, (int, float)) or not math.isfinite(alpha_init):
        raise ValueError(f"alpha_init must be a finite float (0 keeps the activation as is), got {alpha_init!r}")
    opts = PrepareOptions(filter_fn, float(alpha_init), bool(per_channel))
    if any(t.is_meta for t in model.parameters()):
        raise ValueError("prepare_ got a model on the meta device (no weights to reuse); materialise it first, e.g. "
                         "model.to_empty(device='cpu') and load its state dict")
    visited: set[int] = set()
    with atomic(model, "prepare_"):
        for path, m in list(model.named_modules()):
            if _inside_site(path, opts.result) or id(m) in visited:
                continue
            visited.add(id(m))
            for handler in handlers():
                handler(m, path, opts)
        unrecognised_ffns(model, opts)
    known = model.__dict__.setdefault(PREPARED_KEY, {})
    for path in opts.result:
        known[path] = _describe_untouched(model.get_submodule(path) if path else model)
    for p, reason in opts.result.skipped:
        log.info("prepare_: skipped %s: %s", p, reason)
    return opts.result


def _inside_site(path: str, done: list[str]) -> bool:
    return any(path == d or path.startswith(d + ".") for d in done)
