"""Measured tables: the dispatcher's per-shape choices and the Triton autotuner's chosen configs,
in memory and in ``warmup.json`` under the cache directory.

``lc.warmup`` measures them; this module keeps them and gives them back. The dispatcher asks
:func:`measured` on every call that has a choice to make, so that is one dictionary lookup keyed by
a tuple: the file is read once per process and device (on the first question about that device,
or by ``lc.warmup``), never per call, and with nothing stored the answer is ``None`` (today's
rule). A table applies only where it was measured: entries are filed under a context of the
device's name (CUDA: with its compute capability; CPU: machine and thread count) and the
torch / triton / lc_kernels versions, so another machine, thread count or upgrade measures anew.
File layout (``FORMAT``)::

    {"format": "lc_kernels.warmup/1",
     "tables": {"<context>": {"choices": [[kind, dtype, token_bucket, [shape...], choice], ...],
                              "autotune": {"<kernel>": [[key, config], ...]},
                              "roofline": {"<dtype>": [peak_flops, peak_bytes_per_s, launch_s]}}}}

``choices`` kinds: ``"partial"`` (a PARTIAL block ``d_in -> kept -> d_out``: ``"shared"`` first
GEMM or ``"separate"`` skip GEMM), ``"gated_partial"`` (the same for a gated block) and
``"fused_mlp"`` (on CUDA: ``"fused"`` kernel or ``"two"`` GEMMs). ``autotune`` holds, per kernel,
the autotuner's keys (``Autotuner.cache``) and the config each chose; a process seeds its
autotuners with them when the kernels are built, so it launches without benchmarking.
"""
from __future__ import annotations

import json
import os
import platform
import warnings
from importlib import metadata
from typing import Any, Iterable

import torch

from .. import _config
from .._version import __version__

FILE = "warmup.json"
FORMAT = "lc_kernels.warmup/1"

# (kind, device, dtype, token_bucket, *shape) -> choice. Filled by lc.warmup and by loading.
_choices: dict[tuple, str] = {}
# Devices whose stored tables were read (or found absent) in this process.
_loaded: set[torch.device] = set()
# kernel name -> {autotuner key: config kwargs dict} for the current CUDA context, and the
# autotuners built in this process (launch.autotuned registers them).
_autotune: dict[str, dict[tuple, dict]] = {}
_tuners: dict[str, Any] = {}
# (capability, dtype) -> (peak_flops, peak_bytes_per_s, launch_s) measured on this device.
rooflines: dict[tuple[tuple[int, int], torch.dtype], tuple[float, float, float]] = {}


