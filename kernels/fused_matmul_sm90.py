"""Fused NF4 dequantize-matmul for Hopper (sm_90), training shapes: y = x @ W.T, written in Gluon.

Gluon (triton.experimental.gluon) is Triton with the layouts, shared memory, barriers and the
tensor-core instruction (wgmma) spelled out by the kernel instead of chosen by the compiler.
This kernel needs that control; kernels/fused_matmul.py is the same computation in plain Triton
(any GPU, and the CPU interpreter), and this file says what it does differently and why.

Math (as fused_matmul's LOOKUP = 3): y[m, n] = sum_k x[m, k] * W[n, k] with
W[n, k] = bf16(bf16(code[q]) * bf16(absmax)), products accumulated in float32 by the tensor
cores, y rounded to bf16. Computed transposed, y.T tile = W tile @ x tile.T, so that the weight
rows are the instruction's M (64 per warp group) and the tokens its N (up to 256).

A persistent grid: one program per SM, each taking the tiles t = pid, pid + G, ... (G programs)
of BLOCK_N = 128 weight rows x BLOCK_M = 256 tokens, in turn. Per program: 8 decoding warps = 2
warp groups, group g owns weight rows 64 g .. 64 g + 63 of the tile, one loader warp, one scale
warp and one store warp (Gluon's warp_specialize runs each on its own function; 12 warps
launch, warp groups being whole). The K loop steps by BLOCK_K = 64 = one NF4 block (one scale
per row per step). A ring of STAGES (5) stages in shared memory holds, per step, the (256, 64)
bf16 x tile and the (128, 32) packed W bytes, brought by two TMA copies, and the 128 rows'
scales, each as the bf16 pair (absmax, absmax); the stage's mbarrier ready[s] completes when
both copies have landed and the scale warp has arrived. The loader and scale warps each fill
their part of step j's stage once it is free again (empty[j % STAGES]); the ring runs on across
tiles, so the next tile's first steps are there when the decoding warps finish the last tile.
The scale warp computes absmax = code8[q] * absmax2 + offset (double quantization) from global
memory: its loads are issued before it waits for the stage, so their latency is off every
critical path. Decoding warps, step i:
  1. wait for stage i % STAGES; each thread reads the 32 packed bytes of each of its two rows
     (16 w + g and 16 w + g + 8 for lane 4 g + c of warp w; the 4 lanes of a quad read the
     same bytes) and its rows' scale pairs.
  2. decode, unscaled, the 8 bytes of each row that wgmma's register operand wants in this
     lane (bytes c, c + 4, c + 8, ..., c + 28: the 2 weights of a byte are 2 adjacent columns,
     one 32-bit register of the operand) through a table in shared memory: byte -> the bf16
     pair of its two weights, 256 words, one copy per lane (32 KB: lane l reads bank l, no
     conflicts), 3 instructions per byte (prmt, mad, ld.shared); then scale them
     (mul.rn.bf16x2). Gluon has no gather from shared memory, so the lookup is inline PTX at
     the table's address, which Gluon cannot name either: the launcher passes candidate offsets
     from the compiled kernel's LLVM IR, and each program, having filled the table, keeps the
     first at which every thread reads back what it stored (_find_table). If none passes
     (another Triton, or the first call), the table's words are read from global memory
     (code_with_tables, the same numbers): a wrong guess costs speed, never a wrong result.
  3. wgmma (asynchronous): acc (128, 256) += W @ x_stage.T, W from the registers just decoded,
     x from shared memory; it runs while the warps do steps 1-2 of step i + 1.
  4. wait until step i - 1's wgmma is done (at most one running); barrier of the 8 warps; one
     arrive on empty[(i - 1) % STAGES]: the loader and scale warps may refill that stage.
After the last step, y's tile: rounded to bf16 and transposed by stmatrix into the x stages of
the tile's last two steps (128 tokens in each, 32 KB, an x tile's size), which the K loop
keeps instead of freeing; the store warp copies each to y by TMA as soon as it is written, and
frees the stage once TMA has read it. So the decoding warps go on to the next tile while y
goes out, and the writes to global memory overlap its K loop. And the last
wave: T tiles on G programs leave T % G for it; when that is G / 2 or fewer
(11008x4096 at M = 4096: 1376 tiles, 10 waves of 132, then 56), those tiles are split along K
into up to 4 parts run by different programs, whose float32 sums meet in a workspace (parts
1.. write theirs and raise a flag; part 0 waits for each flag, adds in order, lowers the flags
for the next call and stores y: deterministic), so that most SMs do not idle through a whole last tile.
With no more tiles than half the SMs (few tokens: 32 at 4096x4096, M = 256), every tile is
split so, on as many programs as its parts.
Why the weights go to wgmma in registers (seventeenth session): with both operands in shared
memory, a step moved about 152 KB through it by our count (TMA writes 36 KB, wgmma reads 80: each
warp group reads the whole x tile; the decoding wrote 16 and read 20), against cuBLAS's 128 KB at
this tile, and shared memory moves 128 bytes per clock: 1.08-1.16x cuBLAS in one run. From
registers: about 120 KB, and no W stores, fence or their barriers: 0.99-1.07x in the same run.
The operand's layout is what the decoding makes directly (step 2), so the conversion costs
nothing; in plain Triton (kernels/fused_matmul.py) tl.dot converts from the decoding layout
through shared memory with a CTA-wide barrier around each conversion, and waits for each wgmma
before the next (1.4-1.6x cuBLAS, BENCHMARKS.md).
Why a scale warp (eighteenth session): at 4096x11008 a variant without wgmma (the decoding
alone) ran in 0.55x the kernel's time, and one with twice the wgmma work in 1.8x: the decoding and
the tensor cores do not overlap fully (both need the SM's shared-memory and issue bandwidth),
and each instruction taken out of the decoding warps counts. Moving the scales (two byte loads,
two code8 loads, the absmax2 loads and their addresses, the multiply-add and conversion per
row) to their own warp: 3-6% faster (BENCHMARKS.md).
Lessons that cost time (BENCHMARKS.md, ninth session): ptxas serializes every wgmma (its note
C7515) if anything writes the accumulator registers while one is in flight; and global loads
cannot be prefetched into registers across a step: the mbarrier arrive is a release, which
waits for every load in flight. Hence TMA for the tiles, and the scales' plain loads in a warp
of their own, which has no other loads to hold up. Why a loader warp
(eleventh session): issued by the decoding warps, the expect and the three copies (one
thread's operations) each got a CTA barrier from the compiler's shared-memory analysis; code8
from L1, not gl.gather, whose shared-memory scratch cost 2 more (2-3%); the decoding table
3-5.5% over byte permutes. Why persistent, split and stored so (sixteenth session): a timeline
of the one-tile-per-program kernel (globaltimer stamps) showed per tile of 54 us about 3 us
filling and checking the table and 2 us storing y outside the loop, and at 11008x4096 the 56
programs with an eleventh tile ending 55 us after the others. Filling the table once per
program, with the next tile's loads during the epilogue: 1-4%; the split last wave: 3% at
11008x4096; stores from registers instead of TMA stores by the decoding warps (whose wait
took 0.77 us per 128 tokens): 1-2%. Why y leaves through x stages, by a store warp (forty-first
session): without y's stores at all the kernel ran 3-5% faster (fortieth session), the tensor
cores idling while the decoding warps stored; shared memory had no room for a second buffer
of y. TMA stores issued by a warp of their own, from the stages the tile had just used, and a
fifth stage (the 32 KB that y's own buffer had taken) so that three steps of the next tile are
ready while two stages wait for TMA: 1.1% faster at 4096x4096 and 1.7-1.9% at 11008x4096 on
M = 4096, 0.8-1% slower at M = 256 and 1024, where a program has one tile and nothing to
overlap (BENCHMARKS.md).

Hazards, and what orders them:
  - wgmma reads its register operand until the wait that retires it: step i decodes into the
    registers of its copy of the step (the K loop has two), last read by step i - 2's wgmma,
    which the wait of step i - 1 retired; step i - 1's wgmma reads the other copy's.
  - (steps counted over the program's work items) the ring stage of step i is refilled after
    the arrive on empty[i % STAGES] at step i + 1 (an item's last step: after its final wgmma
    wait and a barrier), which follows the barrier of step i + 1, which every decoding warp
    reaches after its wait (step i's wgmma done) and after using its W bytes and scale pairs
    (the decode, before step i's wgmma); the loader and scale warps wait for that arrive. The
    scale warp's stores to a stage are ordered before its arrive on ready by a barrier of its
    lanes; the decoding warps read them after their wait on ready.
  - y's tile goes into the x stages of the item's last two steps after the item's final
    wgmma wait and a barrier (each warp group's wgmma reads all of a stage); the K loop does
    not free them (no arrive on empty), the store warp does, after its TMA stores have read
    them (wait_group.read), so the loader and scale warps refill them only then. Each
    thread's stmatrix writes are made visible to TMA (the async proxy) by fence.proxy.async
    before the barrier and the arrive on y_ready[h]; the store warp waits for it. It arrives
    on y_free[h] once it has seen that phase, and the decoding warps wait for that before
    writing the next tile's half h, so that y_ready[h] never completes two phases unseen
    (tiles of few steps: the next one need not wait for the stages the store warp frees).
  - a split tile's part 0 spins on flags that parts 1.. raise after writing their sums (a
    barrier, then a release); they wait for nothing, so the spin ends as soon as they have run,
    on other SMs (G is at most the number of SMs, one program each). Part 0 lowers the flags
    after a barrier (every thread of it has seen them raised); the next call on the stream
    starts after this one ends, so it finds them down.
  - the decoding table is filled before the decoding warps' first barrier and only read after;
    it is an argument of their function, so the compiler keeps its memory while they run
    (it does not see the reads, which are by address).

Restrictions (sm90_ok): NF4 with double quantization and blocks of 64, at least two of them
along K (y's tile takes two stages of the ring), out_features a multiple of 128, bf16 x that
TMA can read; fused_matmul runs the Triton kernel otherwise.

Layout read: x (M, K) bf16 row-major with 16-byte aligned rows (TMA); packed uint8 (N, KP/2);
scales (KP/64, N) uint8 codes (read 4 per lane by the scale warp) with absmax2 / code8 / offset
(double quantization); y (M, N) bf16, contiguous (TMA writes it; rows beyond M are not
written). K < KP (padded weights): TMA reads x's columns beyond K as zeros.
"""

