"""``Y = sigma_alpha(X @ W.T + b)``: one GEMM with bias and activation in the epilogue.

Triton code and autotune configs only; shapes, strides and allocation live in
``lc_kernels/ops/fused_linear_op.py``.
"""
import triton
import triton.language as tl


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
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk the N tiles together, so a W column panel is
    # reused from L2 by GROUP_M programs instead of being re-read from HBM by each.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

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


def _config(block_m: int, block_n: int, block_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_stages=stages, num_warps=warps,
    )


# The shapes of Triton's matmul tutorial tuned for A100/H100 plus two small-M tiles for
# decode-sized batches (M <= 64), where a 128-row tile wastes most of its work.
CONFIGS = [
    _config(128, 256, 64, 3, 8),
    _config(64, 256, 32, 4, 4),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(128, 32, 32, 4, 4),
    _config(64, 32, 32, 5, 2),
    _config(32, 64, 32, 5, 2),
    _config(16, 128, 64, 4, 4),
    _config(16, 64, 128, 3, 4),
]

# The interpreter runs each program in numpy (seconds per launch at real sizes): one small
# tile, no tuning, and tails on every axis of the tiny test shapes.
INTERPRETER_CONFIGS = [_config(16, 16, 16, 1, 1)]

AUTOTUNE_KEY = ["N", "K", "M_BUCKET"]

# A config's software pipeline keeps num_stages tiles of x (BLOCK_M x BLOCK_K) and w
# (BLOCK_N x BLOCK_K) in shared memory. sm_80 allows 166,912 bytes per block (sm_90 232,448): a
# config over that for the element size at hand never launches (the ahead-of-time compile test
# found the 128x256x64 three-stage tile at 294,912 bytes in fp32), so the autotuner drops it.
MAX_SHARED_BYTES = 166_912


def shared_bytes(meta: dict, num_stages: int, elem_bytes: int) -> int:
    return num_stages * (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * elem_bytes


def fits(meta: dict, num_stages: int, elem_bytes: int) -> bool:
    return shared_bytes(meta, num_stages, elem_bytes) <= MAX_SHARED_BYTES


def prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """The configs whose pipeline fits in shared memory for the input's element size."""
    elem = named_args["x_ptr"].element_size()
    kept = [c for c in configs if fits(c.kwargs, c.num_stages, elem)]
    return kept or configs[-1:]


PRUNE = {"early_config_prune": prune_configs}
