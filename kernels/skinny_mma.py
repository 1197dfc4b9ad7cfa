"""Decoding on tensor cores: y = x @ W.T for M = 1..16 rows of bf16 x and an NF4 W (block 64).

Why: at M = 1 the CUDA-core kernel (kernels/gemv.py) issues about 6.6 instructions per
weight: 2.9 to decode, then a shift to turn each bf16 code value into float32, an FMA, the sums.
One warp-wide mma.sync.m16n8k16 multiplies a 16 x 16 tile of bf16 weights by a 16 x 8 tile of x:
8 weights per thread in one instruction, products and sums in float32 on the tensor cores. The 8
columns of the mma are 8 rows of x (M <= 8: one mma, M <= 16: two); at M = 1 seven of them
multiply zeros, at no cost: the tensor cores are idle otherwise.

Math, per output row n and quantization block b (64 columns):
    d[m, n, b] = sum_{k in b} bf16(code[q[n, k]]) * x[m, k]      (mma, float32)
    y[m, n] = sum_b absmax[b, n] * d[m, n, b]                      (float32, then rounded to bf16)
The numbers of the LOOKUP 3 gemv: bf16 code values (one rounding, 2^-9 relative), exact products,
float32 sums (in another order).

Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16", .bf16): lane = 4 g + t, g in 0..7,
t in 0..3; every register holds two bf16 of consecutive k (the lower k in the low half):
    A (16 rows of W x 16 k):  a0 = A[g, 2t:2t+2]    a1 = A[g+8, 2t:2t+2]
                              a2 = A[g, 2t+8:2t+10] a3 = A[g+8, 2t+8:2t+10]
    B (16 k x 8 rows of x):   b0 = B[2t:2t+2, g]    b1 = B[2t+8:2t+10, g]
    D (16 x 8, float32):      d0, d1 = D[g, 2t], D[g, 2t+1]   d2, d3 = D[g+8, 2t], D[g+8, 2t+1]
A register of A is two consecutive k of one row: exactly one packed byte, decoded. And a sum does
not care which real k plays which k of the mma, as long as A and B agree, so each thread takes
contiguous bytes: in block b (32 bytes per row of W) thread t loads bytes 8t..8t+7 of rows g and
g+8 (one 8-byte load each) and x[m, 64 b + 16t : 64 b + 16t + 16] (four 8-byte loads, m = g);
mma step s = 0..3 uses its bytes 2s and 2s+1 (k 16t + 4s .. 16t + 4s + 3) as the mma's k 2t, 2t+1
and 2t+8, 2t+9, and x's 32-bit words 2s, 2s+1 for the same k. Four steps cover the block's 64 k;
the block sum then meets the absmax of rows g and g+8 (float32 FMA).

Two decoders (meta-parameter LUT), both giving the word bf16(code[low nibble]) << 16 |
bf16(code[high nibble]) per byte:
  - LUT=0: the byte permutes of _tile.py (prmt_decode_lines), about 2.9 integer instructions per
    weight.
  - LUT=1: a table of the 256 possible bytes in shared memory, one 32-bit load per byte (2
    weights) and 2 integer instructions for its address. The H100 runs integer instructions at half
    the float32 rate (64 lanes per clock per SM), and at M = 1 the decode is most of the work, so
    this is the faster one where the table's fill pays off (large programs, BENCHMARKS.md). The
    table holds 32 copies, word 32 b + lane = pair of byte b: each lane reads its own bank, so a
    warp's 32 random lookups never conflict. Triton has no user-managed shared memory; the table
    is a static .shared array declared in inline PTX (LUT_DECLARE, once per kernel, 32 KB of the
    48 KB a static allocation may take), filled from code_with_tables' 256 pair words, then a
    barrier.

Feeding it (meta-parameter STAGES). The kernel is bound by waiting for memory, not by its
arithmetic: with every load hitting L1 the same kernel runs 2.6-3x faster (BENCHMARKS.md). Loads into
registers cannot be moved ahead by writing them earlier: ptxas issues a global load just before
its first use, wherever it stands in the source (a "next block" register rotation only added a
copy that waited for the load). So with STAGES > 0, W, the 8-bit absmax codes and the absmax2
come through a ring of STAGES slots per warp in shared memory, filled by cp.async (which has no
register to wait on) STAGES - 1 blocks ahead: lane l copies 16 bytes of the warp's row l // 2,
one lane the 16 rows' scale bytes, one their absmax2 (16 rows starting at a multiple of 16
share one DQ group); one commit group per block; cp.async.wait_group + a warp barrier before a
thread reads its bytes back, a warp barrier before a slot is refilled. Needs N a multiple of 16
and, with the table, fits 2-3 stages in the 48 KB (ring_slot; the launcher checks; the
interpreter runs STAGES as 0).
On the H100 this took 11008 x 4096 from HBM from 20.6 to 18.5 us (BENCHMARKS.md), not to the
10 us a kernel that only reads the bytes takes: some latency stays exposed. A third stage (with
XS below) took it from 15.4 to 14.3 us; deeper rings (in dynamic shared memory), smaller tables
with room for them, and L2 prefetches were slower (BENCHMARKS.md).
With XS = 1 (and the ring) x comes from shared memory too: each program first copies x's rows
(1 at M = 1, else the 8 or 16 of the mma tiles) over its split's blocks there (cp.async, 8 bytes
per copy; X_ROWS x X_BLOCKS x 128 bytes, where it fits in the 48 KB: else the launcher runs it
with x from global memory). Why: with the ring, ncu put the first mma of every block waiting on
x's global loads (a third of the stall samples): the 8 warps of a program read the same x block
at about the same time, one L2 round trip each block. From shared memory: 0.5-1.1 us less at
M = 1, 4-5 us at M = 16 (BENCHMARKS.md).

Which thread holds which element is decided by the hardware lane, not by Triton's layout: every
lane-dependent index comes from %tid.x (read with inline PTX) and each (32 * num_warps,) tensor
has one element per thread. Rows: warp w of program i takes rows 16 (i * WARPS + w) + 0..15 (rows
past N read row n % N and are not stored). K is split as in skinny_matmul (float32 partials,
reduced there) so that thousands of warps share the work.

Needs: NF4 (with or without double quantization) with block size 64, K a multiple of 64 (no
padding), bf16 x with contiguous rows, 8-byte aligned. Inline PTX: CUDA only; in the interpreter
(ASM=0) each thread computes its four block sums with plain loads and tl.sum instead of the mma,
the same numbers, to test everything around it (indices, scales, split, stores).

Memory layout: x (M, K) bf16, row stride stride_xm (elements), unit column stride; packed uint8
(N, K/2) row stride stride_pn; scales (K/64, N); out (SPLIT_K, M, N) float32 partials, or y.
"""

