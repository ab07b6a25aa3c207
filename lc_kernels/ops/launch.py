"""What both ops share: the op definition that keeps Triton out of ``import lc_kernels``, and the
Triton launch plumbing (autotuned kernels, grid, precision flags).

``torch.library.triton_op`` imports Triton and ``torch._inductor`` when an op is registered (it
scans the body for kernels), which a CPU-only user who never compiles would pay on every import.
:func:`define_op` builds the same thing from ``torch.library``'s parts: an op whose body is also
its fake kernel, decomposed under ``FunctionalTensorMode`` so ``torch.compile`` traces into the
body (the Triton kernels through ``wrap_triton`` on CUDA, plain aten ops elsewhere). Triton is
imported on the first kernel launch only.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .. import _config

try:  # present since torch 2.6; without it the backend body simply runs through wrap_triton
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # pragma: no cover
    def set_wrap_triton_enabled(enabled: bool):  # type: ignore[misc]
        return contextlib.nullcontext()

try:
    from torch._library import triton as _torch_triton_registry
except ImportError:  # pragma: no cover
    _torch_triton_registry = None


_LIBRARIES: dict[str, torch.library.Library] = {}


class DefinedOp:
    """An op defined with ``torch.library``'s low-level API; ``register_kernel`` and
    ``register_autograd`` mirror ``custom_op``'s, without its dynamo-disabling wrapper (whose
    first call imports ``torch._dynamo`` and with it Triton, on every eager CPU call path)."""

    def __init__(self, qualname: str, fn: Callable[..., torch.Tensor]):
        namespace, self.name = qualname.split("::")
        self.qualname = qualname
        if namespace not in _LIBRARIES:
            _LIBRARIES[namespace] = torch.library.Library(namespace, "DEF")
        self.lib = _LIBRARIES[namespace]
        self.lib.define(self.name + torch.library.infer_schema(fn, mutates_args=()))
        self.lib.impl(self.name, _backend(fn), "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, fn, lib=self.lib)
        torch.library.register_torch_dispatch(qualname, FunctionalTensorMode, _functional_decomp(fn), lib=self.lib)

    def register_kernel(self, device_type: str) -> Callable:
        def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            self.lib.impl(self.name, _backend(fn), torch._C._dispatch_key_for_device(device_type))
            return fn

        return register

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=self.lib)


def _backend(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def backend_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        # Real tensors reach the kernels directly, not through the wrap_triton higher-order op.
        with set_wrap_triton_enabled(False):
            return fn(*args, **kwargs)

    return backend_fn


def _functional_decomp(fn: Callable[..., torch.Tensor]) -> Callable:
    """Under FunctionalTensorMode (AOTAutograd, i.e. torch.compile) run the op's body, so the
    compiler sees its aten ops and wrapped Triton kernels rather than an opaque call."""

    def decomp(mode, func, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        if custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(func, types, args, kwargs)
        known = (torch.Tensor, torch._subclasses.functional_tensor.FunctionalTensor)
        if any(not issubclass(t, torch._subclasses.FakeTensor) and t not in known for t in types):
            return NotImplemented
        with mode:
            return fn(*args, **kwargs)

    return decomp


def define_op(qualname: str, fn: Callable[..., torch.Tensor]) -> DefinedOp:
    """``triton_op(qualname, mutates_args=())(fn)`` without importing Triton or Inductor."""
    return DefinedOp(qualname, fn)


@functools.cache
def tuned_kernels() -> tuple[Any, Any]:
    """The autotuned kernels, built on first use so Triton is imported only when a kernel runs."""
    import triton

    from ..kernels import fused_linear as fl
    from ..kernels import fused_mlp as fm

    interpret = _config.triton_interpret()
    linear = triton.autotune(
        configs=fl.INTERPRETER_CONFIGS if interpret else fl.CONFIGS, key=fl.AUTOTUNE_KEY,
        prune_configs_by=None if interpret else fl.PRUNE,
    )(fl.fused_linear_kernel)
    mlp = triton.autotune(
        configs=fm.INTERPRETER_CONFIGS if interpret else fm.CONFIGS, key=fm.AUTOTUNE_KEY
    )(fm.fused_mlp_kernel)
    if _torch_triton_registry is not None:
        # What triton_op records at registration: AOTAutograd's cache keys include kernel source.
        _torch_triton_registry.triton_ops_to_kernels["lc_kernels::fused_linear"] = [fl.fused_linear_kernel]
        _torch_triton_registry.triton_ops_to_kernels["lc_kernels::fused_mlp"] = [fm.fused_mlp_kernel]
    return linear, mlp


def m_bucket(m: int) -> int:
    """Autotune key for M: next power of two in [16, 4096], so a new batch size reuses a tuning.

    A comparison loop rather than bit tricks keeps it valid for symbolic sizes under compile.
    """
    bucket = 16
    while bucket < m and bucket < 4096:
        bucket *= 2
    return bucket


def input_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's own matmul setting: "highest" (the default) keeps IEEE fp32
    # products, anything else allows TF32 as F.linear would.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    # Triton's interpreter multiplies bfloat16 tiles as raw bits (see fused_linear_kernel).
    return dtype == torch.bfloat16 and _config.triton_interpret()


def grid(m: int, n: int) -> Callable[[dict], tuple[int]]:
    def grid_fn(meta: dict) -> tuple[int]:
        return ((m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"] * ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]),)

    return grid_fn
