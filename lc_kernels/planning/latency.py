"""Measured latency as a planning objective: what each candidate form costs on this device.

FLOPs fall where latency may not (a narrow GEMM that cannot fill the machine, an extra launch, a
skip GEMM beside the kept MLP). ``plan_collapse(..., objective="latency", example=...)`` plans on
a :class:`LatencyTable` instead: every block a plan can build — a Linear (with the activation the
op fuses into it, where one follows), a PARTIAL block (narrow MLP plus skip) — is timed on the
model's device and dtype at the token count of ``example`` (or ``tokens=``), with the interleaved
timer of the benchmarks, and cached per (device, dtype, shape) in a JSON table under the user's
cache directory (``LC_KERNELS_CACHE`` overrides it) so a second plan measures nothing.
"""
from __future__ import annotations

import json
import os
import platform

import torch

from .. import _config
from ..nn.activation import CollapsibleActivation
from ..nn.mlp import LCFusedMLP
from ..ops import fused_linear
from ..timing import time_interleaved
from .sites import Site

CACHE_FILE = "latency.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.machine()}:{torch.get_num_threads()}threads"


class LatencyTable:
    """Seconds per call of candidate blocks at ``tokens`` rows, measured once and cached."""

    def __init__(self, device: torch.device, dtype: torch.dtype, tokens: int, *, rounds: int = 7,
                 min_time: float = 0.01):
        self.device, self.dtype, self.tokens = torch.device(device), dtype, int(tokens)
        self.rounds, self.min_time = rounds, min_time
        self.prefix = f"{device_name(self.device)}|{str(dtype).removeprefix('torch.')}|{self.tokens}"
        self.path = os.path.join(_config.cache_dir(), CACHE_FILE)
        self.measured = 0
        try:
            with open(self.path) as f:
                self._table: dict[str, float] = {k: float(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, AttributeError):
            self._table = {}

    # what the cost model asks -------------------------------------------------------------------

    def for_site(self, site: Site) -> "SiteLatency":
        """The cost model's view for one site: each joint timed with that joint's activation."""
        return SiteLatency(self, [a.base if isinstance(a, CollapsibleActivation) else "identity" for a in site.acts])

    def linear(self, d_in: int, d_out: int, act: str) -> float:
        """A Linear with ``act`` (``"identity"``: none) fused after it, at a slope of 0.5."""
        return self._get(f"linear|{d_in}|{d_out}|{act}", lambda: self._linear_call(d_in, d_out, act))

    def partial(self, d_in: int, kept: int, d_out: int, act: str) -> float:
        """A PARTIAL block: ``d_in -> kept -> d_out`` with ``act`` between, plus a ``d_in -> d_out`` skip."""
        return self._get(f"partial|{d_in}|{kept}|{d_out}|{act}", lambda: self._partial_call(d_in, kept, d_out, act))

    # measurement -------------------------------------------------------------------------------

    def _get(self, key: str, build) -> float:
        full = f"{self.prefix}|{key}"
        if full not in self._table:
            call = build()
            with torch.inference_mode():
                t = time_interleaved({"c": call}, self.device, rounds=self.rounds, warmup=2, min_time=self.min_time)
            self._table[full] = t["c"].median
            self.measured += 1
            self._save()
        return self._table[full]

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def _linear_call(self, d_in: int, d_out: int, act: str):
        x, w, b = self._rand(self.tokens, d_in), self._rand(d_out, d_in) * d_in ** -0.5, self._rand(d_out)
        alpha = None if act == "identity" else torch.full((1,), 0.5, device=self.device, dtype=self.dtype)
        return lambda: fused_linear(x, w, b, alpha, act)

    def _partial_call(self, d_in: int, kept: int, d_out: int, act: str):
        m = LCFusedMLP(d_in, kept, d_out, act=act, alpha_init=0.5).to(self.device, self.dtype)
        m.skip = torch.nn.Linear(d_in, d_out, bias=False).to(self.device, self.dtype)
        m.form = "partial"
        x = self._rand(self.tokens, d_in)
        return lambda: m(x)

    def _save(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self._table, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a concurrent planner never reads half a file
        except OSError:
            pass  # a read-only cache only costs re-measuring next time


class SiteLatency:
    """A :class:`LatencyTable` as one site's cost model: joint ``i`` is timed with its own activation.

    ``group_cost`` and ``decisions_cost`` ask ``linear(d_in, d_out, joint)`` (the joint whose
    activation fuses after the Linear, or None) and ``partial(d_in, kept, d_out, joint)``.
    """

    def __init__(self, table: LatencyTable, acts: list[str]):
        self.table, self.acts = table, acts

    def for_site(self, site: Site) -> "SiteLatency":
        return self

    def linear(self, d_in: int, d_out: int, joint: int | None) -> float:
        return self.table.linear(d_in, d_out, "identity" if joint is None else self.acts[joint])

    def partial(self, d_in: int, kept: int, d_out: int, joint: int) -> float:
        return self.table.partial(d_in, kept, d_out, self.acts[joint])