import functools

import triton
import triton.language as tl

from ._launch import pdl_chain
from ._tile import (PRMT_TEMPS, _table_word, double_dequant, load_block_scales, nf4_code_pairs,
                    prmt_decode_lines)

QBLOCK = 64  # the one block size of this kernel: 4 mma k-steps per block


@functools.lru_cache(maxsize=None)
def mma_asm(tiles: int, lut: bool) -> str:
    """PTX for one quantization block: decode 16 bytes of W (rows g, g + 8), then 4 k-steps of
    `tiles` mma each (tile j: x rows 8 j + g). Operands: the 4 `tiles` float32 block sums
    $0.., then W bytes of row g and g + 8 (two .b64), x (4 `tiles` .b64), then the 9 table
    operands: the byte permutes' words or, with `lut`, 4 * lane in the first (the others unused)."""
    n_out = 4 * tiles
    wa, wb = f"${n_out}", f"${n_out + 1}"
    xs = [f"${n_out + 2 + i}" for i in range(4 * tiles)]
    tab = [f"${n_out + 2 + 4 * tiles + i}" for i in range(9)]
    lines = ["{", PRMT_TEMPS, ".reg .b32 w<4>, p<16>, xw<16>, lut;", ".reg .f32 z;",
             "mov.f32 z, 0f00000000;", f"mov.b64 {{w0, w1}}, {wa};", f"mov.b64 {{w2, w3}}, {wb};"]
    lines += [f"mov.b64 {{xw{2 * i}, xw{2 * i + 1}}}, {xs[i]};" for i in range(4 * tiles)]
    if lut:
        lines.append(f"mov.u32 lut, {LUT_NAME};")
    for i in range(4):  # p0..p7: the 8 bytes of row g; p8..p15: row g + 8
        if not lut:
            lines += prmt_decode_lines(f"w{i}", [f"p{4 * i + j}" for j in range(4)], tab)
            continue
        for j, shift in enumerate(["shl.b32 a, {}, 7;", "shr.b32 a, {}, 1;", "shr.b32 a, {}, 9;",
                                   "shr.b32 a, {}, 17;"]):
            lines += [shift.format(f"w{i}"),                   # byte j at bits 7..14: byte * 128
                      f"lop3.b32 a, a, 0x7F80, {tab[0]}, 0xEA;",  # (a & 0x7F80) | 4 lane
                      "add.u32 a, a, lut;",                     # (folded into the load by ptxas)
                      f"ld.shared.b32 p{4 * i + j}, [a];"]
    for s in range(4):
        a = f"{{p{2 * s}, p{8 + 2 * s}, p{2 * s + 1}, p{9 + 2 * s}}}"
        for j in range(tiles):
            d = "{" + ", ".join(f"${4 * j + i}" for i in range(4)) + "}"
            c = "{z, z, z, z}" if s == 0 else d
            b = f"{{xw{8 * j + 2 * s}, xw{8 * j + 2 * s + 1}}}"
            lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d}, {a}, {b}, {c};")
    lines.append("}")
    return "\n".join(lines)


