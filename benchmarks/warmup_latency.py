"""First-call latency of a small collapsed model with and without ``lc.warmup``, each in a fresh process.

``python benchmarks/warmup_latency.py [--device cuda] [--dtype bfloat16] [--tokens 256] [--json PATH]
[--markdown PATH] [--quick]``

Four fresh processes, in order (Triton's compile cache and lc_kernels' cache directory are private
temporary directories, so the first two start with nothing compiled, tuned or measured):

1. ``cold``: no warmup; the first call compiles and autotunes every kernel it launches.
2. ``warmup``: ``lc.warmup(model, x)`` first (its time is reported), then the first call.
3. ``warmup-again``: a new process on the same caches calls ``lc.warmup`` again (it should load,
   not benchmark), then the first call.
4. ``cached``: a new process on the same caches calling no warmup at all: the autotuners are
   seeded from the cache when the kernels are built, so its first call should not benchmark.

Each reports the first call, the median of the next calls (the steady state) and the kernel
configs its autotuners benchmarked. On a CPU (the dry run of ``benchmarks/gpu_check.sh``) the same
steps run at small sizes: no Triton, warmup measures the dispatcher's choices instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
from torch import nn

MODES = ("cold", "warmup", "warmup-again", "cached")


def _provenance(device: str) -> dict:
    """Commit, CPU model, versions and command, as every results file records them."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))
    from _report import provenance

    return provenance(device)


def build(d: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """KEEP, PARTIAL and MERGE LCFusedMLP blocks and a packed gated block, as a collapsed model holds."""
    import lc_kernels as lc

    torch.manual_seed(0)
    keep = lc.LCFusedMLP(d, 4 * d, act="gelu", alpha_init=0.3)
    part = lc.LCFusedMLP(d, 2 * d, act="gelu", alpha_init=0.3)
    part.skip, part.form = nn.Linear(d, d, bias=False), "partial"
    merged = lc.LCFusedMLP(d, 4 * d)
    merged.fc, merged.form = nn.Linear(d, d), "merged"
    gated = lc.LCGatedMLP(d, 2 * d, packed=True, alpha_init=0.2)
    return nn.Sequential(keep, part, merged, gated).to(device, dtype).eval()


def child(mode: str, device: torch.device, dtype: torch.dtype, d: int, tokens: int, repeats: int) -> dict:
    import lc_kernels as lc
    from lc_kernels.ops import tables

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    model = build(d, dtype, device)
    x = torch.randn(tokens, d, device=device, dtype=dtype)
    out: dict = {"mode": mode}
    if mode in ("warmup", "warmup-again"):
        t0 = time.perf_counter()
        report = lc.warmup(model, x)
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        out["warmup_measured"], out["warmup_cached"] = report.measured, report.cached
        out["warmup_configs_tuned"] = report.kernel_configs_new
        print(report, file=sys.stderr)
    if device.type == "cuda":  # build (and seed from the cache) the autotuners, so `before` counts what was loaded
        from lc_kernels.ops import fused_gated_linear_op, launch

        launch.tuned_kernels()
        fused_gated_linear_op.tuned_kernel()
    before = {(n, k) for n, e in tables.autotuned_configs().items() for k in e}
    out["configs_loaded_or_tuned_before"] = len(before)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        out["first_call_s"] = time.perf_counter() - t0
        steady = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            sync()
            steady.append(time.perf_counter() - t0)
    out["steady_s"] = statistics.median(steady)
    after = {(n, k) for n, e in tables.autotuned_configs().items() for k in e}
    out["configs_tuned_at_first_call"] = len(after - before)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--d", type=int, default=None, help="model width (default 768 on CUDA, 64 on CPU)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="small sizes, few calls (the CPU dry run)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    d = args.d or (768 if device.type == "cuda" and not args.quick else 64)
    tokens, repeats = (16, 3) if args.quick else (args.tokens, args.repeats)
    if args.child:
        print(json.dumps(child(args.child, device, dtype, d, tokens, repeats)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            # cold gets its own caches; the others share one pair, filled by the warmup process.
            sub = os.path.join(tmp, "cold" if mode == "cold" else "shared")
            env = {**os.environ, "LC_KERNELS_CACHE": os.path.join(sub, "lc"),
                   "TRITON_CACHE_DIR": os.path.join(sub, "triton")}
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--device", str(device),
                   "--dtype", args.dtype, "--d", str(d), "--tokens", str(tokens), "--repeats", str(repeats)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["process_s"] = time.perf_counter() - t0
            rows.append(row)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "dtype": str(dtype).removeprefix("torch."), "d": d, "tokens": tokens,
        "torch": torch.__version__, "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "rows": rows, "environment": _provenance(str(device)),
    }
    lines = [f"# lc.warmup and first-call latency: {result['device']}, {result['dtype']}, d={d}, "
             f"{tokens} tokens, torch {result['torch']}, {result['date']}", "",
             "| process | warmup (s) | first call (ms) | steady call (ms) | first / steady | configs held before "
             "the call | configs tuned at first call |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        warm = f"{r['warmup_s']:.2f}" if "warmup_s" in r else "-"
        lines.append(f"| {r['mode']} | {warm} | {r['first_call_s'] * 1e3:.1f} | {r['steady_s'] * 1e3:.3f} | "
                     f"{r['first_call_s'] / r['steady_s']:.1f}x | {r['configs_loaded_or_tuned_before']} | "
                     f"{r['configs_tuned_at_first_call']} |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
