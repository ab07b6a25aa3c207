"""benchmarks/gpu_check.sh must not rot where no GPU is: its CPU dry run runs every step here."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine run benchmarks/gpu_check.sh itself")
def test_gpu_check_dry_run_passes_on_cpu():
    env = {k: v for k, v in os.environ.items() if k not in ("LC_KERNELS_FORCE_TRITON", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CPU dry run" in out.stdout
    for step in ("tests-cpu: ok", "bench-cpu: ok", "constants-cpu: ok", "gated-cpu: ok", "warmup-latency-cpu: ok"):
        assert step in out.stdout, out.stdout[-3000:]
