"""``save_collapsed`` / ``load_collapsed``: safetensors weights plus a JSON that says how to rebuild.

No code runs on load: the weights are safetensors and the structure is replayed from the plans
recorded in the JSON onto a freshly built original model.

The JSON (format ``lc_kernels.collapsed/2``; ``/1`` is still read) describes every site as
``prepare_`` made it, and ``load_collapsed`` refuses a model built differently::

    "architecture": {"0": {"kind": "LCChain", "widths": [8, 16, 16, 4], "dtype": "float32",
                           "joints": [{"activation": "relu", "slopes": 1, "norm": "BatchNorm1d",
                                       "norm_position": "post", "dropout": 0.1, "fit": "exact"}, ...]}}

``norm`` is ``"BatchNorm1d"`` or ``"none"`` (``norm_position``: ``"pre"`` or ``"post"`` the
activation), ``dropout`` is its p or ``"none"``, ``fit`` says how a collapsed joint's weights were
made (``"exact"`` algebra or ``"least-squares"``; null while the joint is kept). ``null`` elsewhere
means unknown: ``collapse_`` folds the norm and dropout of a changed site, and the activation of
a joint it makes linear, into the weights, so a model collapsed in this session no longer knows
them (a model loaded from a checkpoint does). What is unknown no longer changes what the
collapsed model computes.
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
from ..planning import KEEP, MERGE, CollapsePlan, SitePlan
from .atomic import atomic
from .collapse import _check_joints, _check_site_matches, _record, apply_site
from .describe import _JOINT_FIELDS, PREPARED_KEY, _describe_untouched, _dtype, _joint, _unknown_joint
from .prepare import prepare_

WEIGHTS, META = "model.safetensors", "lc_collapse.json"
CHECKPOINT_FORMAT = "lc_kernels.collapsed/2"
READ_FORMATS = ("lc_kernels.collapsed/1", CHECKPOINT_FORMAT)


def _fit_name(plan: CollapsePlan) -> str:
    fit = getattr(plan, "fit", None)
    if fit is True:
        return "least-squares"
    return "exact" if fit in (False, None) else str(fit)


def _live_acts(m: nn.Module) -> list[nn.Module | None]:
    """The activations a (possibly collapsed) site holds now, one per joint it has now."""
    if isinstance(m, LCChain):
        return list(m.acts)
    return {"mlp": [m._modules.get("act")], "partial": [m._modules.get("act")], "factored": [None]}.get(m.form, [])


def _describe_changed(m: nn.Module, steps: list[tuple[CollapsePlan, SitePlan]]) -> dict:
    """What a collapsed site still tells: slopes from its first plan, live activations, fits."""
    first = steps[0][1]
    joints = [_unknown_joint(len(j.alpha)) for j in first.joints]
    cur: list[int] | None = list(range(len(joints)))  # the original joint behind each joint the site has now
    for plan, sp in steps:
        if cur is None or len(sp.joints) != len(cur):
            cur = None
            break
        if not sp.changes:
            continue
        for q, j in enumerate(sp.joints):
            if j.decision != KEEP and joints[cur[q]]["fit"] is None:
                joints[cur[q]]["fit"] = _fit_name(plan)
        # Collapse keeps one joint per non-MERGE joint, in order (a PARTIAL block's inner one included).
        cur = [cur[q] for q, j in enumerate(sp.joints) if j.decision != MERGE]
    live = _live_acts(m)
    if cur is not None and len(live) == len(cur):
        for q, a in zip(cur, live):
            if isinstance(a, CollapsibleActivation):
                joints[q]["activation"] = a.base
    return {"kind": first.kind, "widths": list(first.widths), "dtype": _dtype(m), "joints": joints}


def _with_known(derived: dict, known: dict | None) -> dict:
    """``derived`` with its unknown (None) fields filled from ``known`` (a fuller description)."""
    if not isinstance(known, dict) or len(known.get("joints", [])) != len(derived["joints"]):
        return derived
    out = {k: known.get(k) if v is None else v for k, v in derived.items() if k != "joints"}
    out["joints"] = [{k: kj.get(k) if v is None and k != "fit" else v for k, v in dj.items()}
                     for dj, kj in zip(derived["joints"], known["joints"])]
    return out


def describe_sites(model: nn.Module) -> dict[str, dict]:
    """site path -> the site as ``prepare_`` made it, as far as ``model`` still knows (module docstring)."""
    history: dict[str, list[tuple[CollapsePlan, SitePlan]]] = {}
    for plan in getattr(model, "_lc_plans", []):
        for sp in plan.sites:
            history.setdefault(sp.path, []).append((plan, sp))
    known = model.__dict__.get(PREPARED_KEY) or {}
    out = {}
    for path, m in model.named_modules():
        if not isinstance(m, (LCFusedMLP, LCChain)):
            continue
        steps = history.get(path, [])
        if any(sp.changes for _, sp in steps):
            out[path] = _with_known(_describe_changed(m, steps), known.get(path))
        else:
            out[path] = _describe_untouched(m)
    return out


def save_collapsed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights (safetensors) and how to rebuild it (JSON) into directory ``path``.

    The JSON holds every plan ``collapse_`` applied to the model, in order, which sites
    ``prepare_`` converted (slopes per joint) and what each site was built from (activation,
    norm and its position, dropout, dtype, fit: see the module docstring);
    :func:`load_collapsed` replays them onto a freshly built model and refuses one that differs.
    Existing files of a checkpoint in ``path`` are replaced, each file in one step.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_collapsed expects an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_collapsed expects a directory path (str or os.PathLike), got {type(path).__name__}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is an existing file; save_collapsed writes a directory holding "
                         f"{WEIGHTS} and {META}: pass a directory path (new or existing)")
    arch = describe_sites(model)
    if not arch:
        raise ValueError("the model has no LayerCollapse sites: run prepare_ (and collapse_) before saving")
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
        "prepared": {p: [j["slopes"] for j in d["joints"]] for p, d in arch.items()},
        "architecture": arch,
        "aliases": aliases,
        "plans": [p.to_dict() for p in getattr(model, "_lc_plans", [])],
    }
    text = json.dumps(meta, indent=1)
    os.makedirs(path, exist_ok=True)
    # Temporary names, then os.replace: an interrupted save never leaves a half-written file behind.
    w_path, m_path = os.path.join(path, WEIGHTS), os.path.join(path, META)
    save_file(tensors, w_path + ".tmp")
    with open(m_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(w_path + ".tmp", w_path)
    os.replace(m_path + ".tmp", m_path)


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
    if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path} has format {got!r}, expected one of {READ_FORMATS} (written by save_collapsed)")
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated: {e}") from e
    return meta, tensors


def _parse_meta(meta: dict) -> tuple[list[CollapsePlan], dict[str, int | list[int]], dict[str, dict]]:
    plans_raw = meta.get("plans")
    if not isinstance(plans_raw, list):
        raise ValueError(f"plans is {type(plans_raw).__name__} {plans_raw!r:.60}, expected a list of plans")
    plans = []
    for i, d in enumerate(plans_raw):
        try:
            plans.append(CollapsePlan.from_dict(d))
        except ValueError as e:
            raise ValueError(f"plans[{i}]: {e}") from None
    prepared = meta.get("prepared")
    if not isinstance(prepared, dict):
        raise ValueError(f"prepared is {type(prepared).__name__} {prepared!r:.60}, expected site path -> slopes per "
                         "joint")
    layout: dict[str, int | list[int]] = {}
    for k, v in prepared.items():
        if isinstance(v, list) and v and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v):
            layout[str(k)] = list(v)  # /2: slopes per joint
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
            layout[str(k)] = v  # /1: the most slopes of any joint of the site
        else:
            raise ValueError(f"prepared[{k!r}] is {v!r}, expected slopes per joint (a non-empty list of ints >= 1)")
    arch = meta.get("architecture", {})
    if not isinstance(arch, dict):
        raise ValueError(f"architecture is {type(arch).__name__}, expected site path -> description")
    for p, d in arch.items():
        joints = d.get("joints", []) if isinstance(d, dict) else None
        if not isinstance(joints, list) or not all(isinstance(j, dict) for j in joints):
            raise ValueError(f"architecture[{p!r}] must describe the site as an object whose joints are a list of "
                             f"objects, got {d!r:.80}")
    aliases = meta.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"aliases must map state-dict keys to the key stored for them (strings), got {aliases!r:.80}")
    return plans, layout, arch


def _check_values(tensors: dict[str, torch.Tensor], w_path: str) -> None:
    """A checkpoint holding NaN or Inf would load a model that computes NaN: refuse it, naming the tensors."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{w_path} holds NaN or Inf in {len(bad)} tensor(s): {bad[:5]}; the model it was saved "
                         "from had diverged or the file is corrupt. Save again from a healthy model")


