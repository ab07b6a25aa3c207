"""``Y = sigma_alpha(X @ W.T + b)``: one GEMM with bias and activation in the epilogue.

Triton code and autotune configs only; shapes, strides and allocation live in
``lc_kernels/ops/fused_linear_op.py``.
"""
import triton
import triton.language as tl

from .tuning import MAX_SHARED_BYTES, grouped_tile, shared_memory_rules, tile_config  # noqa: F401


@triton.jit
def apply_activation(z, ACT: tl.constexpr):
    """``base(z)`` on an fp32 tile; ``ACT`` is one of ``reference.ACTIVATIONS``."""
    if ACT == "relu":
        return tl.maximum(z, 0.0)
    elif ACT == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # tanh(u) = 2*sigmoid(2u) - 1: tl has no portable tanh across Triton 3.6-3.9 and the
        # interpreter; the rewrite's error is absolute (<1e-7 in fp32), harmless after z * (...).
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    elif ACT == "silu":
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def collapsible_epilogue(z, alpha_ptr, stride_alpha, offs_n, mask_n, ACT: tl.constexpr, HAS_ALPHA: tl.constexpr):
    """``alpha * z + (1 - alpha) * base(z)`` on an fp32 ``(BLOCK_M, BLOCK_N)`` tile.

    ``stride_alpha`` is 0 for one shared alpha and the element stride for per-channel alpha, so
    both forms are one load.
    """
    base = apply_activation(z, ACT)
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + offs_n * stride_alpha, mask=mask_n, other=0.0).to(tl.float32)
        return base + alpha[None, :] * (z - base)
    return base


@triton.jit
def dot_tile(
    acc, a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, offs_m, offs_n, mask_m, mask_n, K,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``acc + A[offs_m, :K] @ B[:K, offs_n]`` in fp32, with the K tail masked."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def fused_linear_kernel(
    x_ptr, w_ptr, b_ptr, alpha_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b, stride_alpha,
    stride_ym, stride_yn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALPHA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``(BLOCK_M, BLOCK_N)`` tile of ``Y``; ``M_BUCKET`` only keys the autotuner.

    ``DOT_IN_FP32`` upcasts the operands of ``tl.dot`` (exact for 16-bit floats); the launcher
    sets it only for bfloat16 under Triton's interpreter, whose ``tl.dot`` multiplies bfloat16
    tiles as their raw uint16 bits (triton-lang/triton#11584, unsupported upstream).
    """
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # int64 offsets: rows * stride overflow int32 past 2**31 elements.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = dot_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, stride_xm, stride_xk,
                   w_ptr, stride_wk, stride_wn, offs_m, offs_n, mask_m, mask_n, K,
                   INPUT_PRECISION, DOT_IN_FP32, BLOCK_K)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = collapsible_epilogue(acc, alpha_ptr, stride_alpha, offs_n, mask_n, ACT, HAS_ALPHA)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# The shapes of Triton's matmul tutorial tuned for A100/H100 plus two small-M tiles for
# decode-sized batches (M <= 64), where a 128-row tile wastes most of its work.
CONFIGS = [
    tile_config(128, 256, 64, 3, 8),
    tile_config(64, 256, 32, 4, 4),
    tile_config(128, 128, 32, 4, 4),
    tile_config(128, 64, 32, 4, 4),
    tile_config(64, 128, 32, 4, 4),
    tile_config(128, 32, 32, 4, 4),
    tile_config(64, 32, 32, 5, 2),
    tile_config(32, 64, 32, 5, 2),
    tile_config(16, 128, 64, 4, 4),
    tile_config(16, 64, 128, 3, 4),
]

# The interpreter runs each program in numpy (seconds per launch at real sizes): one small
# tile, no tuning, and tails on every axis of the tiny test shapes.
INTERPRETER_CONFIGS = [tile_config(16, 16, 16, 1, 1)]

# Everything that changes the best config: the shape, and the constexprs that compile to different
# code (activation, bias and alpha loads, dot precision); Triton appends each tensor's dtype itself.
AUTOTUNE_KEY = ["N", "K", "M_BUCKET", "ACT", "HAS_BIAS", "HAS_ALPHA", "INPUT_PRECISION", "DOT_IN_FP32"]

# Per stage one x tile and one W tile in shared memory; configs over sm_80's limit are pruned
# (see tuning).
shared_bytes, fits, prune_configs = shared_memory_rules(weight_tiles=1)

PRUNE = {"early_config_prune": prune_configs}
