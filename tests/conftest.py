import os

import torch

from lc_kernels.testing import rel_err  # noqa: F401  (tests import it from here too)

# Triton reads TRITON_INTERPRET once, at import: set it before anything imports triton, and
# only where there is no GPU (on CUDA the kernels run natively).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long interpreter/compile tests (still run in CI)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Latency tables measured by tests go to a temporary directory, never the user's cache."""
    old = os.environ.get("LC_KERNELS_CACHE")
    os.environ["LC_KERNELS_CACHE"] = str(tmp_path_factory.mktemp("lc_kernels_cache"))
    yield
    if old is None:
        os.environ.pop("LC_KERNELS_CACHE", None)
    else:
        os.environ["LC_KERNELS_CACHE"] = old


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a loaded machine OpenMP
    spin-waiting makes them orders of magnitude slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def strip_and_compare(model, x) -> torch.Tensor:
    """``lc.strip_`` ``model``; asserts no lc_kernels module is left and its output on ``x`` is
    unchanged (<= 1e-6 relative). Returns the output before stripping."""
    import lc_kernels as lc
    from lc_kernels.testing import rel_err

    with torch.no_grad():
        before = model(x)
    lc.strip_(model)
    assert not any(type(m).__module__.startswith("lc_kernels") for m in model.modules())
    with torch.no_grad():
        assert rel_err(model(x), before) <= 1e-6
    return before


def error_without_lc_kernels(model, x, y, tmp_path) -> float:
    """Pickle ``model`` (stripped), load it in a fresh interpreter where ``import lc_kernels`` fails,
    run it on ``x`` and return its relative error to ``y``: a stripped model needs torch alone."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "model.pt"
    torch.save({"model": model, "x": x, "y": y}, path)
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "lc_kernels":
                    raise ImportError("lc_kernels is not installed here")
        sys.meta_path.insert(0, Block())
        import torch
        d = torch.load({str(path)!r}, weights_only=False)
        with torch.no_grad():
            y = d["model"](d["x"])
        assert "lc_kernels" not in sys.modules
        print(((y - d["y"]).norm() / d["y"].norm()).item())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())
