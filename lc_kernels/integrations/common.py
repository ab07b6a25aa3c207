"""What every integration handler shares: exact activation mapping and swapping in an LCFusedMLP.

An integration recognises a library's MLP block, checks that it really is
``Linear -> act -> [Dropout] -> Linear [-> Dropout]``, and replaces it by an
:class:`~lc_kernels.nn.mlp.LCFusedMLP` that reuses the block's Linear modules. Nothing here
imports timm or transformers: their classes are looked up in ``sys.modules`` by the caller.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .registry import PrepareOptions, join
from ..nn.convert import to_collapsible
from ..nn.mlp import LCFusedMLP

# Library activation classes that compute one of the collapsible bases exactly (to float
# rounding: <= 4e-8 relative in float32 on N(0, 3^2) inputs; tests/test_integrations.py checks each). Keyed by
# (defining module, class name) so the classes are never imported to build the table.
# FastGELU and AccurateGELU are the tanh formula with sqrt(2/pi) rounded to 10 and 16 digits.
LIBRARY_ACTIVATIONS: dict[tuple[str, str], str] = {
    ("transformers.activations", "GELUActivation"): "gelu",
    ("transformers.activations", "NewGELUActivation"): "gelu_tanh",
    ("transformers.activations", "GELUTanh"): "gelu_tanh",
    ("transformers.activations", "PytorchGELUTanh"): "gelu_tanh",  # GELUTanh's former name
    ("transformers.activations", "FastGELUActivation"): "gelu_tanh",
    ("transformers.activations", "AccurateGELUActivation"): "gelu_tanh",
    ("transformers.activations", "SiLUActivation"): "silu",
    ("timm.layers.activations", "GELU"): "gelu",
    ("timm.layers.activations", "GELUTanh"): "gelu_tanh",
    ("timm.layers.activations", "Swish"): "silu",
}

# Plain functions a config may hold instead of a module (BertConfig(hidden_act=F.gelu)).
FUNCTIONS: dict[Callable, str] = {F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", F.silu: "silu"}


def library_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is already imported, else None (never imports it)."""
    return getattr(sys.modules.get(module), name, None)


def collapsible_act(act: object) -> nn.Module | str:
    """What :meth:`LCFusedMLP.from_modules` needs for ``act``: a base name or a torch module.

    Raises ``TypeError`` for an activation with no exact collapsible form.
    """
    for (mod, name), base in LIBRARY_ACTIVATIONS.items():
        cls = library_class(mod, name)
        # Exact type: a subclass may override forward with another function.
        if cls is not None and type(act) is cls:
            return base
    if isinstance(act, nn.Module):
        return act  # torch.nn activations: to_collapsible decides (and explains a refusal)
    for fn, base in FUNCTIONS.items():
        if act is fn:
            return base
    raise TypeError(f"{getattr(act, '__name__', type(act).__name__)} has no exact collapsible form; supported: "
                    "ReLU, GELU (erf and tanh forms), SiLU, PReLU, LeakyReLU")


def is_active_dropout(m: nn.Module | None) -> bool:
    """True for a dropout that changes training outputs (p > 0)."""
    return isinstance(m, nn.Dropout) and m.p > 0


def swap_in_mlp(
    parent: nn.Module,
    name: str,
    path: str,
    opts: PrepareOptions,
    fc1: nn.Linear,
    act: object,
    fc2: nn.Linear,
    *,
    drop: nn.Module | None = None,
    out_drop: nn.Module | None = None,
) -> bool:
    """Replace ``parent.<name>`` (a block computing ``out_drop(fc2(drop(act(fc1(x)))))``; for a
    BERT layer only ``act(fc1(x))``, and the caller then takes fc2 out of ``output``).

    The site is ``parent.<name>`` itself, or ``parent.<name>.0`` when ``out_drop`` is an active
    dropout: then the block becomes ``Sequential(LCFusedMLP, out_drop)`` so training keeps the
    dropout after fc2. Without it the LCFusedMLP's state dict keys (``fc1.*``, ``fc2.*``) are
    the block's own plus ``act.alpha``. Appends the site to ``opts.result`` and returns True,
    or appends ``(path, reason)`` to ``opts.result.skipped`` and returns False.
    """
    block_path = join(path, name)
    keep_out_drop = is_active_dropout(out_drop)
    site = join(block_path, "0") if keep_out_drop else block_path
    try:
        spec = collapsible_act(act)
        # Validate the activation here, so a refusal is a skip with its reason.
        to_collapsible(spec, fc1.out_features)
    except (TypeError, ValueError) as e:
        opts.result.skipped.append((block_path, f"activation left as is: {e}"))
        return False
    if opts.filter_fn is not None and not opts.filter_fn(fc1, site):
        opts.result.skipped.append((site, "excluded by filter_fn"))
        return False
    old = parent._modules[name]
    new: nn.Module = LCFusedMLP.from_modules(
        fc1, spec, fc2, drop=drop if isinstance(drop, nn.Dropout) else None,
        alpha_init=opts.alpha_init, per_channel=opts.per_channel)
    if keep_out_drop:
        new = nn.Sequential(new, out_drop)
    # A fresh module starts in train mode; follow the block it replaces (dropout in eval).
    new.train(old.training)
    parent._modules[name] = new
    opts.result.append(site)
    return True
