"""All or nothing: a transform that fails part-way leaves the model exactly as it was.

:func:`atomic` snapshots every module's attributes (its children, parameters, buffers and plain
fields, by reference) and the values of every parameter and buffer; on an exception it puts the
structure back and copies the values back into the same tensor objects, so references a user
holds (to submodules, to parameters in an optimizer) stay valid.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _snapshot(model: nn.Module, values: bool = True) -> tuple[list, list]:
    modules = []
    for m in model.modules():
        d = dict(m.__dict__)
        d["_modules"], d["_parameters"], d["_buffers"] = dict(m._modules), dict(m._parameters), dict(m._buffers)
        modules.append((m, d))
    tensors, seen = [], set()
    for t in (list(model.parameters()) + list(model.buffers())) if values else ():
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append((t, t.detach().clone(), t.requires_grad))
    return modules, tensors


def _restore(modules: list, tensors: list) -> None:
    for m, d in modules:
        m.__dict__.clear()
        m.__dict__.update(d)
        for key in ("_modules", "_parameters", "_buffers"):
            m.__dict__[key] = dict(d[key])  # a fresh dict: the snapshot stays intact for a second restore
    with torch.no_grad():
        for t, value, grad in tensors:
            if t.shape != value.shape or t.dtype != value.dtype:
                t.data = value
            else:
                t.copy_(value)
            t.requires_grad_(grad)


# Models inside a transaction: a transform called from another (prepare_ and collapse_ inside
# compress) takes no snapshot of its own; the outer one restores everything.
_ACTIVE: set[int] = set()


@contextmanager
def atomic(model: nn.Module, what: str, *, values: bool = True) -> Iterator[None]:
    """Run the body as one transaction on ``model``; a failure restores it and says what failed.

    ``values=False`` snapshots the structure only (no copy of the weights: a model's size in
    memory), for a body that replaces modules and tensors but writes into none it found.
    """
    if id(model) in _ACTIVE:
        yield
        return
    modules, tensors = _snapshot(model, values)
    _ACTIVE.add(id(model))
    try:
        yield
    except BaseException as e:
        _restore(modules, tensors)
        if isinstance(e, (ValueError, TypeError)):
            raise
        raise RuntimeError(f"{what} failed and the model was restored as it was: {type(e).__name__}: {e}") from e
    finally:
        _ACTIVE.discard(id(model))
