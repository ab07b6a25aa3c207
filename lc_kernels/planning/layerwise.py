"""The calibration engine: calibration streamed through a model's sites in forward order.

A transformer is a ``ModuleList`` of blocks, each holding one FFN site. Instead of a forward pass
of the whole model per site, the calibration batches are captured once where they enter the first
block (with the keyword arguments every block receives: position embeddings, masks; key/value
caches dropped), then each block runs on the previous block's outputs: one block's activations in
memory at a time, whatever the depth. Modules dispatched across devices or offloaded with
accelerate hooks run through their own hooks, as in a normal forward.

:class:`SiteStream` visits each site with its rows on the current stream (the replacements before
it in place) and, for global targets, what the site must output for the dense model's stream to
come out at the same tokens: found per block by a random change of the site's output (the block's
output for blocks that add the FFN last, the input of the norm after it for post-norm blocks).
Models without such a stack get one whole-model pass per site that stops right after it (global
target: the site's dense output). Both give the same fits (tests check ``<= 1e-6`` in float64).
Gated and Linear -> act -> Linear sites are fitted through it alike.

:class:`Passes` is the engine's whole-model pass (hooks that observe, replace or shift site
outputs, optionally stopping after a site): the planner's statistics and gains
(``FittedCalibration``), the exact residuals of ``fit=False`` plans (``Calibration``), the
measured error of a fitted plan, and the engine's fallback for models without a block stack all
run through it.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import Batch, ForwardFn, flat_output, run_model


class _Stop(Exception):
    """Raised by a hook once what a pass needs has been seen."""


Observe = Callable[[torch.Tensor, torch.Tensor, Batch], None]
Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def site_hooks(sites: dict[int, nn.Module], batch_of: Callable[[], Batch], observe: dict[int, Observe] | None = None,
               replace: dict[int, Replace | nn.Module] | None = None,
               shift: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None) -> Iterator[None]:
    """Forward hooks on site modules: ``replace[i](x)`` computes site i's output instead (or
    ``shift[i](x, y)`` changes it), then ``observe[i](x, y, batch)`` sees its input and (possibly
    changed) output."""
    observe, replace, shift = observe or {}, replace or {}, shift or {}
    handles = []

    def hook_for(i: int):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if i in replace:
                out = replace[i](x).to(out.dtype)
            if i in shift:
                out = shift[i](x, out).to(out.dtype)
            if i in observe:
                observe[i](x, out, batch_of())
            return out
        return hook

    for i in set(observe) | set(replace) | set(shift):
        handles.append(sites[i].register_forward_hook(hook_for(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Passes:
    """Whole-model passes over the calibration batches with hooks on the sites: every pass of the
    planner that runs the entire model (statistics, gains, measured errors, exact residuals, and
    the engine's fallback for models without a block stack) goes through here."""

    def __init__(self, model: nn.Module, sites: list, batches: list[Batch], forward_fn: ForwardFn | None):
        self.model, self.sites, self.batches, self.forward_fn = model, sites, batches, forward_fn
        self.count = 0
        self.batch: Batch | None = None

    def run(self, *, observe: dict[int, Observe] | None = None, replace: dict[int, nn.Module | Replace] | None = None,
            shift: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
            stop_after: int | None = None, outputs: bool = False, batches: list[Batch] | None = None
            ) -> list[torch.Tensor]:
        """One pass. ``observe[i](x, y, batch)`` sees site i's input and output; ``replace[i]`` (a
        module or ``f(x) -> y``) computes site i's output instead; ``shift[i](x, y) -> y'`` changes
        it; with ``stop_after`` the pass ends after that site. Returns the flattened model outputs
        when ``outputs``. ``batches`` (default: all) limits the pass."""
        observe, replace, shift = observe or {}, replace or {}, shift or {}
        if stop_after is not None:
            seen = observe.get(stop_after)

            def stop(x, y, b, seen=seen):
                if seen is not None:
                    seen(x, y, b)
                raise _Stop

            observe = {**observe, stop_after: stop}
        mods = {i: s.module for i, s in enumerate(self.sites)}
        out = []
        with site_hooks(mods, lambda: self.batch, observe=observe, replace=replace, shift=shift):
            try:
                for k, b in enumerate(self.batches if batches is None else batches):
                    self.batch = b
                    try:
                        y = run_model(self.model, b, k, self.forward_fn)
                    except _Stop:
                        continue
                    if outputs:
                        out.append(flat_output(y, b))
            finally:
                self.batch = None
        self.count += 1
        return out


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate hooks hold (some of) the model's weights elsewhere (``cpu_offload``,
    ``dispatch_model`` with a device map): they are meta until a hook loads them for a forward."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: its hooks' execution device, else its first real parameter's device."""
    for m in model.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    p = next((t for t in model.parameters() if not t.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


@contextmanager
def materialized(module: nn.Module) -> Iterator[None]:
    """Within: every offloaded weight of ``module`` is loaded on its execution device (accelerate's
    ``align_module_device`` on each hooked submodule); a plain module is left as it is."""
    hooked = [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]
    if not hooked:
        yield
        return
    from accelerate.utils import align_module_device  # only ever reached when accelerate hooks exist

    with ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        yield


def output_point(model: nn.Module) -> nn.Module | None:
    """Where the model's output is measured: the input of its output embedding (a causal LM's final
    hidden state, before the vocabulary projection), or None for the model's own outputs."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except (NotImplementedError, AttributeError, TypeError):
        return None
    return head if isinstance(head, nn.Module) else None


def find_blocks(model: nn.Module, paths: list[str]) -> tuple[list[nn.Module], list[int]] | None:
    """The ``ModuleList`` of blocks the sites live in (one site per block), and each site's block
    index; None when the sites do not sit one per entry of a single ModuleList."""
    found, index = None, []
    for p in paths:
        parts = p.split(".")
        hit = None
        for k in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:k - 1]) if k > 1 else ""
            try:
                holder = model.get_submodule(".".join(parts[:k - 1])) if k > 1 else model
                lst = holder.get_submodule(parts[k - 1])
            except AttributeError:
                continue
            if isinstance(lst, nn.ModuleList) and parts[k].isdigit():
                hit = (parent + ("." if parent else "") + parts[k - 1], int(parts[k]))
                break
        if hit is None:
            return None
        if found is None:
            found = hit[0]
        elif found != hit[0]:
            return None
        index.append(hit[1])
    if found is None or len(set(index)) != len(index):
        return None
    return list(model.get_submodule(found)), index


class _Measure:
    """The model's output on every batch, at :func:`output_point` (never the full-vocabulary logits)."""

    def __init__(self, model: nn.Module, forward_fn: ForwardFn | None):
        self.model, self.forward_fn = model, forward_fn
        self.point = output_point(model) if forward_fn is None else None

    def run(self, batches: list[Batch], before: Callable[[int, Batch], None] | None = None) -> list[torch.Tensor]:
        """Flattened float64 outputs per batch."""
        outs: list[torch.Tensor] = []
        got: list[torch.Tensor] = []
        handle = None
        if self.point is not None:
            def pre(mod, args):
                got.append(args[0])
                raise _Stop
            handle = self.point.register_forward_pre_hook(pre)
        try:
            for k, b in enumerate(batches):
                if before is not None:
                    before(k, b)
                got.clear()
                try:
                    y = run_model(self.model, b, k, self.forward_fn)
                except _Stop:
                    y = got[0]
                outs.append(flat_output(y, b))
        finally:
            if handle is not None:
                handle.remove()
        return outs


def replaced_outputs(meas: "_Measure", modules: dict[int, nn.Module], batches: list[Batch],
                     replace: dict[int, nn.Module]) -> list[torch.Tensor]:
    """``meas.run(batches)`` with ``replace`` standing in for those of ``modules`` (site index -> module)."""
    current: list[Batch] = []
    before = lambda k, b: current.__setitem__(slice(None), [b])  # noqa: E731
    with site_hooks(modules, lambda: current[0], replace=dict(replace)):
        return meas.run(batches, before)


class HeldOut:
    """The end-to-end error of the model with some sites replaced, on held-out batches: the mean KL
    (nats per token) of the next-token distributions to the dense model's when the model has an
    output embedding (taken through it from the final hidden state), else the relative output error
    ``||dy|| / ||y||``. The dense reference is measured once, at construction."""

    # Teacher log-probabilities are kept when they fit in this many elements (float32), else
    # recomputed from the dense hidden states at every evaluation.
    KEEP_LOGP = 1 << 28

    def __init__(self, model: nn.Module, sites: list, batches: list[Batch], forward_fn: ForwardFn | None):
        self.model, self.batches = model, batches
        self.meas = _Measure(model, forward_fn)
        self.mods = {i: s.module for i, s in enumerate(sites)}
        self.reference = self.meas.run(batches)
        head = self.meas.point
        self.kind = "kl" if isinstance(getattr(head, "weight", None), torch.Tensor) and head.weight.dim() == 2 else "rel"
        self.evaluations = 0
        self._logp: list[torch.Tensor] | None = None
        if self.kind == "kl":
            with materialized(head):  # offloaded weights are loaded for the copy, then released
                self.w = head.weight.detach().float().clone()
                b = getattr(head, "bias", None)
                self.b = None if b is None else b.detach().float().clone()
            rows = sum(r.numel() // self.w.shape[1] for r in self.reference)
            if rows * self.w.shape[0] <= self.KEEP_LOGP:
                self._logp = [self._log_probs(r) for r in self.reference]

    def _log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.linear(h.view(-1, self.w.shape[1]).float(), self.w, self.b), dim=-1)

    def __call__(self, replace: dict[int, nn.Module]) -> float:
        outs = replaced_outputs(self.meas, self.mods, self.batches, replace)
        self.evaluations += 1
        if self.kind == "rel":
            return relative_error(outs, self.reference)
        kl, n = 0.0, 0
        for k, (o, r) in enumerate(zip(outs, self.reference)):
            p_t = self._logp[k] if self._logp is not None else self._log_probs(r)
            log_s = self._log_probs(o)
            kl += float((p_t.exp() * (p_t - log_s)).sum())
            n += p_t.shape[0]
        return kl / max(n, 1)


def relative_error(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    d2 = sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref))
    y2 = sum(float(r.pow(2).sum()) for r in ref)
    return math.sqrt(d2 / y2) if y2 > 0 else 0.0


class BlockStream:
    """Calibration batches streamed block by block (see the module docs).

    ``inputs[k]`` is what enters the current block on batch ``k``; :meth:`advance` runs the block on
    it (with hooks on its site) and moves to the next block.
    """

    kind = "layer-by-layer"

    def __init__(self, model: nn.Module, blocks: list[nn.Module], batches: list[Batch], forward_fn: ForwardFn | None):
        self.model, self.blocks, self.batches = model, blocks, batches
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]  # per block, per batch: (args, kwargs)
        self._batch: Batch | None = None
        hooks = []
        first: list[torch.Tensor] = []
        for j, blk in enumerate(blocks):
            def pre(mod, args, kwargs, j=j):
                if j == 0:
                    first.append(_hidden(args, kwargs))
                # Only the first block's hidden states are kept: later ones are recomputed as the
                # stream moves (holding every block's would cost depth x the activations).
                self.calls[j].append(_without_hidden(args, kwargs))
            hooks.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            # The capture pass runs on to the output point: the dense reference comes with it.
            self.reference = _Measure(model, forward_fn).run(batches)
        finally:
            for h in hooks:
                h.remove()
        if any(len(c) != len(batches) for c in self.calls):
            raise ValueError("calibration did not run every block once per batch (a block skipped or called twice); "
                             "this model's blocks cannot be streamed one at a time")
        self.inputs = first

    def batch(self) -> Batch:
        return self._batch

    def run(self, j: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Block ``j`` on ``inputs`` (one per batch); site hooks installed by the caller apply."""
        out = []
        for k, (x, (args, kwargs)) in enumerate(zip(inputs, self.calls[j])):
            self._batch = self.batches[k]
            y = self.blocks[j](x, *args, **kwargs)
            out.append(y[0] if isinstance(y, (tuple, list)) else y)
        self._batch = None
        return out


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise ValueError("a block was called without its hidden states as the first argument or hidden_states=; "
                         "this model's blocks cannot be streamed one at a time")
    return h


# A block re-run on the stream must not read or grow the key/value cache of the capture pass.
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _is_cache(v: object) -> bool:
    """A key/value cache object (transformers' ``Cache`` classes), recognised without importing them."""
    return not isinstance(v, torch.Tensor) and callable(getattr(v, "get_seq_length", None))


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kw = dict(kwargs)
    for k in CACHE_KWARGS:
        if kw.get(k) is not None:
            kw[k] = None
    for k, v in kw.items():
        if _is_cache(v):
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    args = tuple(None if _is_cache(a) else a for a in args)  # GPT-2 passes its cache positionally
    if args and isinstance(args[0], torch.Tensor):
        return tuple(args[1:]), kw
    kw.pop("hidden_states", None)
    return tuple(args), kw


# ----------------------------------------------------------------------------------------------
# the calibration engine: sites visited in forward order on the stream the replacements produce


NORM_NAMES = ("norm",)  # class names containing this are candidate stream points (LayerNorm, RMSNorm, ...)


class SiteStream:
    """Runs calibration through the sites in forward order, block by block when the model is a stack
    of blocks (one site each), else a whole-model pass per site that stops after it.

    ``sites`` are objects with ``.path`` and ``.module`` (gated or Linear -> act -> Linear sites):
    the engine only hooks the modules. Every fitted replacement (classic and gated) and every
    measured error comes through here.
    """

    def __init__(self, model: nn.Module, sites: list, batches: list[Batch], forward_fn: ForwardFn | None,
                 engine: str = "auto"):
        self.model, self.sites, self.batches, self.forward_fn = model, sites, batches, forward_fn
        found = find_blocks(model, [s.path for s in sites]) if engine in ("auto", "layers") else None
        if engine == "layers" and found is None:
            raise ValueError("engine='layers' needs the sites one per entry of a single ModuleList of blocks")
        self.blocks, self.block_of = found if found is not None else (None, None)
        self.kind = "layer-by-layer" if found is not None else "whole-model passes"
        self.modules = {i: s.module for i, s in enumerate(sites)}
        self.passes = 0
        self.points: dict[int, str] = {}  # per site: where its global target was taken ("" = none)
        self._stream: BlockStream | None = None

    @property
    def reference(self) -> list[torch.Tensor] | None:
        """The dense model's outputs on calib, when a block capture has measured them."""
        return None if self._stream is None else self._stream.reference

    def sweep(self, visit, global_target: bool = False, only: set[int] | None = None):
        """For each site in forward order: ``visit(i, rows) -> replacement or None``, where ``rows`` is
        a list per batch of ``(x, y, target, stream)`` rows on the current stream. ``target`` (with
        ``global_target``) is what the site must output for the dense model's stream to come out at
        the same tokens: the dense stream after the block minus the current stream before the
        site's output is added (a block that adds its FFN last, or a post-norm block at its norm's
        input), or, without a block stack, the dense model's output of the site itself; None where
        no such point exists. A returned module replaces the site from then on. Sites outside
        ``only`` are run through, never visited."""
        if self.blocks is not None:
            return self._sweep_blocks(visit, global_target, only)
        return self._sweep_model(visit, global_target, only)

    def _sweep_blocks(self, visit, global_target: bool, only: set[int] | None):
        if self._stream is None:  # the dense capture serves every sweep: kwargs and the first block's inputs
            self._stream = BlockStream(self.model, self.blocks, self.batches, self.forward_fn)
            self.passes += 1
        stream = self._stream
        site_at = {b: i for i, b in enumerate(self.block_of) if only is None or i in only}
        x_c = stream.inputs
        x_d = list(x_c) if global_target else None
        last = max(site_at, default=-1)
        for j in range(last + 1):
            i = site_at.get(j)
            if i is None:
                x_c = stream.run(j, x_c)
                if x_d is not None:
                    x_d = stream.run(j, x_d)
                continue
            seen: list[tuple[torch.Tensor, torch.Tensor, Batch]] = []
            # A post-norm block's stream point is a norm's input: kept from the block runs themselves
            # (the point test compares batch 0's with a changed site output; no extra block run).
            norms = self._norms(i, j)
            cap_c: dict[int, list] = {id(m): [] for m in norms}
            with site_hooks(self.modules, stream.batch, observe={i: lambda x, y, b: seen.append((x, y, b))}), \
                    _capture_inputs(norms, cap_c):
                out_c = stream.run(j, x_c)
            once = [m for m in norms if len(cap_c[id(m)]) == len(seen)]  # called once per batch
            point = self._stream_point(stream, i, j, x_c[0], seen[0], out_c[0], once, cap_c)
            self.points[i] = "block output" if point == "output" else (
                f"input of {type(point).__name__}" if point is not None else "")
            rows = []
            if x_d is not None:
                cap_d: dict[int, list] = {id(m): [] for m in once}
                with _capture_inputs(once, cap_d):
                    out_d = stream.run(j, x_d)
                if point is None or point == "output":
                    at_c, at_d = out_c, out_d
                else:  # a post-norm block: the stream is the norm's input, on both streams
                    at_c, at_d = cap_c[id(point)], cap_d[id(point)]
                del cap_d
                for (x, y, b), vc, vd, od in zip(seen, at_c, at_d, out_d):
                    # stream = rest + site output: the site output that gives the dense stream is y + (dense - current)
                    t = None if point is None else y + (vd - vc)
                    rows.append((b.rows(x), b.rows(y), None if t is None else b.rows(t), b.rows(od)))
                x_d = out_d
            else:
                rows = [(b.rows(x), b.rows(y), None, b.rows(oc)) for (x, y, b), oc in zip(seen, out_c)]
            new = visit(i, rows)
            if new is None:
                x_c = out_c
            elif point == "output":  # the block adds its FFN's output last: swap it without running the block again
                x_c = [oc - y + new(x).to(y.dtype) for (x, y, _), oc in zip(seen, out_c)]
            else:
                with site_hooks(self.modules, stream.batch, replace={i: new}):
                    x_c = stream.run(j, x_c)
        return stream

    def _stream_point(self, stream: BlockStream, i: int, j: int, x: torch.Tensor, seen: tuple, out: torch.Tensor,
                      norms: list[nn.Module], base: dict[int, list]):
        """Where block ``j``'s stream holds site ``i``'s output added to the rest: ``"output"`` when
        the block returns ``stream + FFN(...)`` with nothing after the FFN (Llama, Qwen2, Phi-3, GPT-2),
        else the normalisation module after the site whose input is such a sum (post-norm blocks:
        BERT), else None (Gemma 2/3 normalise the FFN's output first). A random change of the site's
        output on the first batch must show unchanged there (``base``: each of ``norms``' inputs on the
        unchanged run, first batch first)."""
        y = seen[1]
        g = torch.Generator(device="cpu").manual_seed(j)
        # as large as the stream itself, so float rounding of the sum stays far below the change
        delta = (torch.randn(y.shape, generator=g, dtype=torch.float32) * float(out.detach().float().std() + 1e-3)).to(y)
        tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(y.dtype, 3e-2)
        batches = stream.batches
        stream.batches = batches[:1]
        try:
            moved = {id(m): [] for m in norms}
            with _capture_inputs(norms, moved), site_hooks(self.modules, stream.batch,
                                                          replace={i: lambda v: y + delta}):
                got = stream.run(j, [x])[0]
        finally:
            stream.batches = batches
        if ((got - out) - delta).norm() <= tol * delta.norm():
            return "output"
        for m in norms:
            a, b = base[id(m)][:1], moved[id(m)]
            if len(b) == 1 and a[0].shape == delta.shape and \
                    ((b[0] - a[0]) - delta).norm() <= tol * delta.norm():
                return m
        return None

    def _norms(self, i: int, j: int) -> list[nn.Module]:
        """Normalisation modules of block ``j`` outside site ``i``: candidate stream points."""
        inside = set(map(id, self.modules[i].modules()))
        return [m for m in self.blocks[j].modules() if id(m) not in inside
                and any(k in type(m).__name__.lower() for k in NORM_NAMES)]

    def _sweep_model(self, visit, global_target: bool, only: set[int] | None):
        replace: dict[int, nn.Module] = {}
        order = self._forward_order()
        for i in order:
            if only is not None and i not in only:
                continue
            dense: list[torch.Tensor] = []
            if global_target:  # without a block stack the stream after the site is the site's own output
                self._pass(i, lambda x, y, b: dense.append(b.rows(y)), {})
            seen: list[tuple] = []
            self._pass(i, lambda x, y, b: seen.append((b.rows(x), b.rows(y))), replace)
            self.points[i] = "site output" if global_target else ""
            rows = [(x, y, dense[k] if global_target else None, None) for k, (x, y) in enumerate(seen)]
            new = visit(i, rows)
            if new is not None:
                replace[i] = new
        return None

    def _pass(self, i: int, observe: Observe, replace: dict) -> None:
        """One pass over the batches that stops right after site ``i`` (``observe`` sees it)."""
        Passes(self.model, self.sites, self.batches, self.forward_fn).run(observe={i: observe}, replace=replace,
                                                                          stop_after=i)
        self.passes += 1

    def _forward_order(self) -> list[int]:
        order: list[int] = []

        def seen(i):
            def f(x, y, b):
                if i not in order:
                    order.append(i)
            return f

        Passes(self.model, self.sites, self.batches, self.forward_fn).run(
            observe={i: seen(i) for i in range(len(self.sites))}, batches=self.batches[:1])
        self.passes += 1
        return order + [i for i in range(len(self.sites)) if i not in order]


@contextmanager
def _capture_inputs(modules: list[nn.Module], into: dict[int, list]) -> Iterator[None]:
    with ExitStack() as stack:
        for m in modules:
            h = m.register_forward_pre_hook(lambda mod, args, _l=into[id(m)]: _l.append(args[0]))
            stack.callback(h.remove)
        yield


__all__ = ["SiteStream", "HeldOut", "replaced_outputs", "Passes", "BlockStream", "find_blocks", "output_point", "site_hooks", "relative_error", "is_offloaded",
           "execution_device", "materialized"]
