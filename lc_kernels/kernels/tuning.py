"""Autotune plumbing the kernels share: tile configs and the shared-memory prune.

A GEMM-style kernel's software pipeline keeps ``num_stages`` tiles of x (BLOCK_M x BLOCK_K) and
of each weight operand it streams (BLOCK_N x BLOCK_K each) in shared memory. sm_80 allows
166,912 bytes per block (sm_90 232,448): a config over that for the element size at hand never
launches (the ahead-of-time compile test found fused_linear's 128x256x64 three-stage tile at
294,912 bytes in fp32), so the autotuner drops it.
"""
from typing import Callable

import triton
import triton.language as tl

MAX_SHARED_BYTES = 166_912


def tile_config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    """One ``(BLOCK_M, BLOCK_N)`` output tile walking K in ``BLOCK_K`` steps, grouped by 8 rows."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_stages=stages, num_warps=warps,
    )


def shared_memory_rules(weight_tiles: int) -> tuple[Callable, Callable, Callable]:
    """``(shared_bytes, fits, prune_configs)`` for a kernel streaming ``weight_tiles`` W tiles per
    x tile (1 for fused_linear, 2 for fused_gated_linear's gate and up halves).

    ``shared_bytes(meta, num_stages, elem_bytes)``: the pipeline's buffers; ``fits(...)``: whether
    they stay within :data:`MAX_SHARED_BYTES`; ``prune_configs``: the autotuner's
    ``early_config_prune``, keeping the configs that fit for the input's element size.
    """

    def shared_bytes(meta: dict, num_stages: int, elem_bytes: int) -> int:
        return num_stages * (meta["BLOCK_M"] + weight_tiles * meta["BLOCK_N"]) * meta["BLOCK_K"] * elem_bytes

    def fits(meta: dict, num_stages: int, elem_bytes: int) -> bool:
        return shared_bytes(meta, num_stages, elem_bytes) <= MAX_SHARED_BYTES

    def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
        """The configs whose pipeline fits in shared memory for the input's element size."""
        elem = named_args["x_ptr"].element_size()
        kept = [c for c in configs if fits(c.kwargs, c.num_stages, elem)]
        return kept or configs[-1:]

    return shared_bytes, fits, prune_configs


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of this program's output tile in grouped order: GROUP_M row tiles walk
    the N tiles together, so a W column panel is reused from L2 by GROUP_M programs instead of
    being re-read from HBM by each."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
