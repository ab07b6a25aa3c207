"""``Y = sigma_alpha(X @ W_g.T + b_g) * (X @ W_u.T + b_u)``: a gated FFN's first half in one kernel.

``W = cat([W_g, W_u])`` is ``(2H, K)``. Each program owns one ``(BLOCK_M, BLOCK_N)`` tile of
``Y`` (columns ``n`` of ``H``) and walks ``K`` once, multiplying each ``X`` tile into two fp32
accumulators: the gate (rows ``n`` of ``W``) and the up projection (rows ``H + n``). Bias,
activation (with alpha) and the product happen in the epilogue, so neither ``(M, H)`` half goes
to memory and ``X`` is read once for both.

Triton code and autotune configs only; shapes, strides and allocation live in
``lc_kernels/ops/fused_gated_linear_op.py``.
"""
import triton
import triton.language as tl

from .fused_linear import collapsible_epilogue
from .tuning import grouped_tile, shared_memory_rules, tile_config


@triton.jit
def fused_gated_linear_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, y_ptr,
    M, H, K, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b, stride_alpha,
    stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALPHA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``Y``; ``M_BUCKET`` only keys the autotuner.

    ``DOT_IN_FP32``: see ``fused_linear_kernel`` (interpreter bfloat16 workaround).
    """
    # Grouped order: GROUP_M row tiles share both W panels through L2.
    pid_m, pid_n = grouped_tile(M, H, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 offsets: rows * stride overflow int32 past 2**31 elements (and H + n rows of W too).
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_u = offs_n + H
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < H

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    wu_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_u[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        mask_k = offs_k < k_left
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_g = tl.dot(a, wg, acc_g, input_precision=INPUT_PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc_g += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + offs_u * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = collapsible_epilogue(acc_g, alpha_ptr, stride_alpha, offs_n, mask_n, ACT, HAS_ALPHA) * acc_u
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# fused_linear's tiles with the N side halved where it was widest: two (BLOCK_M, BLOCK_N) fp32
# accumulators live in registers. 2 x 128 x 64 takes 8 warps (with 4 it spilled 136 B/thread on
# sm_80 in the ahead-of-time compile, with 8 none); 2 x 128 x 128 over 8 warps spills 128-152 B
# on sm_80's mma.sync but none on sm_90's wgmma, so it stays for H100 and on A100 the autotuner's
# timing decides. Small-M tiles for decode-sized batches as in fused_linear.
CONFIGS = [
    tile_config(128, 128, 32, 3, 8),
    tile_config(128, 64, 64, 3, 8),
    tile_config(64, 128, 32, 4, 4),
    tile_config(128, 64, 32, 4, 8),
    tile_config(64, 64, 32, 4, 4),
    tile_config(64, 32, 32, 5, 2),
    tile_config(32, 64, 32, 5, 2),
    tile_config(16, 128, 64, 3, 4),
    tile_config(16, 64, 64, 4, 4),
]

# The interpreter runs each program in numpy: one small tile, no tuning (see fused_linear).
INTERPRETER_CONFIGS = [tile_config(16, 16, 16, 1, 1)]

# Shape and code-changing constexprs (see fused_linear); Triton appends each tensor's dtype itself.
AUTOTUNE_KEY = ["H", "K", "M_BUCKET", "ACT", "HAS_BIAS", "HAS_ALPHA", "INPUT_PRECISION", "DOT_IN_FP32"]


# Per stage one x tile and both W halves' tiles (2 x BLOCK_N x BLOCK_K) in shared memory; the
# limit is fused_linear's (sm_80's per-block maximum).
shared_bytes, fits, prune_configs = shared_memory_rules(weight_tiles=2)

PRUNE = {"early_config_prune": prune_configs}
