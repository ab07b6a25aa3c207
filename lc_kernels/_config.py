"""The only module that reads environment variables.

Values are read at call time (not import time) so tests and users can flip a switch
without re-importing the package.
"""
from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def force_triton() -> bool:
    """``LC_KERNELS_FORCE_TRITON=1``: run the Triton kernels on CPU tensors.

    Needs ``TRITON_INTERPRET=1`` set before ``triton`` is first imported, because Triton
    reads it once at import.
    """
    return _flag("LC_KERNELS_FORCE_TRITON")


def triton_interpret() -> bool:
    """Whether Triton's CPU interpreter was requested (``TRITON_INTERPRET=1``)."""
    return _flag("TRITON_INTERPRET")


def disable_triton() -> bool:
    """``LC_KERNELS_DISABLE_TRITON=1``: never launch Triton, even on CUDA (debugging aid)."""
    return _flag("LC_KERNELS_DISABLE_TRITON")


def cache_dir() -> str:
    """Where measured tables live: ``LC_KERNELS_CACHE``, else ``$XDG_CACHE_HOME/lc_kernels``, else
    ``~/.cache/lc_kernels``."""
    explicit = os.environ.get("LC_KERNELS_CACHE", "").strip()
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lc_kernels")
