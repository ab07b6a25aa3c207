"""``save_pretrained`` / ``load_pretrained``: a compressed Hugging Face model as a self-contained directory.

The directory holds ``model.safetensors`` (every parameter and persistent buffer, tied weights once;
plus the model's non-persistent buffers, such as rotary ``inv_freq``, which the architecture computes
at construction and a checkpoint of the dense model leaves out), ``config.json`` (the model's own
Hugging Face config with ``architectures`` set) and, when the model has one,
``generation_config.json``. ``config.json`` carries one more entry, ``"lc_kernels"``::

    "lc_kernels": {"format": "lc_kernels.pretrained/1", "version": "0.1.0",
                   "sites": {"model.layers.0.mlp": {"kind": "LCGatedMLP", "form": "partial",
                                                    "spec": {"in_features": 576, "kept": 512, ...}},
                             "transformer.h.0.mlp.0": {"kind": "LCFusedMLP", "form": "partial",
                                                       "architecture": {...}}},
                   "plans": [...], "aliases": {"lm_head.weight": "model.embed_tokens.weight"},
                   "buffers": ["model.rotary_emb.inv_freq", ...], "attn_implementation": "sdpa"}

A gated site is described by :meth:`LCGatedMLP.spec` and rebuilt by :meth:`LCGatedMLP.empty`. A
classic site (``LCFusedMLP`` / ``LCChain``) is described as ``save_collapsed`` describes it (its
``architecture`` as ``prepare_`` made it, see :mod:`.checkpoint`) and rebuilt the same way:
``prepare_`` and the recorded ``plans`` replayed for their structure. ``aliases`` maps each tied
state-dict key to the key whose tensor it shares.

:func:`load_pretrained` builds the architecture on the meta device (no dense weights are allocated),
swaps each recorded site for an empty module of its recorded form, and assigns the file's tensors.
``prepare_`` needs real weights, so a classic site's enclosing block (one transformer layer) is
given uninitialised memory while its structure is replayed, one block at a time, then put back on
the meta device: peak memory is one dense block, never the dense model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._version import __version__
from ..nn.gated import LCGatedMLP
from ..nn.mlp import LCChain, LCFusedMLP
from ..planning import CollapsePlan
from .checkpoint import describe_sites, rebuild_
from .describe import PREPARED_KEY

WEIGHTS, CONFIG, GENERATION = "model.safetensors", "config.json", "generation_config.json"
PRETRAINED_FORMAT = "lc_kernels.pretrained/1"
READ_FORMATS = (PRETRAINED_FORMAT,)
CLASSIC = ("LCFusedMLP", "LCChain")
_SAVE_HINT = "save the model again with lc_kernels.save_pretrained"


# -- describing a model ---------------------------------------------------------------------------------------


def _form(m: nn.Module) -> str:
    if isinstance(m, LCChain):
        return "chain-partial" if m._modules.get("skips") else "chain"
    return m.form


def _sites(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if isinstance(m, (LCGatedMLP, LCFusedMLP, LCChain))}


def _classic_plans(model: nn.Module) -> list[CollapsePlan]:
    """The plans ``collapse_`` applied to classic sites (gated plans are described by each site's spec)."""
    return [p for p in getattr(model, "_lc_plans", []) if p.sites and all(sp.kind in CLASSIC for sp in p.sites)]


def _non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mpath, m in model.named_modules(remove_duplicate=False):
        for name in getattr(m, "_non_persistent_buffers_set", ()):
            t = m._buffers.get(name)
            if t is not None:
                out[f"{mpath}.{name}" if mpath else name] = t
    return out


def _describe(model: nn.Module) -> dict:
    sites = _sites(model)
    classic = describe_sites(model) if any(not isinstance(m, LCGatedMLP) for m in sites.values()) else {}
    out = {}
    for path, m in sites.items():
        if isinstance(m, LCGatedMLP):
            out[path] = {"kind": "LCGatedMLP", "form": m.form, "spec": m.spec()}
        else:
            out[path] = {"kind": type(m).__name__, "form": _form(m), "architecture": classic[path]}
    return out


def _tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """State dict and non-persistent buffers, each tensor once: (tensors, aliases, buffer names)."""
    state = model.state_dict(keep_vars=True)
    buffers = _non_persistent(model)
    items = list(state.items()) + [(k, v) for k, v in buffers.items() if k not in state]
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for k, v in items:
        if v.is_meta:
            raise ValueError(f"save_pretrained: {k} is on the meta device (no values to save); load or materialise "
                             "the model's weights first")
        key = (v.device, v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:  # tied weights are stored once
            aliases[k] = seen[key]
            continue
        t = v.detach().contiguous().cpu()
        sid = (t.untyped_storage().data_ptr(), t.device)
        if t.numel() and sid in storages:  # a different view of stored memory: safetensors stores no overlaps
            t = t.clone()
        storages.add((t.untyped_storage().data_ptr(), t.device))
        if key is not None:
            seen[key] = k
        tensors[k] = t
    return tensors, aliases, sorted(buffers)


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a (compressed) Hugging Face model into directory ``path``: ``model.safetensors`` + ``config.json``.

    ``config.json`` is the model's config with an ``"lc_kernels"`` entry recording each LayerCollapse
    site's kind, form and widths (module docstring); :func:`load_pretrained` rebuilds the model from
    the directory alone. The structure is checked before anything is written: a model the loader
    could not rebuild (a stripped model, a block replaced by hand with something that is no recorded
    site) is refused with the reason. Existing files are replaced, each in one step.
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pretrained expects an nn.Module, got {type(model).__name__}")
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"save_pretrained expects a Hugging Face-style model with a .config (to_dict()), got "
                        f"{type(model).__name__} without one; save other models with lc_kernels.save_collapsed")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_pretrained expects a directory path (str or os.PathLike), got {type(path).__name__}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)!r} is an existing file; save_pretrained writes a directory holding "
                         f"{WEIGHTS} and {CONFIG}: pass a directory path (new or existing)")
    tensors, aliases, buffers = _tensors(model)
    plans = _classic_plans(model)
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["lc_kernels"] = {
        "format": PRETRAINED_FORMAT,
        "version": __version__,
        "sites": _describe(model),
        "plans": [p.to_dict() for p in plans],
        "aliases": aliases,
        "buffers": buffers,
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }
    text = json.dumps(cfg, indent=2, sort_keys=True)
    # What load_pretrained would build must hold exactly these tensors: refuse now, not at load time.
    skeleton = _skeleton(json.loads(text), "the model being saved")
    _match(skeleton, tensors, aliases, "the model being saved",
           "it has a module the recorded sites do not rebuild (strip_ or a hand-made change?)")
    gen = getattr(model, "generation_config", None)
    gen_text = json.dumps(gen.to_dict(), indent=2, sort_keys=True) if callable(getattr(gen, "to_dict", None)) else None
    os.makedirs(path, exist_ok=True)
    # Temporary names, then os.replace: an interrupted save never leaves a half-written file behind.
    w_path, c_path, g_path = (os.path.join(path, n) for n in (WEIGHTS, CONFIG, GENERATION))
    save_file(tensors, w_path + ".tmp", metadata={"format": "pt"})
    for p, t in ((c_path, text), (g_path, gen_text)):
        if t is not None:
            with open(p + ".tmp", "w") as f:
                f.write(t)
    os.replace(w_path + ".tmp", w_path)
    os.replace(c_path + ".tmp", c_path)
    if gen_text is not None:
        os.replace(g_path + ".tmp", g_path)
    elif os.path.exists(g_path):
        os.remove(g_path)


