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
