"""Skinny dequantize-matmul for decoding: y = x @ W.T with M = 1..16 rows of x and W 4-bit.

At M <= 16 the matmul is bound by reading W (N*K/2 bytes), so the kernel must keep enough loads in
flight to saturate HBM. One program per BLOCK_N rows walking all of K (16-43 dependent steps, each
one global load whose latency nothing hides: Triton does not software-pipeline loads that do not
feed tl.dot) reaches 10-20% of the bandwidth. So the work is split along K as well (split-K):

    grid (cdiv(N, BLOCK_N), SPLIT_K); program (i, s) reads rows [i*BLOCK_N, (i+1)*BLOCK_N) of W
    over the K range [s*K_PER_SPLIT, (s+1)*K_PER_SPLIT) (K_PER_SPLIT a multiple of BLOCK_K, so of
    the quantization block: every step sees whole blocks), 1-4 steps of BLOCK_K/2 contiguous
    bytes per row (16-byte loads), and writes a float32 partial sum to partials[s, m, n].

SPLIT_K is chosen so that there are about PROGRAMS_PER_SM programs per SM: thousands of
independent programs, each with a few wide loads in flight; "about" is at least as many, or
with FIT = 1 at most as many. FIT matters where all programs are resident at once (the
skinny_mma configs): 32 row tiles x 9 splits = 288 programs on 132 SMs put 3 on some SMs and 2
on others, and the SMs with 3 set the time; 8 or 12 splits (256 or 384) do not (4096x11008 at
M = 16 on an H100, from HBM: 32.3 -> 21.4 us, BENCHMARKS.md). A second tiny kernel
(reduce_partials.py) then adds the SPLIT_K partials in a fixed order (deterministic, no atomics)
and rounds to x's dtype; with SPLIT_K = 1 the first kernel writes y directly. Both are plain
launches with fixed arguments once the config is chosen, so the pair can be captured in a CUDA
graph (the partial buffer comes from the caching allocator, which graph capture supports). On
Hopper both are launched with programmatic dependent launch (pdl_ok, _launch.pdl_chain): each
starts while the kernel before it still runs and waits for it (griddepcontrol) before it reads
anything that kernel may write, which hides the launches (the reduction's: 0.4-0.5 us per call;
the main kernel's behind the reduction of the call before: 0.2-0.6 us more), and skinny_mma
fills its decoder table before that wait (0.5-0.8 us more; BENCHMARKS.md).

M == 1 (kernels/gemv.py): on CUDA cores, float32 throughout, the block scale applied once per
block sum; the products are not rounded to x's dtype (its docstring says what limits it).
1 < M <= 16 (skinny_matmul_kernel): the dequantized tile (rounded to x's dtype) goes through tl.dot
with x padded to 16 rows, float32 accumulation; equal to the reference up to accumulation order.
For NF4 with bf16 x the candidates also include LOOKUP=3 (the byte-permute decoder of _tile.py,
W = bf16(bf16(code) * bf16(absmax))) with SWAP=1 (acc = W_tile @ x.T, the decoded W as the
register operand of the tensor cores), and, for NF4 with block 64, skinny_mma.py (mma.sync on
decoded bytes, 1 <= M <= 16, launched from here: same split-K and reduction): the tuner times
them all in a graph. At M = 1 on Hopper (NF4 with double quantization) kernels/decode_sm90.py
is one more candidate, twice: one or two persistent programs per SM, no reduction kernel
(DECODE_SM90 = programs per SM).

Config choice: a small list of candidates (CANDIDATES_M1, CANDIDATES_M16) timed once per
(shape, format, dtype, device) in a CUDA graph (so that the ~20 us of Python launch overhead does
not drown a ~5 us kernel), on copies of the weight read from HBM in turn (_stream_copies: as in
decoding, not from L2), and cached, in memory and on disk in Triton's cache (_disk_choice: a new
process takes it from there, as the autotuners of _launch.autotune do: 2.3 -> 1.0 s for the
first calls on the three 7B shapes on an H100; a stored choice that fails to launch is tuned
again, with a warning); during graph capture, or in the interpreter, no timing happens (the first
candidate / INTERPRETER_CONFIG is used).

Memory layout: x (M, K) any strides; packed uint8 (N, KP/2), two codes per byte, column 2j high
nibble; per-block scales (KP/B, N); y (M, N) contiguous.
"""