def load_collapsed(model: nn.Module, path: str | os.PathLike) -> CollapsePlan | None:
    """Rebuild a collapsed model saved by :func:`save_collapsed` onto a fresh original ``model``.

    ``model`` is the architecture as originally built (or already prepared). The checkpoint is
    validated against a copy first: the sites, widths and weights, and what each site was built
    from (activation, slopes, norm and its position, dropout, dtype). On any mismatch the error
    names the site and what differs and ``model`` is left unchanged. Returns the last plan
    applied (None for a prepared, uncollapsed checkpoint).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_collapsed expects an nn.Module, got {type(model).__name__}")
    meta, tensors = read_checkpoint(path)
    meta_path = os.path.join(path, META)
    try:
        plans, layout, arch = _parse_meta(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{meta_path} is corrupt: {e}") from e
    _check_values(tensors, os.path.join(path, WEIGHTS))
    trial = copy.deepcopy(model)
    try:
        _prepare_as(trial, layout, arch)
        fresh = {p: _describe_untouched(trial.get_submodule(p)) for p in layout if _untouched(trial, p)}
        _replay(trial, plans)
        _compare(arch, fresh)
        state = _state_from_file(trial, tensors, meta.get("aliases", {}))
    except (KeyError, IndexError, AttributeError) as e:
        # Everything read from the JSON is checked above; this is the backstop for an edit those checks
        # do not foresee. Only the copy was touched.
        raise ValueError(f"{meta_path} does not describe a model this one can become ({type(e).__name__}: {e}); "
                         "was it edited? Save the checkpoint again with save_collapsed") from e
    with atomic(model, "load_collapsed"):  # validated on the copy; still all or nothing
        rebuild_(model, plans, layout, arch)
        model.load_state_dict(state)
    model.__dict__[PREPARED_KEY] = fresh
    return plans[-1] if plans else None


def rebuild_(model: nn.Module, plans: list[CollapsePlan], layout: dict[str, int | list[int]],
             arch: dict[str, dict] | None = None) -> None:
    """Prepare ``model`` as ``layout`` records and replay the plans' structure (not weights).

    ``layout`` maps each site to its slopes per joint (or, as format /1 wrote, the most slopes of
    any joint); ``arch`` (the checkpoint's descriptions) gives the widths that decide it.
    """
    _prepare_as(model, layout, arch)
    _replay(model, plans)


def _per_channel(slopes: int | list[int], widths: list[int] | None) -> bool:
    """Whether ``prepare_(per_channel=True)`` reproduces these slope counts (PReLU(n) keeps n either way)."""
    if isinstance(slopes, int):
        return slopes > 1
    hidden = widths[1:-1] if isinstance(widths, list) and len(widths) == len(slopes) + 2 else [None] * len(slopes)
    return any(n > 1 for n in slopes) and not any(n == 1 and h != 1 for n, h in zip(slopes, hidden))


def _untouched(model: nn.Module, path: str) -> bool:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return False
    return (isinstance(m, LCFusedMLP) and m.form == "mlp") or (isinstance(m, LCChain) and "skips" not in m._modules)


def _prepare_as(model: nn.Module, layout: dict[str, int | list[int]], arch: dict[str, dict] | None) -> None:
    existing = {p for p, m in model.named_modules() if isinstance(m, (LCFusedMLP, LCChain))}
    todo = {p for p in layout if p not in existing}
    if not todo:
        return
    per_ch = {p for p in todo if _per_channel(layout[p], ((arch or {}).get(p) or {}).get("widths"))}
    got = list(prepare_(model, filter_fn=lambda m, p: p in per_ch, per_channel=True)) if per_ch else []
    got += prepare_(model, filter_fn=lambda m, p: p in todo and p not in per_ch)
    missing = sorted(todo - set(got))
    if missing:
        raise ValueError(f"checkpoint sites {missing} were not found in this model (it has {sorted(got)}); "
                         "build the same architecture the checkpoint was saved from")


def _replay(model: nn.Module, plans: list[CollapsePlan]) -> None:
    for plan in plans:
        for sp in plan.sites:
            m = _check_site_matches(model, sp)
            _check_joints(m, sp)
            acts = [m.act] if isinstance(m, LCFusedMLP) else list(m.acts)
            for i, (act, jp) in enumerate(zip(acts, sp.joints)):
                if isinstance(act, CollapsibleActivation) and act.num_parameters != len(jp.alpha):
                    raise ValueError(f"site {sp.path!r}: the checkpoint's joint {i} has {len(jp.alpha)} slopes, "
                                     f"the model's has {act.num_parameters}{_SLOPES_HINT}")
            if sp.changes:
                apply_site(m, sp)
        _record(model, plan)


_SLOPES_HINT = " (PReLU(n) and prepare_(per_channel=True) give one slope per channel)"


def _norm_words(j: dict) -> str:
    if j.get("norm") in (None, "none"):
        return "no norm"
    where = {"pre": " before the activation", "post": " after the activation"}.get(j.get("norm_position"), "")
    return f"{j['norm']}{where}"


def _drop_words(v: object) -> str:
    return f"dropout p={v:g}" if isinstance(v, float) else "no dropout" if v == "none" else f"dropout {v}"


def _site_differences(path: str, rec: dict, got: dict) -> list[str]:
    out, at = [], f"site {path!r}"
    for key, what in (("kind", "site is"), ("widths", "widths are")):
        if rec.get(key) is not None and rec[key] != got[key]:
            out.append(f"{at}: the checkpoint's {what} {rec[key]}, the model's {got[key]}")
    if out:
        return out
    if rec.get("dtype") is not None and rec["dtype"] != got["dtype"]:
        out.append(f"{at}: the checkpoint's weights are {rec['dtype']}, the model's {got['dtype']} "
                   f"(cast the model first: model.to(torch.{rec['dtype']}))")
    joints = rec.get("joints", [])
    if len(joints) != len(got["joints"]):
        return out + [f"{at}: the checkpoint has {len(joints)} joints, the model {len(got['joints'])}"]
    for i, (r, g) in enumerate(zip(joints, got["joints"])):
        j = f"{at}: the checkpoint's joint {i}"
        if r.get("activation") is not None and r["activation"] != g["activation"]:
            out.append(f"{j} activation is {r['activation']}, the model's is {g['activation']}")
        if r.get("slopes") is not None and r["slopes"] != g["slopes"]:
            out.append(f"{j} has {r['slopes']} slopes, the model's has {g['slopes']}{_SLOPES_HINT}")
        if r.get("norm") is not None and (r["norm"] != g["norm"] or (
                r.get("norm_position") is not None and r["norm_position"] != g["norm_position"])):
            out.append(f"{j} has {_norm_words(r)}, the model's has {_norm_words(g)}")
        if r.get("dropout") is not None and r["dropout"] != g["dropout"]:
            out.append(f"{j} has {_drop_words(r['dropout'])}, the model's has {_drop_words(g['dropout'])}")
    return out


def _compare(recorded: dict[str, dict], fresh: dict[str, dict]) -> None:
    """Refuse a model whose prepared sites differ from what the checkpoint recorded."""
    problems = [d for p, rec in recorded.items() if p in fresh for d in _site_differences(p, rec, fresh[p])]
    if problems:
        raise ValueError("the checkpoint was saved from a different architecture: " + "; ".join(problems[:10])
                         + (f"; ... {len(problems) - 10} more" if len(problems) > 10 else "")
                         + ". Build the model the checkpoint was saved from, then load it")


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
