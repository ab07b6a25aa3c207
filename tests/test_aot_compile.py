"""Ahead-of-time CUDA compiles of the Triton kernels for sm_80 and sm_90, on a CPU-only machine.

``triton.compile`` with a ``GPUTarget`` runs Triton's whole CUDA pipeline down to a cubin
(``ptxas`` ships with Triton), so this checks without a GPU that every autotune config and
every dtype x activation x flag combination compiles, fits the target's shared memory, and that
16-bit and TF32 dots use tensor cores (``wgmma`` on sm_90 where the tile allows it,
``mma.sync`` otherwise) while IEEE fp32 does not. The cases and the compile live in
``benchmarks/aot_compile.py`` (also a CLI: ``python benchmarks/aot_compile.py --full``).

Case set (CI, ~390 compiles): on sm_80 and sm_90 every autotune config of each kernel
(``fused_linear``, ``fused_mlp``, ``fused_gated_linear``) twice
(``aot_compile.CONFIG_SWEEP``: bf16 with GELU and every flag, the most registers; fp32/TF32
with no epilogue, the most shared memory), and at one config (``SWEEP_CONFIG``) every dtype x
activation x flag combination on sm_90 but only every dtype x precision on sm_80: the epilogue
is the same code on both targets, and the sweep on sm_80 too took the test from ~2.5 to ~4.3
min. Cost: ~300 CPU-seconds with a cold Triton cache (~175 for the first two kernels, ~125 for
the 105 gated cases), i.e. ~2.5 min on 2 idle cores; ~5 s with a warm cache.
``LC_KERNELS_AOT_FULL=1``: the full config x dtype x activation x flags cross product on both
targets instead (4,536 compiles, of them 1,152 gated; ~50 CPU-minutes; ``python
benchmarks/aot_compile.py --full`` is the same as a table).

The compiles run in spawned worker processes with ``TRITON_INTERPRET`` removed: under
``tests/conftest.py``'s ``TRITON_INTERPRET=1`` the ``@triton.jit`` kernels imported in this
process are interpreter functions that ``triton.compile`` cannot take.

Skips (with the reason) where Triton, its NVIDIA backend or a working ``ptxas`` is missing.
"""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import aot_compile  # noqa: E402

FULL = os.environ.get("LC_KERNELS_AOT_FULL", "") not in ("", "0")
ARCHS = (80, 90)
CASES = aot_compile.cases(full=FULL, archs=ARCHS, sweep_archs=None if FULL else (90,))


@pytest.fixture(scope="module")
def compiled(request) -> dict:
    """Results by case id for the selected cases, compiled in parallel on first use."""
    why = aot_compile.backend_unavailable()
    if why:
        pytest.skip(f"cannot compile for CUDA here: {why}")
    wanted = {
        aot_compile.case_id(item.callspec.params["case"])
        for item in request.session.items
        if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})
    }
    todo = [c for c in CASES if aot_compile.case_id(c) in wanted]
    return {aot_compile.case_id(r): r for r in aot_compile.run_cases(todo)}


def _uses_tensor_cores(c: dict) -> bool:
    return c["dtype"] != "fp32" or c["flags"]["input_precision"] == "tf32"


def _wgmma_tile(c: dict) -> bool:
    """Whether Triton can use wgmma for the tile: a warpgroup (4 warps) with 64+ rows."""
    return c["config"]["BLOCK_M"] >= 64 and c["config"]["num_warps"] % 4 == 0


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=aot_compile.case_id)
def test_aot_compile(case, compiled):
    r = compiled[aot_compile.case_id(case)]
    limit = aot_compile.SHARED_LIMIT[case["arch"]]
    shared = r["shared_bytes"]
    assert shared is not None, f"did not compile for sm_{case['arch']}: {r['error']}\n{r.get('traceback', '')}"
    assert shared <= limit, (
        f"{shared} bytes of shared memory > sm_{case['arch']}'s {limit} per block: the config would "
        f"never launch there (the autotuner drops it with OutOfResources)"
    )
    assert r["ok"], r["error"]
    counts = r["tensor_core_counts"]
    if not _uses_tensor_cores(case):
        assert sum(counts.values()) == 0, f"IEEE fp32 dot uses tensor cores (TF32 rounding?): {counts}"
    elif case["arch"] >= 90 and _wgmma_tile(case):
        assert counts["wgmma"] > 0, f"no wgmma on sm_{case['arch']}: {counts}"
    else:
        assert counts["mma.sync"] > 0 and counts["wgmma"] == 0, f"expected mma.sync on sm_{case['arch']}: {counts}"


def test_compile_case_refuses_interpreted_kernels():
    """In this process, under TRITON_INTERPRET=1, the kernels are interpreter functions:
    ``compile_case`` must say so instead of producing a bogus result."""
    from triton.runtime.jit import JITFunction

    from lc_kernels.kernels.fused_linear import fused_linear_kernel

    if isinstance(fused_linear_kernel, JITFunction):
        pytest.skip("kernels were imported without TRITON_INTERPRET: nothing to refuse")
    c = CASES[0]
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot_compile.compile_case(c["kernel"], c["arch"], c["dtype"], c["act"], c["flags"], c["config"])
