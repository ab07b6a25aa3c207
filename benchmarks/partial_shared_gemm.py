"""PARTIAL with a shared first GEMM (``[W1_N; S] x`` gives the kept pre-activations and the skip
output at once; fc2 adds the skip in its epilogue) against the three-GEMM form LCFusedMLP runs.

``python benchmarks/partial_shared_gemm.py`` (2 threads, fp32, interleaved rounds).
"""
import torch, torch.nn as nn, torch.nn.functional as F
from lc_kernels.timing import time_interleaved, Ratio
from lc_kernels.nn.mlp import LCFusedMLP
from lc_kernels.ops import reference
torch.set_num_threads(2); torch.manual_seed(0)
for d, h in ((192, 768), (384, 1536), (768, 3072)):
    T, k = 4096, h // 2
    part = LCFusedMLP(d, k, d, act="gelu", alpha_init=0.3).eval()
    part.skip = nn.Linear(d, d, bias=False); part.form = "partial"
    w = torch.cat([part.fc1.weight, part.skip.weight]).contiguous()
    b = torch.cat([part.fc1.bias, torch.zeros(d)])
    w2t = part.fc2.weight.t()
    def shared(x):
        zs = F.linear(x, w, b)
        hdn = reference.collapsible_activation_(zs[:, :k], "gelu", part.act.alpha)
        return torch.addmm(zs[:, k:].add_(part.fc2.bias), hdn, w2t)
    x = torch.randn(T, d)
    with torch.inference_mode():
        assert torch.allclose(shared(x), part(x), rtol=1e-4, atol=1e-4), (shared(x) - part(x)).abs().max()
        t = time_interleaved({"three": lambda: part(x), "two": lambda: shared(x)}, torch.device("cpu"), rounds=15, warmup=3, min_time=0.2)
    print(f"{d}->{k}(+skip)->{d}: shared first GEMM vs three GEMMs: {Ratio.of(t['three'], t['two'])}", flush=True)
