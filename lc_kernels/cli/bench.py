"""``lc-kernels bench``: runs the benchmark harness of a source checkout (``benchmarks/harness.py``).

The harness (cases, a benchmark-only encoder, report) is not part of the installed library; this
thin command finds it beside the package in a checkout (``pip install -e .``) or through
``LC_KERNELS_BENCHMARKS``, a path to a ``benchmarks/`` folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_HARNESS: ModuleType | None = None


def _benchmarks_dir() -> Path | None:
    env = os.environ.get("LC_KERNELS_BENCHMARKS")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks")
    return next((c for c in candidates if (c / "harness.py").is_file()), None)


def harness() -> ModuleType:
    """The checkout's ``benchmarks/harness.py``, imported once."""
    global _HARNESS
    if _HARNESS is None:
        where = _benchmarks_dir()
        if where is None:
            raise RuntimeError("lc-kernels bench runs benchmarks/harness.py from a source checkout of lc_kernels; "
                               "install with `pip install -e .` from the checkout, or set LC_KERNELS_BENCHMARKS "
                               "to its benchmarks/ folder")
        spec = importlib.util.spec_from_file_location("lc_kernels_bench_harness", where / "harness.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
        _HARNESS = module
    return _HARNESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        harness().add_arguments(parser)
    except RuntimeError as e:  # --help still works without a checkout; running says why not
        parser.description = f"{parser.description} ({e})"


def run(args: argparse.Namespace) -> int:
    try:
        h = harness()
    except RuntimeError as e:
        print(f"lc-kernels bench: {e}", file=sys.stderr)
        return 2
    return h.run(args)
