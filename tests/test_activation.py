import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lc_kernels import CollapsibleActivation
from lc_kernels.ops import reference

BASES = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
         "identity": lambda x: x}


@pytest.mark.parametrize("base", list(BASES))
def test_endpoints(base):
    x = torch.randn(7, 5, 13)
    act = CollapsibleActivation(base, init=0.0)
    torch.testing.assert_close(act(x), BASES[base](x), rtol=0, atol=0)
    act = CollapsibleActivation(base, init=1.0)
    torch.testing.assert_close(act(x), x)


@pytest.mark.parametrize("base", list(BASES))
def test_interpolates_per_channel_along_last_dim(base):
    x = torch.randn(4, 3, 6)
    alpha = torch.rand(6)
    act = CollapsibleActivation(base, num_parameters=6, init=alpha)
    torch.testing.assert_close(act(x), alpha * x + (1 - alpha) * BASES[base](x))


def test_relu_alpha_is_prelu_slope():
    x = torch.randn(32, 9)
    w = torch.rand(9)
    prelu = nn.PReLU(9)
    prelu.weight.data.copy_(w)
    torch.testing.assert_close(CollapsibleActivation("relu", 9, w)(x), prelu(x))


@pytest.mark.parametrize("base", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("n", [1, 5])
def test_gradcheck_x_and_alpha(base, n):
    act = CollapsibleActivation(base, num_parameters=n, init=torch.rand(n)).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    x = x + 0.1 * x.sign()  # keep relu's kink away from finite-difference steps
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, a: reference.collapsible_activation(x, base, a), (x, act.alpha))


def test_alpha_is_the_only_parameter():
    act = CollapsibleActivation("gelu", 4)
    assert [n for n, _ in act.named_parameters()] == ["alpha"]


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(base="tanh"), ValueError, "unknown activation 'tanh'"),
    (dict(base=nn.ReLU()), TypeError, "must be a name"),
    (dict(base="relu", num_parameters=0), ValueError, "positive int"),
    (dict(base="relu", num_parameters=3, init=[0.1, 0.2]), ValueError, "init has 2 values"),
])
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        CollapsibleActivation(**kwargs)


def test_wrong_channel_count_is_explained():
    with pytest.raises(ValueError, match=r"last dim must be 6.*\(2, 5\)|\(2, 5\).*last dim must be 6"):
        CollapsibleActivation("relu", 6)(torch.randn(2, 5))
