"""A PARTIAL block's shared-first-GEMM form: ``[W1; S] x`` in one GEMM gives the kept channels'
pre-activations and the skip's output at once, then ``fc2`` accumulates onto the skip's columns.

Against the separate form (skip GEMM, fc1 GEMM, fc2 accumulated onto the skip's output) it saves
one pass over ``x`` and one GEMM launch, at the price of a stacked copy of ``[W1; S]`` kept per
block. Which form wins depends on the widths, the token count and the machine
(``benchmarks/partial_shared_gemm.py`` compares them), so ``lc.warmup`` times both per shape and
:func:`~.dispatch.partial_form` returns what it measured. Inference only (nothing requires
grad): the stacked weight is a copy, so gradients would not reach the block's parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from .fused_linear_op import activate_

# first weight of a block -> (stamp of its parts, stacked weight, stacked bias).
_STACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(tensors: tuple[Optional[torch.Tensor], ...]) -> tuple | None:
    """Where each part lives and how often it was written (autograd's version counter: optimizer
    steps, ``load_state_dict``, in-place ops); ``None`` for inference tensors, which keep no
    counter, so their stack is rebuilt every call."""
    try:
        return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:
        return None


def stacked(weights: tuple[torch.Tensor, ...], biases: tuple[Optional[torch.Tensor], ...]
            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``cat(weights)`` and ``cat(biases)`` (zeros where a part has none; ``None`` if none has),
    built once and rebuilt when a part moves or is written through autograd's view of it.

    Writes through ``.data`` (which skip the version counter) are not seen: call
    :func:`forget` after such a write, or run ``lc.warmup`` again.
    """
    stamp = _stamp((*weights, *biases))
    entry = _STACKED.get(weights[0]) if stamp is not None else None
    if entry is not None and entry[0] == stamp:
        return entry[1], entry[2]
    w = torch.cat(weights)
    b = None
    if any(t is not None for t in biases):
        b = torch.cat([t if t is not None else torch.zeros(wt.shape[0], dtype=wt.dtype, device=wt.device)
                       for t, wt in zip(biases, weights)])
    if stamp is not None:
        _STACKED[weights[0]] = (stamp, w, b)
    return w, b


def forget() -> None:
    """Drop every stacked weight (they are rebuilt on the next shared-form call)."""
    _STACKED.clear()


def shared_mlp(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
               act: str, skip: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``skip @ x + fc2(sigma_alpha(fc1 x))`` of an LCFusedMLP / LCChain PARTIAL block, shared form.

    ``w1 (k, d)``, ``skip (n, d)``, ``w2 (n, k)``; ``b2`` (the block's bias) rides on the skip's
    rows of the stacked GEMM, so no pass adds it.
    """
    w, b = stacked((w1, skip), (b1, b2))
    k = w1.shape[0]
    z = F.linear(x, w, b)
    z2 = z.view(-1, z.shape[-1])
    hidden = activate_(z2[:, :k], alpha, act)
    # fc2 accumulates onto the skip's columns in place (BLAS beta = 1, ldc = k + n): no (M, n)
    # buffer and no copy of the skip's output into one; the result is a view of the GEMM's output.
    return z2[:, k:].addmm_(hidden, w2.t()).view(*x.shape[:-1], w2.shape[0])


def shared_gated(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], alpha: Optional[torch.Tensor],
                 act: str, skip: torch.Tensor, w2: torch.Tensor, b2: Optional[torch.Tensor]) -> torch.Tensor:
    """``skip @ x + down(sigma_alpha(gate x) * up x)`` of an LCGatedMLP PARTIAL block, shared form.

    ``w = [W_g; W_u] (2k, d)`` (the packed ``gate_up_proj``), ``skip (n, d)``, ``w2 (n, k)``.
    """
    ws, bs = stacked((w, skip), (b, b2))
    k2 = w.shape[0]
    z = F.linear(x, ws, bs)
    z2 = z.view(-1, z.shape[-1])
    gate, up = z2[:, : k2 // 2], z2[:, k2 // 2 : k2]
    hidden = activate_(gate, alpha, act).mul_(up)  # alpha = 0: silu_ and mul_, in place
    return z2[:, k2:].addmm_(hidden, w2.t()).view(*x.shape[:-1], w2.shape[0])
