"""Triton helpers shared by the kernels: turn packed 4-bit bytes into float32 weights on chip.

Not a kernel: these are @triton.jit functions inlined into the kernels of this package.

Layout read here (written by quant.py, see its docstring "Packed layout"):
  packed  uint8 (N, KP/2): byte j of row n = code of column 2j << 4 | code of column 2j+1
  scales  (KP/QBLOCK, N): block b of row n at scales[b * N + n]
          FORMAT 0 (NF4):        float32 absmax
          FORMAT 1 (NF4 + DQ):   uint8 index into code8; absmax = code8[q] * absmax2[i // DQ_BLOCK]
                                 + offset, with i = b * N + n
          FORMAT 2 (INT4):       float32 scale; zeros (same shape, uint8) holds the zero point
Math (float32, as quant.dequantize):  NF4  w = code[q] * absmax;   INT4  w = (q - zero) * scale.

The kernels take the packed row stride as its own argument (stride_pn, = KP/2) rather than
computing KP // 2: Triton then sees that it is a multiple of 16 and issues 16-byte loads.

Four ways to turn a code into its value (meta-parameter LOOKUP of each kernel):
  - LOOKUP=0: a gather from the 64-byte table in global memory (one L1 load per value, all lanes
    hit the same cache line). Good where nothing is pipelined (dequantize, the skinny kernels).
    Inside a loop that feeds tl.dot it is harmful: Triton's software pipeliner walks back from the
    dot operands through every op and turns each load of >= 32 bits it meets into an async copy to
    shared memory, so this gather becomes one 4-byte cp.async per weight plus a shared-memory
    round trip.
  - LOOKUP=1: a 4-level tree of selects on the bits of the code (15 selects, no memory).
  - LOOKUP=2: per row (and quantization block) build the 16 scaled values
    table[r, c] = value(c) * scale[r] in float32, round them once to the output dtype, and pick
    with tl.gather (a tile spanning G blocks uses one (rows, 16 G) table, index + 16 * block) (a register/shared-memory gather, not a load: the pipeliner leaves it alone).
    The result is bit-identical to value * scale rounded per weight, and per weight it costs one
    gather instead of lookup + multiply + conversion. Made for the tl.dot kernels.
  - LOOKUP=3 (NF4 with bf16 output, the tl.dot kernels; dequantize only in tests): byte permutes
    (prmt) look up 4 codes per instruction in tables held in registers, then one bf16x2 multiply by
    the scale per 2 weights, about 3.4 instructions per weight (section "LOOKUP = 3" below).
    Unlike the others it rounds the code and the scale to bf16 before the product:
    w = bf16(bf16(code) * bf16(scale)), within 3.03 * 2^-8 relative of quant.dequantize's
    float32 weight (rounding once: 2^-8). Inline PTX, so on CUDA only; the interpreter runs a
    plain-Triton statement of the same numbers (nf4_bf16_pairs, ASM=0).
  - INT4 never needs a table for LOOKUP 0/1: float(q) - float(zero) is computed as
    bitcast(0x4B000000 | q) - bitcast(0x4B000000 | zero): 0x4B000000 is 2^23 as float32, so OR-ing
    an integer below 2^23 into its mantissa gives 2^23 + q exactly; the difference is exact.
"""

import triton
import triton.language as tl

