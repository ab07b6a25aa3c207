"""``lc-kernels plan CHECKPOINT``: the collapse plan report for a saved model.

CHECKPOINT is a directory written by ``save_collapsed`` (its JSON records every applied plan),
a directory written by ``save_pretrained`` (its ``config.json`` records the architecture, each
site's form and the applied plans: the model is rebuilt with ``load_pretrained``, no ``--model``),
or a file holding the ``state_dict()`` of a prepared, uncollapsed model. Planning the other kinds
needs the architecture: ``--model MODULE:FACTORY`` builds it fresh. Without ``--model`` a
``save_collapsed`` directory is reported from its stored plans alone.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys

import torch
from torch import nn

from ..planning import OBJECTIVES, CollapsePlan, find_sites, plan_collapse
from ..planning.inputs import calib_batches
from ..planning.options import SEARCHES, SELECTS
from ..planning.plan import FIT_TARGETS
from ..transforms import load_collapsed, load_pretrained, read_checkpoint, rebuild_
from ..transforms.pretrained import CONFIG
from ._args import fraction, nonneg_float, positive_int

CALIB_HELP = """\
calibration data (optional; needs --model): --calib PATH loads model inputs from a .pt/.pth
file (torch.save of a tensor, an (input, target) tuple, or a list of those), a .npy file, or a
.npz file (its first array, or --calib-key NAME). Inputs are cast to the model's dtype; rows
must match its input width. With calibration each site's error is the exact ||delta||/||y||
of its collapse at the site's output, and the plan's model-output error is measured.
--max-error and --target need it.

Without --model, a save_collapsed directory is reported from the plans stored with it. A
save_pretrained directory needs no --model (its config.json names the architecture) and takes
no --calib (a language model calibrates on token ids: use lc.plan_collapse(model, calib=...))."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``plan`` subcommand's options on ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = CALIB_HELP
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a save_collapsed or save_pretrained directory, or a state-dict file (torch.save) "
                             "of a prepared model")
    parser.add_argument("--model", metavar="MODULE:FACTORY",
                        help="build the original architecture by calling FACTORY() from MODULE (an importable "
                             "module or a path to a .py file); required for a state-dict file")
    cal = parser.add_argument_group("calibration")
    cal.add_argument("--calib", metavar="PATH", help="model inputs (.pt, .pth, .npy, .npz); see below")
    cal.add_argument("--calib-key", metavar="NAME", help="array to use from a .npz file (default: its first)")
    cal.add_argument("--calib-rows", metavar="N", type=positive_int, help="use only the first N rows (default: all)")
    plan = parser.add_argument_group("planning (as lc_kernels.plan_collapse)")
    plan.add_argument("--tol", type=nonneg_float, default=0.05,
                      help="collapse joints with |1-alpha| <= TOL (default 0.05)")
    plan.add_argument("--max-error", type=nonneg_float, metavar="E",
                      help="most FLOPs saved with measured ||dy||/||y|| <= E on the calibration data")
    plan.add_argument("--target", type=fraction, metavar="T",
                      help="least measured error removing at least fraction T in (0, 1] of collapsible FLOPs")
    plan.add_argument("--search", choices=SEARCHES, default="auto",
                      help="budget search (default auto: exhaustive when small)")
    plan.add_argument("--objective", choices=OBJECTIVES, default="flops", help="what the plan minimises")
    plan.add_argument("--tokens", type=positive_int, metavar="N",
                      help="--objective latency: time every candidate form at N tokens per call")
    plan.add_argument("--force", action="store_true", help="collapse every joint whatever tol says")
    plan.add_argument("--fit", choices=FIT_TARGETS, default=None,
                      help="with --calib: fit each site to the dense stream after it (global, the default) or to "
                           "its own function (local)")
    plan.add_argument("--select", choices=SELECTS, default="activation",
                      help="with --calib: how PARTIAL channels are ranked (default activation)")
    parser.add_argument("--json", metavar="PATH", help="also write the applied plans and the new plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the report; returns 0, or 2 with the reason on stderr when the input is unusable."""
    try:
        return _run(args)
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"lc-kernels plan: error: {e}", file=sys.stderr)
        return 2


