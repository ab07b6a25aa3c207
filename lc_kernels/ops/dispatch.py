"""Dispatch policy: which path an op takes (:func:`use_triton`), which plan a pair takes
(:func:`prefer_fused_mlp`, with its constants per device and dtype) and which form a PARTIAL
block runs (:func:`partial_form`); measured per-shape choices (``lc.warmup``, :mod:`.tables`)
decide first where they exist."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import _config
from . import tables


ATEN, TRITON, INTERPRET = "aten", "triton", "interpret"


def kernel_path(x: torch.Tensor) -> str:
    """Where ``x``'s op runs: ``"triton"`` (CUDA), ``"interpret"`` (CPU tensors forced through
    Triton's interpreter) or ``"aten"`` (the PyTorch reference's ops)."""
    flags = _config.flags()
    if flags.disable_triton:
        return ATEN
    if x.is_cuda:
        return TRITON
    if flags.force_triton and x.device.type == "cpu":
        if not flags.triton_interpret:
            raise RuntimeError(
                "LC_KERNELS_FORCE_TRITON=1 runs the Triton kernels on CPU tensors through Triton's "
                "interpreter, but TRITON_INTERPRET is not set; export TRITON_INTERPRET=1 before "
                "Python starts (Triton reads it once, at import)"
            )
        return INTERPRET
    return ATEN


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s op runs the Triton kernels (CUDA, or CPU forced through the interpreter)."""
    return kernel_path(x) != ATEN


def plain_gemm_to_aten(path: str) -> bool:
    """Whether a GEMM with nothing to fuse (identity activation, optional bias) calls ``F.linear``.

    On CUDA that is cuBLAS / cuBLASLt (what ``torch.compile``'s max-autotune usually keeps for a
    plain GEMM) rather than the Triton kernel and its fixed configs; only a CPU run forced through
    the interpreter keeps the kernel, so the kernel tests still exercise it.
    """
    return path != INTERPRET


# H100 SXM datasheet figures (dense bf16 989 TFLOP/s, HBM3 3.35 TB/s) and a typical eager launch
# cost: the documented default of the roofline rule for every device and dtype that has neither an
# entry in ROOFLINES nor a measurement (lc.warmup on CUDA, benchmarks/gpu_constants.py).
PEAK_FLOPS = 989e12
PEAK_BYTES = 3.35e12
LAUNCH_S = 3e-6
# GEMM output tile of fused_linear's large configs and fused_mlp's largest, for occupancy.
LINEAR_TILE = (128, 128)
MLP_TILE = (64, 128)


@dataclass(frozen=True)
class Roofline:
    """What :func:`prefer_fused_mlp`'s cost rule assumes about one device and dtype."""

    peak_flops: float  # dense matmul FLOP/s
    peak_bytes: float  # memory bandwidth, bytes/s
    launch_s: float  # one eager kernel launch, seconds


DEFAULT_ROOFLINE = Roofline(PEAK_FLOPS, PEAK_BYTES, LAUNCH_S)

# (compute capability, dtype) -> constants. Only datasheet figures for the device the rule was
# written for; anything else falls back to DEFAULT_ROOFLINE until measured, and a measurement
# (lc.warmup on CUDA stores one per capability and dtype) takes precedence over this table.
ROOFLINES: dict[tuple[tuple[int, int], torch.dtype], Roofline] = {
    ((9, 0), torch.bfloat16): DEFAULT_ROOFLINE,
    ((9, 0), torch.float16): DEFAULT_ROOFLINE,
}


def roofline(capability: tuple[int, int] | None, dtype: torch.dtype | None) -> Roofline:
    """The constants for a device of ``capability`` in ``dtype``: measured, else ``ROOFLINES``,
    else the H100-bf16 default."""
    measured = tables.rooflines.get((capability, dtype))
    if measured is not None:
        return Roofline(*measured)
    return ROOFLINES.get((capability, dtype), DEFAULT_ROOFLINE)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _capability(device: torch.device) -> tuple[int, int] | None:
    try:
        return torch.cuda.get_device_capability(device)
    except (RuntimeError, AssertionError):  # no driver: fake CUDA tensors (the dispatch tests)
        return None


def _kernel_seconds(flops: int, elems: int, tiles: int, sms: int, roof: Roofline, elem_bytes: int) -> float:
    """Roofline time of one kernel, slowed by the share of idle SMs."""
    return max(flops / roof.peak_flops, elem_bytes * elems / roof.peak_bytes) * max(1.0, sms / max(tiles, 1))