import re

import torch
import triton

# (without Gluon, or without sm_90, fused_matmul is used)
from ._gluon import (HAVE_GLUON, TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, tma,
                     warpgroup_mma, warpgroup_mma_wait)
from ._launch import FP_FUSION, check_activation, sm_count, weight_args

BLOCK_N, BLOCK_M, BLOCK_K, STAGES, GROUP_M, WARPS = 128, 256, 64, 5, 1, 8
# Decoding through the shared-memory table: byte c of word $1 ($2 = 0x4440 + c: prmt's selector
# for that byte, zeros above) -> its word of the table (byte * 128 + $3: $3 = the table's address
# plus 4 * lane, each lane reading its own copy)
TABLE_ASM = "{ .reg .b32 i; prmt.b32 i, $1, 0, $2; mad.lo.u32 i, i, 128, $3; ld.shared.b32 $0, [i]; }"
TABLE_BYTES = 256 * 32 * 4
# registers per thread of the loader and scale warps (a few indices each): 24, not 40, leaves the
# decoding warps 240 instead of 232, which they need to run without spills
WORKER_REGS = 24

if HAVE_GLUON:
    TABLE_ASM = gl.constexpr(TABLE_ASM)

    @gluon.jit
    def _issue_step(x_desc, p_desc, x_ring, p_ring, ready, sj, j, off_m, off_n, STEP_BYTES: gl.constexpr):
        """Start the TMA copies of K step j of a tile (x tile, packed W tile) into stage sj."""
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        bar = ready.index(sj)
        mbarrier.expect(bar, STEP_BYTES)
        tma.async_load(x_desc, [off_m, j * BLOCK_K], bar, x_ring.index(sj))
        tma.async_load(p_desc, [off_n, j * (BLOCK_K // 2)], bar, p_ring.index(sj))

    @gluon.jit
    def _pair_word(code_ptr, e):
        """Word e of the decoding table: bf16(code[e & 15]) << 16 | bf16(code[e >> 4]), byte e's
        two weights, unscaled (column 2 j, the high nibble, in the low half, as _tile's decoder).
        code_with_tables (_launch.py) has built the 256 of them: words 28.. of code_ptr."""
        return gl.load(code_ptr.to(gl.pointer_type(gl.int32)) + 28 + e)

    @gluon.jit
    def _and(a, b):
        return a & b

    @gluon.jit
    def _find_table(words, where, cands_ptr, n_cands):
        """The table's offset in shared memory (from the symbol global_smem), or -1: the first of
        the n_cands (<= 31) candidate offsets at which every thread reads back the words it
        stored (words, at byte offsets where within the table). Gluon cannot name a buffer's
        address in inline PTX, so the launcher guesses candidates from the compiled kernel and
        this checks them: a wrong guess costs speed (the table's words then come from global
        memory), never a wrong result."""
        bits = words * 0
        for c in range(n_cands):
            got = gl.inline_asm_elementwise(
                "{ .reg .b32 a; mov.u32 a, global_smem; add.u32 a, a, $1; ld.shared.b32 $0, [a]; }",
                "=r,r", [where + gl.load(cands_ptr + c)], dtype=gl.int32, is_pure=False, pack=1)
            bits = bits | ((got == words).to(gl.int32) << c)
        found_bits = gl.reduce(gl.reduce(bits, 1, _and), 0, _and)
        found = -1
        for c in range(n_cands):
            if ((found_bits >> c) & 1) == 1 and found < 0:
                found = gl.load(cands_ptr + c)
        return found

    @gluon.jit
    def _tile_offsets(t, num_pid_m, num_pid_n, GROUP_M: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr):
        """Tile t's first token and weight row. Grouped order (as fused_matmul): GROUP_M token
        tiles share W tiles in L2. GROUP_M = 1 (one token tile's row of tiles after another: the
        (256, K) x tile, 8x the bytes of a packed W tile, is read by every program on that row)
        measured 0.4-2.2% faster than 2 in two runs once the weights went to wgmma in registers
        (BENCHMARKS.md, seventeenth session); before, 2 had been 0-5% faster than 8."""
        group_id = t // (GROUP_M * num_pid_n)
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (t % (GROUP_M * num_pid_n)) % group_size_m
        pid_n = (t % (GROUP_M * num_pid_n)) // group_size_m
        return pid_m * BLOCK_M, pid_n * BLOCK_N

    @gluon.jit
    def _work_item(u, num_pid_m, num_pid_n, num_k, SPLIT):
        """Work item u of the kernel: a tile and a range of its K steps. With T tiles and G
        programs, program p takes items p, p + G, ...: the first F = T - R (R = T % G) are
        whole tiles; when SPLIT > 1 (the launcher's choice, R * SPLIT <= G), the last R tiles,
        which would leave most programs idle in the last wave, come as SPLIT items each, part
        s covering steps [s num_k / SPLIT, (s + 1) num_k / SPLIT). Returns (tile, first step,
        steps, v): v = u - F for a part of a split tile (part v // R of tile F + v % R), else -1."""
        tiles = num_pid_m * num_pid_n
        full = tiles - tiles % gl.num_programs(0) if SPLIT > 1 else tiles
        t = u
        k0 = 0
        nk = num_k
        v = -1
        if u >= full:
            v = u - full
            r = tiles - full
            t = full + v % r
            k0 = (v // r) * num_k // SPLIT
            nk = (v // r + 1) * num_k // SPLIT - k0
        return t, k0, nk, v

    @gluon.jit
    def _num_items(num_pid_m, num_pid_n, SPLIT):
        tiles = num_pid_m * num_pid_n
        return tiles + (tiles % gl.num_programs(0)) * (SPLIT - 1)

    @gluon.jit
    def _decode_and_mma(x_ring, p_ring, s_ring, table, ready, empty, y_ready, y_free, code_ptr,
                        cands_ptr, n_cands, ws_ptr, flags_ptr, SPLIT, M, N, KP,
                        BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                        num_warps: gl.constexpr):
        """The 8 decoding warps (steps 1-4 of the module docstring), for each of this program's
        work items: acc (BLOCK_N, BLOCK_M) = W tile @ x tile.T over the item's K steps, then y's
        tile. First the decoding table, once per program: filled, then found."""
        fill: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])
        e = gl.arange(0, 256, layout=gl.SliceLayout(1, fill))
        lane = gl.arange(0, 32, layout=gl.SliceLayout(0, fill))
        words = _pair_word(code_ptr, e)[:, None] + gl.zeros([256, 32], gl.int32, fill)
        table.store(words)
        gl.barrier()
        table_off = _find_table(words, e[:, None] * 128 + lane[None, :] * 4, cands_ptr, n_cands)
        gl.store(cands_ptr + n_cands, table_off)  # what was found, for the tests (every program alike)
        if table_off >= 0:
            _tiles(x_ring, p_ring, s_ring, ready, empty, y_ready, y_free, code_ptr, table_off, ws_ptr,
                   flags_ptr, SPLIT, M, N, KP, BLOCK_M, STAGES, GROUP_M, num_warps, True)
        else:
            _tiles(x_ring, p_ring, s_ring, ready, empty, y_ready, y_free, code_ptr, table_off, ws_ptr,
                   flags_ptr, SPLIT, M, N, KP, BLOCK_M, STAGES, GROUP_M, num_warps, False)

    @gluon.jit
    def _tiles(x_ring, p_ring, s_ring, ready, empty, y_ready, y_free, code_ptr, table_off, ws_ptr,
               flags_ptr, SPLIT, M, N, KP, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
               GROUP_M: gl.constexpr, num_warps: gl.constexpr, TABLE: gl.constexpr):
        """This program's work items u = pid, pid + G, ... (G programs, _work_item): the K loop,
        then y's tile (for a split tile: from its part 0, with the other parts' sums) into the
        x stages of the item's last two steps, which the store warp copies out (_stage_tile)."""
        BLOCK_N: gl.constexpr = p_ring.shape[1]
        BLOCK_K: gl.constexpr = 2 * p_ring.shape[2]
        num_k = KP // BLOCK_K
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        r = num_pid_m * num_pid_n % gl.num_programs(0)
        step = 0  # steps done by this program, over all its work items: the ring's position
        stored = 0  # tiles this program has stored
        for u in range(gl.program_id(0), _num_items(num_pid_m, num_pid_n, SPLIT), gl.num_programs(0)):
            t, k0, nk, v = _work_item(u, num_pid_m, num_pid_n, num_k, SPLIT)
            hold = v < r  # a whole tile, or part 0 of a split one: it stores y
            acc = _k_loop(x_ring, p_ring, s_ring, ready, empty, code_ptr, table_off, nk, step, hold,
                          BLOCK_M, STAGES, num_warps, TABLE)
            if v >= 0:  # a part of a split tile: parts 1.. hand their sums to part 0
                acc = _split_sums(acc, ws_ptr, flags_ptr, v, r, SPLIT)
            if hold:
                _stage_tile(acc, x_ring, y_ready, y_free, step + nk - 2, stored, STAGES)
                stored += 1
            step += nk

    @gluon.jit
    def _split_sums(acc, ws_ptr, flags_ptr, v, r, SPLIT):
        """Part v // r of split tile v % r: a part s >= 1 writes its float32 sums to the
        workspace (slot v - r) and raises its flag (0 before the call: _flags); part 0 waits for
        each other part's flag in turn and adds its sums (in the order of the parts: the same
        result every call), then lowers the flags again. Parts run at the same time on different
        SMs (one program per SM, and part 0 waits for nobody that waits), so the wait is for the
        slower part."""
        BLOCK_N: gl.constexpr = acc.shape[0]
        BLOCK_M: gl.constexpr = acc.shape[1]
        rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc.type.layout))
        cols = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc.type.layout))
        offs = rows[:, None] * BLOCK_M + cols[None, :]
        if v >= r:
            gl.store(ws_ptr + (v - r).to(gl.int64) * (BLOCK_N * BLOCK_M) + offs, acc)
            gl.barrier()  # every thread's sums are written before the flag is raised
            gl.atomic_xchg(flags_ptr + (v - r), 1, sem="release", scope="gpu")
        else:
            for s in range(1, SPLIT):
                slot = (s - 1) * r + v
                while gl.atomic_add(flags_ptr + slot, 0, sem="acquire", scope="gpu") == 0:
                    pass
                acc = acc + gl.load(ws_ptr + slot.to(gl.int64) * (BLOCK_N * BLOCK_M) + offs)
            gl.barrier()  # every thread has seen every flag raised: down again, for the next call
            for s in range(1, SPLIT):
                gl.store(flags_ptr + (s - 1) * r + v, 0)
        return acc

    @gluon.jit
    def _stage_tile(acc, x_ring, y_ready, y_free, first, stored, STAGES: gl.constexpr):
        """y's tile (tokens, rows of W) = acc.T in bf16, for the store warp (_storer), into the x
        stages of the item's last two steps, first and first + 1 (the K loop kept them: hold),
        128 tokens into each: transposed on the way (stmatrix), as two (128, 64) boxes of y with
        wgmma's 128-byte swizzle, which an x stage's (256, 64) has too. Half h: wait until the
        store warp has seen the previous tile's half h (y_free, so that y_ready[h] cannot run a
        phase ahead of it), write, make the writes visible to TMA (fence.proxy.async), a barrier
        of the 8 warps, one arrive on y_ready[h]. The split, permutes and reshapes only rename
        registers."""
        BLOCK_N: gl.constexpr = acc.shape[0]
        HALF: gl.constexpr = acc.shape[1] // 2
        BOX_N: gl.constexpr = BLOCK_N // 2
        boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=3)
        halves = gl.split(acc.to(gl.bfloat16).reshape([BLOCK_N, 2, HALF]).permute(0, 2, 1))
        for h in gl.static_range(2):
            part = halves[h].permute(1, 0)  # (128 tokens, 128 rows of W)
            mbarrier.wait(y_free.index(h), (stored & 1) ^ 1, pred=stored >= 1)
            buf = x_ring.index((first + h) % STAGES).reinterpret(gl.bfloat16, [2, HALF, BOX_N], boxes)
            # columns 64 c .. 64 c + 63 (warp group c's rows of W) into box c
            buf.store(part.reshape([HALF, 2, BOX_N]).permute(1, 0, 2))
            fence_async_shared()
            gl.barrier()
            mbarrier.arrive(y_ready.index(h))

    @gluon.jit
    def _step(x_ring, p_ring, s_ring, ready, empty, code_ptr, base, sel, acc, step0, i, kept,
              STAGES: gl.constexpr, TABLE: gl.constexpr):
        """K step i of a work item (the program's step step0 + i): decode the stage's W tile into
        wgmma's register operand, start acc += W @ x.T, wait for step i - 1's wgmma and hand its
        stage back to the loader and scale warps, unless step i - 1 is kept (y's tile goes there)."""
        L3: gl.constexpr = sel.type.layout  # (row, word, c), _k_loop
        BLOCK_N: gl.constexpr = p_ring.shape[1]
        WORDS: gl.constexpr = sel.shape[1]
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        words_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
        stage = (step0 + i) % STAGES
        mbarrier.wait(ready.index(stage), ((step0 + i) // STAGES) & 1)
        # every lane of a quad reads the same 2 rows x 8 words (4 x 16 bytes; broadcast), and the
        # 2 rows' scale pairs (absmax, absmax) as bf16x2, from the scale warp
        words = p_ring.index(stage).reinterpret(gl.int32, [BLOCK_N, WORDS], words_layout).load(
            gl.SliceLayout(2, L3))
        s2 = s_ring.index(stage).load(gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        # decode unscaled, byte c of each word (2 weights: one register of the operand), then
        # scale (mul.rn.bf16x2, as LOOKUP 3)
        if TABLE:  # 3 instructions per byte (prmt, mad, ld.shared)
            codes = gl.inline_asm_elementwise(TABLE_ASM, "=r,r,r,r", [words[:, :, None], sel, base],
                                              dtype=gl.int32, is_pure=True, pack=1)
        else:  # the table's word from global memory (an L1 hit)
            byte = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $2;", "=r,r,r", [words[:, :, None], sel],
                                             dtype=gl.int32, is_pure=True, pack=1)
            codes = _pair_word(code_ptr, byte)
        pair = gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [codes, s2[:, None, None]],
                                         dtype=gl.int32, is_pure=True, pack=1)
        # pair [n, w, c]: the bf16 of columns 8 w + 2 c (low half) and 8 w + 2 c + 1; in (row,
        # column) these are wgmma's operand registers already: the conversion renames them
        w_even = pair.to(gl.int16).to(gl.bfloat16, bitcast=True)
        w_odd = (pair >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
        a = gl.convert_layout(gl.reshape(gl.join(w_even, w_odd), [BLOCK_N, 8 * WORDS]), a_layout)
        acc = warpgroup_mma(a, x_ring.index(stage).permute((1, 0)), acc, is_async=True)
        # step i - 1's wgmma is done (step i's runs while step i + 1 decodes): its registers may
        # be written and its stage refilled, once every warp is here
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        gl.barrier()
        mbarrier.arrive(empty.index((step0 + i + STAGES - 1) % STAGES), pred=(i >= 1) & (i - 1 != kept))
        return acc

    @gluon.jit
    def _k_loop(x_ring, p_ring, s_ring, ready, empty, code_ptr, table_off, num_k, step0, hold,
                BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr, TABLE: gl.constexpr):
        """The K loop of one work item: num_k K steps, the program's steps step0 .. step0 + num_k
        - 1 in the ring; TABLE: decode through the shared-memory table at table_off, else from
        the code in global memory. Two steps per iteration, each its own code: wgmma reads its
        register operand while it runs (until the wait that retires it), so consecutive steps
        must decode into different registers, which two copies of the step get (PTX names
        registers per value; one loop body would reuse them). Every ring stage it reads is
        handed back: at step i the stage of step i - 1, at the end that of its last step; with
        hold, the last two are kept instead, for y's tile (_stage_tile), and the store warp
        hands them back once TMA has read it out."""
        BLOCK_N: gl.constexpr = p_ring.shape[1]
        WORDS: gl.constexpr = p_ring.shape[2] // 4
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
        # wgmma's register operand (m64nNk16, bf16): lane 4 g + c of warp w holds rows 16 w + g
        # and 16 w + g + 8, columns 16 s + 2 c, + 1 and 16 s + 8 + 2 c, + 1 of each 16-column
        # slice s: the two weights of bytes 8 s + c and 8 s + 4 + c of those rows, which are byte
        # c of words 2 s and 2 s + 1. L3 indexes them (row, word, c): each lane holds its rows'
        # 8 words, and c is its lane % 4 (the 4 lanes of a quad read the same words)
        L3: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0], [64, 0, 0]], block_bases=[], shape=[BLOCK_N, WORDS, 4])
        # num_k >= 1 always (a weight has at least one block, a split tile at least one step a part)
        gl.assume(num_k >= 1)
        c = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        sel = (0x4440 + c)[None, None, :] + gl.zeros([1, WORDS, 4], gl.int32, L3)
        # each lane's address of its own copy of the table
        base = gl.inline_asm_elementwise(
            "{ .reg .b32 l; mov.u32 $0, global_smem; mov.u32 l, %laneid;"
            " mad.lo.u32 $0, l, 4, $0; add.u32 $0, $0, $1; }",
            "=r,r", [table_off], dtype=gl.int32, is_pure=True, pack=1)

        kept = num_k - 2 if hold else -1  # (num_k >= 2 where hold: sm90_ok, _split_last_wave)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_layout)
        for i in range(0, num_k - 1, 2):
            acc = _step(x_ring, p_ring, s_ring, ready, empty, code_ptr, base, sel, acc, step0, i, kept,
                        STAGES, TABLE)
            acc = _step(x_ring, p_ring, s_ring, ready, empty, code_ptr, base, sel, acc, step0, i + 1, kept,
                        STAGES, TABLE)
        if num_k % 2 == 1:
            acc = _step(x_ring, p_ring, s_ring, ready, empty, code_ptr, base, sel, acc, step0, num_k - 1,
                        kept, STAGES, TABLE)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        # both warp groups' last wgmmas are done (each reads all of an x stage): the last stage
        # may go, or take y's tile
        gl.barrier()
        mbarrier.arrive(empty.index((step0 + num_k + STAGES - 1) % STAGES), pred=not hold)
        return acc

    @gluon.jit
    def _loader(x_desc, p_desc, x_ring, p_ring, ready, empty, M, N, KP, SPLIT,
                STEP_BYTES: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        """The loader warp: for each of the program's work items in turn, fills stage j % STAGES with
        the program's step j once the decoding warps have freed it (the (j // STAGES)-th
        completion of empty[s], phases counted from 0), up to STAGES steps ahead of them, across
        tiles: the next tile's first steps arrive while the decoding warps store y."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = p_desc.block_type.shape[0]
        num_k = KP // BLOCK_K
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        j = 0
        for u in range(gl.program_id(0), _num_items(num_pid_m, num_pid_n, SPLIT), gl.num_programs(0)):
            t, k0, nk, v = _work_item(u, num_pid_m, num_pid_n, num_k, SPLIT)
            off_m, off_n = _tile_offsets(t, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
            for kk in range(k0, k0 + nk):
                s = j % STAGES
                mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
                _issue_step(x_desc, p_desc, x_ring, p_ring, ready, s, kk, off_m, off_n, STEP_BYTES)
                j += 1

    @gluon.jit
    def _scales(s_ring, ready, empty, scales_ptr, absmax2_ptr, code8_ptr, offset_ptr, M, N, KP, SPLIT,
                DQ_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        """The scale warp: for the program's step j (as the loader's), the scale of each of the
        tile's rows n, absmax = code8[q] * absmax2[(k N + n) // DQ_BLOCK] + offset for its code q
        at K block k (double quantization), as the bf16 pair (absmax, absmax) that mul.rn.bf16x2
        takes, into stage j % STAGES of s_ring once the decoding warps have freed it; then one
        arrive on ready[s] (the stage's second arrival, the loader's being the first). Its global
        loads are issued before the wait for the stage, so their latency hides behind it; code8
        (1 KB) stays in L1."""
        BLOCK_N: gl.constexpr = s_ring.shape[1]
        rows: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])  # 4 consecutive rows per lane
        r = gl.arange(0, BLOCK_N, layout=rows)
        offset = gl.load(offset_ptr)
        num_k = KP // 64  # a step is one NF4 block (BLOCK_K)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        j = 0
        for u in range(gl.program_id(0), _num_items(num_pid_m, num_pid_n, SPLIT), gl.num_programs(0)):
            t, k0, nk, v = _work_item(u, num_pid_m, num_pid_n, num_k, SPLIT)
            off_m, off_n = _tile_offsets(t, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
            for kk in range(k0, k0 + nk):
                s = j % STAGES
                idx = kk * N + off_n + r
                q = gl.load(scales_ptr + idx).to(gl.int32)
                absmax = gl.load(code8_ptr + q) * gl.load(absmax2_ptr + idx // DQ_BLOCK) + offset
                # round to bf16 (as LOOKUP 3) and pair: cvt.rn.bf16x2 puts its two operands in the
                # two halves, one instruction
                pair = gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $1, $1;", "=r,f", [absmax],
                                                 dtype=gl.int32, is_pure=True, pack=1)
                mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
                s_ring.index(s).store(pair)
                gl.barrier()  # every lane's store before the arrive
                mbarrier.arrive(ready.index(s))
                j += 1

    @gluon.jit
    def _storer(y_desc, x_ring, empty, y_ready, y_free, M, N, KP, SPLIT, STAGES: gl.constexpr,
                GROUP_M: gl.constexpr):
        """The store warp: for each tile the program stores (a whole tile, or part 0 of a split
        one), y's two halves of 128 tokens from the x stages where the decoding warps put them
        (_stage_tile), by TMA (two (128, 64) boxes each; rows beyond M are not written). It
        issues each half as soon as y_ready says it is there, and hands each stage back to the
        loader and scale warps (empty) once TMA has read it (wait_group.read): the writes to
        global memory go on while the next tile's K loop runs."""
        HALF: gl.constexpr = y_desc.block_type.shape[0]
        BOX_N: gl.constexpr = y_desc.block_type.shape[1]
        BLOCK_M: gl.constexpr = 2 * HALF
        BLOCK_N: gl.constexpr = 2 * BOX_N
        num_k = KP // x_ring.shape[2]
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        r = num_pid_m * num_pid_n % gl.num_programs(0)
        step = 0
        stored = 0
        for u in range(gl.program_id(0), _num_items(num_pid_m, num_pid_n, SPLIT), gl.num_programs(0)):
            t, k0, nk, v = _work_item(u, num_pid_m, num_pid_n, num_k, SPLIT)
            if v < r:
                off_m, off_n = _tile_offsets(t, num_pid_m, num_pid_n, GROUP_M, BLOCK_M, BLOCK_N)
                for h in gl.static_range(2):
                    mbarrier.wait(y_ready.index(h), stored & 1)
                    mbarrier.arrive(y_free.index(h))
                    stage = x_ring.index((step + nk - 2 + h) % STAGES)
                    for c in gl.static_range(2):
                        tma.async_store(y_desc, [off_m + h * HALF, off_n + c * BOX_N],
                                        stage.slice(c * HALF, HALF))
                tma.store_wait(2)  # the first half is read out: its stage may be refilled
                mbarrier.arrive(empty.index((step + nk - 2) % STAGES))
                tma.store_wait(0)
                mbarrier.arrive(empty.index((step + nk - 1) % STAGES))
                stored += 1
            step += nk

    @gluon.jit(do_not_specialize=["n_cands", "SPLIT"])
    def fused_matmul_sm90_kernel(
        x_desc, p_desc, y_desc, scales_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, cands_ptr,
        ws_ptr, flags_ptr, M, N, KP, n_cands, SPLIT,
        DQ_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr, GROUP_M: gl.constexpr, WORKER_REGS: gl.constexpr, num_warps: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BYTES: gl.constexpr = BLOCK_K // 2

        # the ring: stage s holds one step's x tile and packed W tile (one TMA each) and the
        # rows' scale pairs (the scale warp's stores), all counted on mbarrier ready[s] (two
        # arrivals: the loader's, with the copies' bytes, and the scale warp's); empty[s]: the
        # decoding warps are done with it
        x_ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        p_ring = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N, BYTES], p_desc.layout)
        s_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # y's halves in x stages: written (y_ready[h]), seen by the store warp (y_free[h])
        y_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        y_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        # the decoding table, byte -> the bf16 pair of its two weights, one copy per lane (lane l
        # reads word [e, l]: bank l, no conflicts); passed to the decoding warps, which keeps it
        # allocated while they run (they read it by address, which the compiler does not see)
        table = gl.allocate_shared_memory(gl.int32, [256, 32], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        for j0 in gl.static_range(STAGES):
            mbarrier.init(ready.index(j0), count=2)
            mbarrier.init(empty.index(j0), count=1)
        for h in gl.static_range(2):
            mbarrier.init(y_ready.index(h), count=1)
            mbarrier.init(y_free.index(h), count=1)
        STEP_BYTES: gl.constexpr = x_desc.block_type.nbytes + p_desc.block_type.nbytes

        # the decoding warps (num_warps of them), the loader, scale and store warps, each running
        # its function
        gl.warp_specialize([
            (_decode_and_mma, (x_ring, p_ring, s_ring, table, ready, empty, y_ready, y_free, code_ptr,
                               cands_ptr, n_cands, ws_ptr, flags_ptr, SPLIT, M, N, KP, BLOCK_M, STAGES,
                               GROUP_M, num_warps)),
            (_loader, (x_desc, p_desc, x_ring, p_ring, ready, empty, M, N, KP, SPLIT, STEP_BYTES, STAGES,
                       GROUP_M)),
            (_scales, (s_ring, ready, empty, scales_ptr, absmax2_ptr, code8_ptr, offset_ptr, M, N, KP, SPLIT,
                       DQ_BLOCK, BLOCK_M, STAGES, GROUP_M)),
            (_storer, (y_desc, x_ring, empty, y_ready, y_free, M, N, KP, SPLIT, STAGES, GROUP_M)),
        ], [1, 1, 1], [WORKER_REGS, WORKER_REGS, WORKER_REGS])
        for j0 in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(j0))
            mbarrier.invalidate(empty.index(j0))
        for h in gl.static_range(2):
            mbarrier.invalidate(y_ready.index(h))
            mbarrier.invalidate(y_free.index(h))