import functools
import hashlib
import json
import os
import time
import warnings

import torch
import triton
import triton.testing
import triton.language as tl

from ._launch import (FP_FUSION, pdl_chain, check_activation, check_lookup, interpreting, pdl_ok,
                      prmt_ok, sm_count, split_config, weight_args)
from . import decode_sm90, skinny_mma
from ._tile import dequantize_tile, dequantize_tile_prmt, load_block_scales
from .gemv import gemv_kernel
from .reduce_partials import reduce_partials_kernel


@triton.heuristics({"EVEN_K": lambda a: a["K"] == a["KP"] and a["KP"] % a["BLOCK_K"] == 0})
@triton.jit
def skinny_matmul_kernel(
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, out_ptr,
    M, N, K, KP, stride_pn, K_PER_SPLIT,
    stride_xm, stride_xk, stride_os, stride_om, stride_on,
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOKUP: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr = 0, ASM: tl.constexpr = 1,
    PDL: tl.constexpr = 0,
):
    """1 < M <= 16: out[s, m, n] = partial sum over split s (out is y itself when SPLIT_K == 1).

    x is padded to 16 rows (masked loads) for tl.dot; the dequantized tile is rounded to x's dtype.
    """
    BLOCK_M: tl.constexpr = 16
    GROUPS: tl.constexpr = BLOCK_K // QBLOCK if BLOCK_K > QBLOCK else 1
    HALF: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pdl_chain(PDL)
    pid_s = tl.program_id(1)
    k_begin = pid_s * K_PER_SPLIT
    k_end = min(k_begin + K_PER_SPLIT, KP)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # clamped rows: loads stay in bounds
    offs_b = tl.arange(0, HALF)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # pointers from k0 with its alignment stated (k0 is a multiple of BLOCK_K >= 16): Triton
        # then proves 16-byte alignment and loads W 16 bytes at a time
        byte0 = tl.multiple_of(k0 // 2, 8)
        p_ptrs = packed_ptr + offs_n[:, None] * stride_pn + (byte0 + offs_b)[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
        kblock = k0 // QBLOCK + tl.arange(0, GROUPS)
        if EVEN_K:
            p = tl.load(p_ptrs)
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            kb_ok = kblock >= 0
        else:
            p = tl.load(p_ptrs, mask=(byte0 + offs_b < KP // 2)[None, :], other=0)
            x = tl.load(x_ptrs, mask=m_ok[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
            kb_ok = kblock < KP // QBLOCK
        scale, zero_f = load_block_scales(
            scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
            kblock[None, :], offs_n[:, None], kb_ok[None, :], N, FORMAT, DQ_BLOCK)
        if LOOKUP == 3:
            w = dequantize_tile_prmt(p, scale, code_ptr, BLOCK_N, HALF, GROUPS, ASM)
        else:
            w = dequantize_tile(p, scale, zero_f, code_ptr, BLOCK_N, HALF, GROUPS, FORMAT, LOOKUP,
                                x.dtype)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        elif IEEE:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SWAP:
        tl.store(out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + out_n[:, None] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[None, :] & (out_n < N)[:, None])
    else:
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + out_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (out_n < N)[None, :])


def _cand(bn, bk, lookup, warps, stages, per_sm, swap=0):
    cand = {"BLOCK_N": bn, "BLOCK_K": bk, "LOOKUP": lookup, "num_warps": warps,
            "num_stages": stages, "PROGRAMS_PER_SM": per_sm}
    return {**cand, "SWAP": 1} if swap else cand


# The first candidate of each list is the default when no timing is possible.
# M = 1 (gemv_kernel): one warp per program, 16-64 codes per thread per step; the best of a
# 93-config sweep on an H100 (BENCHMARKS.md), within 10% of each other on the LLaMA shapes.
CANDIDATES_M1 = [
    _cand(16, 128, 0, 1, 1, 32),
    _cand(8, 256, 0, 1, 1, 32),
    _cand(4, 512, 0, 1, 1, 16),
    _cand(4, 256, 0, 1, 1, 32),
    _cand(8, 256, 0, 1, 1, 16),
]
# 1 < M <= 16 (skinny_matmul_kernel, tl.dot): BLOCK_K = 256 is 128 contiguous bytes per row
# per step (8 threads x 16-byte loads); LOOKUP 2 is the scaled table + tl.gather of _tile.py.
CANDIDATES_M16 = [
    _cand(32, 256, 2, 4, 1, 4),
    _cand(64, 128, 2, 4, 1, 4),
    _cand(32, 256, 2, 4, 1, 8),
    _cand(32, 256, 1, 4, 1, 4),
]
# NF4 weights with bf16 x add LOOKUP=3 (the byte-permute decoder of _tile.py). At M = 1 in the
# gemv kernel (unscaled bf16 code values, float32 products), on its best tilings: 10.0 / 18.9 /
# 19.6 us in a graph on an H100 against 12.2 / 24.9 / 26.3 with LOOKUP 0; for 1 < M <= 16
# in the tl.dot kernel, swapped (acc = W_tile @ x.T: the decoded W is the register operand of the
# tensor-core instruction): on an H100 the tuner picked it at M = 16 for 11008x4096 and
# 4096x11008 (27 / 28 us in a graph, LOOKUP 2 had 37 / 33; BENCHMARKS.md).
PRMT_CANDIDATES_M1 = [_cand(16, 128, 3, 1, 1, 32), _cand(8, 256, 3, 1, 1, 32), _cand(4, 512, 3, 1, 1, 16)]
PRMT_CANDIDATES_M16 = [_cand(64, 256, 3, 4, 1, 8, swap=1), _cand(64, 128, 3, 4, 3, 8, swap=1)]


def _mma_cand(warps, per_sm, lut, stages=0, xs=0, fit=0):
    """A skinny_mma config; STAGES, XS and FIT only where set (absent means 0)."""
    cand = {"MMA": 1, "LUT": lut, "num_warps": warps, "PROGRAMS_PER_SM": per_sm}
    optional = {"STAGES": stages, "XS": int(bool(xs)), "FIT": int(bool(fit))}
    return {**cand, **{k: v for k, v in optional.items() if v}}


# skinny_mma_kernel (tensor cores; NF4 with block 64, bf16 x, K a multiple of 64): the best of
# sweeps on an H100 with the weight read from HBM (BENCHMARKS.md). At M = 1 the shared-memory
# table (LUT 1) in large programs, the best with W coming through the cp.async ring (STAGES, N a
# multiple of 16; the tuner skips them elsewhere) and x in shared memory (XS); at M = 16 the
# byte permutes (LUT 0), the best also with the ring and XS; and FIT variants (at most
# PROGRAMS_PER_SM programs per SM, so that no SM has more than the others).
MMA_CANDIDATES_M1 = [_mma_cand(8, 2, 1), _mma_cand(8, 4, 1),
                     _mma_cand(8, 2, 1, stages=2, xs=1), _mma_cand(8, 3, 1, stages=2, xs=1),
                     _mma_cand(8, 2, 1, stages=3, xs=1), _mma_cand(8, 2, 1, stages=2),
                     _mma_cand(8, 3, 1, stages=3), _mma_cand(8, 2, 1, stages=2, xs=1, fit=1),
                     _mma_cand(8, 2, 1, stages=3, xs=1, fit=1)]
MMA_CANDIDATES_M16 = [_mma_cand(2, 8, 0), _mma_cand(4, 4, 0), _mma_cand(8, 2, 0, stages=3, xs=1),
                      _mma_cand(8, 4, 0, stages=3, xs=1), _mma_cand(8, 2, 0, stages=2, xs=1),
                      _mma_cand(4, 6, 0, stages=4), _mma_cand(8, 3, 0, stages=3, xs=1, fit=1),
                      _mma_cand(8, 1, 0, stages=3, xs=1, fit=1)]
# kernels/decode_sm90.py (M = 1, Hopper, NF4 with double quantization): candidates where
# decode_sm90.decode_ok, with 1 and 2 programs per SM (the second won only at 11008x4096 on an
# H200: BENCHMARKS.md)
DECODE_SM90_CANDIDATES = [{"DECODE_SM90": p} for p in decode_sm90.PER_SM]
# Small enough for the interpreter; SPLIT_K = 2 so that the tests exercise the reduction.
# (LOOKUP 2, the tl.gather table, is for tl.dot; the M = 1 kernel takes it as 0.)
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64, "LOOKUP": 2, "SPLIT_K": 2}
MAX_M = 16
REDUCE_BLOCK = 1024
MAX_TUNE_COPIES = 16

_chosen = {}  # _key(...) -> config dict


def split_k_for(n: int, kp: int, block_n: int, block_k: int, programs: int, fit: bool = False) -> int:
    """SPLIT_K for about `programs` programs: the smallest giving at least that many or, with
    `fit`, the largest giving at most that many (programs = PROGRAMS_PER_SM times the SMs: then
    no SM runs more programs than the others, see FIT above); then lowered where needed so that
    no split is empty (equal splits of whole steps)."""
    n_blocks = triton.cdiv(n, block_n)
    k_steps = triton.cdiv(kp, block_k)
    split = programs // n_blocks if fit else triton.cdiv(programs, n_blocks)
    split = max(1, min(k_steps, split))
    steps_per_split = triton.cdiv(k_steps, split)
    return triton.cdiv(k_steps, steps_per_split)


def x_aligned(x) -> bool:
    """Unit column stride, rows (if several) and start 8-byte aligned: skinny_mma reads x 8 bytes
    at a time (bf16: rows a multiple of 4 elements apart)."""
    return x.stride(1) == 1 and x.data_ptr() % 8 == 0 and (x.shape[0] == 1 or x.stride(0) % 4 == 0)


def mma_ok(x, fmt, k, kp, qb) -> bool:
    """skinny_mma_kernel's needs: NF4 with block 64, no padding of K, bf16 x, x_aligned."""
    return prmt_ok(fmt, x.dtype) and qb == skinny_mma.QBLOCK and k == kp and x_aligned(x)


def _launch(x, w, config, fmt, tensors, kp, qb, dq_block):
    m, n, k = x.shape[0], w.out_features, w.in_features
    if config.get("DECODE_SM90"):  # the persistent Gluon kernel (M = 1 on Hopper): one launch
        programs = config["DECODE_SM90"] * sm_count(x.device)
        return decode_sm90.launch(x, tensors, n, k, dq_block, programs=programs)
    meta, opts = split_config(config)
    per_sm = meta.pop("PROGRAMS_PER_SM", 4)
    split_k = meta.pop("SPLIT_K", None)
    fit = meta.pop("FIT", 0)
    mma = meta.pop("MMA", 0)
    if mma:
        if not mma_ok(x, fmt, k, kp, qb):
            raise ValueError("the MMA kernel needs an NF4 weight with block size 64 and K a multiple "
                             "of 64, and bf16 x with contiguous, 8-byte aligned rows")
        block_n, block_k = 16 * opts.get("num_warps", 4), qb
    else:
        block_n, block_k = meta["BLOCK_N"], meta["BLOCK_K"]
        if block_k % qb and qb % block_k:
            raise ValueError(f"BLOCK_K {block_k} and the block size {qb} must divide one another")
        check_lookup(meta.get("LOOKUP"), fmt, x.dtype)
    gemv = m == 1 and not mma
    if gemv:
        block_k = meta["BLOCK_K"] = max(block_k, qb)  # whole quantization blocks per step
    if split_k is None:
        split_k = split_k_for(n, kp, block_n, block_k, per_sm * sm_count(x.device), bool(fit))
    k_steps = triton.cdiv(kp, block_k)
    split_k = max(1, min(split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    split_k = triton.cdiv(kp, k_per_split)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    out = y if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    stride_os = 0 if split_k == 1 else out.stride(0)
    stride_om, stride_on = (y.stride(0), y.stride(1)) if split_k == 1 else (out.stride(1), out.stride(2))
    grid = (triton.cdiv(n, block_n), split_k)
    pdl = split_k > 1 and pdl_ok(x.device)
    pdl_opt = {"launch_pdl": True} if pdl else {}  # every kernel of the call: see pdl_chain
    asm = not interpreting()  # inline PTX (CUDA); the interpreter runs each kernel's plain path
    consts = dict(FORMAT=fmt, QBLOCK=qb, DQ_BLOCK=dq_block, ASM=int(asm), PDL=int(pdl), **meta, **opts,
                  **FP_FUSION)
    if mma:
        tiles, lut = (1 if m <= 8 else 2), meta.get("LUT", 0)
        warps = opts.get("num_warps", 4)
        stages = meta.get("STAGES", 0) if asm else 0
        ring_declare, ring_read = skinny_mma.ring_asm(stages, warps, fmt) if stages else ("", "")
        if stages and not skinny_mma.ring_ok(n, tensors[0], tensors[1], dq_block):
            raise ValueError("the MMA kernel's cp.async ring (STAGES > 0) needs N a multiple of 16 "
                             "and 16-byte aligned packed and scale tensors")
        if skinny_mma.static_shared_bytes(lut, stages, warps, fmt) > skinny_mma.STATIC_SHARED_MAX:
            raise ValueError(f"skinny_mma with LUT={lut}, STAGES={stages} and {warps} warps needs "
                             f"more than {skinny_mma.STATIC_SHARED_MAX} bytes of shared memory")
        # XS: x in shared memory too, where it fits (it grows with M and the split's length; a
        # config tuned at M = 5 may run at M = 16); else x is read from global memory as before
        x_rows, x_blocks = skinny_mma.x_stage_rows(m), k_per_split // qb
        xs = int(bool(meta.get("XS", 0)) and stages > 0 and skinny_mma.static_shared_bytes(
            lut, stages, warps, fmt, x_rows * x_blocks * 128) <= skinny_mma.STATIC_SHARED_MAX)
        x_declare, x_read = skinny_mma.x_stage_asm(x_rows, x_blocks, tiles) if xs else ("", "")
        skinny_mma.skinny_mma_kernel[grid](
            x, *tensors, out, m, n, tensors[0].stride(0), x.stride(0) if m > 1 else 0,
            kp // qb, k_per_split // qb, stride_os, stride_om, FORMAT=fmt, DQ_BLOCK=dq_block,
            WARPS=warps, TILES=tiles, LUT=lut,
            MMA_ASM=skinny_mma.mma_asm(tiles, bool(lut)) if asm else "", ASM=int(asm),
            STAGES=stages, SLOT=skinny_mma.ring_slot(fmt), RING_DECLARE=ring_declare,
            RING_READ=ring_read, PDL=int(pdl),
            XS=xs, X_ROWS=x_rows, X_BLOCKS=x_blocks, X_DECLARE=x_declare, X_READ=x_read,
            **pdl_opt, **opts, **FP_FUSION)
    elif gemv:
        # x as 32-bit pairs where it is contiguous bf16 with an even start
        pairs = (x.dtype == torch.bfloat16 and x.stride(1) == 1 and k % 2 == 0
                 and x.storage_offset() % 2 == 0)
        x_arg = x.reshape(k).view(torch.int32) if pairs else x
        gemv_kernel[grid](x_arg, *tensors, out, n, k, kp, tensors[0].stride(0), k_per_split,
                          x.stride(1), stride_os, stride_on, XPAIR=int(pairs), **consts, **pdl_opt)
    else:
        skinny_matmul_kernel[grid](
            x, *tensors, out, m, n, k, kp, tensors[0].stride(0), k_per_split,
            x.stride(0), x.stride(1), stride_os, stride_om, stride_on,
            IEEE=x.dtype == torch.float32, **consts, **pdl_opt)
    if split_k > 1:
        size = m * n
        reduce_partials_kernel[(triton.cdiv(size, REDUCE_BLOCK),)](
            out, y, size, split_k, BLOCK=REDUCE_BLOCK, num_warps=4, PDL=int(pdl), **pdl_opt, **FP_FUSION)
    return y


def _stream_copies(tensors, device):
    """Copies of what a decoding matmul streams (the packed bytes, the scales, INT4's zero
    points), enough of them to be twice the size of L2 (at most MAX_TUNE_COPIES): cycled
    through, each call reads W from HBM, as in decoding, where every layer's weight is read once
    per token. (One weight replayed stays in the H100's 50 MB L2, and the fastest config there is
    not the fastest from HBM; BENCHMARKS.md.) Unused zeros alias the packed tensor (weight_args)."""
    packed, scales, zeros = tensors[:3]
    nbytes = packed.numel() + scales.numel() * scales.element_size()
    if zeros is not packed:
        nbytes += zeros.numel()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    count = min(MAX_TUNE_COPIES, max(1, -(-2 * l2 // nbytes)))
    copies = []
    for _ in range(count):
        p = packed.clone()
        copies.append((p, scales.clone(), p if zeros is packed else zeros.clone(), *tensors[3:]))
    return copies


def _tune(x, w, candidates, args):
    """Time each candidate in a CUDA graph on copies of the weight from HBM (_stream_copies);
    return the fastest (first on ties)."""
    fmt, tensors, kp, qb, dq_block = args
    copies = _stream_copies(tensors, x.device)
    turn = [0]

    def call(cand):
        turn[0] = (turn[0] + 1) % len(copies)
        return _launch(x, w, cand, fmt, copies[turn[0]], kp, qb, dq_block)

    timings, failures = [], []
    for cand in candidates:
        fn = lambda: call(cand)  # noqa: E731
        try:
            fn()  # compile outside the graph
            torch.cuda.synchronize(x.device)
            t = triton.testing.do_bench_cudagraph(fn, rep=10)
        except Exception as e:  # a candidate that does not compile or run here
            # out of resources on this GPU is expected of some tiles; anything else (a Triton
            # release whose compiler refuses a kernel, say: kernels/_gluon.py) is reported, and
            # the other candidates still run: only when none does is it an error
            if "OutOfResources" not in type(e).__name__ and "out of resource" not in str(e).lower():
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                warnings.warn(f"skinny_matmul: candidate {cand} skipped, it failed here: "
                              f"{type(e).__name__}: {first}", RuntimeWarning, stacklevel=3)
                failures.append(e)
            t = float("inf")
        timings.append(t)
    del copies
    best = min(range(len(candidates)), key=lambda i: timings[i])
    if timings[best] == float("inf"):
        raise RuntimeError(f"no skinny_matmul candidate runs for this {w.out_features}x"
                           f"{w.in_features} weight on this GPU") from (failures[0] if failures else None)
    return candidates[best]


@functools.lru_cache(maxsize=None)
def _sources_hash() -> str:
    """A hash of every source file of this package: a changed kernel, candidate list or launcher
    makes the choices kept on disk stale."""
    folder = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _disk_choice(key, device, candidates, config=None):
    """The tuned choice for `key` kept in Triton's cache (~/.triton/cache, or TRITON_CACHE_DIR):
    with config, store it there (and return None); without, return what is stored, or None
    (nothing stored, or what is stored is not one of `candidates`). Its name hashes the key,
    the GPU's name and compute capability, the candidates, Triton's and torch's versions and
    _sources_hash. Delete the cache to tune again. Reading or writing failing only means tuning
    again (with a warning)."""
    if device.type != "cuda":  # (tuning on the CPU happens only in tests/test_kernels.py)
        return None
    try:
        from triton.runtime.cache import get_cache_manager
        where = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device),
                 triton.__version__, torch.__version__, _sources_hash())
        name = hashlib.sha256(repr((key, where, candidates)).encode()).hexdigest()
        cache = get_cache_manager(name)
        if config is not None:
            cache.put(json.dumps({"config": config}), "skinny_matmul.json", binary=False)
            return None
        path = cache.get_file("skinny_matmul.json")
        if path is None:
            return None
        with open(path) as f:
            stored = json.load(f)["config"]
        return stored if stored in candidates else None
    except Exception as e:  # an unreadable or unwritable cache: tune (again)
        warnings.warn(f"skinny_matmul: the tuned choice could not be kept on disk: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=3)
        return None


def chosen_config(x, w):
    """The config that skinny_matmul(x, w) uses (after the first call), or None."""
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    return _chosen.get(_key(x, w, tensors, dq_block))


def _key(x, w, tensors, dq_block):
    """What a tuned config depends on: the shape and format, M = 1 or not, x's dtype and device,
    whether skinny_mma may run (x_aligned), whether decode_sm90 may (x 16-byte aligned, its TMA)
    and whether skinny_mma's ring may (ring_ok: the alignment of this weight's tensors), so that
    a config is never reused where it cannot run."""
    return (w.out_features, w.in_features, w.quant_type, w.double_quant, w.block_size,
            x.shape[0] == 1, x.dtype, x.device, x_aligned(x), x.data_ptr() % 16 == 0,
            skinny_mma.ring_ok(w.out_features, tensors[0], tensors[1], dq_block))


def _candidates(x, w, args) -> list:
    """The configs the tuner times for this call: the CUDA-core lists, then the byte-permute,
    tensor-core and Hopper ones where they can run."""
    fmt, tensors, kp, qb, dq_block = args
    m1 = x.shape[0] == 1
    candidates = CANDIDATES_M1 if m1 else CANDIDATES_M16
    if prmt_ok(fmt, x.dtype):
        candidates = candidates + (PRMT_CANDIDATES_M1 if m1 else PRMT_CANDIDATES_M16)
    if mma_ok(x, fmt, w.in_features, kp, qb):
        ring = skinny_mma.ring_ok(w.out_features, tensors[0], tensors[1], dq_block)
        candidates = candidates + [c for c in (MMA_CANDIDATES_M1 if m1 else MMA_CANDIDATES_M16)
                                   if ring or not c.get("STAGES")]
    if decode_sm90.decode_ok(x, w):
        candidates = candidates + DECODE_SM90_CANDIDATES
    return candidates


def _tune_and_keep(x, w, key, candidates, args):
    """_tune, then the choice kept on disk for the next process (and printed, as Triton's
    autotuners do, with TRITON_PRINT_AUTOTUNING=1)."""
    start = time.perf_counter()
    config = _tune(x, w, candidates, args)
    _disk_choice(key, x.device, candidates, config)
    if os.environ.get("TRITON_PRINT_AUTOTUNING", "0") not in ("", "0"):
        print(f"skinny_matmul tuned for {w.out_features}x{w.in_features}, M = {x.shape[0]}, in "
              f"{time.perf_counter() - start:.2f} s: {config}")
    return config


def skinny_matmul(x: torch.Tensor, w, config: dict = None) -> torch.Tensor:
    """y = x @ W.T for a 2-D x with 1 <= M <= 16 rows; y (M, out_features) in x's dtype.

    config: fixed meta-parameters (BLOCK_N, BLOCK_K, LOOKUP, num_warps, num_stages, and either
    SPLIT_K or PROGRAMS_PER_SM, with FIT) instead of the tuned choice; SPLIT_K = 1 is the classic
    one-program-per-row-block kernel. The CPU interpreter uses INTERPRETER_CONFIG by default.
    """
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    check_activation(x, w.in_features, w.packed.device, "x")
    m = x.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_matmul takes 1 to {MAX_M} rows, got {m}; use fused_matmul")
    args = (fmt, tensors, kp, qb, dq_block)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is not None and config.get("DECODE_SM90"):
        if config["DECODE_SM90"] not in decode_sm90.PER_SM:
            raise ValueError(f"DECODE_SM90 is the programs per SM: one of {decode_sm90.PER_SM}, "
                             f"got {config['DECODE_SM90']}")
        # (a tuned choice needs no check: the tuner offers it only where decode_ok, and _key
        # keeps it from calls where it could not run)
        if not decode_sm90.decode_ok(x, w):
            raise ValueError("DECODE_SM90 needs what decode_sm90.decode_ok checks: an sm_90 GPU, "
                             "one contiguous, 16-byte aligned bf16 row of x and an NF4 weight with "
                             "double quantization, blocks of 64, no padding")
    if config is None:
        key = _key(x, w, tensors, dq_block)
        config = _chosen.get(key)
    if config is None:  # this process's first call of its kind
        candidates = _candidates(x, w, args)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return _launch(x, w, candidates[0], *args)  # no timing inside a capture
        stored = _disk_choice(key, x.device, candidates)
        if stored is not None:  # tuned by an earlier process
            try:
                y = _launch(x, w, stored, *args)
                _chosen[key] = stored
                return y
            except Exception as e:  # something its name does not cover changed (the driver)
                warnings.warn(f"skinny_matmul: the choice kept on disk, {stored}, failed here "
                              f"({type(e).__name__}: {e}); tuning again", RuntimeWarning, stacklevel=2)
        config = _chosen[key] = _tune_and_keep(x, w, key, candidates, args)
    return _launch(x, w, config, *args)
