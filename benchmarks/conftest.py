"""Fixtures for the pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``.

``pytest.ini`` limits the unit-test command to ``tests/``, so nothing here is collected by
``python -m pytest``. Cases come from ``benchmarks/harness.py``, the code behind
``lc-kernels bench``, at smaller sizes so the suites finish in a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import harness as bench

# 1024 tokens (2 × 197 for the encoder): GPT-2 medium's MLP then takes ~0.2 s per eager call on
# 2 CPU cores, and the suites finish in a few minutes. `lc-kernels bench` runs the full sizes.
TOKENS = 1024
ENCODER_BATCH = 2
ROUNDS = 10
PEAK_SIZE = 2048


@pytest.fixture(scope="session")
def settings() -> bench.Settings:
    """CUDA in bf16 when available, else CPU in fp32."""
    cuda = torch.cuda.is_available()
    return bench.Settings(
        device=torch.device("cuda" if cuda else "cpu"), dtypes=[torch.bfloat16 if cuda else torch.float32],
        shapes=[], tokens=TOKENS, batch=ENCODER_BATCH, rounds=ROUNDS,
    )


@pytest.fixture(scope="session")
def env(settings: bench.Settings) -> dict:
    return dataclasses.asdict(bench.collect_env(settings.device))


@pytest.fixture(scope="session")
def peak_tflops(settings: bench.Settings) -> float:
    return bench.measure_peak(settings.device, settings.dtypes[0], PEAK_SIZE, rounds=5)


@pytest.fixture(scope="session")
def case(settings: bench.Settings) -> Callable[[str], bench.Case]:
    """``case(name)``: built, compiled and checked on first use; only the latest is kept.

    Keeping one releases the previous case's weights and inputs (~100 MB at GPT-2 medium), and
    ``build_case`` resets dynamo, after which an older case's compiled providers would
    recompile. Tests are listed shape by shape, so each case is built once.
    """
    held: dict[str, bench.Case] = {}

    def get(name: str) -> bench.Case:
        if name not in held:
            held.clear()
            held[name] = bench.build_case(name, settings.dtypes[0], settings)
        return held[name]

    return get


@pytest.fixture
def run_provider(benchmark, env: dict, peak_tflops: float, settings: bench.Settings):
    """Time one provider of a case with pytest-benchmark, grouped per shape."""

    def run(case: bench.Case, name: str) -> None:
        p = case.provider(name)
        if p.status != "ok":
            pytest.fail(f"refusing to time {case.name}/{name}: {p.status}")
        base = case.baseline
        benchmark.group = f"{case.name} {case.label} × {case.tokens} tokens, {bench.dtype_name(case.dtype)}"
        benchmark.extra_info.update(
            env=env, case=case.name, shape=case.label, tokens=case.tokens, dtype=bench.dtype_name(case.dtype),
            provider=name, form=p.form, flops=p.flops, flop_ratio=base.flops / p.flops, rel_err=p.rel_err,
            peak_tflops=peak_tflops,
        )
        call, sync = bench.rotating(p.fn, case.inputs), bench.synchronizer(case.device)

        def timed() -> None:
            call()
            sync()

        with torch.inference_mode():
            n = bench.calls_for(timed, case.device, settings.min_time)
            benchmark.pedantic(timed, rounds=settings.rounds, iterations=n, warmup_rounds=settings.warmup)
        if benchmark.stats is not None:  # None under --benchmark-disable
            tflops = p.flops / benchmark.stats.stats.median / 1e12
            benchmark.extra_info.update(tflops=tflops, pct_peak=100 * tflops / peak_tflops)

    return run
