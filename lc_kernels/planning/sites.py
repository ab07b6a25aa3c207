"""Where a model can collapse: read-only views of its uncollapsed LCFusedMLP / LCChain sites."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCChain, LCFusedMLP, linears_of


@dataclass
class Site:
    """A read-only view of one collapsible block: its Linear widths and joint activations."""

    path: str
    module: nn.Module
    widths: list[int]
    acts: list[CollapsibleActivation | None]  # None: the joint is already linear (factored)
    biases: list[bool]

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def find_sites(model: nn.Module) -> list[Site]:
    """Every uncollapsed LCFusedMLP and every LCChain with a joint left, in module order."""
    sites = []
    for path, m in model.named_modules():
        if (isinstance(m, LCFusedMLP) and m.form == "mlp") or (
                isinstance(m, LCChain) and "skips" not in m._modules
                and any(isinstance(a, CollapsibleActivation) for a in m.acts)):
            sites.append(site_of(m, path))
    return sites


def site_of(m: nn.Module, path: str) -> Site:
    """The read-only view of one uncollapsed LCFusedMLP or LCChain."""
    acts = [m.act] if isinstance(m, LCFusedMLP) else [a if isinstance(a, CollapsibleActivation) else None
                                                      for a in m.acts]
    lins = linears_of(m)
    widths = [lins[0].in_features] + [lin.out_features for lin in lins]
    return Site(path, m, widths, acts, [lin.bias is not None for lin in lins])


def collapsible_sites(model: nn.Module) -> list[Site]:
    """:func:`find_sites`, or a ValueError saying what to do when there are none."""
    sites = find_sites(model)
    if not sites:
        raise ValueError(
            "the model has no collapsible sites: run lc_kernels.prepare_(model) first "
            "(or it is fully collapsed already)"
        )
    return sites


def site_params(site: Site) -> int:
    """Parameters the site holds now (Linears, slopes, BatchNorm affine terms)."""
    return sum(p.numel() for p in site.module.parameters())


def joint_width(site: Site, i: int) -> int:
    """Hidden width at joint ``i`` (the output width of Linear ``i``)."""
    return site.widths[i + 1]
