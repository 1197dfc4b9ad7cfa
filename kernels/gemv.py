"""Decoding at M = 1 on CUDA cores: out[s, n] = sum over the K split s of W[n, k] * x[k], float32.

    y[n] = sum_b s[b, n] * sum_{k in block b} v(q[n, k]) * x[k]
where v(q) = code[q] (NF4) or q - zero (INT4) and s = absmax or scale: the block scale is applied
once per block sum instead of once per weight; the tile is 3-D (rows, blocks, bytes) so that the
block sums meet their scales without a reshape; x meets the high / low nibbles of each byte as
its even and odd columns (one 32-bit load per byte for contiguous bf16 x). The code lookup is
LOOKUP 0 (gather from the 64-byte table, in L1) or 1 (select tree); 2 means 0 here. Unlike the
other kernels, the weight is *not* rounded to x's dtype before multiplying (no tensor cores
here), so y differs from x @ quant.dequantize(w, x.dtype).T by that rounding (relative 2^-9 per
product in bf16, averaging out over K); the tests bound it.
What limits it (H100, BENCHMARKS.md): with LOOKUP 0, about 10 instructions per weight (byte
extraction, shift and mask, 64-bit table address, the lookup, the FMA) and the per-weight table
gathers through L1; all tile shapes tried land within 10% of each other at 25-28 us for
11008 x 4096, about 30% of HBM bandwidth. LOOKUP 3 (byte permutes, bf16 code values; NF4 with
bf16 x) issues about 6.6 per weight and runs in 18.9 us there, 37%. A variant that read W as
32-bit words with constant shifts issued fewer instructions (6 per weight in the sm_90
assembly) yet ran slower (33 us) and was dropped. skinny_mma and decode_sm90 (the tensor cores
do the products) are the faster candidates on Hopper; this kernel runs everywhere.

Launched by skinny_matmul.py (its tuner times this kernel's configs, CANDIDATES_M1 and
PRMT_CANDIDATES_M1, with the others), with the same split of K: program (i, s) takes rows
[i BLOCK_N, (i + 1) BLOCK_N) over the K range of split s, and reduce_partials.py adds the splits.

Memory layout: x (K,) any stride, or (XPAIR) int32 pairs of contiguous bf16; packed uint8
(N, KP/2), two codes per byte, column 2j high nibble; per-block scales (KP/B, N); out (SPLIT_K, N)
float32 partial sums, or y (1, N) itself when SPLIT_K = 1.
"""

import triton
import triton.language as tl

from ._launch import pdl_chain
from ._tile import code_values, load_block_scales, nf4_code_pairs


@triton.heuristics({"EVEN_K": lambda a: a["K"] == a["KP"] and a["KP"] % a["BLOCK_K"] == 0})
@triton.jit
def gemv_kernel(
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, out_ptr,
    N, K, KP, stride_pn, K_PER_SPLIT, stride_xk, stride_os, stride_on,
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LOOKUP: tl.constexpr, EVEN_K: tl.constexpr,
    XPAIR: tl.constexpr, ASM: tl.constexpr = 1, PDL: tl.constexpr = 0,
):
    """M = 1: out[s, n] = sum over split s of W[n, k] * x[k], float32 on CUDA cores.

    3-D tile (BLOCK_N rows, G quantization blocks, QBLOCK/2 bytes per block): the block sums meet
    their scales without any reshape (a reshape can cost a shared-memory round trip). The high
    nibble of byte j meets x[2j], the low one x[2j+1]; with XPAIR (contiguous bf16 x) the pair
    (x[2j], x[2j+1]) is one 32-bit load, split into two float32 by bit operations (a bf16 is
    the top half of the float32 with the same value).
    """
    G: tl.constexpr = BLOCK_K // QBLOCK
    HQ: tl.constexpr = QBLOCK // 2
    LK: tl.constexpr = 0 if LOOKUP == 2 else LOOKUP
    pid_n = tl.program_id(0)
    pdl_chain(PDL)
    pid_s = tl.program_id(1)
    k_begin = pid_s * K_PER_SPLIT
    k_end = min(k_begin + K_PER_SPLIT, KP)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_g = tl.arange(0, G)
    col_b = offs_g[:, None] * HQ + tl.arange(0, HQ)[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kblock = k0 // QBLOCK + offs_g
        byte0 = tl.multiple_of(k0 // 2, 32)  # stated so that Triton proves 16-byte W loads
        if XPAIR:
            xw = tl.load(x_ptr + byte0 + col_b, mask=byte0 + col_b < K // 2, other=0)
            x_even = (xw << 16).to(tl.float32, bitcast=True)
            x_odd = (xw & -65536).to(tl.float32, bitcast=True)
        else:
            k_even = k0 + 2 * col_b
            x_even = tl.load(x_ptr + k_even * stride_xk, mask=k_even < K, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + (k_even + 1) * stride_xk, mask=k_even + 1 < K, other=0.0).to(tl.float32)
        p3_ptrs = packed_ptr + offs_n[:, None, None] * stride_pn + (byte0 + col_b)[None, :, :]
        if EVEN_K:
            p = tl.load(p3_ptrs)
            kb_ok = kblock >= 0
        else:
            p = tl.load(p3_ptrs, mask=(byte0 + col_b < KP // 2)[None, :, :], other=0)
            kb_ok = kblock < KP // QBLOCK
        scale, zero_f = load_block_scales(
            scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
            kblock[None, :], offs_n[:, None], kb_ok[None, :], N, FORMAT, DQ_BLOCK)
        if LOOKUP == 3:  # byte permutes (_tile.py): bf16 code values, float32 products
            pairs = nf4_code_pairs(p, code_ptr, ASM)
            t = ((pairs << 16).to(tl.float32, bitcast=True) * x_even[None, :, :]
                 + (pairs & -65536).to(tl.float32, bitcast=True) * x_odd[None, :, :])
        else:
            z3 = zero_f[:, :, None]
            t = (code_values((p >> 4).to(tl.int32), z3, code_ptr, FORMAT, LK) * x_even[None, :, :]
                 + code_values((p & 0xF).to(tl.int32), z3, code_ptr, FORMAT, LK) * x_odd[None, :, :])
        acc += tl.sum(tl.sum(t, axis=2) * scale, axis=1)
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + pid_s * stride_os + out_n * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=out_n < N)