LUT_NAME = "nf4_pair_lut"
LUT_SIZE = 256 * 32  # words: 256 byte values x 32 copies (one per lane: no bank conflicts), 32 KB
LUT_WORDS = tl.constexpr(LUT_SIZE)
# declared at the kernel's top scope (no braces), so that mma_asm's PTX can name it; the kernel
# runs this statement once (one element per thread, outside the loop): PTX allows one declaration
LUT_DECLARE: tl.constexpr = tl.constexpr(
    f".shared .align 16 .b32 {LUT_NAME}[{LUT_SIZE}];\nmov.u32 $0, {LUT_NAME};")


def ring_slot(fmt: int) -> int:
    """Bytes per warp and stage of the ring: W (16 rows x 32 bytes), the 16 rows' scales (8-bit
    codes with double quantization, FORMAT 1: 16 bytes; float32 absmax: 64), then 16 bytes for
    the absmax2 of NF4 + DQ (4 used; read, and not used, without DQ). The 48 bytes NF4 + DQ
    saves per slot against the float32 layout let 3 stages, x in shared memory and the table fit
    at 22 blocks per split (11008x4096's FIT split): 1 us faster from HBM than 2 stages
    (BENCHMARKS.md)."""
    return 512 + 16 * (1 if fmt == 1 else 4) + 16


@functools.lru_cache(maxsize=None)
def ring_asm(stages: int, warps: int, fmt: int):
    """PTX of the cp.async ring (STAGES > 0): its declaration (a static .shared array of
    stages * warps * ring_slot(fmt) bytes named RING_NAME; the statement gives its address) and
    the read of one stage by one thread: wait until at most stages - 1 groups of copies are in
    flight (the stage's have landed), sync the warp (other lanes copied them), then this thread's 8
    bytes of W rows g ($0 from [$5]) and g + 8 ($1 from [$6]), the scale of each row ($2 from
    [$7], $3 from [$8]: the 8-bit code of NF4 + DQ, the float32 absmax of plain NF4) and the
    warp's absmax2 ($4 from [$9], NF4 + DQ: its 16 rows share one, see _ring_issue)."""
    declare = (f".shared .align 16 .b8 {RING_NAME}[{stages * warps * ring_slot(fmt)}];\n"
               f"mov.u32 $0, {RING_NAME};")
    ld = "ld.shared.u8" if fmt == 1 else "ld.shared.b32"
    read = (f"cp.async.wait_group {stages - 1};\nbar.warp.sync -1;\n"
            f"ld.shared.b64 $0, [$5];\nld.shared.b64 $1, [$6];\n{ld} $2, [$7];\n{ld} $3, [$8];\n"
            "ld.shared.b32 $4, [$9];")
    return declare, read


RING_NAME = "w_ring"
# one block's copies into a warp's stage slot, as one group: first make sure the warp is done
# reading the slot (it was read one iteration ago), then each lane copies 16 bytes of W ([$1]
# from [$2]), the lanes with $5 != 0 16 bytes of scales ([$3] from [$4]) and the lane with
# $8 != 0 the absmax2 ([$6] from [$7])
RING_ISSUE: tl.constexpr = tl.constexpr(
    "{ .reg .pred p, q; setp.ne.u32 p, $5, 0; setp.ne.u32 q, $8, 0;\n"
    "bar.warp.sync -1;\n"
    "cp.async.cg.shared.global [$1], [$2], 16;\n"
    "@p cp.async.cg.shared.global [$3], [$4], 16;\n"
    "@q cp.async.ca.shared.global [$6], [$7], 4;\n"
    "cp.async.commit_group; }\n"
    "mov.u32 $0, 0;")
STATIC_SHARED_MAX = 48 * 1024  # what a kernel may declare statically


def ring_ok(n: int, packed, scales, dq_block: int) -> bool:
    """What the ring's copies need: whole 16-row tiles (each warp's 16 scales are one 16-byte
    run and share one absmax2: DQ_BLOCK a multiple of 16) and 16-byte aligned rows (K a
    multiple of 64 gives the row stride)."""
    return (n % 16 == 0 and dq_block % 16 == 0 and packed.data_ptr() % 16 == 0
            and scales.data_ptr() % 16 == 0)