@triton.jit
def nf4_lookup(nib, code_ptr, LOOKUP: tl.constexpr):
    """float32 code[nib] for an int32 tensor nib with values in [0, 16)."""
    if LOOKUP == 0:
        v = tl.load(code_ptr + nib)
    else:
        bit0 = (nib & 1) != 0
        bit1 = (nib & 2) != 0
        bit2 = (nib & 4) != 0
        bit3 = (nib & 8) != 0
        # level 1: pairs (2i, 2i+1) chosen by bit 0
        v01 = tl.where(bit0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
        v23 = tl.where(bit0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
        v45 = tl.where(bit0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
        v67 = tl.where(bit0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
        v89 = tl.where(bit0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
        vab = tl.where(bit0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
        vcd = tl.where(bit0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
        vef = tl.where(bit0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
        # levels 2-4
        v03 = tl.where(bit1, v23, v01)
        v47 = tl.where(bit1, v67, v45)
        v8b = tl.where(bit1, vab, v89)
        vcf = tl.where(bit1, vef, vcd)
        v07 = tl.where(bit2, v47, v03)
        v8f = tl.where(bit2, vcf, v8b)
        v = tl.where(bit3, v8f, v07)
    return v


@triton.jit
def code_values(nib, zero_f, code_ptr, FORMAT: tl.constexpr, LOOKUP: tl.constexpr):
    """Unscaled float32 value of each code: code[q] (NF4) or q - zero (INT4, exact).

    zero_f is 2^23 + zero as float32 (from load_block_scales), broadcastable to nib.
    """
    if FORMAT == 2:
        v = (nib | 0x4B000000).to(tl.float32, bitcast=True) - zero_f
    else:
        v = nf4_lookup(nib, code_ptr, LOOKUP)
    return v


@triton.jit
def double_dequant(q, absmax2, code8_ptr, offset):
    """A block's absmax from its 8-bit code q (int32) and its group's absmax2, as
    quant.double_dequantize: code8[q] * absmax2 + offset. (Two roundings there; the compiler may
    fuse them into one FMA: then the absmax can differ by one float32 ulp from the reference.)"""
    return tl.load(code8_ptr + q) * absmax2 + offset


@triton.jit
def load_block_scales(scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                      kblock, row, mask, N,
                      FORMAT: tl.constexpr, DQ_BLOCK: tl.constexpr):
    """Per-block multiplier (float32) and, for INT4, 2^23 + zero (float32).

    kblock, row: broadcastable int tensors (block index along K, output row); masked-off entries
    give finite values (scale 0 or the DQ offset) so that they never make NaN.
    """
    idx = kblock * N + row
    if FORMAT == 1:
        q = tl.load(scales_ptr + idx, mask=mask, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + idx // DQ_BLOCK, mask=mask, other=0.0)
        scale = double_dequant(q, absmax2, code8_ptr, tl.load(offset_ptr))
    else:
        scale = tl.load(scales_ptr + idx, mask=mask, other=0.0)
    if FORMAT == 2:
        zero = tl.load(zeros_ptr + idx, mask=mask, other=0).to(tl.int32)
        zero_f = (zero | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        zero_f = scale  # unused
    return scale, zero_f


@triton.jit
def scaled_table(scale, zero_f, code_ptr, FORMAT: tl.constexpr, DTYPE: tl.constexpr,
                 GROUPED: tl.constexpr):
    """Table of the 16 scaled code values in DTYPE, for LOOKUP=2: value(c) * scale, shape
    (ROWS, 16) for scale (ROWS,) or, GROUPED, (ROWS, GROUPS, 16) for scale (ROWS, GROUPS).

    value(c) = code[c] (NF4) or c - zero (INT4, zero_f = 2^23 + zero as from load_block_scales).
    """
    c = tl.arange(0, 16)
    if FORMAT == 2:
        v = (c | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        v = tl.load(code_ptr + c)
    if GROUPED:
        if FORMAT == 2:
            t = (v[None, None, :] - zero_f[:, :, None]) * scale[:, :, None]
        else:
            t = v[None, None, :] * scale[:, :, None]
    else:
        if FORMAT == 2:
            t = (v[None, :] - zero_f[:, None]) * scale[:, None]
        else:
            t = v[None, :] * scale[:, None]
    return t.to(DTYPE)


@triton.jit
def dequantize_tile(p, scale, zero_f, code_ptr,
                    ROWS: tl.constexpr, BYTES: tl.constexpr, GROUPS: tl.constexpr,
                    FORMAT: tl.constexpr, LOOKUP: tl.constexpr, DTYPE: tl.constexpr):
    """uint8 p (ROWS, BYTES) -> weights (ROWS, 2 * BYTES) in DTYPE, on chip.

    scale, zero_f: (ROWS, GROUPS) float32, one per quantization block; the BYTES columns split
    evenly into GROUPS blocks. Column 2j comes from the high nibble of byte j, 2j+1 from its low
    nibble (tl.interleave: a join along a new in-thread axis, then a reshape, both register-local).
    Every LOOKUP gives value * scale computed in float32 and rounded once to DTYPE.
    """
    hi = (p >> 4).to(tl.int32)
    lo = (p & 0xF).to(tl.int32)
    if LOOKUP == 2:
        if GROUPS == 1:
            table = scaled_table(tl.reshape(scale, (ROWS,)), tl.reshape(zero_f, (ROWS,)),
                                 code_ptr, FORMAT, DTYPE, False)
            w_hi = tl.gather(table, hi, axis=1)
            w_lo = tl.gather(table, lo, axis=1)
        else:
            # one 2-D table (ROWS, GROUPS * 16) and the index moved to its block's 16 entries:
            # the big tiles stay 2-D (no reshape of them, no 3-D gather)
            PER: tl.constexpr = BYTES // GROUPS
            table = tl.reshape(scaled_table(scale, zero_f, code_ptr, FORMAT, DTYPE, True),
                               (ROWS, GROUPS * 16))
            base = (tl.arange(0, BYTES) // PER * 16)[None, :]
            w_hi = tl.gather(table, hi + base, axis=1)
            w_lo = tl.gather(table, lo + base, axis=1)
    elif GROUPS == 1:
        w_hi = (code_values(hi, zero_f, code_ptr, FORMAT, LOOKUP) * scale).to(DTYPE)
        w_lo = (code_values(lo, zero_f, code_ptr, FORMAT, LOOKUP) * scale).to(DTYPE)
    else:
        PER: tl.constexpr = BYTES // GROUPS
        hi3 = tl.reshape(hi, (ROWS, GROUPS, PER))
        lo3 = tl.reshape(lo, (ROWS, GROUPS, PER))
        z3 = zero_f[:, :, None]
        s3 = scale[:, :, None]
        w_hi = tl.reshape((code_values(hi3, z3, code_ptr, FORMAT, LOOKUP) * s3).to(DTYPE), (ROWS, BYTES))
        w_lo = tl.reshape((code_values(lo3, z3, code_ptr, FORMAT, LOOKUP) * s3).to(DTYPE), (ROWS, BYTES))
    return tl.interleave(w_hi, w_lo)


# ----------------------------------------------------------------------------- LOOKUP = 3
# NF4 to bf16 with byte permutes (CUDA only; the interpreter runs nf4_bf16_pairs' plain branch).
#
# prmt.b32 d, a, b, c builds each byte of d from one of the 8 bytes of {b, a}, chosen by one
# nibble of c: a lookup in an 8-entry byte table, for 4 nibbles (codes) at once, in one
# instruction. A bf16 code value has two bytes and there are 16 codes, so the 16 high bytes and
# the 16 low bytes are each a table of 4 words (code_with_tables in _launch.py builds them from
# the weight's code, after code[0:16]: words 16-19 high bytes, 20-23 low bytes, 24 = 0x01010101),
# looked up twice: in their first half with the nibble as is, in their second half with nibble ^ 8,
# keeping per byte the right result with a mask from bit 3 of the nibble (a set bit 3 makes prmt
# replicate the sign of the byte instead of copying it: prmt on 0x01 bytes gives 0x01 where the
# code is < 8 and 0x00 where it is >= 8; m = 0xFFFFFFFF - 255 t then marks the codes >= 8).
# Per 8 codes (4 bytes, one asm instance, pack=4): 2 shifts + 1 xor, then per 4 codes 6 prmt,
# 2 lop3, 1 mad, and 2 bf16x2 multiplies by the scale: about 3.4 instructions per weight,
# against about 15 for LOOKUP 2's gather (sm_90 assembly of the fused kernel's loop).
# The value is rounded twice: w = bf16(bf16(code) * bf16(scale)) (fma.rn.bf16x2 rounds the exact
# product once), where quant.dequantize rounds code * scale (float32) once: relative error up to
# (1 + 2^-8)^3 - 1 (measured 0.0099 on a 4096x4096 weight), against 2^-8 for rounding once; 29%
# of the weights differ from quant.dequantize's bf16 by one ulp (NF4's own error is 9%).
# Operands: $0-$3 the 4 output words, $4 the 4 bytes, $5-$8 their scale pairs (bf16 scale in
# both halves), then the 9 table words, each 4 times (pack=4 repeats every argument): $9 + 4 i.
def prmt_decode_lines(src: str, outs, tab) -> list:
    """PTX lines decoding the 4 bytes of the 32-bit register `src` into the 4 registers `outs`
    (out i = bf16(code[low nibble of byte i]) << 16 | bf16(code[high nibble])), unscaled.
    tab: the 9 table operands (4 high-byte words, 4 low-byte words, 0x01010101). Temporaries
    c<2>, x<2>, t, m, a, b, h, l (.b32) must be declared by the caller."""
    h, lo, one = tab[0:4], tab[4:8], tab[8]
    lines = [f"mov.b32 c0, {src};", f"shr.b32 c1, {src}, 16;",          # codes of bytes 0-1, 2-3
             f"xor.b32 x0, {src}, 0x88888888;", "shr.b32 x1, x0, 16;"]  # the same, bit 3 flipped
    for i in range(2):
        lines += [
            f"prmt.b32 t, {one}, {one}, c{i};",                # 0x01 where code < 8, else 0
            "mad.lo.u32 m, t, 0xFFFFFF01, 0xFFFFFFFF;",       # 0xFF where code >= 8, else 0
            f"prmt.b32 a, {h[0]}, {h[1]}, c{i};",             # high byte if code < 8
            f"prmt.b32 b, {h[2]}, {h[3]}, x{i};",             # high byte if code >= 8
            "lop3.b32 h, a, b, m, 0xD8;",                    # (a & ~m) | (b & m)
            f"prmt.b32 a, {lo[0]}, {lo[1]}, c{i};",
            f"prmt.b32 b, {lo[2]}, {lo[3]}, x{i};",
            "lop3.b32 l, a, b, m, 0xD8;",
            # input byte j holds codes (column 2j: high nibble, 2j+1: low nibble); its output
            # word is bf16(column 2j+1) << 16 | bf16(column 2j), its bytes picked from l and h
            f"prmt.b32 {outs[2 * i]}, l, h, 0x4051;",
            f"prmt.b32 {outs[2 * i + 1]}, l, h, 0x6273;",
        ]
    return lines


PRMT_TEMPS = ".reg .b32 c<2>, x<2>, t, m, a, b, h, l;"


def _nf4_prmt_asm(scaled: bool) -> str:
    first_tab = 9 if scaled else 5  # the unscaled variant has no scale operands
    tab = [f"${first_tab + 4 * i}" for i in range(9)]
    lines = ["{", PRMT_TEMPS] + prmt_decode_lines("$4", ["$0", "$1", "$2", "$3"], tab)
    if scaled:
        # w * scale as fma(w, scale, -0.0): exactly mul.rn.bf16x2 (one rounding; adding -0 keeps
        # every product, zeros' signs too), but fma.rn.bf16x2 runs from sm_80 and mul only from
        # sm_90 (A100, RTX 30xx / 40xx could not compile LOOKUP 3)
        lines += ["mov.b32 t, 0x80008000;"]
        lines += [f"fma.rn.bf16x2 ${i}, ${i}, ${5 + i}, t;" for i in range(4)]
    lines.append("}")
    return "\n".join(lines)


NF4_PRMT_ASM: tl.constexpr = tl.constexpr(_nf4_prmt_asm(scaled=True))
NF4_PRMT_CONSTRAINTS: tl.constexpr = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 4 + ",r" * 36)
# The same without the scale (for the M = 1 kernel, which applies it to each block's sum):
NF4_PRMT_CODES_ASM: tl.constexpr = tl.constexpr(_nf4_prmt_asm(scaled=False))
NF4_PRMT_CODES_CONSTRAINTS: tl.constexpr = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 36)


@triton.jit
def bf16_bits(x):
    """float32 x -> the 16 bits of bf16(x), rounded to nearest even, as int32 in [0, 65536)
    (finite x). Integer arithmetic: the interpreter's float32 -> bf16 conversion truncates."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _table_word(tab, i):
    """Word i of the decoder's table, made to look lane-dependent to ptxas (XOR with lane id AND
    word 9, which is 0 but only memory knows): ptxas then holds it in a regular register, where it
    would keep a plain load's value in a uniform register and copy it to a regular one before every
    prmt (one more instruction per prmt)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 l; mov.u32 l, %laneid; and.b32 l, l, $2; xor.b32 $0, $1, l; }", "=r,r,r",
        [tl.load(tab + i), tl.load(tab + 9)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _table_byte(tab, n, word0):
    """Byte n % 4 of word word0 + n // 4 of the int32 table tab: entry n of a 16-byte table."""
    return (tl.load(tab + word0 + n // 4) >> (n % 4 * 8)) & 0xFF


@triton.jit
def nf4_code_pairs(p, code_ptr, ASM: tl.constexpr):
    """uint8 p -> int32 of the same shape: bf16(code[low nibble]) << 16 | bf16(code[high nibble]),
    unscaled (LOOKUP=3 for the M = 1 kernel, which turns the halves into float32 by shifts)."""
    tab = code_ptr.to(tl.pointer_type(tl.int32)) + 16
    if ASM:
        words = tl.inline_asm_elementwise(
            NF4_PRMT_CODES_ASM, NF4_PRMT_CODES_CONSTRAINTS,
            [p, _table_word(tab, 0), _table_word(tab, 1), _table_word(tab, 2), _table_word(tab, 3),
             _table_word(tab, 4), _table_word(tab, 5), _table_word(tab, 6), _table_word(tab, 7),
             _table_word(tab, 8)],
            dtype=tl.int32, is_pure=True, pack=4)
    else:
        hi = (p >> 4).to(tl.int32)
        lo = (p & 0xF).to(tl.int32)
        words = ((_table_byte(tab, lo, 0) << 24) | (_table_byte(tab, lo, 4) << 16)
                 | (_table_byte(tab, hi, 0) << 8) | _table_byte(tab, hi, 4))
    return words


@triton.jit
def nf4_bf16_pairs(p, s2, code_ptr, ASM: tl.constexpr):
    """uint8 p (ROWS, BYTES), int32 s2 (broadcastable to p: bf16 scale bits in both halves) ->
    bf16 (ROWS, 2 BYTES), w = bf16(bf16(code) * bf16(scale)), column 2j from byte j's high nibble.

    ASM: the prmt decoder above; else the same numbers from plain loads and shifts (the
    interpreter's path, and the statement of what the decoder computes).
    """
    tab = code_ptr.to(tl.pointer_type(tl.int32)) + 16
    if ASM:
        wpair = tl.inline_asm_elementwise(
            NF4_PRMT_ASM, NF4_PRMT_CONSTRAINTS,
            [p, s2, _table_word(tab, 0), _table_word(tab, 1), _table_word(tab, 2), _table_word(tab, 3),
             _table_word(tab, 4), _table_word(tab, 5), _table_word(tab, 6), _table_word(tab, 7),
             _table_word(tab, 8)],
            dtype=tl.int32, is_pure=True, pack=4)
        # (the table words are loaded, not written into the PTX as immediates: ptxas then keeps
        # them in registers instead of re-materializing constants before every prmt)
        w_hi = wpair.to(tl.int16).to(tl.bfloat16, bitcast=True)
        w_lo = (wpair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        scale = (s2 << 16).to(tl.float32, bitcast=True)  # the bf16 scale, exactly
        codes = nf4_code_pairs(p, code_ptr, 0)
        v_hi = (codes << 16).to(tl.float32, bitcast=True)  # bf16 code values as float32
        v_lo = (codes & -65536).to(tl.float32, bitcast=True)
        # the product of two bf16 is exact in float32: one rounding, as fma.rn.bf16x2
        w_hi = bf16_bits(v_hi * scale).to(tl.int16).to(tl.bfloat16, bitcast=True)
        w_lo = bf16_bits(v_lo * scale).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.interleave(w_hi, w_lo)


@triton.jit
def dequantize_tile_prmt(p, scale, code_ptr, ROWS: tl.constexpr, BYTES: tl.constexpr,
                         GROUPS: tl.constexpr, ASM: tl.constexpr):
    """LOOKUP=3 (NF4, bf16 out): uint8 p (ROWS, BYTES), float32 scale (ROWS, GROUPS) -> bf16
    (ROWS, 2 BYTES), w = bf16(bf16(code) * bf16(scale)); see nf4_bf16_pairs."""
    sb = bf16_bits(scale)
    s2 = sb | (sb << 16)
    if GROUPS == 1:
        s2 = tl.reshape(s2, (ROWS, 1))
    else:
        PER: tl.constexpr = BYTES // GROUPS
        s2 = tl.reshape(tl.broadcast_to(s2[:, :, None], (ROWS, GROUPS, PER)), (ROWS, BYTES))
    return nf4_bf16_pairs(p, s2, code_ptr, ASM)
