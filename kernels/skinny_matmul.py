"""Skinny dequantize-matmul for decoding: y = x @ W.T with M = 1..16 rows of x and W 4-bit.

At M <= 16 the matmul is bound by reading W (N*K/2 bytes), so each program owns BLOCK_N rows of W
(all of K) and reads every packed byte exactly once, with wide loads of BLOCK_K/2 contiguous bytes
per row per step; x (a few KB) stays in cache. One program per BLOCK_N rows: no split-K, no
atomics, no second reduction pass.

M == 1 (BLOCK_M = 1), on CUDA cores, float32 throughout:
    y[n] = sum_b s[b, n] * sum_{k in block b} v(q[n, k]) * x[k]
where v(q) = code[q] (NF4) or q - zero (INT4) and s = absmax or scale: the block scale is applied
once per block sum instead of once per weight, and x is split into even / odd columns to meet the
high / low nibbles of each byte without interleaving W. Unlike the other kernels, the weight is
*not* rounded to x's dtype before multiplying (no tensor cores here), so y differs from
x @ quant.dequantize(w, x.dtype).T by that rounding (relative 2^-9 per product in bf16,
averaging out over K); the tests bound it.
1 < M <= 16 (BLOCK_M = 16): the dequantized tile (rounded to x's dtype) goes through tl.dot with
x padded to 16 rows, float32 accumulation; equal to the reference up to accumulation order.

Memory layout: x (M, K) any strides; packed uint8 (N, KP/2), two codes per byte, column 2j high
nibble; per-block scales (KP/B, N); y (M, N) contiguous.
"""

import torch
import triton
import triton.language as tl

from ._launch import check_activation, interpreting, split_config, weight_args
from ._tile import code_values, dequantize_tile, load_block_scales