X_NAME = "x_stage"


@functools.lru_cache(maxsize=None)
def x_stage_asm(rows: int, blocks: int, tiles: int):
    """PTX of x in shared memory (XS): its declaration (rows x blocks x 128 bytes: x row r, block
    j of the split at byte 128 (r blocks + j); the statement gives its address) and the read of
    one block by one thread: 32 bytes of x row g ($0..$3 from [$8]) and, with tiles = 2, of row
    g + 8 ($4..$7 from [$9]; else copies of the first four). Rows past M need no zeros (rows
    M..7 of M <= 8 hold whatever they hold): x row m only reaches the mma's output column m, and
    columns m >= M are not stored. At M = 1 (rows = 1) only the 4 threads of g = 0 ($10) read,
    the others take zeros: all 32 threads reading the same 4 addresses made the M = 1 kernel
    0.1-0.5 us slower (a 16-byte shared load takes a pass per 8 threads)."""
    declare = (f".shared .align 16 .b8 {X_NAME}[{rows * blocks * 128}];\n"
               f"mov.u32 $0, {X_NAME};")
    p = "@p " if rows == 1 else ""
    read = ["{ .reg .pred p; setp.eq.u32 p, $10, 0;"]
    if rows == 1:
        read += ["mov.b64 $0, 0; mov.b64 $1, 0; mov.b64 $2, 0; mov.b64 $3, 0;"]
    read += [f"{p}ld.shared.v2.b64 {{$0, $1}}, [$8];", f"{p}ld.shared.v2.b64 {{$2, $3}}, [$8+16];"]
    if tiles == 2:
        read += ["ld.shared.v2.b64 {$4, $5}, [$9];", "ld.shared.v2.b64 {$6, $7}, [$9+16];"]
    else:
        read += ["mov.b64 $4, $0;", "mov.b64 $5, $1;", "mov.b64 $6, $2;", "mov.b64 $7, $3;"]
    return declare, "\n".join(read + ["}"])


def x_stage_rows(m: int) -> int:
    """Rows of x kept in shared memory: 1 at M = 1, else the 8 or 16 rows of the mma tiles."""
    return 1 if m == 1 else (8 if m <= 8 else 16)


# one 8-byte piece of x into shared memory ([$1] from [$2]) where $3 != 0
X_COPY: tl.constexpr = tl.constexpr(
    "{ .reg .pred p; setp.ne.u32 p, $3, 0;\n"
    "@p cp.async.ca.shared.global [$1], [$2], 8; }\n"
    "mov.u32 $0, 0;")
# wait for every cp.async of this thread, then for the whole program (bar.sync follows)
WAIT_ALL: tl.constexpr = tl.constexpr("cp.async.wait_all;\nmov.u32 $0, 0;")


def static_shared_bytes(lut: int, stages: int, warps: int, fmt: int, x_bytes: int = 0) -> int:
    """Shared memory the kernel declares: the table (LUT), the ring and x (XS)."""
    return (4 * LUT_SIZE if lut else 0) + stages * warps * ring_slot(fmt) + x_bytes


# operands: the block sums (4 per tile), W (2 x .b64), x (4 x .b64 per tile), 9 table operands
MMA_CONSTRAINTS_1: tl.constexpr = tl.constexpr(",".join(["=f"] * 4 + ["l"] * 6 + ["r"] * 9))
MMA_CONSTRAINTS_2: tl.constexpr = tl.constexpr(",".join(["=f"] * 8 + ["l"] * 10 + ["r"] * 9))


@triton.jit
def _thread_ids(T: tl.constexpr, ASM: tl.constexpr):
    """(T,) int32, one element per thread: the CUDA thread index of the thread holding it."""
    ids = tl.arange(0, T)
    if ASM:
        ids = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [ids], dtype=tl.int32,
                                        is_pure=True, pack=1)
    return ids


@triton.jit
def _block_sum_plain(packed_ptr, code_ptr, x_ptr, row, col, b, M, stride_pn, stride_xm):
    """The interpreter's stand-in for the mma: per element, sum over block b of
    bf16(code[q[row, k]]) * x[col, k] in float32 (x rows col >= M are zeros)."""
    j = tl.arange(0, QBLOCK // 2)
    p = tl.load(packed_ptr + row[:, None] * stride_pn + b * (QBLOCK // 2) + j[None, :])
    pairs = nf4_code_pairs(p, code_ptr, 0)
    xp = x_ptr + col[:, None] * stride_xm + b * QBLOCK + 2 * j[None, :]
    ok = (col < M)[:, None]
    x_even = tl.load(xp, mask=ok, other=0.0).to(tl.float32)
    x_odd = tl.load(xp + 1, mask=ok, other=0.0).to(tl.float32)
    return tl.sum((pairs << 16).to(tl.float32, bitcast=True) * x_even
                  + (pairs & -65536).to(tl.float32, bitcast=True) * x_odd, axis=1)


@triton.jit
def _scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr, b, ra, rb, N,
            FORMAT: tl.constexpr, DQ_BLOCK: tl.constexpr):
    """absmax of rows ra and rb in block b."""
    sa, _ = load_block_scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                              b, ra, ra >= 0, N, FORMAT, DQ_BLOCK)
    sb, _ = load_block_scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                              b, rb, rb >= 0, N, FORMAT, DQ_BLOCK)
    return sa, sb