def sm90_ok(x: torch.Tensor, w) -> bool:
    """Whether fused_matmul_sm90 can take this call: Gluon, an sm_90 GPU, bf16 x that TMA can
    read (unit stride along K, 16-byte aligned base and rows), an NF4 weight with blocks of 64
    and double quantization (quant.py's default) whose packed bytes start 16-byte aligned (TMA
    reads them too), at least two blocks along K (y's tile leaves through the stages of a
    tile's last two K steps), and out_features a multiple of 128 (every LLaMA / Mistral
    projection). Not enabled, because they faulted ("illegal instruction") in their first GPU
    tests and were not debugged: out_features not a multiple of 128 (a partial last tile; the
    1-D TMA of its scales, since replaced by the scale warp's loads, was a suspect), and NF4
    with float32 absmax (a variant reading them, since removed). fused_matmul runs the Triton
    kernel there."""
    return (HAVE_GLUON and x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0)
            and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1
            and x.data_ptr() % 16 == 0 and (x.stride(0) * 2) % 16 == 0 and x.shape[0] > 0
            and w.quant_type == "nf4" and w.double_quant and w.block_size == BLOCK_K and w.packed.is_cuda
            and w.out_features % BLOCK_N == 0 and w.packed.data_ptr() % 16 == 0
            and w.packed.shape[1] >= BLOCK_K)


