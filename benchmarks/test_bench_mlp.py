"""MLP blocks at transformer shapes, a low-rank bottleneck and a deep chain, per provider."""
import pytest

# Shape-major order: the `case` fixture builds each shape once. No PARTIAL at the bottleneck:
# with 32 of 64 channels linear the skip (1024×1024) costs more than it saves, so the planner
# keeps the MLP (PARTIAL pays only when |L|·(d_in + d_out) > d_in·d_out).
MLP = {
    "vit_tiny": ("LCFusedMLP", "collapsed", "partial"),
    "vit_small": ("LCFusedMLP", "collapsed", "partial"),
    "vit_base": ("LCFusedMLP", "collapsed", "partial"),
    "gpt2_medium": ("LCFusedMLP", "collapsed", "partial"),
    "bottleneck": ("LCFusedMLP", "collapsed"),
    "deep_chain": ("LCChain", "collapsed", "collapsed-half"),
}
PARAMS = [
    (shape, provider)
    for shape, (lc, *collapsed) in MLP.items()
    for provider in ("nn.Sequential", "nn.Sequential+compile", lc, lc + "+compile", *collapsed)
]


@pytest.mark.parametrize("shape, provider", PARAMS)
def test_mlp(case, run_provider, shape, provider):
    run_provider(case(shape), provider)