# -- rebuilding a model ----------------------------------------------------------------------------------------


def _entry(cfg: object, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} holds {type(cfg).__name__}, expected a JSON object (a Hugging Face config)")
    entry = cfg.get("lc_kernels")
    if not isinstance(entry, dict):
        raise ValueError(f"{where} has no \"lc_kernels\" entry: it is not a directory written by "
                         "lc_kernels.save_pretrained (a dense model loads with transformers' from_pretrained)")
    if entry.get("format") not in READ_FORMATS:
        raise ValueError(f"{where} has lc_kernels format {entry.get('format')!r} (written by lc_kernels "
                         f"{entry.get('version', '?')}); this version {__version__} reads {list(READ_FORMATS)}: "
                         f"install the version that wrote it, or {_SAVE_HINT} from there")
    for key, typ in (("sites", dict), ("plans", list), ("aliases", dict), ("buffers", list)):
        if not isinstance(entry.get(key), typ):
            raise ValueError(f"{where}: lc_kernels.{key} is {entry.get(key)!r}, expected a JSON "
                             f"{'object' if typ is dict else 'list'}; the file was edited or truncated: {_SAVE_HINT}")
    return entry


def _build(cfg: dict, entry: dict, where: str) -> nn.Module:
    """The Hugging Face architecture of ``cfg`` with every parameter and buffer on the meta device."""
    import transformers

    cfg = {k: v for k, v in cfg.items() if k != "lc_kernels"}
    names = cfg.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    try:
        if cls is not None and isinstance(getattr(cls, "config_class", None), type):
            config = cls.config_class.from_dict(cfg)
        else:
            config = transformers.AutoConfig.for_model(**cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: transformers {transformers.__version__} cannot read this config "
                         f"(model_type {cfg.get('model_type')!r}): {e}") from e
    if entry.get("attn_implementation"):
        # The saved model's attention kernel: sdpa and eager round differently.
        config._attn_implementation = entry["attn_implementation"]
    with torch.device("meta"):
        if cls is not None:
            return cls(config)
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            with contextlib.suppress(ValueError):
                return auto.from_config(config)
    raise ValueError(f"{where}: transformers has no model class for architectures {names} / model_type "
                     f"{cfg.get('model_type')!r}; upgrade transformers")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = new


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _unit_of(model: nn.Module, path: str) -> str:
    """The block ``prepare_`` rebuilds a classic site from: the parent of its deepest existing ancestor."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        if _exists(model, ".".join(parts[:n])):
            return ".".join(parts[:n - 1])
    return ""


def _inside(path: str, unit: str) -> bool:
    return unit == "" or path == unit or path.startswith(unit + ".")


def _rebuild_classic(model: nn.Module, sites: dict[str, dict], plans: list[CollapsePlan], where: str) -> None:
    arch = {p: d.get("architecture") for p, d in sites.items()}
    for p, a in arch.items():
        if not isinstance(a, dict) or not isinstance(a.get("joints"), list) or not all(
                isinstance(j, dict) and isinstance(j.get("slopes"), int) for j in a["joints"]):
            raise ValueError(f"{where}: site {p!r} has no valid architecture (joints with slopes); {_SAVE_HINT}")
    units = sorted({_unit_of(model, p) for p in sites})
    units = [u for u in units if not any(v != u and _inside(u, v) for v in units)]
    for unit in units:
        paths = [p for p in sites if _inside(p, unit)]
        rel = {p: p[len(unit) + 1:] if unit else p for p in paths}
        block = model.get_submodule(unit) if unit else model
        sub_plans = []
        for plan in plans:
            mine = [dataclasses.replace(sp, path=rel[sp.path]) for sp in plan.sites if sp.path in rel]
            if mine:
                sub_plans.append(dataclasses.replace(plan, sites=mine, fitted={}))
        layout = {rel[p]: [j["slopes"] for j in arch[p]["joints"]] for p in paths}
        # prepare_ reuses real weights: this block alone gets (uninitialised) memory, then goes back to meta.
        block.to_empty(device="cpu")
        try:
            rebuild_(block, sub_plans, layout, {rel[p]: arch[p] for p in paths})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: the recorded sites do not rebuild on this architecture ({e}); "
                             f"{_SAVE_HINT}") from e
        finally:
            block.to("meta")
            block.__dict__.pop("_lc_plans", None)
            block.__dict__.pop(PREPARED_KEY, None)
    model.__dict__["_lc_plans"] = list(plans)
    model.__dict__[PREPARED_KEY] = dict(arch)


class _EmptyOnMeta(TorchFunctionMode):
    """``torch.empty`` with no device goes to the meta device: ``nn.Linear`` weights allocate nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _empty_gated(spec: dict) -> LCGatedMLP:
    try:
        return LCGatedMLP.empty(spec, device="meta")
    except RuntimeError as e:
        if "meta" not in str(e):
            raise
    # LCGatedMLP.empty(device="meta") builds its CollapsibleActivation under torch.device("meta"), whose
    # finiteness check of the slope calls .item(): build on the default device with the Linears' weights
    # on meta instead (the slope is a few floats), then move the rest.
    with _EmptyOnMeta():
        return LCGatedMLP.empty(spec).to("meta")


