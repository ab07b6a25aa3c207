"""The collapsible activation ``sigma_alpha(x) = alpha * x + (1 - alpha) * base(x)``."""
from __future__ import annotations

import torch
from torch import nn

from ..ops import reference

# The activation table has one owner, the reference; the names users pass are its names.
BASES = reference.ACTIVATIONS


def check_base(base: object) -> str:
    """Return ``base`` if it names a supported activation, else raise a helpful error."""
    if not isinstance(base, str):
        raise TypeError(f"activation must be a name (str), got {type(base).__name__}; use one of {BASES}")
    if base not in BASES:
        raise ValueError(
            f"unknown activation {base!r}; expected one of {BASES} "
            "(for nn.GELU(approximate='tanh') use 'gelu_tanh')"
        )
    return base


class CollapsibleActivation(nn.Module):
    """``alpha * x + (1 - alpha) * base(x)``: ``base`` at alpha = 0, the identity at alpha = 1.

    ``alpha`` is the module's only parameter: one value (``num_parameters=1``) or one per
    channel of the LAST dimension (unlike ``nn.PReLU``, which uses dim 1). With
    ``base="relu"`` alpha is exactly PReLU's negative slope.
    """

    def __init__(self, base: str = "gelu", num_parameters: int = 1, init: float | torch.Tensor = 0.0):
        super().__init__()
        self.base = check_base(base)
        if not isinstance(num_parameters, int) or isinstance(num_parameters, bool) or num_parameters < 1:
            raise ValueError(f"num_parameters must be a positive int, got {num_parameters!r}")
        self.num_parameters = num_parameters
        try:
            # on the CPU whatever the default device: the finiteness check below reads values (meta has none)
            init_t = torch.as_tensor(init, dtype=torch.float32, device="cpu").detach().clone().reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"init must be a float or a tensor of floats, got {type(init).__name__} {init!r}: {e}") \
                from None
        if not torch.isfinite(init_t).all():
            raise ValueError(f"init must be finite (0 keeps the activation as is, 1 makes it the identity), "
                             f"got {init!r}")
        if init_t.numel() not in (1, num_parameters):
            raise ValueError(
                f"init has {init_t.numel()} values but num_parameters={num_parameters}; "
                "pass a scalar or one value per channel"
            )
        self.alpha = nn.Parameter(init_t.expand(num_parameters).clone().to(torch.empty(0).device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CollapsibleActivation expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            # The slope would be cast to the input dtype: alpha=0.5 on int64 input is 0, a plain ReLU.
            raise TypeError(f"CollapsibleActivation expects a floating-point input, got dtype {x.dtype}; "
                            "cast it first, e.g. x.float()")
        if self.num_parameters > 1 and (x.dim() == 0 or x.shape[-1] != self.num_parameters):
            raise ValueError(
                f"CollapsibleActivation has {self.num_parameters} per-channel slopes for the last "
                f"dimension, got input of shape {tuple(x.shape)}; the last dim must be {self.num_parameters}"
            )
        return reference.collapsible_activation(x, self.base, self.alpha)

    def extra_repr(self) -> str:
        if self.alpha.is_meta:  # a module built on the meta device holds no slope values to print
            return f"base={self.base!r}, num_parameters={self.num_parameters}, alpha on meta (no values)"
        if self.num_parameters == 1:
            return f"base={self.base!r}, alpha={self.alpha.item():.4f}"
        a = self.alpha.detach()
        return (
            f"base={self.base!r}, num_parameters={self.num_parameters}, "
            f"alpha in [{a.min().item():.4f}, {a.max().item():.4f}]"
        )
