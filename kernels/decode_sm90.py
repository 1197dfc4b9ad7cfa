"""Decoding on Hopper (sm_90): y = x @ W.T for ONE row of bf16 x and an NF4 weight, in Gluon.

A candidate of skinny_matmul's tuner at M = 1 (it runs where it times faster than the other
candidates). At M = 1 the matmul reads each packed byte once and does little with it, so the
kernel must keep HBM busy throughout. skinny_mma splits K over thousands of small programs with a
few cp.async copies in flight each, then adds the partial sums in a second kernel. This kernel:
  - is persistent: one program per SM (or two: PER_SM, below), each taking an equal contiguous
    share of the work;
  - streams W and its 8-bit absmax codes through a ring in shared memory (STAGES stages of one
    unit) filled by TMA from a loader warp that starts at once: W is never written by a kernel,
    so only x, y and the hand-over wait for the kernel before (programmatic dependent launch);
  - brings x by TMA too, 32 blocks (4 KB) to a barrier, those of the first unit first: the loop
    starts once its first unit's x has come, not all of x (22 KB at K = 11008);
  - overlaps consecutive calls: two programs fit on an SM (MAXNREG registers per thread at
    launch, 3 stages; K up to about 12288), and a program's loader lets the next kernel start
    (griddepcontrol.launch_dependents) when it has LAUNCH_AHEAD units left to bring, so the next
    call's programs take the SMs' second slots, fill their tables and bring their first units
    while this call ends, and start their loop as soon as it has ended;
  - needs no second kernel: a row tile split between programs is finished by the first of them
    with the others' partial sums (below).

Math (skinny_mma's, the same numbers): per row n and NF4 block b (64 weights),
    d[n, b] = sum_{k in b} bf16(code[q[n, k]]) * x[k]     (mma.sync, float32)
    y[n] = bf16( sum_b absmax[b, n] * d[n, b] )             (float32)
with absmax = code8[q8] * absmax2 + offset (double quantization).

Work: a unit is 16 rows x UNIT_BLOCKS NF4 blocks (UNIT_BLOCKS * 32 bytes per row); units are
numbered row tile by row tile (row tile rt: rows 16 rt .. 16 rt + 15, its KU units along K, the
last one may run past K: TMA reads zeros there, those blocks get absmax 0 and the consumers skip
its 8-block groups that lie wholly past K), and program c of G takes a contiguous share of
TOT // G units, one more for the first TOT % G programs (the hardware starts programs in order,
so the first ones start earliest: BENCHMARKS.md, thirteenth session). Per stage the loader brings
one unit: UNIT_BLOCKS / 4 TMA boxes of W (16 rows x 128 bytes each, 128-byte swizzle) and one box
of the absmax codes.

The 8 consumer warps each take UNIT_BLOCKS / 8 blocks of a unit, one mma block at a time as
skinny_mma does (its mma_asm: the shared-memory decoding table, 4 mma.sync m16n8k16): thread (warp
w, lane 4 g + t) reads 8 bytes (bytes 8t .. 8t + 7 of the block's 32) of rows 2 g and 2 g + 1 of
the row tile, the mma's rows g and g + 8 (rows 2 g + r, not g + 8 r, so that the 8-byte loads have
no bank conflicts: W_VIEW). x is the mma's B, 8 columns, and column n holds the x of the unit's
block n // 2 (lanes g = n load it, x[64 b + 16 t .. + 16], once per unit instead of once per
block): the mma of the unit's block h is right in columns 2 h and 2 h + 1 only, which lane t = h
holds. Lane t scales block h = t of the unit (one code and absmax per row and unit, not per block)
and adds only that block's sums: the 4 lanes of a row are added at the row tile's end. A whole
unit's W words go into registers (16 per thread) before any is decoded, and the stage goes back to
the loader then, not after the decoding: the ring holds a unit more in flight. All consumer tensors
are (8, 8, 4) = (warp, g, t), one element per thread (THREAD): which thread holds what is the mma's
fragment layout, written as linear layouts, and the W bytes are read through a view of the ring
stage (W_VIEW) that undoes TMA's swizzle. Before the loop each program puts into shared memory the
decoding table and code8 (static arrays declared in inline PTX, so that inline PTX can index them),
the absmax2 of its units' blocks (one per block and row tile), all weight constants, read before
the kernel before has ended. x comes from the loader after its PDL wait (x_ready[c]: the x of the
units c of a row tile; the consumers wait for it before a unit's first mma).

End of a row tile: each warp writes its 16 sums to a shared buffer (two, alternating) and the
consumers arrive on done[buf]; the epilogue warp adds the 8 warps' sums in a fixed order and
  - writes y (bf16) if this program holds the whole row tile;
  - if the tile began in the program before (this program's first tile, begun mid-tile):
    publishes the float32 sums to scratch[c] and counts 16 releases on flags[c];
  - if the tile goes on in the next programs (its last tile): waits for their flags (acquire),
    adds their sums in program order (deterministic), writes y and resets the flags. The next
    program's sums are waited for before this program's own are done: it published them when it
    began, and the flag's round trips to L2 then overlap this program's last units.
A program only waits for programs after it, which publish before they wait for anything, and every
program of a call gets a place on an SM without waiting on the call (at most two per SM, each SM
has room for two, and the kernel before, all of whose programs had started before this one could,
frees its places without waiting on this one; the kernel after starts only once every program of
this one has let it): no deadlock. The flags are zero between calls (each call resets what it set),
so one scratch pair per device serves every call on one stream (the stream orders the calls; two
streams must not run it at once).

Programs per SM (skinny_matmul's tuner times both, PER_SM): one, so that the next call's programs
take the SMs' second places and overlap this call's end; or two of this call, twice the warps to
hide the loop's latencies, without that overlap. On an H200 two were 7% faster at 11008x4096
(9.2 against 9.9 us from HBM) and slower at 4096x4096 and 4096x11008; on an H100 slower at all
three (BENCHMARKS.md, thirty-eighth and fortieth sessions).

Measured (BENCHMARKS.md, twelfth to fifteenth sessions): 3-9% faster than the tuned skinny_mma
on the H100 at the three LLaMA shapes from HBM, then 0-3% more (7-8% with W in L2) from the
per-lane scales, the skipped groups past K and the longer shares first, then 1.5-17% more from
the overlap of consecutive calls (a timeline had shown programs starting over about 4 us as the
previous call's programs ended, their first loads behind the HBM stream), then 4-16% more from a
table fill without bank conflicts (the next call's fill had slowed this call's loop by 10%) and
the hand-over's wait moved ahead, then 0-5% from the absmax offset read before the PDL wait,
then (twentieth session) 3-4% at the two large shapes from the stage given back before decoding,
and 1.5-6% at the two large shapes from x by TMA (the loop had waited for all of x), then
(twenty-sixth session) 2-3% at 4096x4096 from one unit fewer before the PDL wait in short
shares, then (thirty-eighth session) 5-7% from x read once per unit instead of once per block,
and 2.5-4% more from the rows that free W's loads of bank conflicts. TMA alone streams the bytes
in 9.5 us.

Restrictions (decode_ok): an sm_90 GPU with Gluon; bf16 x of one row, contiguous; NF4 with double
quantization, blocks of 64, K a multiple of 64 (no padding); N a multiple of 16; x, the packed
bytes and the scales 16-byte aligned (TMA). skinny_matmul's other kernels run otherwise.

Memory layout: x (1, K) bf16; packed (N, K/2) uint8, two codes per byte (column 2j high nibble);
scales (K/64, N) uint8 codes, absmax2 (K N / 256 / DQ) float32, code8 (256), offset (1); y (1, N).
"""