def _skeleton(cfg: dict, where: str) -> nn.Module:
    """The model ``cfg`` describes, every site in its recorded form, weights on the meta device."""
    entry = _entry(cfg, where)
    model = _build(cfg, entry, where)
    sites, classic = entry["sites"], {}
    for path, d in sites.items():
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "LCGatedMLP":
            spec = d.get("spec")
            if not _exists(model, path) or not path:
                raise ValueError(f"{where}: gated site {path!r} is not a module of {type(model).__name__}; the "
                                 f"config was edited or belongs to another model: {_SAVE_HINT}")
            try:
                new = _empty_gated(spec)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: site {path!r} has spec {spec!r}, which builds no LCGatedMLP ({e}); "
                                 f"{_SAVE_HINT}") from e
            if d.get("form") != new.form:
                raise ValueError(f"{where}: site {path!r} is recorded as form {d.get('form')!r} but its spec "
                                 f"builds form {new.form!r}; the config was edited: {_SAVE_HINT}")
            _replace(model, path, new)
        elif kind in CLASSIC:
            classic[path] = d
        else:
            raise ValueError(f"{where}: site {path!r} has kind {kind!r}, expected LCGatedMLP, LCFusedMLP or LCChain")
    if classic:
        try:
            plans = [CollapsePlan.from_dict(p) for p in entry["plans"]]
        except ValueError as e:
            raise ValueError(f"{where}: lc_kernels.plans is corrupt ({e}); {_SAVE_HINT}") from e
        _rebuild_classic(model, classic, plans, where)
        for path, d in classic.items():
            m = model.get_submodule(path) if _exists(model, path) else None
            got = None if m is None else type(m).__name__
            if got != d["kind"] or _form(m) != d.get("form"):
                now = f"{got}(form={_form(m)!r})" if m is not None else "nothing"
                raise ValueError(f"{where}: site {path!r} is recorded as {d['kind']}(form={d.get('form')!r}) but "
                                 f"its recorded plans rebuild {now}; the config was edited: {_SAVE_HINT}")
    return model


