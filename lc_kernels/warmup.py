"""``lc.warmup(model, example)``: tune before traffic, once per machine.

Every lc module in the model (``LCFusedMLP``, ``LCChain``, ``LCGatedMLP``) is run at the token
counts it will serve: the rows it sees when the model runs ``example`` (forward pre-hooks record
them), and/or ``tokens=``. Where the dispatcher has a choice at such a shape it is timed, both ways,
in a short interleaved run (``lc_kernels.timing``) and the faster one stored; where it has
none, the call still compiles and autotunes the Triton kernels it launches (CUDA). What was chosen
goes to ``warmup.json`` in the cache directory (:mod:`lc_kernels.ops.tables`), so the next process
on the same device and versions starts with it: its autotuners are seeded when the kernels are
built and its dispatcher reads the choices at the first call, measuring nothing.

Choices timed per shape, device and dtype:

* PARTIAL blocks (``LCFusedMLP``, ``LCChain`` joints without BatchNorm, packed ``LCGatedMLP`` with a
  full-rank skip): the separate skip GEMM (default) or one GEMM over ``[W1; S]``
  (``ops/partial.py``); the shared form is stored only where it is measurably faster (its spread
  clear of 1.0x).
* On CUDA, ``LCFusedMLP`` with an MLP or factored pair: ``fused_mlp``'s one kernel or two GEMMs,
  against the roofline rule's choice; and once per compute capability and dtype the rule's constants
  (matmul peak, bandwidth, launch cost) are measured for the shapes nobody warmed up.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .nn.activation import CollapsibleActivation
from .nn.gated import LCGatedMLP
from .nn.mlp import LCChain, LCFusedMLP
from .ops import dispatch, tables
from .timing import Ratio, Timing, time_interleaved

LC_MODULES = (LCFusedMLP, LCChain, LCGatedMLP)

# Interleaved rounds per choice and the shortest timed sample: about 2 x 7 x 5 ms = 0.07 s a choice,
# enough to tell apart the >= 5% differences worth switching for.
ROUNDS = 7
MIN_TIME = 0.005


@dataclass
class WarmupChoice:
    """One dispatcher choice at one shape: what was picked and where the answer came from."""

    kind: str  # "partial", "gated_partial" or "fused_mlp" (see ops.tables)
    tokens: int  # the rows it was measured at (it serves the power-of-two bucket above)
    shape: tuple  # the block's widths (and activation)
    choice: str
    source: str  # "measured" (now) or "cache" (stored by an earlier warmup)
    ratio: str = ""  # default's time / alternative's time, with its spread, when measured now


@dataclass
class WarmupSite:
    """One lc module: its form, the token counts it was run at, and its choices."""

    name: str
    module: str
    form: str
    device: str
    dtype: str
    tokens: list[int]
    choices: list[WarmupChoice] = field(default_factory=list)


@dataclass
class WarmupReport:
    """What :func:`warmup` did; ``print(report)`` shows it as a table."""

    sites: list[WarmupSite]
    tokens: list[int]
    measured: int  # choices timed in this call
    cached: int  # choices found in the cache
    kernel_configs: int  # autotuned kernel configs held after warmup (CUDA; 0 on CPU)
    kernel_configs_new: int  # of which benchmarked in this call
    path: str | None  # the cache file written, or None when it could not be written
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lc.warmup: {len(self.sites)} lc module(s) at tokens {self.tokens} in {self.seconds:.2f} s; "
                 f"{self.measured} choice(s) measured, {self.cached} from the cache; "
                 f"{self.kernel_configs} kernel config(s) held ({self.kernel_configs_new} tuned now)",
                 f"cache: {self.path or 'not written'}"]
        lines += [f"note: {n}" for n in self.notes]
        if self.sites:
            rows = [("site", "module", "form", "device/dtype", "tokens", "choice", "result")]
            for s in self.sites:
                head = (s.name or "(model)", s.module, s.form, f"{s.device}/{s.dtype}", ",".join(map(str, s.tokens)))
                if not s.choices:
                    rows.append((*head, "-", "no choice here; kernels run at these shapes"))
                for c in s.choices:
                    dims = "->".join(str(v) for v in c.shape if isinstance(v, int))
                    acts = "".join(f" {v}" for v in c.shape if isinstance(v, str))
                    what = f"{c.kind} {dims}{acts} @ {c.tokens} tokens"
                    result = f"{c.choice} ({c.source}{': ' + c.ratio if c.ratio else ''})"
                    rows.append((*head, what, result))
                    head = ("",) * len(head)
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def _token_counts(tokens: object) -> list[int]:
    items = [tokens] if isinstance(tokens, int) or not isinstance(tokens, Iterable) else list(tokens)
    if not items or any(isinstance(t, bool) or not isinstance(t, int) or t <= 0 for t in items):
        raise ValueError(f"lc.warmup: tokens must be a positive int or a non-empty list of them (the rows each "
                         f"lc module sees per call, e.g. batch x sequence length), got {tokens!r}")
    return sorted(set(items))


def _check(model: object, example: object, tokens: object, cache_dir: object) -> list[int]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"lc.warmup expects a torch.nn.Module, got {type(model).__name__}")
    if example is None and tokens is None:
        raise ValueError("lc.warmup needs the serving shapes: pass example= (an input the model is called "
                         "with, as in serving) or tokens= (rows per call: an int or a list of ints)")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"lc.warmup: cache_dir must be a path (str or os.PathLike) or None for the default "
                        f"cache directory, got {type(cache_dir).__name__}")
    return [] if tokens is None else _token_counts(tokens)


def _call(model: nn.Module, example: Any) -> None:
    if isinstance(example, dict):
        model(**example)
    elif isinstance(example, tuple):
        model(*example)
    else:
        model(example)


def _observed_rows(model: nn.Module, example: Any, sites: list[tuple[str, nn.Module]]) -> dict[str, set[int]]:
    """The rows each site sees when ``model`` runs ``example`` (its input's leading dims)."""
    seen: dict[str, set[int]] = {name: set() for name, _ in sites}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1 and args[0].shape[-1]:
                seen[name].add(args[0].numel() // args[0].shape[-1])

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in sites]
    try:
        _call(model, example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _first_param(m: nn.Module) -> torch.Tensor | None:
    return next(iter(m.parameters()), None)


def _act(act: nn.Module) -> str:
    return act.base if isinstance(act, CollapsibleActivation) else "identity"


def _choices_of(m: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple, Sequence[str]]]:
    """``(kind, shape, (default, alternative))`` for each choice the dispatcher makes in ``m(x)``."""
    out: list[tuple[str, tuple, Sequence[str]]] = []
    if isinstance(m, LCFusedMLP):
        if m.form == "partial" and m._modules.get("norm") is None:
            out.append(("partial", (m.in_features, m.fc1.out_features, m.out_features, m.act.base),
                        (dispatch.SEPARATE, dispatch.SHARED)))
        elif m.form in ("mlp", "factored") and m._modules.get("norm") is None \
                and dispatch.kernel_path(x) == dispatch.TRITON:
            k, h, n = m.in_features, m.fc1.out_features, m.fc2.out_features
            rows = x.numel() // k
            rule = dispatch.FUSED if dispatch.roofline_prefers_fused(rows, k, h, n, x.device, x.dtype) else dispatch.TWO
            out.append(("fused_mlp", (k, h, n), (rule, dispatch.TWO if rule == dispatch.FUSED else dispatch.FUSED)))
    elif isinstance(m, LCChain):
        skips = m._modules.get("skips")
        for key in (skips or {}):
            i = int(key)
            if m._fusable(i):
                out.append(("partial", (m.linears[i].in_features, m.linears[i].out_features,
                                        m.linears[i + 1].out_features, _act(m.acts[i])),
                            (dispatch.SEPARATE, dispatch.SHARED)))
    elif isinstance(m, LCGatedMLP) and m.form == "partial" and m.packed and "skip_in" not in m._modules:
        out.append(("gated_partial", (m.in_features, m.kept_features, m.out_features, m.act.base),
                    (dispatch.SEPARATE, dispatch.SHARED)))
    return out


def _measure(m: nn.Module, x: torch.Tensor, kind: str, shape: tuple, options: Sequence[str]) -> tuple[str, Ratio]:
    """Time ``m(x)`` with each option stored for ``(kind, shape)``, interleaved; keep the default
    unless the alternative is measurably faster (its spread clear of 1.0x)."""
    rows = x.numel() // x.shape[-1]

    def forcing(option: str) -> Callable[[], object]:
        def call() -> object:
            tables.record(kind, x.device, x.dtype, rows, shape, option)
            return m(x)

        return call

    try:
        t: dict[str, Timing] = time_interleaved({o: forcing(o) for o in options}, x.device, rounds=ROUNDS,
                                                warmup=2, min_time=MIN_TIME)
    except BaseException:
        tables.forget(kind, x.device, x.dtype, rows, shape)  # no forced option left behind
        raise
    default, alternative = options
    ratio = Ratio.of(t[default], t[alternative])
    return (alternative if ratio.low > 1.0 else default), ratio


def _measure_roofline(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float]:
    """Matmul FLOP/s, copy bandwidth and one launch on ``device`` (benchmarks/gpu_constants.py's
    method at smaller sizes: about a second)."""
    n, elems = 4096, 1 << 26
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    src = torch.randn(elems, device=device, dtype=dtype)
    dst, tiny = torch.empty_like(src), torch.zeros(1, device=device, dtype=dtype)
    t = time_interleaved({"matmul": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src),
                          "launch": lambda: tiny.add_(1)}, device, rounds=5, warmup=2, min_time=0.02)
    return 2 * n ** 3 / t["matmul"].min, 2 * elems * src.element_size() / t["copy"].min, t["launch"].median


