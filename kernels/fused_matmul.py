"""Fused dequantize-matmul for training shapes: y = x @ W.T with W 4-bit, dequantized on chip.

Math: y[m, n] = sum_k x[m, k] * W[n, k], with W[n, k] = code[q] * absmax (NF4) or
(q - zero) * scale (INT4) computed in float32 and rounded to x's dtype (exactly the weight of
quant.dequantize), products accumulated in float32 by tl.dot, y rounded to x's dtype.
So y equals x @ quant.dequantize(w, x.dtype).T up to the order of the float32 accumulation
(LOOKUP=3, below, rounds W differently).

Memory layout: x (M, K) any strides; packed uint8 (N, KP/2) row-major, two codes per byte
(column 2j high nibble, 2j+1 low nibble); per-block scales (KP/B, N); y (M, N) contiguous.

Tiling (as the Triton matmul tutorial, with grouped program order for L2 reuse): each program
owns a BLOCK_M x BLOCK_N tile of y. Per K step it loads a BLOCK_M x BLOCK_K tile of x, a
BLOCK_N x BLOCK_K/2 tile of bytes (BLOCK_K/2 contiguous bytes per row) and the BLOCK_N x
BLOCK_K/B block scales (contiguous along N), unpacks the nibbles, looks up / shifts them to
float32, multiplies by the scales, rounds to x's dtype and feeds tl.dot. With LOOKUP=2 the last
three steps are one tl.gather from a per-row table of the 16 scaled values (kernels/_tile.py says
why the global-memory gather of LOOKUP=0 is slow here). NF4 weights with bf16 x use LOOKUP=3
first (byte-permute lookups, _tile.py): then W = bf16(bf16(code) * bf16(absmax)), which differs
from quant.dequantize's weight by at most about 3 bf16 roundings (tests bound it). The 16-bit weight only
ever exists in registers / shared memory: global memory traffic for W is 4.1-4.6 bits per weight
per pass over it.

SWAP = 1 computes the transposed tile, y.T = W_tile @ x_tile.T: on Hopper the tensor-core
instruction (wgmma) takes its A operand from registers but B from shared memory, so with the
dequantized W as A it goes straight from registers into the product, while x (B) is
software-pipelined into shared memory. With BLOCK_K = 128 this took the kernel from 2.7-3.0x to
1.6-1.7x of cuBLAS at M = 4096, and LOOKUP=3 to 1.4-1.5x (H100, BENCHMARKS.md).

K padding (quant.py pads K to a multiple of B with zero columns): x is read with k < K masks,
W up to KP; the padded weights multiply zeros. EVEN_K (K == KP, KP % BLOCK_K == 0) drops the
masks. Rows beyond M / N are clamped (modulo) for the loads and masked at the store.
"""

import torch
import triton
import triton.language as tl

from ._launch import (autotune, check_activation, check_lookup, interpreting, launch, next_power_of_2,
                      prmt_ok, weight_args)
from . import fused_matmul_sm90
from ._tile import dequantize_tile, dequantize_tile_prmt, load_block_scales