def as_device(device: object, who: str) -> torch.device:
    """``device`` as a ``torch.device``; a clear error for anything that is not one."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{who}: device must be a torch.device or a string such as 'cuda', 'cuda:0' or 'cpu', "
                        f"got {type(device).__name__} {device!r}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{who}: device {device!r} is not a device torch knows; expected a torch.device or a "
                         f"string such as 'cuda', 'cuda:0' or 'cpu' ({e})") from None


def prefer_fused_mlp(M: int, K: int, H: int, N: int, device: torch.device | str,
                     dtype: torch.dtype | None = None) -> bool:
    """Whether ``fused_mlp`` beats two ``fused_linear`` calls for ``(M, K) -> H -> N``.

    A choice measured for this shape (``lc.warmup`` on CUDA times both plans per site and token
    count, see :mod:`.tables`) decides first. Otherwise a roofline estimate of both plans, with
    the constants of :func:`roofline` for the device's capability and ``dtype`` (``None``: 2-byte
    elements and the bf16 constants):

    * two calls: ``2MKH`` FLOPs moving ``MK + HK + MH`` elements, then ``2MHN`` FLOPs moving
      ``MH + NH + MN``, plus one more launch;
    * fused: never writes or re-reads the ``(M, H)`` hidden tensor, but recomputes
      ``X @ W1.T`` for each of the ``ceil(N / 128)`` output column tiles:
      ``2MH(K * tiles + N)`` FLOPs moving ``MK + HK + NH + MN``;

    each slowed by ``SMs / tiles`` when its grid cannot fill the GPU (the fused grid has
    ``H / 128`` times fewer tiles). So the fused kernel wins where the hidden tensor's traffic
    and the extra launch outweigh recomputation: narrow hidden widths (a FACTOR pair whose
    rank-64 GEMM fills a fraction of the SMs) or narrow outputs; a wide 768 -> 3072 -> 768 KEEP
    MLP stays on two GEMMs.

    Off CUDA both plans run the same aten work (two GEMMs, in-place epilogue) and the fused op
    is one dispatch instead of two, so this returns True.

    Raises:
        ValueError: ``device`` is a string torch does not know (``"gpu"``).
        TypeError: ``device`` is neither a ``torch.device`` nor a string.
    """
    if not isinstance(device, torch.device):
        device = as_device(device, "prefer_fused_mlp")
    if device.type != "cuda":
        return True
    if device.index is None:
        device = tables.normalize(device)
    if dtype is not None and not torch.compiler.is_compiling():
        choice = tables.measured("fused_mlp", device, dtype, M, K, H, N)
        if choice is not None:
            return choice == FUSED
    return roofline_prefers_fused(M, K, H, N, device, dtype)


def roofline_prefers_fused(M: int, K: int, H: int, N: int, device: torch.device, dtype: torch.dtype | None) -> bool:
    """:func:`prefer_fused_mlp`'s cost rule alone (no measured choice) on a CUDA ``device``."""
    sms = _sm_count(device)
    roof = roofline(_capability(device), dtype)
    elem = 2 if dtype is None else dtype.itemsize
    lm, ln = LINEAR_TILE
    fm, fn = MLP_TILE
    n_tiles = -(-N // fn)
    two = (
        _kernel_seconds(2 * M * K * H, M * K + H * K + M * H, -(-M // lm) * -(-H // ln), sms, roof, elem)
        + _kernel_seconds(2 * M * H * N, M * H + N * H + M * N, -(-M // lm) * -(-N // ln), sms, roof, elem)
        + roof.launch_s
    )
    fused = _kernel_seconds(2 * M * H * (K * n_tiles + N), M * K + H * K + N * H + M * N,
                            -(-M // fm) * n_tiles, sms, roof, elem)
    return fused < two


# Measured choices (ops.tables kinds): a PARTIAL block's two forms, fused_mlp's two plans.
SEPARATE, SHARED = "separate", "shared"
FUSED, TWO = "fused", "two"


def partial_form(x: torch.Tensor, d_in: int, kept: int, d_out: int, act: str, gated: bool = False) -> str:
    """Which form a PARTIAL block runs for input ``x``: ``"separate"`` (the skip GEMM writes the
    output and ``fc2`` accumulates onto it; the default) or ``"shared"`` (one GEMM over
    ``[W1; S]`` gives the kept pre-activations and the skip's output at once), as ``lc.warmup``
    measured for this shape, device and dtype. Eager calls only: under ``torch.compile`` or export
    the default form runs.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return SEPARATE
    m = x.numel() // d_in if d_in else 0
    choice = tables.measured("gated_partial" if gated else "partial", x.device, x.dtype, m, d_in, kept, d_out, act)
    return SEPARATE if choice is None else choice