import functools

import torch
import triton

from ._gluon import HAVE_GLUON, TensorDescriptor, gl, gluon, mbarrier, tma
from ._launch import FP_FUSION, check_activation, pdl_ok, sm_count, weight_args
from . import skinny_mma

UNIT_BLOCKS = 32      # NF4 blocks per row in a unit (8 warps x 4 blocks, 4 lanes t): 1 KB per row
STAGES = 3            # ring depth: 3 x 16 KB of W in flight per program (two programs fit an SM)
MAXNREG = 80          # registers per thread at launch (12 warps): two programs fit an SM
LAUNCH_AHEAD = 4      # units a program has left to bring when it lets the next kernel start
PER_SM = (1, 2)       # programs per SM that launch may run (two fit: MAXNREG, the ring)
ROWS = 16             # rows per unit (the mma's M)
BOX = 128             # bytes per row of a TMA box (the 128-byte swizzle's span)
WARPS = 8
# W_VIEW's basis (below; tests/test_kernels.py checks it against the map it inverts)
W_VIEW_BASES = [[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 2, 1], [1, 1, 0, 0],
                [2, 2, 0, 0], [0, 4, 0, 0], [4, 0, 0, 0]]

if HAVE_GLUON:
    _LANES = [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]]  # lane = 4 g + t
    _WARPS = [[1, 0, 0], [2, 0, 0], [4, 0, 0]]
    # (warp w, g, t): one element per thread, the thread with lane 4 g + t of warp w
    THREAD = gl.constexpr(gl.DistributedLinearLayout([], _LANES, _WARPS, [], [8, 8, 4]))
    # (w, g, t, r): row 2 g + r; the two 8-byte words of a thread
    W_REGS = gl.constexpr(gl.DistributedLinearLayout(
        [[0, 0, 0, 1]], [b + [0] for b in _LANES], [b + [0] for b in _WARPS], [], [8, 8, 4, 2]))
    # Two TMA boxes (16 rows x 128 bytes, 128-byte swizzle: the 16-byte chunk j of row r sits at
    # chunk j ^ (r % 8)) seen as 8-byte words: element (w, g, t, r) is bytes 32 (w % 4) + 8 t
    # .. + 8 of row p = 2 g + r of box w // 4, at word 256 (w // 4) + 16 p +
    # 2 ((2 (w % 4) + t // 2) ^ (p % 8)) + t % 2. Linear over GF(2); its inverse, per bit of the
    # word offset (what SharedLinearLayout takes). Why rows 2 g + r, not g + 8 r: an 8-byte load
    # serves 16 lanes (g = 0..3, or 4..7) per pass; rows 0, 2, 4, 6 put a warp's two chunks of a
    # row at 8 different chunks, rows 0..3 at 4 (a 2-way bank conflict, which ncu showed).
    W_VIEW = gl.constexpr(gl.SharedLinearLayout(W_VIEW_BASES))
    # (w, h, b, t): lane 4 g + t with g = 2 h + b; b = lane bit 2 (the two lanes of a pair
    # share h). x's words are loaded in its slice without b, one 8-byte word per thread.
    X_PAIRS = gl.constexpr(gl.DistributedLinearLayout(
        [], [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 1, 0, 0], [0, 2, 0, 0]],
        [[1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]], [], [8, 4, 2, 4]))
    # (w, h, t, 1): how a word of x is read, one per lane pair (the slice of X_PAIRS, plus i)
    X_LOAD = gl.constexpr(gl.DistributedLinearLayout(
        [], [[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]],
        [[1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]], [], [8, 4, 4, 1]))
    PLAIN1 = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [0]))
    PLAIN2 = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    PLAIN3 = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
    PLAIN4 = gl.constexpr(gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
    AHEAD = gl.constexpr(LAUNCH_AHEAD)
    MMA_ASM = gl.constexpr(skinny_mma.mma_asm(1, True))
    MMA_CONSTRAINTS = gl.constexpr(",".join(["=f"] * 4 + ["l"] * 6 + ["r"] * 9))
    LUT_DECLARE = gl.constexpr(skinny_mma.LUT_DECLARE.value)
    C8_DECLARE = gl.constexpr(".shared .align 16 .b32 dec_code8[256];\nmov.u32 $0, dec_code8;")
    GDC_WAIT = gl.constexpr("griddepcontrol.wait;\nmov.u32 $0, 0;")
    GDC_LAUNCH = gl.constexpr("griddepcontrol.wait;\ngriddepcontrol.launch_dependents;\nmov.u32 $0, 0;")

    @gluon.jit
    def _thread_index(dim: gl.constexpr):
        """Index along dim of the (8, 8, 4) THREAD tensors, broadcast to the full shape."""
        if dim == 0:
            i = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, THREAD)))
            i = gl.expand_dims(gl.expand_dims(i, 1), 2)
        elif dim == 1:
            i = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, THREAD)))
            i = gl.expand_dims(gl.expand_dims(i, 0), 2)
        else:
            i = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, THREAD)))
            i = gl.expand_dims(gl.expand_dims(i, 0), 1)
        return i + gl.zeros([8, 8, 4], gl.int32, THREAD)

    @gluon.jit
    def _pdl_wait(tid):
        """Wait for the kernel before this one: it has ended and its writes are visible."""
        gl.inline_asm_elementwise(GDC_WAIT, "=r,r", [tid], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _pdl_launch(tid):
        """The same wait, then let the next kernel start: its programs take the SMs' second
        slots and bring their first units while this kernel ends."""
        gl.inline_asm_elementwise(GDC_LAUNCH, "=r,r", [tid], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _st_shared(addr, value):
        gl.inline_asm_elementwise("st.shared.b32 [$1], $2;\nmov.u32 $0, 0;", "=r,r,r", [addr, value],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _ld_shared_f32(addr):
        return gl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [addr], dtype=gl.float32,
                                         is_pure=False, pack=1)

    @gluon.jit
    def _share_start(c, TOT, G):
        """Program c's first unit: TOT // G units each, one more for the first TOT % G programs
        (they start first: the hardware launches programs in order)."""
        return c * (TOT // G) + gl.minimum(c, TOT % G)

    @gluon.jit
    def _spread(v, dim: gl.constexpr):
        """A THREAD tensor without dimension dim (g: x, the same for every row; t: the scale
        codes, the same for every lane of a row) -> the (8, 8, 4) THREAD tensor."""
        return gl.expand_dims(v, dim) + gl.zeros([8, 8, 4], v.dtype, THREAD)

    @gluon.jit
    def _w_words(w_ring, s, h: gl.constexpr, BPW: gl.constexpr):
        """This thread's W words of block 8 cb + w of the row (boxes 2 h, 2 h + 1 of stage s):
        bytes 8 t .. 8 t + 7 of rows 2 g (wa) and 2 g + 1 (wb)."""
        # the ring seen as pairs of boxes (32 rows; the swizzle repeats every 8 rows, so the
        # bytes are where they were), then the pair h of stage s as W_VIEW's words (a view of
        # two boxes taken from one box's view reads past it: Triton 3.9 refuses that)
        pairs = w_ring.reinterpret(gl.uint8, [w_ring.shape[0] // 2, 32, 128], w_ring.layout)
        wv = pairs.index(s * BPW + h).reinterpret(gl.int64, [8, 8, 4, 2], W_VIEW)
        wa, wb = gl.split(wv.load(W_REGS))
        wa = gl.convert_layout(wa, THREAD, assert_trivial=True)
        wb = gl.convert_layout(wb, THREAD, assert_trivial=True)
        return wa, wb

    @gluon.jit
    def _x_word(xu, i: gl.constexpr):
        """Word i of the x that lane (g, t) of warp w gives the mma, x[64 (8 (4 c + g // 2) + w) +
        16 t + 4 i .. + 4]: of the warp's block h = g // 2 of unit c (xu = xs[c]: (h, w, t, i)), as
        the (8, 8, 4) THREAD tensor. Lanes g = 2 h and 2 h + 1 read the same words."""
        v = gl.reshape(xu.slice(i, 1, dim=3).permute([1, 0, 2, 3]).load(X_LOAD), [8, 4, 4])
        v = gl.convert_layout(v, gl.SliceLayout(2, X_PAIRS), assert_trivial=True)   # (w, h, t)
        v = gl.expand_dims(v, 2)
        v = v + gl.zeros([8, 4, 2, 4], v.dtype, X_PAIRS)                      # (w, h, b, t)
        return gl.convert_layout(gl.reshape(v, [8, 8, 4]), THREAD, assert_trivial=True)

    @gluon.jit
    def _add_block(acc_a, acc_b, wa, wb, x0, x1, x2, x3, h: gl.constexpr, sa, sb, t3, tw):
        """The warp's block h of unit c (block 8 (4 c + h) + w of the row): skinny_mma's decode and
        4 mma.sync, B from every lane's x words (_x_word). Column n of B is then the x of the
        warp's block n // 2, and column n of the result (lanes t = n // 2) block h's weights times
        it: right where n // 2 = h, in lane t = h, which so holds block h's sums of the mma's rows
        g (d0) and g + 8 (d2), the tile's rows 2 g and 2 g + 1, and scales and adds them. The
        other lanes' columns pair block h's weights with another block's x."""
        d0, d1, d2, d3 = gl.inline_asm_elementwise(
            MMA_ASM, MMA_CONSTRAINTS, [wa, wb, x0, x1, x2, x3, tw, tw, tw, tw, tw, tw, tw, tw, tw],
            dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)
        # (a select, not a product with 0: another block's sums may be infinite where block h's
        # are not, and 0 * inf would make this row's sum NaN)
        return gl.where(t3 == h, acc_a + sa * d0, acc_a), gl.where(t3 == h, acc_b + sb * d2, acc_b)

    @gluon.jit
    def _consumers(w_ring, s_ring, a2s, x_ring, red, ready, empty, done, free, x_ready, code_ptr,
                   code8_ptr, absmax2_ptr, offset_ptr, N, K, u0, u1, KU, KUC: gl.constexpr,
                   DQ_BLOCK: gl.constexpr, STAGES: gl.constexpr, UNIT_BLOCKS: gl.constexpr):
        """The 8 consumer warps: block sums on the tensor cores, scaled and added per row."""
        w3 = _thread_index(0)
        g3 = _thread_index(1)
        t3 = _thread_index(2)
        tid = w3 * 32 + g3 * 4 + t3
        # the decoding table (skinny_mma): word 32 e + lane = the bf16 pair of byte value e
        # (thread e loads it once and stores its 32 copies); code8 beside it (C8_DECLARE)
        lut = gl.inline_asm_elementwise(LUT_DECLARE, "=r,r", [tid], dtype=gl.int32, is_pure=True, pack=1)
        c8 = gl.inline_asm_elementwise(C8_DECLARE, "=r,r", [tid], dtype=gl.int32, is_pure=True, pack=1)
        # (code_with_tables: 16 code values, 12 byte-permute words, then the 256 pairs)
        pair = gl.load(code_ptr.to(gl.pointer_type(gl.int32)) + 28 + tid)
        offset = gl.load(offset_ptr)   # (a weight constant: read here, not on the loop's first unit)
        _st_shared(c8 + 4 * tid, gl.load(code8_ptr.to(gl.pointer_type(gl.int32)) + tid))
        # absmax2 of each block of this program's units (rows 16 rt .. 16 rt + 15 of block b
        # share one, DQ_BLOCK % 16 == 0): row BPW j + h of a2s, element w (zero past K)
        BPW: gl.constexpr = UNIT_BLOCKS // 8   # blocks per warp and unit: 4, one per lane t
        gl.static_assert(BPW == 4, "each lane t of a row scales one block h = t of a unit")
        AL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [8, 1], [1, 0])
        jh = gl.arange(0, a2s.shape[0], layout=gl.SliceLayout(1, AL))[:, None]
        aw = gl.arange(0, 8, layout=gl.SliceLayout(0, AL))[None, :]
        su = u0 + jh // BPW
        blk = (BPW * (su % KU) + jh % BPW) * 8 + aw
        aok = (su < u1) & (blk < K // 64)
        g2 = gl.load(absmax2_ptr + (blk * N + (su // KU) * 16) // DQ_BLOCK, mask=aok, other=0.0)
        a2s.reinterpret(gl.float32, a2s.shape, PLAIN2).store(g2)
        # thread e stores the 32 copies of its entry starting at copy (its lane): word 32 e + l is
        # in bank l, so the 32 lanes of a store hit 32 banks (copy l by every lane at once was a
        # 32-way conflict, 8192 wavefronts that slowed the call before on the same SM: BENCHMARKS.md)
        for l in gl.static_range(32):
            _st_shared(lut + 4 * (32 * tid + (tid + l) % 32), pair)
        gl.barrier()   # (the tables, for every consumer warp)
        # x, as the loader brings it (x_ready[c]: the 32 blocks of units c of a row tile), seen as
        # 8-byte words: xs[c, h, w, t, i] = x[64 (8 (BPW c + h) + w) + 16 t + 4 i .. + 4] (plain,
        # row-major)
        xs = x_ring.reinterpret(gl.int64, [KUC, BPW, 8, 4, 4], PLAIN4)

        tw = (g3 * 4 + t3) * 4  # this lane's column of the table
        acc_a = gl.zeros([8, 8, 4], gl.float32, THREAD)   # row 2 g: lane t adds the blocks h = t
        acc_b = gl.zeros([8, 8, 4], gl.float32, THREAD)   # row 2 g + 1
        piece = 0
        # c: the unit's place in its row tile, counted on (a division by the runtime KU per
        # unit sat on every unit's critical path: BENCHMARKS.md, nineteenth session)
        c = u0 % KU - 1
        for j in range(u1 - u0):
            c = gl.where(c == KU - 1, 0, c + 1)
            s = j % STAGES
            mbarrier.wait(ready.index(s), (j // STAGES) & 1)
            # absmax = code8[q] * absmax2 + offset of block h = t (lane t), rows 2 g and 2 g + 1;
            # zero past K (TMA filled those codes with 0)
            q = s_ring.index(s).reinterpret(gl.uint8, [BPW, 8, 8, 2], PLAIN4)   # (h, w, g, r)
            q = q.permute([1, 2, 0, 3])
            qa, qb = gl.split(q.load(W_REGS))
            qa = gl.convert_layout(qa, THREAD, assert_trivial=True).to(gl.int32)
            qb = gl.convert_layout(qb, THREAD, assert_trivial=True).to(gl.int32)
            a2 = a2s.reinterpret(gl.float32, [a2s.shape[0] // BPW, BPW, 8], PLAIN2).index(j)
            a2 = _spread(a2.permute([1, 0]).load(gl.SliceLayout(1, THREAD)), 1)
            ok = 8 * (BPW * c + t3) + w3 < K // 64
            sa = gl.where(ok, _ld_shared_f32(c8 + 4 * qa) * a2 + offset, 0.0)
            sb = gl.where(ok, _ld_shared_f32(c8 + 4 * qb) * a2 + offset, 0.0)
            if UNIT_BLOCKS * (c + 1) <= K // 64:  # the whole unit lies before K
                # its W words into registers first, and the stage back to the loader at once:
                # the loader brings a unit more while this one is decoded (BENCHMARKS.md,
                # twentieth session: 3-4% faster at the two large shapes from HBM)
                wa0, wb0 = _w_words(w_ring, s, 0, BPW)
                wa1, wb1 = _w_words(w_ring, s, 1, BPW)
                wa2, wb2 = _w_words(w_ring, s, 2, BPW)
                wa3, wb3 = _w_words(w_ring, s, 3, BPW)
                mbarrier.arrive(empty.index(s))
                mbarrier.wait(x_ready.index(c), 0)
                xu = xs.index(c)
                x0, x1, x2, x3 = _x_word(xu, 0), _x_word(xu, 1), _x_word(xu, 2), _x_word(xu, 3)
                acc_a, acc_b = _add_block(acc_a, acc_b, wa0, wb0, x0, x1, x2, x3, 0, sa, sb, t3, tw)
                acc_a, acc_b = _add_block(acc_a, acc_b, wa1, wb1, x0, x1, x2, x3, 1, sa, sb, t3, tw)
                acc_a, acc_b = _add_block(acc_a, acc_b, wa2, wb2, x0, x1, x2, x3, 2, sa, sb, t3, tw)
                acc_a, acc_b = _add_block(acc_a, acc_b, wa3, wb3, x0, x1, x2, x3, 3, sa, sb, t3, tw)
            else:  # a row's last unit, in part past K: its blocks past K are skipped
                mbarrier.wait(x_ready.index(c), 0)
                xu = xs.index(c)   # (TMA filled x past K with zeros)
                x0, x1, x2, x3 = _x_word(xu, 0), _x_word(xu, 1), _x_word(xu, 2), _x_word(xu, 3)
                for h in gl.static_range(BPW):
                    if 8 * (BPW * c + h) < K // 64:
                        wa, wb = _w_words(w_ring, s, h, BPW)
                        acc_a, acc_b = _add_block(acc_a, acc_b, wa, wb, x0, x1, x2, x3, h, sa, sb,
                                                  t3, tw)
                mbarrier.arrive(empty.index(s))
            if (c == KU - 1) | (j == u1 - u0 - 1):
                # the row tile's sums (this program's part) to the epilogue warp: the 4 lanes t
                # of a row hold its blocks h = t
                buf = piece % 2
                mbarrier.wait(free.index(buf), ((piece // 2) & 1) ^ 1, pred=piece >= 2)
                # (red's place i holds row 2 (i % 8) + i // 8 of the tile: the epilogue's store)
                red.index(buf).slice(0, 8, dim=1).store(gl.sum(acc_a, axis=2))
                red.index(buf).slice(8, 8, dim=1).store(gl.sum(acc_b, axis=2))
                mbarrier.arrive(done.index(buf))
                acc_a = gl.zeros([8, 8, 4], gl.float32, THREAD)
                acc_b = gl.zeros([8, 8, 4], gl.float32, THREAD)
                piece += 1

    @gluon.jit
    def _loader(p_desc, s_desc, x_desc, w_ring, s_ring, x_ring, ready, empty, x_ready, u0, u1, KU,
                PDL: gl.constexpr, STAGES: gl.constexpr, UNIT_BLOCKS: gl.constexpr):
        """The loader warp: unit u0 + j into stage j % STAGES once the consumers freed it. Once
        its first STAGES units are on their way (STAGES - 1 in a share of at most STAGES + 1
        units), x (after the PDL wait: the kernel before wrote it), 32 blocks a barrier, those
        of the first unit first. With LAUNCH_AHEAD units left to bring (not before its first
        STAGES), it lets the next kernel start (once the one before has ended)."""
        n = u1 - u0
        launch_at = gl.minimum(gl.maximum(n - AHEAD, STAGES - 1), n - 1)
        # What a program brings before its PDL wait, all programs at once, is one burst that
        # queues in front of the loads the call before still makes after its own wait, and every
        # call waits for the one before to end. In a short share (4096x4096: 3.9 units) that
        # burst is most of the call's bytes: one unit fewer there makes the call 2-3% faster; in
        # long shares it would starve the loop after the wait (BENCHMARKS.md, twenty-sixth session)
        x_at = gl.minimum(STAGES - (n <= STAGES + 1).to(gl.int32), n) - 1
        lanes = gl.zeros([32], gl.int32, gl.BlockedLayout([1], [32], [1], [0]))  # (for inline PTX)
        BOXES: gl.constexpr = UNIT_BLOCKS // 4
        STAGE_BYTES: gl.constexpr = BOXES * p_desc.block_type.nbytes + s_desc.block_type.nbytes
        for j in range(n):
            u = u0 + j
            rt = u // KU
            c = u % KU
            s = j % STAGES
            mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
            bar = ready.index(s)
            mbarrier.expect(bar, STAGE_BYTES)
            for bx in gl.static_range(BOXES):
                tma.async_load(p_desc, [rt * 16, (c * BOXES + bx) * 128], bar,
                               w_ring.index(s * BOXES + bx))
            tma.async_load(s_desc, [c * UNIT_BLOCKS, rt * 16], bar, s_ring.index(s))
            if j == x_at:
                if PDL:
                    _pdl_wait(lanes + u)
                for i in range(gl.minimum(KU, n)):   # the chunks of x this program's units use
                    cx = (u0 + i) % KU
                    mbarrier.expect(x_ready.index(cx), x_desc.block_type.nbytes)
                    tma.async_load(x_desc, [cx * UNIT_BLOCKS, 0], x_ready.index(cx),
                                   x_ring.index(cx))
            if PDL:
                if j == launch_at:
                    _pdl_launch(lanes + u)

    @gluon.jit
    def _take_sums(scratch_ptr, flags_ptr, c2, rows):
        """Program c2's 16 published sums: wait until its 16 releases are counted (acquire),
        read them and reset its flag (the flags are zero between calls)."""
        n = gl.atomic_add(flags_ptr + c2 + rows * 0, rows * 0, sem="acquire", scope="gpu")
        while gl.min(n, 0) < 16:
            n = gl.atomic_add(flags_ptr + c2 + rows * 0, rows * 0, sem="acquire", scope="gpu")
        sums = gl.load(scratch_ptr + c2 * 16 + rows)
        gl.atomic_xchg(flags_ptr + c2 + rows * 0, rows * 0, sem="relaxed", scope="gpu")
        return sums

    @gluon.jit
    def _epilogue(red, done, free, y_ptr, scratch_ptr, flags_ptr, c, G, TOT, u0, u1, KU,
                  PDL: gl.constexpr):
        """The epilogue warp: each row tile's 8 warp sums, added, to y or to the hand-over."""
        EL: gl.constexpr = gl.BlockedLayout([8, 1], [1, 32], [1, 1], [0, 1])
        rows = gl.arange(0, 16, layout=gl.SliceLayout(0, EL))
        if PDL:
            _pdl_wait(rows)
        rt0 = u0 // KU
        for p in range((u1 - 1) // KU - rt0 + 1):
            rt = rt0 + p
            buf = p % 2
            tile_end = (rt + 1) * KU
            # a tile that goes on in the next program (this program's last): take that program's
            # sums first, before this program's own are done. It published them when it began, so
            # the flag's round trips overlap this program's last units instead of following them.
            c2 = c + 1
            ahead = gl.zeros([16], gl.float32, gl.SliceLayout(0, EL))
            if (rt * KU >= u0) & (c2 < G):
                if _share_start(c2, TOT, G) < tile_end:
                    ahead = _take_sums(scratch_ptr, flags_ptr, c2, rows)
                    c2 += 1
            mbarrier.wait(done.index(buf), (p // 2) & 1)
            part = gl.sum(red.index(buf).load(EL), axis=0)
            mbarrier.arrive(free.index(buf))
            if rt * KU < u0:  # begun by the program before: hand the sums over
                gl.store(scratch_ptr + c * 16 + rows, part)
                gl.atomic_add(flags_ptr + c + rows * 0, rows * 0 + 1, sem="release", scope="gpu")
            else:
                total = part
                if c2 > c + 1:
                    total += ahead
                # the other programs whose share starts inside this tile, in order
                while (c2 < G) & (_share_start(c2, TOT, G) < tile_end):
                    total += _take_sums(scratch_ptr, flags_ptr, c2, rows)
                    c2 += 1
                # (place i of the sums is row 2 (i % 8) + i // 8: W_VIEW)
                y_rows = rt * 16 + 2 * (rows % 8) + rows // 8
                gl.store(y_ptr + y_rows, total.to(y_ptr.dtype.element_ty))

    @gluon.jit
    def decode_sm90_kernel(p_desc, s_desc, x_desc, code_ptr, code8_ptr, absmax2_ptr, offset_ptr, y_ptr,
                           scratch_ptr, flags_ptr, N, K, KU, TOT,
                           DQ_BLOCK: gl.constexpr, STAGES: gl.constexpr, UNIT_BLOCKS: gl.constexpr,
                           KUC: gl.constexpr, UMAX: gl.constexpr, PDL: gl.constexpr,
                           num_warps: gl.constexpr):
        c = gl.program_id(0)
        G = gl.num_programs(0)
        u0 = _share_start(c, TOT, G)
        u1 = _share_start(c + 1, TOT, G)
        BOXES: gl.constexpr = UNIT_BLOCKS // 4
        w_ring = gl.allocate_shared_memory(gl.uint8, [STAGES * BOXES, 16, 128], p_desc.layout)
        s_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, UNIT_BLOCKS, 16], s_desc.layout)
        a2s = gl.allocate_shared_memory(gl.float32, [UMAX * (UNIT_BLOCKS // 8), 8], PLAIN1)
        # x, KUC = KU chunks of UNIT_BLOCKS blocks (a constexpr: it sizes the buffer)
        x_ring = gl.allocate_shared_memory(gl.bfloat16, [KUC, UNIT_BLOCKS, 64], x_desc.layout)
        red = gl.allocate_shared_memory(gl.float32, [2, 8, 16], PLAIN2)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        x_ready = gl.allocate_shared_memory(gl.int64, [KUC, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(done.index(i), count=1)
            mbarrier.init(free.index(i), count=1)
        for i in gl.static_range(KUC):
            mbarrier.init(x_ready.index(i), count=1)
        gl.warp_specialize([
            (_consumers, (w_ring, s_ring, a2s, x_ring, red, ready, empty, done, free, x_ready, code_ptr,
                          code8_ptr, absmax2_ptr, offset_ptr, N, K, u0, u1, KU, KUC, DQ_BLOCK, STAGES,
                          UNIT_BLOCKS)),
            (_loader, (p_desc, s_desc, x_desc, w_ring, s_ring, x_ring, ready, empty, x_ready, u0, u1, KU,
                       PDL, STAGES, UNIT_BLOCKS)),
            (_epilogue, (red, done, free, y_ptr, scratch_ptr, flags_ptr, c, G, TOT, u0, u1, KU, PDL)),
        ], [1, 1], [40, 64])


def decode_ok(x: torch.Tensor, w) -> bool:
    """Whether decode_sm90 can take this call (the module docstring's restrictions)."""
    return (HAVE_GLUON and x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)
            and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1
            and x.data_ptr() % 16 == 0
            and w.quant_type == "nf4" and w.double_quant and w.block_size == 64
            and w.in_features % 64 == 0 and w.packed.shape[1] * 2 == w.in_features
            and w.out_features % ROWS == 0 and getattr(w, "dq_block_size", 256) % 16 == 0
            and w.packed.is_cuda and w.packed.data_ptr() % 16 == 0 and w.scales.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _handover(device: torch.device):
    """The hand-over buffers of a device: float32 sums (16 per program) and flags (zero between
    calls), for up to max(PER_SM) programs per SM."""
    programs = max(PER_SM) * sm_count(device)
    return (torch.zeros(programs * 16, dtype=torch.float32, device=device),
            torch.zeros(programs, dtype=torch.int32, device=device))


def decode_sm90(x: torch.Tensor, w, stages: int = STAGES, programs: int = None) -> torch.Tensor:
    """y = x @ W.T for one row of bf16 x (1, in_features) and an NF4 weight (decode_ok).
    programs: at most this many (default: one per SM; at most max(PER_SM) per SM)."""
    _fmt, tensors, _kp, _qb, dq_block = weight_args(w)
    check_activation(x, w.in_features, w.packed.device, "x")
    if not decode_ok(x, w):
        raise ValueError("decode_sm90 needs an sm_90 GPU, one contiguous bf16 row of x and an NF4 "
                         "weight with double quantization, blocks of 64, no padding and "
                         "out_features a multiple of 16 (decode_ok)")
    return launch(x, tensors, w.out_features, w.in_features, dq_block, stages, programs)


def descriptors(x, packed, scales, n: int, k: int):
    """The TMA descriptors of what the loader brings: W's packed bytes (boxes of 16 rows x 128
    bytes, 128-byte swizzle), their 8-bit scale codes (a unit's UNIT_BLOCKS x 16) and x (chunks
    of UNIT_BLOCKS blocks)."""
    swz = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    p_desc = TensorDescriptor(packed, [n, k // 2], [k // 2, 1], [ROWS, BOX], swz)
    plain = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    s_desc = TensorDescriptor(scales, [k // 64, n], [n, 1], [UNIT_BLOCKS, ROWS], plain)
    plain16 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
    x_desc = TensorDescriptor(x.view(k // 64, 64), [k // 64, 64], [64, 1], [UNIT_BLOCKS, 64], plain16)
    return p_desc, s_desc, x_desc


def units(n: int, k: int):
    """(KU, TOT): units per row tile (the last may run past K) and in all."""
    ku = triton.cdiv(k // 64, UNIT_BLOCKS)
    return ku, n // ROWS * ku


def launch(x, tensors, n: int, k: int, dq_block: int, stages: int = STAGES,
           programs: int = None) -> torch.Tensor:
    """The launch, for arguments already checked (weight_args' tensors, decode_ok): skinny_matmul's
    tuner calls it with copies of the weight's tensors."""
    if stages * UNIT_BLOCKS * ROWS * 33 <= 48 * 1024:
        # (the ring in dynamic shared memory must pass 48 KB: only then does Triton let the
        # kernel use more, which the 32 KB static table needs on top of it)
        raise ValueError("decode_sm90 needs a ring of more than 48 KB (stages >= 3: 16.5 KB each)")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    scratch, flags = _handover(x.device)
    programs = min(programs or sm_count(x.device), flags.numel())
    grid, args, options = kernel_call(x, tensors, y, scratch, flags, n, k, dq_block, stages, programs,
                                      pdl_ok(x.device))
    decode_sm90_kernel[grid](*args, **options)
    return y


def kernel_call(x, tensors, y, scratch, flags, n: int, k: int, dq_block: int, stages: int,
                programs: int, pdl: bool):
    """decode_sm90_kernel's grid, arguments and options for one call: launch runs them, and
    tests/gpu_compile.py compiles them without a GPU (with CPU stand-ins for y and the hand-over
    buffers). programs: at most this many (one or two per SM in launch)."""
    packed, scales, _zeros, absmax2, code, code8, offset = tensors
    ku, tot = units(n, k)
    g = min(programs, tot)
    args = (*descriptors(x, packed, scales, n, k), code, code8, absmax2, offset, y, scratch, flags,
            n, k, ku, tot)
    options = dict(DQ_BLOCK=dq_block, STAGES=stages, UNIT_BLOCKS=UNIT_BLOCKS, KUC=ku,
                   UMAX=triton.next_power_of_2(triton.cdiv(tot, g)), PDL=int(pdl), num_warps=WARPS,
                   maxnreg=MAXNREG, **({"launch_pdl": True} if pdl else {}), **FP_FUSION)
    return (g,), args, options
