"""Calibration inputs: whatever the model's forward takes, normalised once.

``calib`` is a tensor (one positional input), a tuple of positional arguments, a dict of
keyword arguments (Hugging Face ``input_ids`` / ``attention_mask`` / ...), or an iterable (a
list, a DataLoader) of those; ``forward_fn(model, batch)`` covers any other convention. Tokens
where ``attention_mask == 0`` (padding) enter neither fits nor errors: each batch carries the
mask, and every site and output tensor whose leading dims match it is read at the unmasked
positions only.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], Any]
MASK_KEYS = ("attention_mask",)


@dataclass
class Batch:
    """One calibration batch: how to call the model, and which tokens count."""

    args: tuple
    kwargs: dict
    raw: Any  # what the user passed, for forward_fn
    mask: torch.Tensor | None  # bool, True = a real token; None = every row counts

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., d) as (rows, d), keeping only the unmasked tokens when the shapes line up."""
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask]
        return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)

    def select(self, out: torch.Tensor) -> torch.Tensor:
        """An output tensor at the unmasked tokens (flattened) when its leading dims match the mask."""
        m = self.mask
        if m is not None and out.dim() >= m.dim() and tuple(out.shape[: m.dim()]) == tuple(m.shape):
            return out[m].reshape(-1)
        return out.reshape(-1)

    @property
    def n_rows(self) -> int:
        if self.mask is not None:
            return int(self.mask.sum())
        ids = self.kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return int(ids.numel())  # every token of every sequence is a row
        x = next((a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None:
            return 1
        return int(x.shape[0]) if x.dim() > 1 else 1


def _positional_capacity(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` accepts (None: any number)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _named(model: nn.Module, args: tuple) -> dict:
    """Positional arguments by the names ``model.forward`` gives them (finds a positional mask)."""
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return {}
    return dict(zip(params, args))


def _input_linear(model: nn.Module) -> nn.Linear | None:
    """The first module holding parameters, when it is a Linear: it fixes the input width and dtype."""
    for m in model.modules():
        if next(m.parameters(recurse=False), None) is not None:
            return m if isinstance(m, nn.Linear) else None
    return None


def _to(v: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(v, torch.Tensor):
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v.to(device)
    return v


def _check_tensor(t: torch.Tensor, i: int, name: str) -> None:
    if t.numel() == 0:
        raise ValueError(f"calib batch {i} is empty ({name} has shape {tuple(t.shape)}); pass at least one row")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"calib batch {i}: {name} holds NaN or Inf; calibration needs finite inputs")


def _mask_of(kwargs: dict, i: int) -> torch.Tensor | None:
    for key in MASK_KEYS:
        m = kwargs.get(key)
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"calib batch {i}: {key} must be a tensor, got {type(m).__name__}")
        ref = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        shape = None if ref is None else tuple(ref.shape[:2])
        if shape is not None and tuple(m.shape) != shape:
            raise ValueError(f"calib batch {i}: {key} has shape {tuple(m.shape)} but the inputs have "
                             f"(batch, sequence) = {shape}; pass the mask the tokenizer returned with them")
        if m.is_floating_point() or m.dtype == torch.bool:
            bad = ~((m == 0) | (m == 1))
        else:
            bad = (m < 0) | (m > 1)
        if bool(bad.any()):
            raise ValueError(f"calib batch {i}: {key} must hold only 0 (padding) and 1 (token)")
        mask = m != 0
        if not bool(mask.any()):
            raise ValueError(f"calib batch {i}: {key} masks every token; nothing is left to calibrate on")
        return mask
    return None


def calib_batches(
    model: nn.Module,
    calib: object,
    *,
    forward_fn: ForwardFn | None = None,
    cast_to: torch.dtype | None = None,
    max_rows: int | None = None,
) -> list[Batch]:
    """``calib`` as a list of :class:`Batch` on the model's device, checked against the model.

    When the model starts with a Linear and a batch is a plain tensor, it must be floating point
    in that Linear's dtype (``cast_to`` casts floating inputs first: the CLI's convenience) with
    last dim ``in_features``. ``max_rows`` keeps only the first rows of plain-tensor batches.
    """
    if isinstance(calib, (torch.Tensor, tuple, dict)):
        items = [calib]
    elif isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise TypeError("calib must be a tensor, a tuple of positional inputs, a dict of keyword inputs, or an "
                        f"iterable/DataLoader of those, got {type(calib).__name__}")
    else:
        items = list(calib)
    if not items:
        raise ValueError(f"calib is empty (an empty {type(calib).__name__}); pass at least one batch of inputs")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be a function forward_fn(model, batch), got {type(forward_fn).__name__}")
    params = [p for p in model.parameters()]
    if not params:
        raise ValueError("the model has no parameters to calibrate")
    device = params[0].device
    if device.type == "meta" and any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        # offloaded by accelerate: inputs go where its hooks compute
        device = next((torch.device(h.execution_device) for m in model.modules()
                       if (h := getattr(m, "_hf_hook", None)) is not None
                       and getattr(h, "execution_device", None) is not None), torch.device("cpu"))
    if device.type == "meta":
        raise ValueError("the model is on the meta device (no weights); load or materialise its weights "
                         "(e.g. model.to_empty(device='cpu') and load a state dict) before calibrating")
    lin = _input_linear(model)
    capacity = _positional_capacity(model)
    batches, left = [], max_rows
    for i, item in enumerate(items):
        if isinstance(item, Batch):  # already normalised (the CLI's file loader)
            batches.append(item)
            continue
        if forward_fn is not None:
            batches.append(Batch((), {}, _to_tree(item, device, cast_to), _mask_of(item, i)
                                 if isinstance(item, dict) else None))
            continue
        if isinstance(item, torch.Tensor):
            args, kwargs = (item,), {}
        elif isinstance(item, dict):
            args, kwargs = (), dict(item)
        elif isinstance(item, (tuple, list)):
            # (x, y) from a DataLoader: arguments beyond what forward takes are targets.
            args, kwargs = tuple(item if capacity is None else item[:max(capacity, 1)]), {}
        else:
            raise TypeError(f"calib batch {i}: expected a tensor, a tuple of inputs or a dict of keyword inputs, "
                            f"got {type(item).__name__}")
        tensors = [(f"argument {k}", a) for k, a in enumerate(args)] + list(kwargs.items())
        if not any(isinstance(t, torch.Tensor) for _, t in tensors):
            raise TypeError(f"calib batch {i}: expected a tensor or an (input, ...) tuple, got {type(item).__name__} "
                            "holding no tensor")
        for name, t in tensors:
            if isinstance(t, torch.Tensor):
                _check_tensor(t, i, name)
        args = tuple(_to(a, device, cast_to) for a in args)
        kwargs = {k: _to(v, device, cast_to) for k, v in kwargs.items()}
        if left is not None and len(args) == 1 and not kwargs and args[0].dim() > 1:
            args, left = (args[0][:left],), left - min(left, args[0].shape[0])
        x = args[0] if len(args) == 1 and not kwargs else None
        if lin is not None and isinstance(x, torch.Tensor):
            if not x.is_floating_point():
                raise TypeError(f"calib batch {i} has dtype {x.dtype}, expected floating point: the model's first "
                                f"Linear computes in {lin.weight.dtype}; pass x.to({lin.weight.dtype})")
            if x.dim() == 0 or x.shape[-1] != lin.in_features:
                raise ValueError(f"calib batch {i} has shape {tuple(x.shape)}; the model's first Linear expects "
                                 f"last dim {lin.in_features}")
            if x.dtype != lin.weight.dtype:
                raise TypeError(f"calib batch {i} has dtype {x.dtype}, the model computes in {lin.weight.dtype}; "
                                f"cast with x.to({lin.weight.dtype})")
        batches.append(Batch(args, kwargs, item, _mask_of({**_named(model, args), **kwargs}, i)))
        if left == 0:
            break
    return batches


def _to_tree(item: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(item, torch.Tensor):
        return _to(item, device, dtype)
    if isinstance(item, dict):
        return {k: _to_tree(v, device, dtype) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_to_tree(v, device, dtype) for v in item)
    return item


def run_model(model: nn.Module, batch: Batch, i: int, forward_fn: ForwardFn | None = None) -> Any:
    """The model's output on one batch; a failing forward names the batch."""
    try:
        if forward_fn is not None:
            return forward_fn(model, batch.raw)
        return model(*batch.args, **batch.kwargs)
    except (RuntimeError, TypeError) as e:
        shapes = [tuple(a.shape) for a in (*batch.args, *batch.kwargs.values()) if isinstance(a, torch.Tensor)]
        raise ValueError(f"the model's forward failed on calib batch {i} (tensors of shapes {shapes}): {e}") from e


def flat_output(out: object, batch: Batch | None = None) -> torch.Tensor:
    """Every floating-point tensor in the model's output (unmasked tokens only), as one float64 vector."""
    parts = [p for p in _parts(out, batch) if p.numel()]
    if not parts:
        raise TypeError(f"the model's output ({type(out).__name__}) holds no floating-point tensor to measure")
    return torch.cat(parts)


def flat_output_grad(out: object, batch: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`flat_output` keeping the graph (float32 is enough for a loss)."""
    if isinstance(out, torch.Tensor):
        return batch.select(out).to(dtype) if out.is_floating_point() else out.new_zeros(0)
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    parts = [flat_output_grad(v, batch, dtype) for v in out if isinstance(v, (torch.Tensor, dict, tuple, list))] \
        if isinstance(out, (tuple, list)) else []
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else torch.zeros(0)


def _parts(out: object, batch: Batch | None) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point():
            return []
        return [(batch.select(out) if batch is not None else out.reshape(-1)).detach().to(torch.float64)]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [p for v in out if v is not None for p in _parts(v, batch)]
    return []


def output_norm(reference: list[torch.Tensor]) -> float:
    """``||y||`` of the model's outputs on calib; a relative error needs it finite and non-zero."""
    y2 = sum(float(r.pow(2).sum()) for r in reference)
    if not math.isfinite(y2) or y2 == 0:
        raise ValueError(f"the model's output on calib has norm {math.sqrt(y2)}; a relative error needs a "
                         "finite, non-zero output")
    return math.sqrt(y2)


# The share of calibration rows held out of every fit: the allocation's candidates and the healing
# guard are judged there (an error measured on the rows a map was fitted on shrinks toward 0 as
# its regressors approach the row count, and says little about new text).
VALIDATION_FRACTION = 0.125


def _slice_batch(b: Batch, lo: int, hi: int, n: int) -> Batch:
    """Rows ``lo:hi`` (leading dim) of every tensor of ``b`` whose leading dim is ``n``."""
    cut = lambda v: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
    raw = b.raw
    if isinstance(raw, dict):
        raw = {k: cut(v) for k, v in raw.items()}
    elif isinstance(raw, (tuple, list)):
        raw = type(raw)(cut(v) for v in raw)
    else:
        raw = cut(raw)
    return Batch(tuple(cut(a) for a in b.args), {k: cut(v) for k, v in b.kwargs.items()}, raw,
                 cut(b.mask) if b.mask is not None else None)


def _leading(b: Batch) -> int | None:
    """The leading dim shared by the batch's tensors (None when they disagree or it cannot be sliced)."""
    ts = [t for t in (*b.args, *b.kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 1]
    if not ts or len({int(t.shape[0]) for t in ts}) != 1 or (not b.args and not b.kwargs):
        return None
    return int(ts[0].shape[0])


def holdout_split(batches: list[Batch], fraction: float = VALIDATION_FRACTION,
                  forward_fn: ForwardFn | None = None) -> tuple[list[Batch], list[Batch]]:
    """``(fit, validation)``: the last ``fraction`` of the calibration batches held out of every fit.

    With fewer than 2 batches the one batch is cut along its leading dim (sequences or samples);
    when nothing can be cut (one row, or a ``forward_fn`` batch of unknown structure), the
    validation list is empty and callers measure on the fit rows (and say so).
    """
    if not batches:
        return [], []
    if len(batches) >= 2:
        n_val = max(1, round(len(batches) * fraction))
        n_val = min(n_val, len(batches) - 1)
        return batches[:-n_val], batches[-n_val:]
    b = batches[0]
    n = None if forward_fn is not None else _leading(b)
    if n is None or n < 2:
        return batches, []
    n_val = min(max(1, round(n * fraction)), n - 1)
    return [_slice_batch(b, 0, n - n_val, n)], [_slice_batch(b, n - n_val, n, n)]
