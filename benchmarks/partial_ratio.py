"""PARTIAL (half the channels linear) against the dense nn.Sequential MLP, beside its FLOP ratio.

``python benchmarks/partial_ratio.py`` (2 threads, fp32, interleaved rounds).
"""
import torch, torch.nn as nn, lc_kernels as lc, sys
from lc_kernels.timing import time_interleaved, Ratio
from lc_kernels.nn.mlp import LCFusedMLP
torch.set_num_threads(2)
torch.manual_seed(0)
for d, h in ((192, 768), (384, 1536), (768, 3072), (1024, 4096)):
    T = 4096 if d < 1024 else 2048
    seq = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)).eval()
    part = LCFusedMLP(d, h // 2, d, act="gelu").eval()
    part.skip = nn.Linear(d, d, bias=False); part.form = "partial"
    x = torch.randn(T, d)
    flop_ratio = (2 * d * h) / (2 * d * (h // 2) + d * d)
    with torch.inference_mode():
        t = time_interleaved({"seq": lambda: seq(x), "partial": lambda: part(x)}, torch.device("cpu"), rounds=15, warmup=3, min_time=0.2)
    r = Ratio.of(t["seq"], t["partial"])
    print(f"{d}->{h}->{d} T={T}: FLOP ratio {flop_ratio:.2f}x, measured {r}, fraction {r.value / flop_ratio:.2f}", flush=True)
