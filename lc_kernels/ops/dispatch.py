"""Dispatch policy: which path an op takes (:func:`use_triton`) and which plan a pair takes
(:func:`prefer_fused_mlp`)."""
from __future__ import annotations

import functools

import torch

from .. import _config


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
# cost: a roofline estimate until benchmarks/gpu_check.sh measures them on the device.
PEAK_FLOPS = 989e12
PEAK_BYTES = 3.35e12
LAUNCH_S = 3e-6
# GEMM output tile of fused_linear's large configs and fused_mlp's largest, for occupancy.
LINEAR_TILE = (128, 128)
MLP_TILE = (64, 128)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_seconds(flops: int, elems: int, tiles: int, sms: int) -> float:
    """Roofline time of one kernel (2-byte elements), slowed by the share of idle SMs."""
    return max(flops / PEAK_FLOPS, 2 * elems / PEAK_BYTES) * max(1.0, sms / max(tiles, 1))


def prefer_fused_mlp(M: int, K: int, H: int, N: int, device: torch.device | str) -> bool:
    """Whether ``fused_mlp`` beats two ``fused_linear`` calls for ``(M, K) -> H -> N``.

    Cost rule on CUDA, a roofline estimate of both plans (2-byte activations):

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
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return True
    sms = _sm_count(device)
    lm, ln = LINEAR_TILE
    fm, fn = MLP_TILE
    n_tiles = -(-N // fn)
    two = (
        _kernel_seconds(2 * M * K * H, M * K + H * K + M * H, -(-M // lm) * -(-H // ln), sms)
        + _kernel_seconds(2 * M * H * N, M * H + N * H + M * N, -(-M // lm) * -(-N // ln), sms)
        + LAUNCH_S
    )
    fused = _kernel_seconds(2 * M * H * (K * n_tiles + N), M * K + H * K + N * H + M * N, -(-M // fm) * n_tiles, sms)
    return fused < two
