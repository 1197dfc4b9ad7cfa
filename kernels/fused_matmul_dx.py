"""Fused dequantize-matmul for the backward pass: dx = dy @ W with W 4-bit, dequantized on chip.

Math: dx[m, k] = sum_n dy[m, n] * W[n, k], W[n, k] in float32 exactly as quant.dequantize, rounded
to dy's dtype, float32 accumulation, dx rounded to dy's dtype. So dx equals
dy @ quant.dequantize(w, dy.dtype) up to the order of the float32 accumulation.

The transposed access: here the reduction runs over N (the rows of W, out_features) and the output
columns are K (in_features). Each program owns a BLOCK_M x BLOCK_K tile of dx and walks N in steps
of BLOCK_N. Per step it loads a BLOCK_M x BLOCK_N tile of dy and a BLOCK_N x BLOCK_K tile of W,
which in the packed layout is still BLOCK_N rows of BLOCK_K/2 contiguous bytes, plus BLOCK_N x
BLOCK_K/B block scales (BLOCK_K/B runs of BLOCK_N contiguous numbers, thanks to the (KP/B, N)
scale layout). The dequantized tile (BLOCK_N, BLOCK_K) is already the (reduction, output) operand
of tl.dot: no transpose of W is ever materialized, in global memory or on chip. BLOCK_K spans
several quantization blocks, so the scales are applied per (row, block) with a reshape.

Memory layout: dy (M, N) any strides; packed uint8 (N, KP/2); scales (KP/B, N); dx (M, K)
contiguous. Columns K..KP (padding) are computed and not stored. EVEN_N (N % BLOCK_N == 0) and
EVEN_K (KP % BLOCK_K == 0) drop the masks on the reduction / byte axes.
"""

import torch
import triton
import triton.language as tl

from ._launch import autotune, check_activation, interpreting, launch, next_power_of_2, weight_args
from ._tile import dequantize_tile, load_block_scales


@triton.heuristics({
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    "EVEN_K": lambda a: a["KP"] % a["BLOCK_K"] == 0,
})
@triton.jit
def fused_matmul_dx_kernel(
    dy_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, dx_ptr,
    M, N, K, KP, stride_pn,
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    M_BUCKET,  # only an autotuning key: next power of two of M
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LOOKUP: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // QBLOCK if BLOCK_K > QBLOCK else 1
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_k = tl.cdiv(KP, BLOCK_K)
    num_pid_in_group = GROUP_M * num_pid_k
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_k = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    kblock = k0 // QBLOCK + tl.arange(0, GROUPS)
    if EVEN_K:
        b_ok = offs_b >= 0
        kb_ok = kblock >= 0
    else:
        b_ok = offs_b < KP // 2
        kb_ok = kblock < KP // QBLOCK
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    p_ptrs = packed_ptr + offs_n[:, None] * stride_pn + offs_b[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        if EVEN_N:
            dy = tl.load(dy_ptrs)
            n_ok = rows >= 0
        else:
            n_ok = rows < N
            dy = tl.load(dy_ptrs, mask=n_ok[None, :], other=0.0)
        if EVEN_N and EVEN_K:
            p = tl.load(p_ptrs)
        else:
            p = tl.load(p_ptrs, mask=n_ok[:, None] & b_ok[None, :], other=0)
        scale, zero_f = load_block_scales(
            scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
            kblock[None, :], rows[:, None], n_ok[:, None] & kb_ok[None, :], N, FORMAT, DQ_BLOCK)
        w = dequantize_tile(p, scale, zero_f, code_ptr, BLOCK_N, BLOCK_K // 2, GROUPS, FORMAT, LOOKUP,
                            dy.dtype)
        if IEEE:
            acc = tl.dot(dy, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(dy, w, acc)
        dy_ptrs += BLOCK_N * stride_dyn
        p_ptrs += BLOCK_N * stride_pn

    out_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    out_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(dx_ptr + out_m[:, None] * stride_dxm + out_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=(out_m < M)[:, None] & (out_k < K)[None, :])


def _cfg(bm, bk, bn, warps, stages, group_m=8, lookup=0):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": group_m,
                          "LOOKUP": lookup}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_K = output columns, BLOCK_N = reduction step); LOOKUP=2 (_tile.py) except one
# select-tree config. BLOCK_K = 64 is one NF4 block (one scale per row, no reshape); wider output
# tiles reuse each dy tile more but gather from a (rows, blocks, 16) table.
LARGE_M_CONFIGS = [
    _cfg(128, 128, 64, 8, 4, lookup=2),
    _cfg(128, 256, 64, 8, 3, lookup=2),
    _cfg(256, 64, 64, 8, 4, lookup=2),
    _cfg(128, 128, 64, 8, 4, lookup=1),
]
SMALL_M_CONFIGS = [
    _cfg(64, 128, 64, 4, 4, lookup=2),
    _cfg(32, 128, 64, 4, 4, lookup=2),
    _cfg(64, 128, 64, 4, 4, lookup=1),
]
_KEY = ["M_BUCKET", "N", "K", "FORMAT", "QBLOCK"]
_large_m_tuned = autotune(LARGE_M_CONFIGS, _KEY)(fused_matmul_dx_kernel)
_small_m_tuned = autotune(SMALL_M_CONFIGS, _KEY)(fused_matmul_dx_kernel)

INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_K": 128, "BLOCK_N": 32, "GROUP_M": 2, "LOOKUP": 2}


def fused_matmul_dx(dy: torch.Tensor, w, config: dict = None) -> torch.Tensor:
    """dx = dy @ W for a 2-D dy (M, out_features) and a quantized weight; dx (M, in_features).

    config: fixed meta-parameters (BLOCK_M, BLOCK_K, BLOCK_N, GROUP_M, LOOKUP, num_warps,
    num_stages) instead of autotuning; the CPU interpreter uses INTERPRETER_CONFIG by default.
    """
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    check_activation(dy, w.out_features, w.packed.device, "dy")
    m, n, k = dy.shape[0], w.out_features, w.in_features
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    args = (dy, *tensors, dx, m, n, k, kp, w.packed.stride(0), dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
            next_power_of_2(m))
    consts = dict(FORMAT=fmt, QBLOCK=qb, DQ_BLOCK=dq_block, IEEE=dy.dtype == torch.float32)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kp, meta["BLOCK_K"]),)  # noqa: E731
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    launch(fused_matmul_dx_kernel, _large_m_tuned if m > 128 else _small_m_tuned, grid, args, consts, config)
    return dx
