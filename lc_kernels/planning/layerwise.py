"""Calibration streamed through a model one block at a time (decoder LLMs and other deep stacks).

A decoder is a ``ModuleList`` of blocks, each holding one FFN site. Instead of a forward pass of
the whole model per site, the calibration batches are captured once where they enter the first
block (with the keyword arguments every block receives: position embeddings, masks), then each
block runs on the previous block's outputs: one block's activations in memory at a time, whatever
the depth. Modules dispatched across devices or offloaded with accelerate hooks run through their
own hooks, as in a normal forward.

:class:`ModelStream` is the fallback with the same interface for models without such a stack: it
runs the whole model per site, stopping right after the site (the classic sequential pass). Both
give the same fits (tests check ``<= 1e-6`` in float64).
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .inputs import Batch, ForwardFn, flat_output, run_model


class _Stop(Exception):
    """Raised by a hook once what a pass needs has been seen."""


Observe = Callable[[torch.Tensor, torch.Tensor, Batch], None]
Replace = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def site_hooks(sites: dict[int, nn.Module], batch_of: Callable[[], Batch], observe: dict[int, Observe] | None = None,
               replace: dict[int, Replace | nn.Module] | None = None) -> Iterator[None]:
    """Forward hooks on site modules: ``replace[i](x)`` computes site i's output instead, then
    ``observe[i](x, y, batch)`` sees its input and (possibly replaced) output."""
    observe, replace = observe or {}, replace or {}
    handles = []

    def hook_for(i: int):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if i in replace:
                out = replace[i](x).to(out.dtype)
            if i in observe:
                observe[i](x, out, batch_of())
            return out
        return hook

    for i in set(observe) | set(replace):
        handles.append(sites[i].register_forward_hook(hook_for(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
        self.block_runs = 0
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
        self.block_runs += 1
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


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kw = dict(kwargs)
    for k in CACHE_KWARGS:
        if kw.get(k) is not None:
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    if args and isinstance(args[0], torch.Tensor):
        return tuple(args[1:]), kw
    kw.pop("hidden_states", None)
    return tuple(args), kw


__all__ = ["BlockStream", "find_blocks", "output_point", "site_hooks", "relative_error", "is_offloaded",
           "execution_device", "materialized"]