def pretrained_entry(path: str) -> dict | None:
    """The ``"lc_kernels"`` entry of a ``save_pretrained`` directory's ``config.json`` (else None)."""

    cfg_path = os.path.join(path, CONFIG)
    if not (os.path.isdir(path) and os.path.isfile(cfg_path)):
        return None
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is corrupt (not JSON: {e})") from e
    entry = cfg.get("lc_kernels") if isinstance(cfg, dict) else None
    return entry if isinstance(entry, dict) else None


def _run(args: argparse.Namespace) -> int:
    path = args.checkpoint
    entry = pretrained_entry(path)
    if entry is not None:
        if args.model is not None:
            raise ValueError(f"{path} is a save_pretrained directory: its config.json names the architecture; "
                             "drop --model")
        if args.calib is not None or args.max_error is not None or args.target is not None:
            raise ValueError(f"{path} is a save_pretrained directory (a language model, calibrated on token ids): "
                             "--calib, --max-error and --target read float model inputs; plan it in Python with "
                             "lc.plan_collapse(lc.load_pretrained(path), calib=..., target=...)")

        model = load_pretrained(path)
        sites = entry.get("sites", {})
        forms = ", ".join(f"{n} {k}" for k, n in sorted(collections.Counter(
            f"{s.get('kind', '?')} {s.get('form', '?')}" for s in sites.values()).items()))
        applied = [CollapsePlan.from_dict(d) for d in entry.get("plans", [])]
        print(f"{path}: save_pretrained directory, {len(sites)} sites ({forms or 'none'}), {len(applied)} plan(s) "
              f"applied to LCFusedMLP/LCChain sites (lc_kernels {entry.get('version', '?')})")
        for name, site in sites.items():
            print(f"  {name}: {site.get('kind', '?')} {site.get('form', '?')}")
        if not find_sites(model):
            # Gated sites have no algebraic merge: planning them needs token-id calibration and a budget.
            _print_applied(applied)
            print("no LCFusedMLP/LCChain site left to plan without data; to plan the gated sites: "
                  "lc.plan_collapse(lc.load_pretrained(path), calib=token batches, target=...)")
            _write_json(args.json, applied, None)
            return 0
        return _plan_model(args, model, applied, calib=None)
    if args.model is None:
        if args.calib is not None or args.max_error is not None or args.target is not None:
            raise ValueError("--calib, --max-error and --target run the model: pass --model MODULE:FACTORY")
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a save_collapsed directory; a state-dict file holds no architecture: "
                             "pass --model MODULE:FACTORY")
        meta, _ = read_checkpoint(path)
        applied = [CollapsePlan.from_dict(d) for d in meta.get("plans", [])]
        print(f"{path}: {len(meta.get('prepared', {}))} prepared sites, {len(applied)} plan(s) applied "
              f"(lc_kernels {meta.get('lc_kernels_version', '?')})")
        _print_applied(applied)
        if not applied:
            print("no plan applied yet; pass --model MODULE:FACTORY to plan the prepared sites")
        _write_json(args.json, applied, None)
        return 0

    model = build_model(args.model)
    if os.path.isdir(path):
        load_collapsed(model, path)
        applied = list(getattr(model, "_lc_plans", []))
    else:
        load_prepared_state(model, path)
        applied = []
    calib = None if args.calib is None else load_calib(args.calib, model, key=args.calib_key, rows=args.calib_rows)
    return _plan_model(args, model, applied, calib)


def _plan_model(args: argparse.Namespace, model: nn.Module, applied: list[CollapsePlan], calib: object) -> int:
    _print_applied(applied)
    if not find_sites(model):
        print("no collapsible sites left: the model is fully collapsed")
        _write_json(args.json, applied, None)
        return 0
    plan = plan_collapse(model, tol=args.tol, calib=calib, max_error=args.max_error, target=args.target,
                         force=args.force, objective=args.objective, search=args.search, tokens=args.tokens,
                         fit=args.fit if calib is not None else None, select=args.select)
    print(plan)
    _write_json(args.json, applied, plan)
    return 0


def _print_applied(applied: list[CollapsePlan]) -> None:
    for i, p in enumerate(applied):
        print(f"\napplied plan {i + 1}/{len(applied)}:\n{p}\n")


def _write_json(path: str | None, applied: list[CollapsePlan], plan: CollapsePlan | None) -> None:
    if path is None:
        return
    with open(path, "w") as f:
        json.dump({"applied": [p.to_dict() for p in applied], "plan": None if plan is None else plan.to_dict()},
                  f, indent=1)


