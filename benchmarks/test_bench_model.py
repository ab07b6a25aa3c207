"""The ViT-Tiny-shaped encoder with 0, half and all of its MLPs collapsed."""
import pytest

PROVIDERS = ("nn.Sequential", "nn.Sequential+compile", "LCFusedMLP", "LCFusedMLP+compile", "collapsed-half",
             "collapsed", "collapsed+compile")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vit_tiny_encoder(case, run_provider, provider):
    run_provider(case("vit_tiny_encoder"), provider)