@triton.jit
def _load_x(x_ptrs, x_ok, b):
    """This thread's 16 bf16 of one x row in block b, as four 8-byte words (zeros past M)."""
    p = x_ptrs + 16 * b
    return (tl.load(p, mask=x_ok, other=0), tl.load(p + 1, mask=x_ok, other=0),
            tl.load(p + 2, mask=x_ok, other=0), tl.load(p + 3, mask=x_ok, other=0))


@triton.jit
def _load_x_tiles(xa_ptrs, xb_ptrs, xa_ok, xb_ok, b, TILES: tl.constexpr):
    """x words of block b for the mma: rows g (4 words), then rows g + 8 (TILES = 2) or the
    first four again (unused)."""
    x0, x1, x2, x3 = _load_x(xa_ptrs, xa_ok, b)
    x4, x5, x6, x7 = x0, x1, x2, x3
    if TILES == 2:
        x4, x5, x6, x7 = _load_x(xb_ptrs, xb_ok, b)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _ring_issue(b, slot, copy_w, copy_s, copy_g, w_src, s_src, s_lane, row0, g_lane, absmax2_ptr,
                N, DQ_BLOCK: tl.constexpr):
    """Start the copies of block b into the ring stage at byte `slot` of this thread's warp's
    ring (SLOT = ring_slot(FORMAT) times the stage): lane l copies bytes 16 (l % 2) .. + 16 of
    the warp's row l // 2 (w_src: that row and half at block 0); the scale lanes (s_lane) 16
    bytes of the 16 rows' scales of block b (s_src: at block 0); g_lane the absmax2 of the warp's
    rows (NF4 + DQ: indices b N + row0 .. + 15 start at a multiple of 16 and DQ_BLOCK is one, so
    they share one)."""
    tl.inline_asm_elementwise(
        RING_ISSUE, "=r,r,l,r,l,r,r,l,r",
        [copy_w + slot, w_src + 32 * b, copy_s + slot, s_src + b * N, s_lane, copy_g + slot,
         absmax2_ptr + (b * N + row0).to(tl.uint32) // DQ_BLOCK, g_lane],  # (unsigned: a shift)
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _mma_block(acc, sa, sb, wa, wb, xs, tw, TILES: tl.constexpr, MMA_ASM: tl.constexpr):
    """acc (8 float32 sums per thread) + absmax (sa: row g, sb: row g + 8) * the block sums of
    one block: MMA_ASM on this thread's W words wa, wb (rows g, g + 8), x words xs (4 per tile)
    and the decoder's table operands tw."""
    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc
    if TILES == 1:
        d0, d1, d2, d3 = tl.inline_asm_elementwise(
            MMA_ASM, MMA_CONSTRAINTS_1,
            [wa, wb, xs[0], xs[1], xs[2], xs[3],
             tw[0], tw[1], tw[2], tw[3], tw[4], tw[5], tw[6], tw[7], tw[8]],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        d0, d1, d2, d3, d4, d5, d6, d7 = tl.inline_asm_elementwise(
            MMA_ASM, MMA_CONSTRAINTS_2,
            [wa, wb, xs[0], xs[1], xs[2], xs[3], xs[4], xs[5], xs[6], xs[7],
             tw[0], tw[1], tw[2], tw[3], tw[4], tw[5], tw[6], tw[7], tw[8]],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        acc4 += sa * d4  # x rows 8 + 2t, 9 + 2t
        acc5 += sa * d5
        acc6 += sb * d6
        acc7 += sb * d7
    acc0 += sa * d0  # D[g, 2t], D[g, 2t + 1]: W row g times x rows 2t, 2t + 1
    acc1 += sa * d1
    acc2 += sb * d2  # W row g + 8
    acc3 += sb * d3
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _st_shared(addr, value):
    """Store value (int32) at the shared-memory address addr (one per thread)."""
    tl.inline_asm_elementwise("st.shared.b32 [$1], $2;\nmov.u32 $0, 0;", "=r,r,r", [addr, value],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _store(out_ptr, acc, m, n, M, N, stride_om):
    tl.store(out_ptr + m * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=(m < M) & (n < N))


@triton.jit
def skinny_mma_kernel(
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, out_ptr,
    M, N, stride_pn, stride_xm, NBLOCKS, BLOCKS_PER_SPLIT, stride_os, stride_om,
    FORMAT: tl.constexpr, DQ_BLOCK: tl.constexpr, WARPS: tl.constexpr, TILES: tl.constexpr,
    LUT: tl.constexpr = 0, MMA_ASM: tl.constexpr = "", ASM: tl.constexpr = 1,
    STAGES: tl.constexpr = 0, SLOT: tl.constexpr = 0, RING_DECLARE: tl.constexpr = "",
    RING_READ: tl.constexpr = "",
    PDL: tl.constexpr = 0,
    XS: tl.constexpr = 0, X_ROWS: tl.constexpr = 1, X_BLOCKS: tl.constexpr = 1,
    X_DECLARE: tl.constexpr = "", X_READ: tl.constexpr = "",
):
    """out[s, m, n] = sum over the blocks of split s of absmax * (mma block sum); TILES = 1 for
    M <= 8, 2 for M <= 16 (x rows 8..15 in a second mma); MMA_ASM = mma_asm(TILES, LUT)."""
    T: tl.constexpr = 32 * WARPS
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    tid = _thread_ids(T, ASM)
    g = tid % 32 // 4
    t = tid % 4
    row = pid_n * (16 * WARPS) + tid // 32 * 16 + g  # this thread's rows: row and row + 8
    ra = row % N
    rb = (row + 8) % N
    b_begin = pid_s * BLOCKS_PER_SPLIT
    b_end = min(b_begin + BLOCKS_PER_SPLIT, NBLOCKS)
    # 8-byte words: W row r, block b, thread t at byte 32 b + 8 t; x row m, block b, thread t at
    # element 64 b + 16 t (both strides are multiples of 8 bytes: the launcher checks)
    w64 = packed_ptr.to(tl.pointer_type(tl.int64))
    wa_ptrs = w64 + ra * (stride_pn // 8) + t
    wb_ptrs = w64 + rb * (stride_pn // 8) + t
    x64 = x_ptr.to(tl.pointer_type(tl.int64))
    xa_ptrs = x64 + g * (stride_xm // 4) + 4 * t
    xb_ptrs = xa_ptrs + 8 * (stride_xm // 4)
    xa_ok = g < M
    xb_ok = g + 8 < M
    if STAGES:
        # W and the scales come through a ring of STAGES slots per warp in shared memory, filled
        # by cp.async STAGES - 1 blocks ahead: a copy has no register to wait on, so ptxas issues
        # it where it stands (a load into a register is issued just before its first use however
        # early it is written, and each block then waited for its bytes: ncu, BENCHMARKS.md).
        # Copies are 16 bytes per lane, one group per block; reads are this thread's bytes.
        # Layout: warp w, stage s at SLOT * (STAGES w + s): W rows 0..15 x 32 bytes, the 16
        # rows' scales (16 bytes: 8-bit codes; 64: float32), their absmax2 (NF4 + DQ).
        ES: tl.constexpr = 1 if FORMAT == 1 else 4
        ring = tl.inline_asm_elementwise(RING_DECLARE, "=r,r", [tid], dtype=tl.int32,
                                         is_pure=True, pack=1)
        lane = tid % 32
        row0 = pid_n * (16 * WARPS) + tid // 32 * 16
        warp_ring = ring + tid // 32 * (STAGES * SLOT)
        w_src = packed_ptr + (row0 + lane // 2) % N * stride_pn + lane % 2 * 16
        s_src = scales_ptr + row0 % N + lane * (16 // ES)
        s_lane = (lane < ES).to(tl.int32)
        copy_w = warp_ring + lane * 16
        copy_s = warp_ring + 512 + lane * 16
        copy_g = warp_ring + 512 + 16 * ES
        g_lane = ((lane == 1) & (FORMAT == 1)).to(tl.int32)
        read_a = warp_ring + g * 32 + t * 8
        last = b_end - 1
        row0_n = row0 % N
    if ASM:  # the decoder's table: read before the PDL wait (see below)
        tab = code_ptr.to(tl.pointer_type(tl.int32)) + 16
        if LUT:  # fill the shared-memory table: word 32 b + lane = pair of byte value b
            lut = tl.inline_asm_elementwise(LUT_DECLARE, "=r,r", [tid], dtype=tl.int32,
                                            is_pure=True, pack=1)
            for i in range(LUT_WORDS // T):
                wi = i * T + tid
                _st_shared(lut + 4 * wi, tl.load(tab + 12 + wi // 32))
            if not XS:  # (with XS, after x's copies)
                tl.debug_barrier()
            tw0 = tid % 32 * 4
            tw1, tw2, tw3, tw4, tw5, tw6, tw7, tw8 = tw0, tw0, tw0, tw0, tw0, tw0, tw0, tw0
        else:  # the decoder's 9 table words (_tile.py), in registers for the whole loop
            tw0, tw1, tw2 = _table_word(tab, 0), _table_word(tab, 1), _table_word(tab, 2)
            tw3, tw4, tw5 = _table_word(tab, 3), _table_word(tab, 4), _table_word(tab, 5)
            tw6, tw7, tw8 = _table_word(tab, 6), _table_word(tab, 7), _table_word(tab, 8)
        tw = (tw0, tw1, tw2, tw3, tw4, tw5, tw6, tw7, tw8)
    # With PDL, everything above ran while the kernel before this one may still be running (its
    # launch_dependents came first): it read nothing but the decoder table, which no kernel
    # writes after its build (code_with_tables waits for the build). Here: wait for that kernel,
    # let the next one start (_launch.pdl_chain); from here on x, W and y.
    pdl_chain(PDL)
    if STAGES:  # the ring's first STAGES - 1 blocks
        offset = tl.load(offset_ptr) if FORMAT == 1 else 0.0
        for pre in tl.static_range(STAGES - 1):
            _ring_issue(min(b_begin + pre, last), pre * SLOT, copy_w, copy_s, copy_g, w_src,
                        s_src, s_lane, row0_n, g_lane, absmax2_ptr, N, DQ_BLOCK)
    if XS:
        # x rows 0 .. X_ROWS - 1 over this split's blocks into shared memory, once: the loop then
        # reads x with no global load to wait for. Layout: row r, block j of the split at byte
        # 128 (r X_BLOCKS + j), 16 pieces of 8 bytes per block; one wait and one barrier for all.
        x_stage = tl.inline_asm_elementwise(X_DECLARE, "=r,r", [tid], dtype=tl.int32,
                                            is_pure=True, pack=1)
        for i in range(tl.cdiv(X_ROWS * X_BLOCKS * 16, T)):
            piece = i * T + tid  # 8-byte pieces: row, block of the split, 16 per block
            xr = piece // (X_BLOCKS * 16)
            xj = piece % (X_BLOCKS * 16)
            ok = (xr < M) & (b_begin + xj // 16 < b_end)
            tl.inline_asm_elementwise(
                X_COPY, "=r,r,l,r",
                [x_stage + 8 * piece, x64 + xr * (stride_xm // 4) + 16 * b_begin + xj, ok.to(tl.int32)],
                dtype=tl.int32, is_pure=False, pack=1)
        tl.inline_asm_elementwise(WAIT_ALL, "=r,r", [tid], dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()
        xa_stage = x_stage + (g % X_ROWS * X_BLOCKS) * 128 + 32 * t  # (M = 1: row 0)
        xb_stage = xa_stage + 8 * X_BLOCKS * 128
    acc0 = tl.zeros((T,), dtype=tl.float32)
    acc1 = tl.zeros((T,), dtype=tl.float32)
    acc2 = tl.zeros((T,), dtype=tl.float32)
    acc3 = tl.zeros((T,), dtype=tl.float32)
    acc4 = tl.zeros((T,), dtype=tl.float32)
    acc5 = tl.zeros((T,), dtype=tl.float32)
    acc6 = tl.zeros((T,), dtype=tl.float32)
    acc7 = tl.zeros((T,), dtype=tl.float32)
    if STAGES:
        slot = b_begin * 0  # byte offset of block b's stage: SLOT ((b - b_begin) % STAGES)
        for b in range(b_begin, b_end):
            # block b + STAGES - 1 goes to the stage read in the previous iteration
            ahead = tl.where(slot == 0, (STAGES - 1) * SLOT, slot - SLOT)
            _ring_issue(min(b + STAGES - 1, last), ahead, copy_w, copy_s, copy_g, w_src, s_src,
                        s_lane, row0_n, g_lane, absmax2_ptr, N, DQ_BLOCK)
            wa, wb, qa, qb, g2 = tl.inline_asm_elementwise(
                RING_READ, "=l,=l,=r,=r,=r,r,r,r,r,r",
                [read_a + slot, read_a + slot + 256, warp_ring + slot + 512 + g * ES,
                 warp_ring + slot + 512 + (g + 8) * ES, copy_g + slot],
                dtype=(tl.int64, tl.int64, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)
            if FORMAT == 1:
                absmax2 = g2.to(tl.float32, bitcast=True)
                sa = double_dequant(qa, absmax2, code8_ptr, offset)
                sb = double_dequant(qb, absmax2, code8_ptr, offset)
            else:
                sa = qa.to(tl.float32, bitcast=True)
                sb = qb.to(tl.float32, bitcast=True)
            if XS:
                j = (b - b_begin) * 128
                xs = tl.inline_asm_elementwise(
                    X_READ, "=l,=l,=l,=l,=l,=l,=l,=l,r,r,r", [xa_stage + j, xb_stage + j, g],
                    dtype=(tl.int64,) * 8, is_pure=False, pack=1)
            else:
                xs = _load_x_tiles(xa_ptrs, xb_ptrs, xa_ok, xb_ok, b, TILES)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _mma_block(
                (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7), sa, sb, wa, wb, xs, tw, TILES,
                MMA_ASM)
            slot = tl.where(slot == (STAGES - 1) * SLOT, 0, slot + SLOT)
    else:
        # Loads written one block ahead (block b + 1's while block b is decoded and multiplied; the
        # last block loads itself again as its "next": every address in bounds). ptxas still
        # issues them just before the copy into "current" at the end of the loop, which waits for
        # them: this path is not really ahead (ncu; the ring above is).
        sa, sb = _scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr, b_begin, ra, rb, N,
                         FORMAT, DQ_BLOCK)
        if ASM:
            wa = tl.load(wa_ptrs + 4 * b_begin)
            wb = tl.load(wb_ptrs + 4 * b_begin)
            xs = _load_x_tiles(xa_ptrs, xb_ptrs, xa_ok, xb_ok, b_begin, TILES)
        for b in range(b_begin, b_end):
            b_next = min(b + 1, b_end - 1)
            sa_next, sb_next = _scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                                       b_next, ra, rb, N, FORMAT, DQ_BLOCK)
            if ASM:
                wa_next = tl.load(wa_ptrs + 4 * b_next)
                wb_next = tl.load(wb_ptrs + 4 * b_next)
                xs_next = _load_x_tiles(xa_ptrs, xb_ptrs, xa_ok, xb_ok, b_next, TILES)
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _mma_block(
                    (acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7), sa, sb, wa, wb, xs, tw,
                    TILES, MMA_ASM)
                wa, wb, xs = wa_next, wb_next, xs_next
            else:
                d0 = _block_sum_plain(packed_ptr, code_ptr, x_ptr, ra, 2 * t, b, M, stride_pn, stride_xm)
                d1 = _block_sum_plain(packed_ptr, code_ptr, x_ptr, ra, 2 * t + 1, b, M, stride_pn, stride_xm)
                d2 = _block_sum_plain(packed_ptr, code_ptr, x_ptr, rb, 2 * t, b, M, stride_pn, stride_xm)
                d3 = _block_sum_plain(packed_ptr, code_ptr, x_ptr, rb, 2 * t + 1, b, M, stride_pn, stride_xm)
                if TILES == 2:
                    acc4 += sa * _block_sum_plain(packed_ptr, code_ptr, x_ptr, ra, 8 + 2 * t, b, M, stride_pn, stride_xm)
                    acc5 += sa * _block_sum_plain(packed_ptr, code_ptr, x_ptr, ra, 9 + 2 * t, b, M, stride_pn, stride_xm)
                    acc6 += sb * _block_sum_plain(packed_ptr, code_ptr, x_ptr, rb, 8 + 2 * t, b, M, stride_pn, stride_xm)
                    acc7 += sb * _block_sum_plain(packed_ptr, code_ptr, x_ptr, rb, 9 + 2 * t, b, M, stride_pn, stride_xm)
                acc0 += sa * d0
                acc1 += sa * d1
                acc2 += sb * d2
                acc3 += sb * d3
            sa, sb = sa_next, sb_next
    out = out_ptr + pid_s * stride_os
    _store(out, acc0, 2 * t, row, M, N, stride_om)  # D[g, 2t]: x row 2t, W row g
    _store(out, acc1, 2 * t + 1, row, M, N, stride_om)
    _store(out, acc2, 2 * t, row + 8, M, N, stride_om)
    _store(out, acc3, 2 * t + 1, row + 8, M, N, stride_om)
    if TILES == 2:
        _store(out, acc4, 8 + 2 * t, row, M, N, stride_om)
        _store(out, acc5, 9 + 2 * t, row, M, N, stride_om)
        _store(out, acc6, 8 + 2 * t, row + 8, M, N, stride_om)
        _store(out, acc7, 9 + 2 * t, row + 8, M, N, stride_om)