@triton.heuristics({"EVEN_K": lambda a: a["K"] == a["KP"] and a["KP"] % a["BLOCK_K"] == 0})
@triton.jit
def fused_matmul_kernel(
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, y_ptr,
    M, N, K, KP, stride_pn,
    stride_xm, stride_xk, stride_ym, stride_yn,
    M_BUCKET,  # only an autotuning key: next power of two of M
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    LOOKUP: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr = 0, ASM: tl.constexpr = 1,
):
    GROUPS: tl.constexpr = BLOCK_K // QBLOCK if BLOCK_K > QBLOCK else 1
    # grouped ordering: GROUP_M row-tiles share the same W column-tiles while they are in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    p_ptrs = packed_ptr + offs_n[:, None] * stride_pn + offs_b[None, :]

    if SWAP:  # y.T tile = W tile @ x tile.T: the dequantized W is the register operand A
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KP, BLOCK_K):
        kblock = k0 // QBLOCK + tl.arange(0, GROUPS)
        if EVEN_K:
            x = tl.load(x_ptrs)
            p = tl.load(p_ptrs)
            kb_ok = kblock >= 0
        else:
            x = tl.load(x_ptrs, mask=(k0 + offs_k < K)[None, :], other=0.0)
            p = tl.load(p_ptrs, mask=(k0 // 2 + offs_b < KP // 2)[None, :], other=0)
            kb_ok = kblock < KP // QBLOCK
        scale, zero_f = load_block_scales(
            scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
            kblock[None, :], offs_n[:, None], kb_ok[None, :], N, FORMAT, DQ_BLOCK)
        if LOOKUP == 3:
            w = dequantize_tile_prmt(p, scale, code_ptr, BLOCK_N, BLOCK_K // 2, GROUPS, ASM)
        else:
            w = dequantize_tile(p, scale, zero_f, code_ptr, BLOCK_N, BLOCK_K // 2, GROUPS, FORMAT, LOOKUP,
                                x.dtype)
        if SWAP:
            if IEEE:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        elif IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk
        p_ptrs += BLOCK_K // 2

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP:
        tl.store(y_ptr + rows[None, :] * stride_ym + cols[:, None] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[None, :] & (cols < N)[:, None])
    else:
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


def _cfg(bm, bn, bk, warps, stages, group_m=8, lookup=0, swap=0):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "LOOKUP": lookup, "SWAP": swap}, num_warps=warps, num_stages=stages)


# Hopper-oriented configs for M > 128 (training): big tiles so that each dequantized W tile is
# reused by many rows of x. First the swapped orientation with BLOCK_K = 128 (two NF4 blocks per
# step), the fastest on an H100 by far; then the earlier BLOCK_K = 64 tiles (one NF4 block per
# step). LOOKUP=2 (scaled table + tl.gather, see _tile.py): with Triton 3.6 on sm_90, LOOKUP 0 in
# the unswapped kernel fails to compile ("LLVM ERROR: Illegal shared layout" in
# TritonGPUOptimizeDotOperands); swapped, 0 and 1 compile but ran 5.5x and 1.8x slower (H100).
LARGE_M_CONFIGS = [
    _cfg(256, 128, 128, 8, 3, lookup=2, swap=1),
    _cfg(128, 256, 64, 8, 3, lookup=2),
    _cfg(128, 128, 64, 8, 4, lookup=2),
    _cfg(256, 128, 64, 8, 3, lookup=2),
]
# 16 < M <= 128: W traffic dominates; smaller M tiles, more programs along N.
SMALL_M_CONFIGS = [
    _cfg(64, 128, 64, 4, 4, lookup=2),
    _cfg(32, 128, 64, 4, 4, lookup=2),
]
# NF4 weights with bf16 x add LOOKUP=3, the byte-permute decoder of _tile.py (7.3 instead of
# 15.4 instructions per weight in this tile's loop; its weights are bf16(bf16(code) * bf16(absmax))): on an
# H100 the swapped 256 x 128 x 128 tile went from 1.63-1.80x to 1.39-1.56x of cuBLAS with it.
# That tile needs 184 KB of shared memory on sm_80 / sm_89: too much for an A100 (163 KB) or an
# RTX 30xx / 40xx (99 KB), which got only LOOKUP 2 tiles; the 256 x 128 x 64 one needs 92 KB and
# fits both (BENCHMARKS.md, twenty-fourth session: 1.8-2.0x of cuBLAS on an H100 at M = 4096,
# where LOOKUP 2's best 99 KB tile takes 2.7-2.9x; not measured on those GPUs). (quant.py sends
# M >= 64 to dequantize + cuBLAS unless DEQUANT_MATMUL_MIN_M is None; Hopper runs the Gluon kernel.)
PRMT_LARGE_M_CONFIGS = [_cfg(256, 128, 128, 8, 3, lookup=3, swap=1),
                        _cfg(256, 128, 64, 8, 3, lookup=3, swap=1)] + LARGE_M_CONFIGS
PRMT_SMALL_M_CONFIGS = [_cfg(64, 128, 128, 4, 3, lookup=3, swap=1)] + SMALL_M_CONFIGS
_KEY = ["M_BUCKET", "N", "K", "FORMAT", "QBLOCK"]
_large_m_tuned = autotune(LARGE_M_CONFIGS, _KEY)(fused_matmul_kernel)
_small_m_tuned = autotune(SMALL_M_CONFIGS, _KEY)(fused_matmul_kernel)
_prmt_large_m_tuned = autotune(PRMT_LARGE_M_CONFIGS, _KEY)(fused_matmul_kernel)
_prmt_small_m_tuned = autotune(PRMT_SMALL_M_CONFIGS, _KEY)(fused_matmul_kernel)

INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2, "LOOKUP": 2}


def fused_matmul(x: torch.Tensor, w, config: dict = None) -> torch.Tensor:
    """y = x @ W.T for a 2-D x (M, in_features) and a quantized weight; y (M, out_features).

    config: fixed meta-parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, LOOKUP, num_warps,
    num_stages) instead of autotuning; the CPU interpreter uses INTERPRETER_CONFIG by default.
    Without config, M > 128 rows, bf16 and an NF4 weight on an sm_90 GPU (H100) run
    kernels/fused_matmul_sm90.py instead (fused_matmul_sm90.sm90_ok says when).
    """
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    check_activation(x, w.in_features, w.packed.device, "x")
    m, n, k = x.shape[0], w.out_features, w.in_features
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args = (x, *tensors, y, m, n, k, kp, w.packed.stride(0), x.stride(0), x.stride(1), y.stride(0), y.stride(1),
            next_power_of_2(m))
    consts = dict(FORMAT=fmt, QBLOCK=qb, DQ_BLOCK=dq_block, IEEE=x.dtype == torch.float32,
                  ASM=int(not interpreting()))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is None and m > 128 and fused_matmul_sm90.sm90_ok(x, w):
        return fused_matmul_sm90.launch_into(y, x, tensors, kp, dq_block)  # Hopper: the Gluon kernel
    if config is not None:
        check_lookup(config.get("LOOKUP"), fmt, x.dtype)
    if prmt_ok(fmt, x.dtype):
        tuned = _prmt_large_m_tuned if m > 128 else _prmt_small_m_tuned
    else:
        tuned = _large_m_tuned if m > 128 else _small_m_tuned
    launch(fused_matmul_kernel, tuned, grid, args, consts, config)
    return y
