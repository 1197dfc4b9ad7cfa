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

Three ways to turn a code into its value (meta-parameter LOOKUP of each kernel):
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
        # two roundings, as quant.double_dequantize (the compiler may fuse them into one FMA:
        # then the absmax can differ by one float32 ulp from the reference)
        scale = tl.load(code8_ptr + q) * absmax2 + tl.load(offset_ptr)
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
