"""Measure the constants ``lc_kernels.ops.dispatch.prefer_fused_mlp`` assumes: matmul peak, memory
bandwidth and the cost of one kernel launch, on the device at hand.

``python benchmarks/gpu_constants.py [--device cuda] [--json PATH] [--quick]`` prints them beside
the datasheet values the dispatcher uses now. On a CPU (the dry run) it measures the same things
at small sizes, so the script is exercised where no GPU is.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from lc_kernels.ops import dispatch
from lc_kernels.timing import time_interleaved


def measure(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    n = 1024 if quick or device.type == "cpu" else 8192
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    elems = (1 << 22) if quick or device.type == "cpu" else (1 << 28)
    src = torch.randn(elems, generator=g).to(device, dtype)
    dst = torch.empty_like(src)
    tiny = torch.zeros(1, device=device, dtype=dtype)
    rounds = 3 if quick else 7
    with torch.inference_mode():
        t = time_interleaved({
            "matmul": lambda: torch.mm(a, b),
            "copy": lambda: dst.copy_(src),
            "launch": lambda: tiny.add_(1),
        }, device, rounds=rounds, warmup=2, min_time=0.0 if quick else 0.05)
    bytes_moved = 2 * src.numel() * src.element_size()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_n": n,
        "peak_flops": 2 * n ** 3 / t["matmul"].min,
        "bandwidth_bytes_per_s": bytes_moved / t["copy"].min,
        "launch_s": t["launch"].median,
        "assumed": {"peak_flops": dispatch.PEAK_FLOPS, "bandwidth_bytes_per_s": dispatch.PEAK_BYTES,
                    "launch_s": dispatch.LAUNCH_S},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds (the CPU dry run)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    r = measure(device, dtype, args.quick)
    print(f"{r['device']} {r['dtype']}: matmul {r['peak_flops'] / 1e12:.3f} TFLOP/s (assumed "
          f"{r['assumed']['peak_flops'] / 1e12:.0f}), copy {r['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (assumed "
          f"{r['assumed']['bandwidth_bytes_per_s'] / 1e9:.0f}), launch {r['launch_s'] * 1e6:.1f} us (assumed "
          f"{r['assumed']['launch_s'] * 1e6:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