def _kernel_configs() -> set[tuple[str, tuple]]:
    return {(name, key) for name, entries in tables.autotuned_configs().items() for key in entries}


def warmup(model: nn.Module, example: Any = None, *, tokens: int | Sequence[int] | None = None,
           cache_dir: str | os.PathLike | None = None) -> WarmupReport:
    """Tune every lc module of ``model`` for the shapes it will serve, before traffic, and cache it.

    Args:
        model: any module holding ``LCFusedMLP`` / ``LCChain`` / ``LCGatedMLP`` blocks (itself one too).
        example: an input as the model is called in serving (a tensor, a tuple of positional args
            or a dict of keyword args); the model runs it once and each lc module's token count is
            the rows it sees.
        tokens: token counts (rows per lc module call: batch x sequence), an int or a list; with
            ``example`` both sets are warmed.
        cache_dir: where ``warmup.json`` lives; default ``LC_KERNELS_CACHE``, else
            ``$XDG_CACHE_HOME/lc_kernels``, else ``~/.cache/lc_kernels`` (as the latency tables). A
            process reads the default directory at its first call; one warmed elsewhere calls
            ``warmup(..., cache_dir=...)`` again, which then measures nothing.

    Returns:
        a :class:`WarmupReport`; ``print(report)`` shows each site, the choices and where each
        came from.

    The model runs in eval mode under ``torch.inference_mode`` (its train/eval flags are restored),
    on its own devices and dtypes. Running it again with the cache filled measures nothing. The
    shared PARTIAL form keeps a stacked copy of the block's ``[W1; S]`` weights, rebuilt when a
    weight changes through autograd's view of it; after writing weights through ``.data`` call
    ``lc_kernels.ops.partial.forget()``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``cache_dir`` is not a path.
        ValueError: neither ``example`` nor ``tokens``, or a token count that is not a positive int.
    """
    counts = _check(model, example, tokens, cache_dir)
    start = time.perf_counter()
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, LC_MODULES)]
    notes: list[str] = []
    if not sites:
        notes.append("no LCFusedMLP / LCChain / LCGatedMLP in the model (lc.prepare_ builds them); nothing to do")
        warnings.warn("lc.warmup: " + notes[0], UserWarning, stacklevel=2)
    modes = {m: m.training for m in model.modules()}
    report_sites: list[WarmupSite] = []
    measured = cached = 0
    devices: set[torch.device] = set()
    configs_before: set[tuple[str, tuple]] = set()
    model.eval()
    try:
        with torch.inference_mode():
            for name, m in sites:
                p = _first_param(m)
                if p is not None and p.device.type != "meta":
                    device = p.device if p.device.type != "cuda" else tables.normalize(p.device)
                    if device not in devices:
                        devices.add(device)
                        tables.load(device, cache_dir)  # this directory's tables, even if others were read
            configs_before = _kernel_configs()
            rows = _observed_rows(model, example, sites) if example is not None and sites else {}
            done: dict[tuple, str] = {}
            for name, m in sites:
                p = _first_param(m)
                if p is None or p.device.type == "meta":
                    continue
                in_features = m.in_features
                counts_here = sorted(set(counts) | rows.get(name, set()))
                site = WarmupSite(name, type(m).__name__, getattr(m, "form", "chain"), str(p.device),
                                  tables.dtype_name(p.dtype), counts_here)
                for t in counts_here:
                    x = torch.randn(t, in_features, device=p.device, dtype=p.dtype)
                    for kind, shape, options in _choices_of(m, x):
                        key = (kind, x.device, x.dtype, tables.token_bucket(t), *shape)
                        stored = tables.measured(kind, x.device, x.dtype, t, *shape)
                        if key in done:
                            site.choices.append(WarmupChoice(kind, t, shape, stored, done[key]))
                            continue
                        if stored is not None:
                            cached += 1
                            done[key] = "cache"
                            site.choices.append(WarmupChoice(kind, t, shape, stored, "cache"))
                            continue
                        choice, ratio = _measure(m, x, kind, shape, options)
                        tables.record(kind, x.device, x.dtype, t, shape, choice)
                        measured += 1
                        done[key] = "measured"
                        site.choices.append(WarmupChoice(kind, t, shape, choice, "measured", str(ratio)))
                    m(x)  # compiles and autotunes what this shape launches, with the choices made
                report_sites.append(site)
            for device in devices:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    cap = torch.cuda.get_device_capability(device)
                    for dtype in {p.dtype for _, m in sites for p in m.parameters() if p.device == device}:
                        if (cap, dtype) not in tables.rooflines and dtype.is_floating_point:
                            tables.rooflines[(cap, dtype)] = _measure_roofline(device, dtype)
                            notes.append(f"measured the roofline constants of sm{cap[0]}{cap[1]} {dtype}")
    finally:
        for m, mode in modes.items():
            m.training = mode
    configs_after = _kernel_configs()
    written: str | None = None
    for device in devices:
        try:
            written = tables.save(device, cache_dir)
        except OSError as e:
            notes.append(f"could not write the cache ({e}); the choices hold for this process only")
            warnings.warn(f"lc.warmup: could not write the cache ({e}); the choices hold for this process only",
                          RuntimeWarning, stacklevel=2)
    return WarmupReport(report_sites, sorted(set(counts) | {r for s in rows.values() for r in s}) if sites else counts,
                        measured, cached, len(configs_after), len(configs_after - configs_before), written,
                        time.perf_counter() - start, notes)
