"""``Y = sigma_alpha(X @ W1.T + b1) @ W2.T + b2`` with the hidden activation kept on chip.

Each program owns one ``(BLOCK_M, BLOCK_N)`` output tile and walks the hidden width in
``BLOCK_H`` chunks: it computes the chunk's activation from ``X`` and ``W1`` in registers and
immediately multiplies it into the output accumulator, so the ``(M, H)`` hidden tensor never
goes to memory. The price is recomputing the first product once per output column tile; the
dispatcher (``ops.dispatch.prefer_fused_mlp``) picks this kernel only where that is cheaper. With
``ACT="identity"`` and no alpha it is the factored low-rank pair ``(X @ A.T) @ B.T``.
"""
import triton
import triton.language as tl

from .fused_linear import collapsible_epilogue, dot_tile
from .tuning import grouped_tile


@triton.jit
def fused_mlp_kernel(
    x_ptr, w1_ptr, b1_ptr, alpha_ptr, w2_ptr, b2_ptr, y_ptr,
    M, N, K, H, M_BUCKET,
    stride_xm, stride_xk,
    stride_w1h, stride_w1k,
    stride_b1, stride_alpha,
    stride_w2n, stride_w2h,
    stride_b2,
    stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_ALPHA: tl.constexpr, HAS_B2: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``Y``; ``M_BUCKET`` only keys the autotuner.

    ``DOT_IN_FP32``: see ``fused_linear_kernel`` (interpreter bfloat16 workaround).
    """
    # Grouped order: neighbouring programs share W1/W2 panels through L2.
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        hid = dot_tile(tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), x_ptr, stride_xm, stride_xk,
                       w1_ptr, stride_w1k, stride_w1h, offs_m, offs_h, mask_m, mask_h, K,
                       INPUT_PRECISION, DOT_IN_FP32, BLOCK_K)
        if HAS_B1:
            hid += tl.load(b1_ptr + offs_h * stride_b1, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        hid = collapsible_epilogue(hid, alpha_ptr, stride_alpha, offs_h, mask_h, ACT, HAS_ALPHA)
        # Padded hidden columns meet zero-masked W2 rows, so they add nothing. Rounding the
        # hidden tile to the input dtype matches what two fused_linear calls store in between.
        w2 = tl.load(
            w2_ptr + offs_h[:, None] * stride_w2h + offs_n[None, :] * stride_w2n,
            mask=mask_h[:, None] & mask_n[None, :], other=0.0,
        )
        hid = hid.to(w2.dtype)
        if DOT_IN_FP32:
            hid = hid.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc = tl.dot(hid, w2, acc, input_precision=INPUT_PRECISION)

    if HAS_B2:
        acc += tl.load(b2_ptr + offs_n * stride_b2, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(block_m: int, block_n: int, block_h: int, block_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_K": block_k, "GROUP_M": 8},
        num_stages=stages, num_warps=warps,
    )


# Two accumulators live in registers ((BLOCK_M, BLOCK_N) output and (BLOCK_M, BLOCK_H) hidden):
# 128 x 128 + 128 x 64 fp32 is the most 8 warps hold without spilling. BLOCK_N up to 128 keeps
# narrow outputs (N <= 128) to a single column tile, i.e. no recomputation at all.
CONFIGS = [
    _config(128, 128, 64, 32, 3, 8),
    _config(64, 128, 64, 32, 3, 4),
    _config(128, 64, 64, 64, 3, 4),
    _config(64, 64, 64, 64, 4, 4),
    _config(64, 128, 32, 64, 3, 4),
    _config(32, 64, 32, 64, 4, 2),
    _config(16, 128, 64, 64, 3, 4),
]

MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)

INTERPRETER_CONFIGS = [_config(16, 16, 16, 16, 1, 1)]

# Shape and code-changing constexprs (see fused_linear); Triton appends each tensor's dtype itself.
AUTOTUNE_KEY = ["N", "K", "H", "M_BUCKET", "ACT", "HAS_B1", "HAS_ALPHA", "HAS_B2", "INPUT_PRECISION", "DOT_IN_FP32"]
