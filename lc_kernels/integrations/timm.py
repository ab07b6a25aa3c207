"""timm: the ``Mlp`` block of ViT, DeiT, MLP-Mixer, ... becomes an :class:`LCFusedMLP`.

``timm.layers.Mlp`` computes ``drop2(fc2(norm(drop1(act(fc1(x))))))``. With ``norm`` an
Identity (every ViT / DeiT / Mixer default) the block is replaced in place: the site is the
block's own path (``blocks.3.mlp``) and its state dict keeps timm's names (``fc1.*``,
``fc2.*``) plus ``act.alpha``, so timm checkpoints load into a prepared model with only the
slopes missing. An active ``drop2`` (``proj_drop_rate > 0``) is kept after fc2: the block becomes
``Sequential(LCFusedMLP, drop2)`` and the site is ``blocks.3.mlp.0``.
Skipped, with the reason: a norm between the layers (per-token normalisation is not linear),
1x1-conv blocks (``use_conv=True``), gated blocks (GluMlp, SwiGLU, GatedMlp) and activations
without an exact collapsible form (QuickGELU, Mish, ...).
"""
from __future__ import annotations

from torch import nn

from .registry import PrepareOptions, join
from .common import library_class, swap_in_mlp

MODULE = "timm.layers.mlp"
GATED = ("GluMlp", "SwiGLU", "GatedMlp")


def timm_mlp_handler(module: nn.Module, path: str, opts: PrepareOptions) -> None:
    """Convert the timm ``Mlp`` children of ``module`` (a no-op unless timm is imported)."""
    mlp_cls = library_class(MODULE, "Mlp")
    if mlp_cls is None:
        return
    if not path and type(module) is mlp_cls:
        opts.result.skipped.append(("", "the model itself is a timm Mlp and cannot be replaced in place; "
                                        "use LCFusedMLP.from_modules(m.fc1, m.act, m.fc2)"))
        return
    gated = tuple(c for c in (library_class(MODULE, n) for n in GATED) if c is not None)
    for name, child in list(module.named_children()):
        if gated and isinstance(child, gated):
            opts.result.skipped.append((join(path, name), f"gated MLP ({type(child).__name__}): "
                                                          "fc2(act(a) * b) is not Linear -> act -> Linear"))
        elif type(child) is mlp_cls:  # exact type: a subclass may change forward
            _convert(module, name, child, path, opts)


def _convert(parent: nn.Module, name: str, mlp: nn.Module, path: str, opts: PrepareOptions) -> None:
    if not (isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
        opts.result.skipped.append((join(path, name), f"{type(mlp.fc1).__name__} layers (use_conv=True): "
                                                      "only nn.Linear blocks are converted"))
        return
    if not isinstance(mlp.norm, nn.Identity):
        opts.result.skipped.append((join(path, name), f"{type(mlp.norm).__name__} between fc1 and fc2 normalises "
                                                      "each token, which is not linear: the pair cannot collapse"))
        return
    swap_in_mlp(parent, name, path, opts, mlp.fc1, mlp.act, mlp.fc2, drop=mlp.drop1, out_drop=mlp.drop2)
