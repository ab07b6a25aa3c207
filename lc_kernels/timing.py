"""The interleaved timer the benchmarks, the demo and latency planning share.

Timing candidates in interleaved rounds (A B C, C B A, ...) rather than one after the other
keeps background load on a shared machine from landing on one of them; the median and the
quartiles over rounds give the number and its spread.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    """Seconds per call over the timed rounds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    rounds: int
    calls_per_round: int

    @classmethod
    def of(cls, samples: list[float], calls_per_round: int) -> "Timing":
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(statistics.median(samples), q1, q3, min(samples), max(samples), len(samples), calls_per_round)

    @property
    def iqr_pct(self) -> float:
        return 100.0 * (self.q3 - self.q1) / self.median


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timed region wait for the device: CUDA launches return before the work is done."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def rotating(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A no-argument call of ``fn`` that takes the next input each time."""
    state = {"i": 0}

    def call() -> torch.Tensor:
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(x)

    return call


def calls_for(call: Callable[[], object], device: torch.device, min_time: float) -> int:
    """Back-to-back calls needed for one timed sample to last at least ``min_time`` seconds."""
    sync = synchronizer(device)
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    return max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))


def time_interleaved(calls: dict[str, Callable[[], object]], device: torch.device, *, rounds: int, warmup: int,
                     min_time: float) -> dict[str, Timing]:
    """Median seconds per call of each callable, timed in interleaved rounds.

    Each round times every callable once, as ``n`` back-to-back calls with ``n`` chosen so a
    sample lasts at least ``min_time`` (CUDA calls of a few µs need many to rise above timer
    and launch noise); the device is synchronised before the first and after the last call.
    """
    sync = synchronizer(device)
    calls_per_round = {}
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        calls_per_round[name] = calls_for(call, device, min_time)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    gc.collect()
    gc.disable()  # a collection inside one sample would be charged to whichever provider ran
    try:
        for r in range(rounds):
            for name in order if r % 2 == 0 else reversed(order):
                n, call = calls_per_round[name], calls[name]
                sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    call()
                sync()
                samples[name].append((time.perf_counter() - t0) / n)
    finally:
        gc.enable()
    return {name: Timing.of(s, calls_per_round[name]) for name, s in samples.items()}


@dataclass
class Ratio:
    """``before / after`` of two timings from the same interleaved run, with its spread."""

    value: float
    low: float  # q1(before) / q3(after): the pessimistic end
    high: float  # q3(before) / q1(after)

    @classmethod
    def of(cls, before: Timing, after: Timing) -> "Ratio":
        return cls(before.median / after.median, before.q1 / after.q3, before.q3 / after.q1)

    @property
    def measurable(self) -> bool:
        """False when the spread covers 1.0x: the two are not told apart."""
        return not (self.low <= 1.0 <= self.high)

    def __str__(self) -> str:
        spread = f"{self.low:.2f}-{self.high:.2f}"
        if not self.measurable:
            return f"no measurable change ({self.value:.2f}x, spread {spread})"
        return f"{self.value:.2f}x (spread {spread})"