def _match(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], where: str,
           hint: str) -> dict[str, torch.Tensor]:
    """``tensors`` as the state dict ``model`` takes (aliases filled in); errors list what differs."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected.update({k: tuple(v.shape) for k, v in _non_persistent(model).items()})
    problems, state = [], {}
    for k, shape in expected.items():
        src = aliases.get(k, k)
        if src not in tensors:
            problems.append(f"missing {k}")
        elif tuple(tensors[src].shape) != shape:
            problems.append(f"{k} has shape {tuple(tensors[src].shape)} in the file, {shape} in the model")
        else:
            state[k] = tensors[src]
    extra = sorted(set(tensors) - set(expected) - set(aliases.values()))
    problems += [f"unexpected {k}" for k in extra]
    if problems:
        raise ValueError(f"{where} does not match the model its config describes ({hint}): " + "; ".join(problems[:8])
                         + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""))
    return state


def _read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_pretrained expects a directory path (str or os.PathLike), got {type(path).__name__}")
    c_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    for p in (c_path, w_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p} is missing; load_pretrained expects a directory written by "
                             "lc_kernels.save_pretrained")
    try:
        with open(c_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{c_path} is corrupt (not JSON: {e}); {_SAVE_HINT}") from e
    _entry(cfg, c_path)
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{w_path} is corrupt or truncated: {e}; {_SAVE_HINT}") from e
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{w_path}: {bad[:5]}{' and more' if len(bad) > 5 else ''} hold NaN or Inf; the file is "
                         f"damaged or the model diverged before saving: {_SAVE_HINT} from a healthy model")
    return cfg, tensors


def load_pretrained(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` from directory ``path`` alone, in eval mode.

    The architecture is built on the meta device from ``config.json`` (transformers' class named in
    ``architectures``), each recorded site becomes an empty module of its recorded form, and the
    file's tensors are assigned (no dense weights are allocated; tied weights share one tensor as
    when saved). The result computes exactly what the saved model computed. ``dtype`` / ``device``
    cast and move it afterwards. A missing or unexpected tensor, a shape or form that differs from
    the config, NaN/Inf weights or an unknown format raise ``ValueError`` naming the file.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_pretrained: dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    cfg, tensors = _read(path)
    c_path, w_path = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    entry = cfg["lc_kernels"]
    model = _skeleton(cfg, c_path)
    state = _match(model, tensors, entry["aliases"], w_path,
                   f"keys and shapes must be those of {c_path}; re-save, or restore the file")
    buffers = {k: state.pop(k) for k in _non_persistent(model)}
    model.load_state_dict(state, strict=True, assign=True)
    for k, t in buffers.items():
        mpath, _, name = k.rpartition(".")
        (model.get_submodule(mpath) if mpath else model)._buffers[name] = t
    for k, src in entry["aliases"].items():  # share one Parameter / buffer again, as when saved
        if k in buffers:
            continue
        mpath, _, name = k.rpartition(".")
        smpath, _, sname = src.rpartition(".")
        owner, sowner = (model.get_submodule(p) if p else model for p in (mpath, smpath))
        table = "_parameters" if name in owner._parameters else "_buffers"
        getattr(owner, table)[name] = getattr(sowner, table)[sname]
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    left += [f"{p}.{k}" for p, m in model.named_modules() for k, v in vars(m).items()
             if isinstance(v, torch.Tensor) and v.is_meta]
    if left:
        raise ValueError(f"{w_path}: {left[:5]} were not in the file and are computed by the architecture at "
                         f"construction; this transformers version builds the model differently: {_SAVE_HINT} "
                         "with this version")
    gen_path = os.path.join(path, GENERATION)
    if os.path.isfile(gen_path) and hasattr(model, "generation_config"):
        import transformers

        with open(gen_path) as f:
            model.generation_config = transformers.GenerationConfig.from_dict(json.load(f))
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()
