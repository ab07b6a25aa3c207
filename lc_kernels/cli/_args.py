"""argparse ``type=`` checks shared by the ``lc-kernels`` subcommands.

A bad number exits 2 at parse time with ``argument --epochs: must be an integer >= 1, got -1``
instead of running with it (``--epochs -1`` used to train nothing and exit 0).
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, NoReturn


def int_at_least(minimum: int, name: str | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` that accepts integers >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = name or f"int_at_least_{minimum}"
    return parse


def _float(name: str, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


positive_int = int_at_least(1, "positive_int")
nonneg_int = int_at_least(0, "nonneg_int")
positive_float = _float("positive_float", lambda v: v > 0, "a finite number > 0")
nonneg_float = _float("nonneg_float", lambda v: v >= 0, "a finite number >= 0")
fraction = _float("fraction", lambda v: 0 < v <= 1, "a number in (0, 1]")


class UsageError(SystemExit):
    """Exit status 2 (argparse's usage error) whose ``str`` is the message, printed to stderr."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def usage_error(command: str, message: str) -> NoReturn:
    """Print ``lc-kernels COMMAND: error: MESSAGE`` and exit 2, as argparse does for bad options."""
    print(f"lc-kernels {command}: error: {message}", file=sys.stderr)
    raise UsageError(message)
