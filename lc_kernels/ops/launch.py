"""What the ops share: the op definition that keeps Triton out of ``import lc_kernels``, the
kernels that check ``x`` and pick the Triton or aten path, the autograd plumbing of ops that
recompute ``x @ w.T + b`` backward, the leading-dims wrapper, and the Triton launch plumbing
(autotuned kernels, grid, precision flags, the single-GEMM launch).

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
import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import wrap_triton

from .. import _config
from . import dispatch, tables
from .validate import check_raw_input, rows

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
        self.params = tuple(inspect.signature(fn).parameters.values())
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
            self.lib.impl(self.name, _backend(_with_defaults(self.params, fn)),
                          torch._C._dispatch_key_for_device(device_type))
            return fn

        return register

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=self.lib)


def _with_defaults(params: tuple[inspect.Parameter, ...], fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` called with every argument of the schema, positionally: the dispatcher passes a
    kernel only the arguments the caller gave, so a kernel that is not the typed body (such as
    one built by :func:`op_kernel`) gets the schema's defaults filled in here."""

    def full_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        if len(args) < len(params) or kwargs:
            args = (*args, *(kwargs.pop(p.name) if p.name in kwargs else p.default for p in params[len(args):]))
        return fn(*args)

    return full_fn


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


def op_kernel(
    name: str,
    triton_fn: Callable[..., torch.Tensor],
    fallback: Callable[..., torch.Tensor],
    takes_triton: Callable[..., bool] | None = None,
) -> Callable[..., torch.Tensor]:
    """An op's body or device kernel ``(x, *operands)``: refuse an ``x`` that is not 2-D, then
    ``triton_fn`` where ``takes_triton(x, *operands)`` (default: :func:`~.dispatch.use_triton`)
    says so, else ``fallback``, both with the same arguments."""

    def kernel(x: torch.Tensor, *operands: Any) -> torch.Tensor:
        check_raw_input(name, x)
        if dispatch.use_triton(x) if takes_triton is None else takes_triton(x, *operands):
            return triton_fn(x, *operands)
        return fallback(x, *operands)

    return kernel


def on_rows(op: Callable[..., torch.Tensor], x: torch.Tensor, width: int, *operands: Any) -> torch.Tensor:
    """``op(x as (M, K), *operands)``, its ``(M, width)`` result given back ``x``'s leading dims."""
    return op(rows(x), *operands).reshape(*x.shape[:-1], width)


def save_linear_inputs(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                       alpha: torch.Tensor | None, act: str) -> None:
    """``setup_context`` of an op that recomputes ``x @ w.T + b`` backward (see
    :func:`recompute_linear`). Called only when an input requires grad (torch.library's autograd
    kernel skips it otherwise), so inference saves nothing."""
    ctx.save_for_backward(x, w, b, alpha)
    ctx.act = act


def recompute_linear(ctx: Any) -> tuple:
    """``(x, w, b, alpha, x @ w.T + b)`` from what :func:`save_linear_inputs` saved.

    Recomputing the pre-activation costs one GEMM in training but lets the forward overwrite it
    in place, so inference pays no extra buffer or pass for the ability to train.
    """
    x, w, b, alpha = ctx.saved_tensors
    return x, w, b, alpha, F.linear(x, w, b)


def autotuned(module: Any, kernel: Any, qualname: str) -> Any:
    """``kernel`` autotuned over its module's ``CONFIGS`` (one small ``INTERPRETER_CONFIGS`` tile
    under Triton's interpreter), pruned by the module's ``PRUNE`` where it has one, and seeded
    with the configs ``lc.warmup`` stored for this device (:func:`.tables.register_autotuner`), so
    a warmed-up shape launches without benchmarking in a new process.

    Triton's own ``autotune(cache_results=True)`` (Triton >= 3.4) also persists timings, but in
    Triton's cache directory, keyed without the device's name, and is off under the interpreter;
    the stored table lives in lc_kernels' cache directory beside the dispatcher's choices.
    """
    import triton

    interpret = _config.triton_interpret()
    tuned = triton.autotune(
        configs=module.INTERPRETER_CONFIGS if interpret else module.CONFIGS, key=module.AUTOTUNE_KEY,
        prune_configs_by=None if interpret else getattr(module, "PRUNE", None),
    )(kernel)
    if _torch_triton_registry is not None:
        # What triton_op records at registration: AOTAutograd's cache keys include kernel source.
        _torch_triton_registry.triton_ops_to_kernels[qualname] = [kernel]
    tables.register_autotuner(kernel.__name__, tuned)
    return tuned


def autotune_key(key_names: list[str], named_args: dict[str, Any]) -> tuple:
    """The key Triton's autotuner files a launch under (``Autotuner.run``, Triton 3.x): the
    values of ``key_names`` among the launch's arguments, then the dtype of every tensor
    argument in order. The kernels' ``AUTOTUNE_KEY`` lists name the constexpr flags too (``ACT``,
    bias and alpha presence, ``INPUT_PRECISION``): each compiles to different code, so one
    best config per shape would otherwise be shared by all of them."""
    key = [named_args[k] for k in key_names if k in named_args]
    key += [str(v.dtype) for v in named_args.values() if hasattr(v, "dtype")]
    return tuple(key)


@functools.cache
def tuned_kernels() -> tuple[Any, Any]:
    """The autotuned kernels, built on first use so Triton is imported only when a kernel runs."""
    from ..kernels import fused_linear as fl
    from ..kernels import fused_mlp as fm

    return (autotuned(fl, fl.fused_linear_kernel, "lc_kernels::fused_linear"),
            autotuned(fm, fm.fused_mlp_kernel, "lc_kernels::fused_mlp"))


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


def launch_gemm(
    tuned: Callable[[], Any], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, alpha: torch.Tensor | None,
    act: str, out: torch.Tensor, n: int,
) -> torch.Tensor:
    """Launch a single-GEMM kernel (``fused_linear_kernel``, ``fused_gated_linear_kernel``: the
    same arguments), the autotuned one ``tuned()`` builds, writing the ``(M, n)`` output ``out``;
    any strides, nothing copied. An empty output launches (and imports) nothing."""
    m, k = x.shape
    if m == 0 or n == 0:
        return out
    # Absent bias/alpha: any valid pointer; the constexpr flags compile its loads away.
    wrap_triton(tuned())[grid(m, n)](
        x, w, w if b is None else b, w if alpha is None else alpha, out,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1),
        w.stride(0), w.stride(1),
        0 if b is None else b.stride(0),
        0 if alpha is None or alpha.numel() == 1 else alpha.stride(0),
        out.stride(0), out.stride(1),
        ACT=act, HAS_BIAS=b is not None, HAS_ALPHA=alpha is not None and act != "identity",
        INPUT_PRECISION=input_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(x.dtype),
    )
    return out


def grid(m: int, n: int) -> Callable[[dict], tuple[int]]:
    def grid_fn(meta: dict) -> tuple[int]:
        return ((m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"] * ((n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]),)

    return grid_fn
