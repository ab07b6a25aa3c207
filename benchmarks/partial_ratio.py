"""PARTIAL (half the channels linear) against the dense nn.Sequential MLP, beside its FLOP ratio.

Both PARTIAL forms are timed in the same interleaved rounds: the separate form (skip GEMM, fc1 GEMM
with its activation, fc2 accumulated onto the skip's output: what an un-warmed model runs) and
the shared-first-GEMM form (one GEMM over ``[W1; S]``: what ``lc.warmup`` switches to where it
measures it faster); the last column says which one ``lc.warmup`` chose at that shape (its own
short timing, in a private cache directory).

    python benchmarks/partial_ratio.py [--threads 2] [--tokens 16 4096] [--rounds 15] [--json PATH]
"""
import argparse
import json
import shlex
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

import lc_kernels as lc
from lc_kernels.nn.mlp import LCFusedMLP
from lc_kernels.ops.fused_linear_op import linear_act
from lc_kernels.ops.partial import shared_mlp
from lc_kernels.timing import Ratio, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = ((192, 768), (384, 1536), (768, 3072), (1024, 4096))


def separate(x, part):
    """The module's default PARTIAL form (``nn/mlp.py::_skip_plus``): the skip GEMM writes the
    output with fc2's bias, fc2's GEMM accumulates into it."""
    y = torch.nn.functional.linear(x, part.skip.weight, part.fc2.bias)
    h = linear_act(x, part.fc1.weight, part.fc1.bias, part.act.alpha, "gelu")
    return y.addmm_(h, part.fc2.weight.t())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="rows per call (default 4096; 2048 at d=1024)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", type=Path, default=None,
                   help="write the rows and the environment (commit, CPU, versions, command) as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = harness.collect_env(torch.device("cpu"))
    env.command = shlex.join(["python", "benchmarks/partial_ratio.py", *sys.argv[1:]])
    rows = []
    print("| shape | tokens | FLOP ratio | separate form | fraction | shared first GEMM | fraction | lc.warmup chose |")
    print("|---|---|---|---|---|---|---|---|")
    for d, h in SHAPES:
        seq = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).eval()
        part = LCFusedMLP(d, h // 2, d, act="gelu").eval()
        part.skip = nn.Linear(d, d, bias=False)
        part.form = "partial"
        flop_ratio = (4 * d * h) / (4 * d * (h // 2) + 2 * d * d)  # dense: two d x h GEMMs
        for tokens in args.tokens or [4096 if d < 1024 else 2048]:
            x = torch.randn(tokens, d)
            ops = (part.fc1.weight, part.fc1.bias, part.act.alpha, "gelu", part.skip.weight, part.fc2.weight,
                   part.fc2.bias)
            with torch.inference_mode():
                torch.testing.assert_close(separate(x, part), shared_mlp(x, *ops), rtol=1e-4, atol=1e-4)
                t = time_interleaved({"seq": lambda: seq(x), "separate": lambda: separate(x, part),
                                      "shared": lambda: shared_mlp(x, *ops)}, torch.device("cpu"),
                                     rounds=args.rounds, warmup=3, min_time=0.2)
            with tempfile.TemporaryDirectory() as cache:
                rep = lc.warmup(part, tokens=tokens, cache_dir=cache)
            chosen = "; ".join(f"{c.choice} ({c.ratio})" if c.ratio else c.choice
                               for s in rep.sites for c in s.choices) or "-"
            r1, r2 = Ratio.of(t["seq"], t["separate"]), Ratio.of(t["seq"], t["shared"])
            print(f"| {d}→{h}→{d} | {tokens} | {flop_ratio:.2f}× | {r1} | {r1.value / flop_ratio:.2f} | {r2} | "
                  f"{r2.value / flop_ratio:.2f} | {chosen} |", flush=True)
            rows.append({"shape": f"{d}→{h}→{d}", "tokens": tokens, "flop_ratio": flop_ratio,
                         "separate": r1.value, "separate_low": r1.low, "separate_high": r1.high,
                         "shared": r2.value, "shared_low": r2.low, "shared_high": r2.high, "warmup_chose": chosen})
    if args.json:
        env.load_avg_end = harness._load_avg()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": asdict(env), "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