def fused_matmul_sm90(x: torch.Tensor, w, stages: int = STAGES) -> torch.Tensor:
    """y = x @ W.T for bf16 x (M, in_features) and an NF4 weight, on an sm_90 GPU (sm90_ok)."""
    _fmt, tensors, kp, _qb, dq_block = weight_args(w)
    check_activation(x, w.in_features, w.packed.device, "x")
    if not sm90_ok(x, w):
        raise ValueError("fused_matmul_sm90 needs an sm_90 GPU, bf16 x readable by TMA and an NF4 "
                         "weight with double quantization, block size 64 and out_features a "
                         "multiple of 128 (sm90_ok)")
    y = torch.empty((x.shape[0], w.out_features), dtype=x.dtype, device=x.device)
    return launch_into(y, x, tensors, kp, dq_block, stages)


_TABLE_CANDIDATES = {}  # (device, stages, dq_block) -> int32 offsets (_table_candidates)
MAX_SPLIT = 4  # parts of a split tile at most: part 0 reads the others' sums one after another


def _split_last_wave(tiles: int, sms: int, num_k: int, device):
    """(G, SPLIT, workspace, flags): the programs and the kernel's work items (_work_item) for T
    tiles on a GPU of S SMs. With T > S, G = S programs leave R = T % G tiles for the last wave;
    when R <= G / 2, most programs would wait idle for it (11008x4096 at M = 4096: 1376 tiles,
    10 waves of 132 and 56 tiles), so each of those tiles is split along K into SPLIT = G // R
    parts (at most MAX_SPLIT, and num_k / 2: a part that stores y keeps two steps' stages for
    it), summed through a float32 workspace. With T <= S / 2 (few tokens: 32 tiles at 4096x4096,
    M = 256) all T tiles are that last wave: SPLIT = S // T parts each (the same bounds), on G =
    T * SPLIT programs. The flags: _flags."""
    if tiles <= sms // 2:
        r, split = tiles, min(sms // tiles, MAX_SPLIT, num_k // 2)
        programs = tiles * split
    else:
        programs = min(tiles, sms)
        r = tiles % programs
        split = min(programs // r, MAX_SPLIT, num_k // 2) if 0 < r <= programs // 2 else 1
    if split == 1:  # not read by the kernel
        ws = torch.empty(1, dtype=torch.float32, device=device)
        return programs, split, ws, ws.view(torch.int32)
    slots = (split - 1) * r
    ws = torch.empty(slots * BLOCK_N * BLOCK_M, dtype=torch.float32, device=device)
    return programs, split, ws, _flags(device, slots, sms)


_FLAGS = {}  # device -> the split tiles' flags, all 0 between calls (_flags)


def _flags(device, slots: int, sms: int) -> torch.Tensor:
    """The flags of a call's split tiles, one int32 per part s >= 1, all 0: zeroed once per
    device and lowered again by each call's parts 0 (_split_sums), which saves a memset launch
    a call (1.3-2.9 us of GPU time a split call, forty-first session). One buffer for every
    call on the device, (MAX_SPLIT - 1) * sms flags: a call has at most MAX_SPLIT - 1 parts
    s >= 1 of at most sms / 2 tiles (_split_last_wave). Calls on one stream run one after
    another, but two calls on different streams at the same time would share it. A first call
    while a CUDA graph is being captured gets flags of its own, zeroed by the graph (allocating
    the shared buffer there would tie it to the graph's memory)."""
    flags = _FLAGS.get(device)
    if flags is None:
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(slots, dtype=torch.int32, device=device)
        flags = _FLAGS[device] = torch.zeros((MAX_SPLIT - 1) * sms, dtype=torch.int32, device=device)
    return flags


def table_offset(device, stages: int = STAGES, dq_block: int = 256):
    """The decoding table's offset the last launch found (-1: not found, global memory served;
    None: no launch since the first). For the tests."""
    cands = _TABLE_CANDIDATES.get((torch.device(device), stages, dq_block))
    return None if cands is None else int(cands[-1])


def _table_candidates(kernel, device) -> torch.Tensor:
    """Where the decoding table may sit in the compiled kernel's shared memory: every constant
    offset from global_smem in its LLVM IR that leaves room for the table (at most 31). The
    kernel checks them in turn (_find_table); none passing only means the slower decoder."""
    found = sorted({int(v) for v in re.findall(r"@global_smem, i32 (\d+)\)", kernel.asm.get("llir", ""))})
    ok = [v for v in found if v % 16 == 0 and v + TABLE_BYTES <= kernel.metadata.shared][:31]
    # (a kernel compiled for other sizes, M % 16 for example, has the same buffers, so in all
    # likelihood the same offsets); one more slot, where the kernel writes what it found
    return torch.tensor(ok + [-1], dtype=torch.int32, device=device)


def descriptors(x, packed, y, kp: int):
    """The TMA descriptors of x (BLOCK_M x BLOCK_K tiles, wgmma's swizzle), of W's packed bytes
    (BLOCK_N x BLOCK_K / 2, plain) and of y (BLOCK_M / 2 x BLOCK_N / 2 boxes, with x's swizzle:
    they leave from x stages)."""
    m, k = x.shape
    n = y.shape[1]
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.bfloat16)
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [BLOCK_M, BLOCK_K], x_layout)
    plain = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    p_desc = TensorDescriptor(packed, [n, kp // 2], [kp // 2, 1], [BLOCK_N, BLOCK_K // 2], plain)
    y_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, BLOCK_N // 2], gl.bfloat16)
    y_desc = TensorDescriptor(y, [m, n], [y.stride(0), 1], [BLOCK_M // 2, BLOCK_N // 2], y_layout)
    return x_desc, p_desc, y_desc


def launch_into(y, x, tensors, kp, dq_block, stages: int = STAGES):
    """The launch itself, into y (M, N), for arguments already checked (weight_args,
    check_activation, sm90_ok): fused_matmul's dispatch, which has done all three, calls it."""
    m, n = x.shape[0], y.shape[1]
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N)
    programs, split, ws, flags = _split_last_wave(tiles, sm_count(x.device), kp // BLOCK_K, x.device)
    key = (x.device, stages, dq_block)
    cands = _TABLE_CANDIDATES.get(key)
    grid, args, options = kernel_call(
        y, x, tensors, kp, dq_block, stages, programs, split, ws, flags,
        cands if cands is not None else torch.full((1,), -1, dtype=torch.int32, device=x.device))
    kernel = fused_matmul_sm90_kernel[grid](*args, **options)
    if cands is None:  # the first call: the next ones look for the table where it may be
        _TABLE_CANDIDATES[key] = _table_candidates(kernel, x.device)
    return y


def kernel_call(y, x, tensors, kp: int, dq_block: int, stages: int, programs: int, split: int, ws,
                flags, cands):
    """fused_matmul_sm90_kernel's grid, arguments and options for one call: launch_into runs
    them, and tests/gpu_compile.py compiles them without a GPU. cands: the table's candidate
    offsets, ending in -1 (just [-1] before the first call has found them)."""
    packed, scales, _zeros, absmax2, code, code8, offset = tensors
    m, n = x.shape[0], y.shape[1]
    args = (*descriptors(x, packed, y, kp), scales, absmax2, code, code8, offset,
            cands, ws, flags, m, n, kp, cands.numel() - 1, split)
    options = dict(DQ_BLOCK=dq_block, BLOCK_N=BLOCK_N, STAGES=stages, GROUP_M=GROUP_M,
                   WORKER_REGS=WORKER_REGS, num_warps=WARPS, **FP_FUSION)
    return (programs,), args, options
