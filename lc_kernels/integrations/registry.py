"""The handler registry ``prepare_`` walks: one small function per model family.

A handler is called as ``handler(module, path, opts)`` for every module of the model. It
converts the sites it recognises in place and appends their paths to ``opts.result`` (or
``(path, reason)`` to ``opts.result.skipped``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


class PreparedSites(list):
    """The converted site paths (a list), with ``.skipped``: [(path, reason), ...]."""

    def __init__(self, paths=(), skipped=()):
        super().__init__(paths)
        self.skipped: list[tuple[str, str]] = list(skipped)


@dataclass
class PrepareOptions:
    filter_fn: FilterFn | None
    alpha_init: float
    per_channel: bool
    result: PreparedSites = field(default_factory=PreparedSites)


Handler = Callable[[nn.Module, str, PrepareOptions], None]
_HANDLERS: list[Handler] = []


def register_handler(handler: Handler) -> Handler:
    """Add a converter called as ``handler(module, path, opts)`` for every module of the model.

    A handler converts the sites it recognises in place and appends their paths to
    ``opts.result`` (or ``(path, reason)`` to ``opts.result.skipped``). One handler per model
    family keeps adding a family to one small function. Registering the same function twice
    is a no-op.
    """
    if not callable(handler):
        raise TypeError(f"register_handler expects a function handler(module, path, opts), got "
                        f"{type(handler).__name__} {handler!r}")
    try:
        inspect.signature(handler).bind(None, "", None)
    except TypeError as e:
        raise TypeError(f"register_handler: {getattr(handler, '__name__', handler)!r} cannot be called as "
                        f"handler(module, path, opts): {e}") from None
    except ValueError:  # builtins without a signature: accept
        pass
    if handler not in _HANDLERS:
        _HANDLERS.append(handler)
    return handler


def handlers() -> tuple[Handler, ...]:
    """The registered handlers, in registration order."""
    return tuple(_HANDLERS)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
