"""``save_collapsed`` / ``load_collapsed``: safetensors weights plus a JSON that says how to rebuild.

No code runs on load: the weights are safetensors and the structure is replayed from the plans
recorded in the JSON onto a freshly built original model.
"""
from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from .._version import __version__
from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCChain, LCFusedMLP
from ..planning import CollapsePlan, find_sites
from .collapse import _check_site_matches, _record, apply_site
from .prepare import prepare_

WEIGHTS, META = "model.safetensors", "lc_collapse.json"
CHECKPOINT_FORMAT = "lc_kernels.collapsed/1"


def _layout(model: nn.Module) -> dict[str, int]:
    """site path -> slopes per joint (1, or the width when per channel), for rebuilding."""
    layout = {}
    for plan in getattr(model, "_lc_plans", []):
        for sp in plan.sites:
            layout.setdefault(sp.path, max(len(j.alpha) for j in sp.joints))
    for site in find_sites(model):
        layout.setdefault(site.path, max(a.num_parameters for a in site.acts if a is not None))
    return layout


def save_collapsed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights (safetensors) and how to rebuild it (JSON) into directory ``path``.

    The JSON holds every plan ``collapse_`` applied to the model, in order, and which sites
    ``prepare_`` converted; :func:`load_collapsed` replays them onto a freshly built model.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_collapsed expects an nn.Module, got {type(model).__name__}")
    layout = _layout(model)
    if not layout:
        raise ValueError("the model has no LayerCollapse sites: run prepare_ (and collapse_) before saving")
    os.makedirs(path, exist_ok=True)
    tensors, aliases, seen = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:  # tied weights are stored once
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "lc_kernels_version": __version__,
        "prepared": layout,
        "aliases": aliases,
        "plans": [p.to_dict() for p in getattr(model, "_lc_plans", [])],
    }
    save_file(tensors, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and validate a ``save_collapsed`` directory; errors name the file and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, w_path = os.path.join(path, META), os.path.join(path, WEIGHTS)
    for p in (meta_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p} is missing; expected a directory written by save_collapsed")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt (not JSON: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} has format {got!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated: {e}") from e
    return meta, tensors


def load_collapsed(model: nn.Module, path: str | os.PathLike) -> CollapsePlan | None:
    """Rebuild a collapsed model saved by :func:`save_collapsed` onto a fresh original ``model``.

    ``model`` is the architecture as originally built (or already prepared). The checkpoint is
    validated against a copy first; on any mismatch the error names the site and what differs
    and ``model`` is left unchanged. Returns the last plan applied (None for a prepared,
    uncollapsed checkpoint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_collapsed expects an nn.Module, got {type(model).__name__}")
    meta, tensors = read_checkpoint(path)
    try:
        plans = [CollapsePlan.from_dict(d) for d in meta["plans"]]
        layout = {str(k): int(v) for k, v in meta["prepared"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{os.path.join(path, META)} is corrupt: {e}") from e
    trial = copy.deepcopy(model)
    rebuild_(trial, plans, layout)
    state = _state_from_file(trial, tensors, meta.get("aliases", {}))
    rebuild_(model, plans, layout)  # validated on the copy: the same steps cannot fail now
    model.load_state_dict(state)
    return plans[-1] if plans else None


def rebuild_(model: nn.Module, plans: list[CollapsePlan], layout: dict[str, int]) -> None:
    """Prepare ``model`` as ``layout`` records and replay the plans' structure (not weights)."""
    if not any(isinstance(m, (LCFusedMLP, LCChain)) for m in model.modules()):
        per_ch = {p for p, n in layout.items() if n > 1}
        got = list(prepare_(model, filter_fn=lambda m, p: p in per_ch, per_channel=True))
        got += prepare_(model, filter_fn=lambda m, p: p in layout and p not in per_ch)
        missing = sorted(set(layout) - set(got))
        if missing:
            raise ValueError(f"checkpoint sites {missing} were not found in this model (it has {sorted(got)}); "
                             "build the same architecture the checkpoint was saved from")
    for plan in plans:
        for sp in plan.sites:
            m = _check_site_matches(model, sp)
            acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
            for act, jp in zip(acts, sp.joints):
                if isinstance(act, CollapsibleActivation) and act.num_parameters != len(jp.alpha):
                    raise ValueError(f"site {sp.path!r}: checkpoint has {len(jp.alpha)} slopes per joint, "
                                     f"the model {act.num_parameters}")
            if sp.changes:
                apply_site(m, sp)
        _record(model, plan)


def _state_from_file(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    expected = model.state_dict()
    state, problems = {}, []
    for k, v in expected.items():
        src = aliases.get(k, k)
        if src not in tensors:
            problems.append(f"{_site_of(k)}: missing {k}")
        elif tuple(tensors[src].shape) != tuple(v.shape):
            problems.append(f"{_site_of(k)}: {k} has shape {tuple(tensors[src].shape)} in the checkpoint, "
                            f"{tuple(v.shape)} in the model")
        else:
            state[k] = tensors[src]
    extra = sorted(set(tensors) - set(expected) - set(aliases.values()))
    problems += [f"{_site_of(k)}: unexpected {k} in the checkpoint" for k in extra]
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems[:10])
                         + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else ""))
    return state


def _site_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:-2]) or parts[0]
