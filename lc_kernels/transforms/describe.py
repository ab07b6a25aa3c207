"""What a prepared site is: activation, slopes, norm and its position, dropout, dtype per joint.

``prepare_`` records this for every site it converts (in ``model.__dict__[PREPARED_KEY]``), before
a collapse folds any of it into weights, so ``save_collapsed`` can write it and ``load_collapsed``
can refuse a differently built model.
"""
from __future__ import annotations

from torch import nn

from ..nn.activation import CollapsibleActivation
from ..nn.gated import LCGatedMLP
from ..nn.mlp import LCFusedMLP

# model.__dict__ key: the prepared architecture (from prepare_ or load_collapsed), kept for saving.
PREPARED_KEY = "_lc_prepared"
_JOINT_FIELDS = ("activation", "slopes", "norm", "norm_position", "dropout", "fit")


def _dropout(drop: nn.Module | None) -> float | str:
    if drop is None or isinstance(drop, nn.Identity):
        return "none"
    p = getattr(drop, "p", None)
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else type(drop).__name__


def _joint(act: nn.Module, norm: nn.Module | None, norm_pre: bool, drop: nn.Module | None) -> dict:
    live, bn = isinstance(act, CollapsibleActivation), isinstance(norm, nn.BatchNorm1d)
    return {"activation": act.base if live else "none", "slopes": act.num_parameters if live else 0,
            "norm": "BatchNorm1d" if bn else "none", "norm_position": ("pre" if norm_pre else "post") if bn else None,
            "dropout": _dropout(drop), "fit": None}


def _unknown_joint(slopes: int) -> dict:
    return {**dict.fromkeys(_JOINT_FIELDS), "slopes": slopes}


def _dtype(m: nn.Module) -> str | None:
    lin = next((x for x in m.modules() if isinstance(x, nn.Linear)), None)
    return None if lin is None else str(lin.weight.dtype).removeprefix("torch.")


def _describe_untouched(m: nn.Module) -> dict:
    """The full description of a site that no plan has changed (as ``prepare_`` left it)."""
    if isinstance(m, LCGatedMLP):
        return {"kind": "LCGatedMLP", "widths": [m.in_features, m.hidden_features, m.out_features],
                "dtype": _dtype(m), "joints": [_joint(m.act, None, False, None)], "packed": m.packed}
    if isinstance(m, LCFusedMLP):
        lins, joints = [m.fc1, m.fc2], [_joint(m.act, m.norm, m.norm_pre, m.drop)]
    else:
        lins = list(m.linears)
        joints = [_joint(a, n, pre, d) for a, n, pre, d in zip(m.acts, m.norms, m.norm_pre, m.drops)]
    return {"kind": type(m).__name__, "widths": [lins[0].in_features] + [lin.out_features for lin in lins],
            "dtype": _dtype(m), "joints": joints}