@triton.heuristics({"EVEN_K": lambda a: a["K"] == a["KP"] and a["KP"] % a["BLOCK_K"] == 0})
@triton.jit
def skinny_matmul_kernel(
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, y_ptr,
    M, N, K, KP, stride_pn,
    stride_xm, stride_xk, stride_ym, stride_yn,
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOKUP: tl.constexpr, EVEN_K: tl.constexpr,
):
    GROUPS: tl.constexpr = BLOCK_K // QBLOCK if BLOCK_K > QBLOCK else 1
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # clamped rows: loads stay in bounds
    offs_b = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    p_ptrs = packed_ptr + offs_n[:, None] * stride_pn + offs_b[None, :]
    out_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)

    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            kblock = k0 // QBLOCK + tl.arange(0, GROUPS)
            if EVEN_K:
                p = tl.load(p_ptrs)
                x = tl.load(x_ptr + (k0 + offs_k) * stride_xk).to(tl.float32)
                kb_ok = kblock >= 0
            else:
                p = tl.load(p_ptrs, mask=(k0 // 2 + offs_b < KP // 2)[None, :], other=0)
                x = tl.load(x_ptr + (k0 + offs_k) * stride_xk, mask=k0 + offs_k < K,
                            other=0.0).to(tl.float32)
                kb_ok = kblock < KP // QBLOCK
            x_even, x_odd = tl.split(tl.reshape(x, (HALF, 2)))
            scale, zero_f = load_block_scales(
                scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                kblock[None, :], offs_n[:, None], kb_ok[None, :], N, FORMAT, DQ_BLOCK)
            hi = (p >> 4).to(tl.int32)
            lo = (p & 0xF).to(tl.int32)
            if GROUPS == 1:
                t = (code_values(hi, zero_f, code_ptr, FORMAT, LOOKUP) * x_even[None, :]
                     + code_values(lo, zero_f, code_ptr, FORMAT, LOOKUP) * x_odd[None, :])
                acc += tl.sum(t, axis=1) * tl.sum(scale, axis=1)  # scale is (BLOCK_N, 1)
            else:
                PER: tl.constexpr = HALF // GROUPS
                z3 = zero_f[:, :, None]
                t = (code_values(tl.reshape(hi, (BLOCK_N, GROUPS, PER)), z3, code_ptr, FORMAT, LOOKUP)
                     * tl.reshape(x_even, (1, GROUPS, PER))
                     + code_values(tl.reshape(lo, (BLOCK_N, GROUPS, PER)), z3, code_ptr, FORMAT, LOOKUP)
                     * tl.reshape(x_odd, (1, GROUPS, PER)))
                acc += tl.sum(tl.sum(t, axis=2) * scale, axis=1)
            p_ptrs += HALF
        tl.store(y_ptr + out_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=out_n < N)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            kblock = k0 // QBLOCK + tl.arange(0, GROUPS)
            if EVEN_K:
                p = tl.load(p_ptrs)
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                kb_ok = kblock >= 0
            else:
                p = tl.load(p_ptrs, mask=(k0 // 2 + offs_b < KP // 2)[None, :], other=0)
                x = tl.load(x_ptrs, mask=m_ok[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
                kb_ok = kblock < KP // QBLOCK
            scale, zero_f = load_block_scales(
                scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                kblock[None, :], offs_n[:, None], kb_ok[None, :], N, FORMAT, DQ_BLOCK)
            w = dequantize_tile(p, scale, zero_f, code_ptr, BLOCK_N, HALF, GROUPS, FORMAT, LOOKUP)
            w = w.to(x.dtype)
            if IEEE:
                acc2 = tl.dot(x, tl.trans(w), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(x, tl.trans(w), acc2)
            p_ptrs += HALF
            x_ptrs += BLOCK_K * stride_xk
        tl.store(y_ptr + offs_m[:, None] * stride_ym + out_n[None, :] * stride_yn,
                 acc2.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (out_n < N)[None, :])


def _cfg(bn, bk, warps, stages, lookup=0):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "LOOKUP": lookup},
                         num_warps=warps, num_stages=stages)


M1_CONFIGS = [
    _cfg(64, 64, 4, 4),
    _cfg(8, 256, 2, 3),
    _cfg(16, 256, 4, 3),
    _cfg(16, 512, 4, 2),
    _cfg(32, 128, 4, 4),
    _cfg(32, 256, 4, 3),
    _cfg(64, 128, 4, 3),
    _cfg(16, 256, 4, 3, lookup=1),
    _cfg(32, 256, 8, 3, lookup=1),
]
M16_CONFIGS = [
    _cfg(16, 256, 4, 3),
    _cfg(32, 128, 4, 4),
    _cfg(32, 256, 4, 3),
    _cfg(64, 128, 4, 3),
    _cfg(64, 64, 4, 4),
    _cfg(32, 256, 4, 3, lookup=1),
]
_KEY = ["N", "K", "FORMAT", "QBLOCK"]
_m1_tuned = triton.autotune(configs=M1_CONFIGS, key=_KEY)(skinny_matmul_kernel)
_m16_tuned = triton.autotune(configs=M16_CONFIGS, key=_KEY)(skinny_matmul_kernel)

INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 128, "LOOKUP": 0}
MAX_M = 16


def skinny_matmul(x: torch.Tensor, w, config: dict = None) -> torch.Tensor:
    """y = x @ W.T for a 2-D x with 1 <= M <= 16 rows; y (M, out_features) in x's dtype.

    config: fixed meta-parameters (BLOCK_N, BLOCK_K, LOOKUP, num_warps, num_stages) instead of
    autotuning; the CPU interpreter uses INTERPRETER_CONFIG by default.
    """
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    check_activation(x, w.in_features, w.packed.device, "x")
    m, n, k = x.shape[0], w.out_features, w.in_features
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_matmul takes 1 to {MAX_M} rows, got {m}; use fused_matmul")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 1 if m == 1 else 16
    args = (x, *tensors, y, m, n, k, kp, w.packed.stride(0), x.stride(0), x.stride(1), y.stride(0), y.stride(1))
    consts = dict(FORMAT=fmt, QBLOCK=qb, DQ_BLOCK=dq_block, IEEE=x.dtype == torch.float32,
                  BLOCK_M=block_m)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is None:
        tuned = _m1_tuned if m == 1 else _m16_tuned
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
        tuned[grid](*args, **consts)
    else:
        meta, opts = split_config(config)
        grid = (triton.cdiv(n, meta["BLOCK_N"]),)
        skinny_matmul_kernel[grid](*args, **consts, **meta, **opts)
    return y
