"""Check and time ``lc_kernels.ops.fused_gated_linear`` against what a gated FFN runs without it.

``python benchmarks/gated_check.py [--device cuda] [--dtype bfloat16] [--quick] [--no-compile]
[--json PATH] [--markdown PATH]`` (``gpu_check.sh`` runs it; on a CPU, ``--quick`` is its dry run).

Providers, on one set of weights and inputs, timed in the same interleaved run:

| provider | what runs |
|---|---|
| `two-linears` | `silu(F.linear(x, W_g, b_g)) * F.linear(x, W_u, b_u)`: a Llama MLP's first half, eager (the baseline) |
| `packed-eager` | `reference.fused_gated_linear`: one packed GEMM, then act and product as aten ops |
| `packed+compile` | `torch.compile` of the same (skipped with `--no-compile`) |
| `op` | `fused_gated_linear(x, w, b, "silu")`: the Triton kernel on CUDA, the CPU kernel otherwise |
| `op+alpha` | the same with a per-channel collapsible slope, as `LCGatedMLP` serves it |

Each output is first compared with the float64 reference (relative error, DESIGN §5 tolerance by
dtype); a provider that disagrees is reported and not timed, and the exit status is 1. Speedups
are medians relative to `two-linears` in the same run, with their spread; TFLOP/s counts the
``2 * M * K * 2H`` FLOPs of the GEMM.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import asdict

import torch
import torch.nn.functional as F

from harness import collect_env, markdown_table
from lc_kernels.ops import fused_gated_linear, reference
from lc_kernels.testing import rel_err
from lc_kernels.timing import Ratio, rotating, time_interleaved

# (name, K = model width, H = intermediate width): SmolLM2-135M, Llama-3.2-1B, Llama-2-7B.
SHAPES = [("smollm2_135m", 576, 1536), ("llama3.2_1b", 2048, 8192), ("llama2_7b", 4096, 11008)]
TOKENS = (16, 4096)  # decode-sized and prefill-sized batches
QUICK_SHAPES = [("toy", 64, 128)]
QUICK_TOKENS = (64,)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
BASELINE = "two-linears"


def providers(w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, compile_: bool) -> dict:
    h = w.shape[0] // 2
    w_g, w_u, b_g, b_u = w[:h].contiguous(), w[h:].contiguous(), b[:h], b[h:]
    out = {
        BASELINE: (lambda x: F.silu(F.linear(x, w_g, b_g)) * F.linear(x, w_u, b_u), None),
        "packed-eager": (lambda x: reference.fused_gated_linear(x, w, b, "silu"), None),
        "op": (lambda x: fused_gated_linear(x, w, b, "silu"), None),
        "op+alpha": (lambda x: fused_gated_linear(x, w, b, "silu", alpha), alpha),
    }
    if compile_:
        packed = torch.compile(lambda x: reference.fused_gated_linear(x, w, b, "silu"), dynamic=False)
        out["packed+compile"] = (packed, None)
    return out


def run_case(name: str, k: int, h: int, tokens: int, dtype: torch.dtype, device: torch.device, args) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(2 * h, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(2 * h, generator=g).to(device, dtype)
    alpha = (torch.rand(h, generator=g) * 0.5).to(device)
    inputs = [torch.randn(tokens, k, generator=g).to(device, dtype) for _ in range(4)]
    calls, rows = {}, []
    with torch.inference_mode():
        for provider, (fn, a) in providers(w, b, alpha, not args.no_compile).items():
            ref = reference.fused_gated_linear(inputs[0].double(), w.double(), b.double(), "silu",
                                               None if a is None else a.double())
            err = rel_err(fn(inputs[0]), ref)
            ok = err <= TOLERANCE[dtype]
            rows.append({"case": name, "K": k, "H": h, "tokens": tokens, "dtype": str(dtype).removeprefix("torch."),
                         "provider": provider, "rel_err": err, "status": "ok" if ok else f"wrong (> {TOLERANCE[dtype]})"})
            if ok:
                calls[provider] = rotating(fn, inputs)
        timings = time_interleaved(calls, device, rounds=args.rounds, warmup=2, min_time=0.0 if args.quick else 0.02)
    flops = 2 * tokens * k * 2 * h
    for row in rows:
        t = timings.get(row["provider"])
        if t is None:
            continue
        row.update(median_ms=t.median * 1e3, iqr_pct=t.iqr_pct, tflops=flops / t.median / 1e12)
        if BASELINE in timings:
            row["speedup"] = str(Ratio.of(timings[BASELINE], t))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quick", action="store_true", help="one toy shape, few rounds (the CPU dry run)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, 3 with --quick)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    env = collect_env(device)
    env.command = shlex.join(["python", *sys.argv])
    rows = []
    for name, k, h in QUICK_SHAPES if args.quick else SHAPES:
        for tokens in QUICK_TOKENS if args.quick else TOKENS:
            rows += run_case(name, k, h, tokens, dtype, device, args)
    head = ["case", "K", "H", "tokens", "dtype", "provider", "rel err", "median ms", "IQR %", "TFLOP/s",
            f"speedup vs {BASELINE} (spread)"]
    body = [[r["case"], str(r["K"]), str(r["H"]), str(r["tokens"]), r["dtype"], r["provider"], f"{r['rel_err']:.1e}",
             f"{r['median_ms']:.3g}" if "median_ms" in r else r["status"], f"{r.get('iqr_pct', 0):.1f}",
             f"{r.get('tflops', 0):.3g}", r.get("speedup", "-")] for r in rows]
    table = markdown_table(head, body)
    text = (f"# fused_gated_linear: {env.device_name} ({env.device}), torch {env.torch}, triton {env.triton}, "
            f"{env.date}\n\n`{env.command}`\n\n{table}\n")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": asdict(env), "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    wrong = [r for r in rows if r["status"] != "ok"]
    for r in wrong:
        print(f"gated_check: {r['case']} {r['tokens']} tokens {r['provider']}: rel err {r['rel_err']:.2e} {r['status']}",
              file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