def build_model(spec: str) -> nn.Module:
    """``MODULE:FACTORY`` -> ``FACTORY()`` (or FACTORY itself when it is a module instance)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--model expects MODULE:FACTORY (e.g. mypkg.models:build or ./model.py:build), got {spec!r}")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise ValueError(f"--model: {mod_name} does not exist")
        loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(mod_name))[0], mod_name)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise ImportError(f"--model: cannot import {mod_name!r} ({e}); install it, add its folder to PYTHONPATH, "
                              f"or pass the file: path/to/{mod_name.rsplit('.', 1)[-1]}.py:{attr}") from e
    if not hasattr(module, attr):
        raise ValueError(f"--model: {mod_name} has no attribute {attr!r}")
    factory = getattr(module, attr)
    model = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model: {spec}() returned {type(model).__name__}, expected an nn.Module")
    return model


_ALPHA_KEY = re.compile(r"^(?:(.*)\.)?(?:act|acts\.(\d+))\.alpha$")


def torch_load(path: str, what: str) -> object:
    """``torch.load(path, weights_only=True)``; a file it cannot or will not read is a one-line ValueError.

    ``weights_only`` refuses pickled classes (a whole ``nn.Module``, custom objects): running a
    checkpoint's code to read it is what this CLI never does.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(f"{what} {path}: torch.load(weights_only=True) refuses to unpickle it (it pickles "
                             f"{found.group(1)}); save tensors only, e.g. torch.save(model.state_dict(), path)") \
                from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        raise ValueError(f"{what} {path} is not a readable torch.save file (UnpicklingError: "
                         f"{(detail or [''])[0][:200]}); is it truncated or of another format?") from None
    except Exception as e:  # noqa: BLE001 - zip/pickle readers raise anything on a damaged file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{what} {path} is not a readable torch.save file ({type(e).__name__}"
                         + (f": {first}" if first else "") + "); is it truncated or of another format?") from None


def load_prepared_state(model: nn.Module, path: str) -> None:
    """Prepare ``model`` as the state dict's slopes say (per channel where they are) and load it."""
    state = torch_load(path, "CHECKPOINT")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}); save one with "
                         "torch.save(model.state_dict(), path)")
    layout: dict[str, list[int]] = {}
    for k, v in state.items():
        m = _ALPHA_KEY.match(k)
        if m:
            counts = layout.setdefault(m.group(1) or "", [])  # one slope count per joint
            j = int(m.group(2) or 0)
            counts.extend([1] * (j + 1 - len(counts)))
            counts[j] = v.numel()
    if not layout:
        raise ValueError(f"{path} has no collapsible slopes (no '*.act.alpha' keys); save the model after "
                         "lc_kernels.prepare_")
    rebuild_(model, [], layout)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the model built by --model (a prepared, uncollapsed model's "
                         f"state dict is expected; a collapsed model is saved with save_collapsed): {e}") from e


def load_calib(path: str, model: nn.Module, *, key: str | None = None, rows: int | None = None) -> object:
    """Calibration inputs from a file, cast to the model's floating dtype, the first ``rows`` rows."""
    if rows is not None and rows < 1:
        raise ValueError(f"--calib-rows must be >= 1, got {rows}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".npy", ".npz"):
        import numpy as np

        arr = np.load(path)
        if ext == ".npz":
            if key is not None and key not in arr.files:
                raise ValueError(f"--calib-key {key!r} is not in {path} (it has {arr.files})")
            arr = arr[key if key is not None else arr.files[0]]
        data: object = torch.from_numpy(arr)
    elif ext in (".pt", ".pth"):
        data = torch_load(path, "--calib")
    else:
        raise ValueError(f"--calib {path}: unknown extension {ext!r}; expected .pt, .pth, .npy or .npz")
    if isinstance(data, (torch.Tensor, tuple)):
        data = [data]
    if not isinstance(data, list):
        raise TypeError(f"--calib {path} holds {type(data).__name__}; expected a tensor, an (input, ...) tuple "
                        "or a list of those")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    # One normalisation for every caller: the library's, with the CLI's casting and row limit.
    return calib_batches(model, data, cast_to=dtype, max_rows=rows)