def token_bucket(m: int) -> int:
    """The token count a measurement stands for: the next power of two (``1, 2, 4, ...``), so a
    table measured at 100 tokens serves calls of 65 to 128 rows."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """What a measurement is valid for: the GPU model and compute capability, or the CPU
    architecture and thread count (the same naming as ``planning.latency``'s tables)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}|sm{major}{minor}"
    return f"{device.type}:{platform.machine()}:{torch.get_num_threads()}threads"


def _triton_version() -> str:
    for dist in ("triton", "pytorch-triton"):  # without importing it (a lean import)
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "absent"


def context(device: torch.device) -> str:
    """The key a device's tables are filed under: device name and the versions that change them."""
    return f"{device_name(device)}|torch {torch.__version__}|triton {_triton_version()}|lc_kernels {__version__}"


def path(cache_dir: str | os.PathLike | None = None) -> str:
    return os.path.join(os.fspath(cache_dir) if cache_dir is not None else _config.cache_dir(), FILE)


def normalize(device: torch.device | str) -> torch.device:
    """``device`` with an index where it has one (``cuda`` -> ``cuda:<current>``), as tensors carry."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


# ------------------------------------------------------------------ what the dispatcher asks

def measured(kind: str, device: torch.device, dtype: torch.dtype, m: int, *shape: Any) -> str | None:
    """The stored choice for ``kind`` at ``m`` rows of ``shape`` on ``device`` in ``dtype``, or
    ``None`` where nothing was measured (the caller keeps its default rule).

    Per call: a set and a dictionary lookup. Under ``torch.compile`` only what is already in
    memory is consulted (no file is read while tracing).
    """
    if device not in _loaded:
        if torch.compiler.is_compiling():
            return None
        load(device)
    if not _choices:
        return None
    return _choices.get((kind, device, dtype, token_bucket(m), *shape))


def record(kind: str, device: torch.device, dtype: torch.dtype, m: int, shape: Iterable[Any], choice: str) -> None:
    """Store a measured choice in memory (``save`` writes it to the cache file)."""
    _choices[(kind, device, dtype, token_bucket(m), *shape)] = choice


def forget(kind: str, device: torch.device, dtype: torch.dtype, m: int, shape: Iterable[Any]) -> None:
    """Drop one choice from memory (the default rule serves it again)."""
    _choices.pop((kind, device, dtype, token_bucket(m), *shape), None)


def reset() -> None:
    """Forget every table in memory (the next question reads the cache file again); autotuners
    keep the configs they hold."""
    _choices.clear()
    _loaded.clear()
    _autotune.clear()
    rooflines.clear()


# ------------------------------------------------------------------ autotuned kernels

def register_autotuner(name: str, tuner: Any) -> None:
    """Called when an autotuned kernel is built: seed it with the configs stored for the current
    CUDA device, so its first launch at a warmed-up shape does not benchmark."""
    _tuners[name] = tuner
    if torch.cuda.is_available() and not _config.triton_interpret():
        device = torch.device("cuda", torch.cuda.current_device())
        if device not in _loaded:
            load(device)
    _seed(name)


def _seed(name: str) -> int:
    tuner, stored = _tuners.get(name), _autotune.get(name)
    if tuner is None or not stored:
        return 0
    by_kwargs = [(c.all_kwargs(), c) for c in tuner.configs]
    seeded = 0
    for key, kwargs in stored.items():
        # Only a config this build still offers (a changed config list must not launch a stale one).
        match = next((c for kw, c in by_kwargs if kw == kwargs), None)
        if match is not None and key not in tuner.cache:
            tuner.cache[key] = match
            seeded += 1
    return seeded


def autotuned_configs() -> dict[str, dict[tuple, dict]]:
    """Per kernel built in this process, its autotuner's choices: ``{key: config kwargs}``."""
    return {name: {key: cfg.all_kwargs() for key, cfg in tuner.cache.items()} for name, tuner in _tuners.items()}


def tuners() -> dict[str, Any]:
    """The autotuned kernels built in this process, by kernel name."""
    return dict(_tuners)


# ------------------------------------------------------------------ the cache file

def _read(file: str) -> dict:
    """The file's tables, or ``{}`` (with a warning) when it is unreadable or of another format."""
    try:
        with open(file) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"lc_kernels: ignoring the warmup cache {file}: unreadable ({e}); "
                      "lc.warmup will measure again and rewrite it", RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tables"), dict):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        warnings.warn(f"lc_kernels: ignoring the warmup cache {file}: format {found!r}, this version reads "
                      f"{FORMAT!r}; lc.warmup will measure again and rewrite it", RuntimeWarning, stacklevel=3)
        return {}
    return data["tables"]


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def load(device: torch.device, cache_dir: str | os.PathLike | None = None) -> int:
    """Read the tables stored for ``device``'s context into memory; returns how many entries.

    A missing file loads nothing; a corrupt file, one of another format or a malformed entry is
    ignored with a warning, never an error (the default rules serve until lc.warmup measures).
    """
    _loaded.add(device)
    try:
        ctx = context(device)
    except (RuntimeError, AssertionError):  # no driver to name it: fake CUDA tensors (the dispatch tests)
        return 0
    file = path(cache_dir)
    tables = _read(file)
    if not tables:
        return 0
    table = tables.get(ctx)
    if table is None:
        prefix = device_name(device) + "|"
        others = [k for k in tables if k.startswith(prefix)]
        if others:
            warnings.warn(f"lc_kernels: the warmup cache {file} holds tables for this device under other "
                          f"versions ({others[0].removeprefix(prefix)}), not for this one "
                          f"({ctx.removeprefix(prefix)}); "
                          "they are ignored and lc.warmup measures again", RuntimeWarning, stacklevel=2)
        return 0
    try:
        n = 0
        for kind, dtype, bucket, shape, choice in table.get("choices", []):
            _choices[(str(kind), device, _dtype(dtype), int(bucket), *shape)] = str(choice)
            n += 1
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            for dtype, values in table.get("roofline", {}).items():
                peak_flops, peak_bytes, launch_s = (float(v) for v in values)
                rooflines[(cap, _dtype(dtype))] = (peak_flops, peak_bytes, launch_s)
                n += 1
            for name, entries in table.get("autotune", {}).items():
                stored = _autotune.setdefault(str(name), {})
                for key, kwargs in entries:
                    if not isinstance(kwargs, dict):
                        raise ValueError(f"config {kwargs!r} is not a dict")
                    stored[tuple(key)] = kwargs
                    n += 1
                _seed(str(name))
    except (TypeError, ValueError, AttributeError) as e:
        warnings.warn(f"lc_kernels: ignoring a malformed entry of the warmup cache {file} ({e!r}); "
                      "lc.warmup will measure again and rewrite it", RuntimeWarning, stacklevel=2)
    return n


def save(device: torch.device, cache_dir: str | os.PathLike | None = None) -> str:
    """Write what is in memory for ``device`` to the cache file (merged with the other contexts
    there); atomic, so a concurrent reader never sees half a file. Returns the path."""
    file = path(cache_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bad file was reported when it was loaded; it is replaced
        tables = _read(file)
    ctx = context(device)
    table = tables.get(ctx) if isinstance(tables.get(ctx), dict) else {}
    try:
        choices = {(c[0], c[1], c[2], tuple(c[3])): c[4] for c in table.get("choices", [])}
        dict(table.get("roofline", {}))
        {name: [tuple(k) for k, _ in entries] for name, entries in table.get("autotune", {}).items()}
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        table, choices = {}, {}  # malformed (reported when loaded): rewritten from memory
    for (kind, dev, dtype, bucket, *shape), choice in _choices.items():
        if dev == device:
            choices[(kind, dtype_name(dtype), bucket, tuple(shape))] = choice
    table["choices"] = [[k, d, b, list(s), c] for (k, d, b, s), c in sorted(choices.items(), key=str)]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        roof = dict(table.get("roofline", {}))
        roof.update({dtype_name(d): list(v) for (c, d), v in rooflines.items() if c == cap})
        table["roofline"] = roof
        # default=str: a key value JSON cannot hold is written as text, which no launch matches
        # again (it is tuned anew), rather than failing the save.
        autotune = {name: {json.dumps(list(k), default=str): kw for k, kw in entries}
                    for name, entries in table.get("autotune", {}).items()}
        for name, entries in autotuned_configs().items():
            autotune.setdefault(name, {}).update({json.dumps(list(k), default=str): kw for k, kw in entries.items()})
        table["autotune"] = {name: [[json.loads(k), kw] for k, kw in sorted(entries.items())]
                             for name, entries in autotune.items()}
    tables[ctx] = table
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "tables": tables}, f, indent=1)
    os.replace(tmp, file)
    return file
