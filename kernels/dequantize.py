"""Dequantize a 4-bit weight (NF4, NF4 with double quantization, or INT4) to a dense 16/32-bit one.

Math (float32, then rounded to the output dtype; identical to quant.dequantize):
    NF4   W[n, k] = code[q[n, k]] * absmax[k // B, n]     (absmax from double quantization:
                    code8[qa] * absmax2[(k // B * N + n) // 256] + offset)
    INT4  W[n, k] = (q[n, k] - zero[k // B, n]) * scale[k // B, n]

Memory layout: packed uint8 (N, KP/2), two codes per byte, column 2j in the high nibble; per-block
numbers (KP/B, N); see kernels/_tile.py. Output: contiguous (N, K) in the requested dtype.

Each program dequantizes a BLOCK_R x BLOCK_C tile: it reads BLOCK_R rows of BLOCK_C/2 contiguous
bytes, BLOCK_R * BLOCK_C/B block scales (contiguous along rows), and writes BLOCK_R rows of BLOCK_C
contiguous outputs. Memory-bound: bytes read = N*K/2 (+ scales), written = N*K*2 (bf16).
This is the first half of the "dequantize, then cuBLAS" path of quant.py, and what
QuantLinear.dequantize() uses on CUDA (e.g. to merge LoRA).
"""

import torch
import triton
import triton.language as tl

from ._launch import autotune, check_device, check_lookup, interpreting, launch, weight_args
from ._tile import dequantize_tile, dequantize_tile_prmt, load_block_scales


@triton.jit
def dequantize_kernel(
    packed_ptr, scales_ptr, zeros_ptr, absmax2_ptr, code_ptr, code8_ptr, offset_ptr, out_ptr,
    N, K, KP, stride_pn, stride_on,
    FORMAT: tl.constexpr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, LOOKUP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ASM: tl.constexpr = 1,
):
    GROUPS: tl.constexpr = BLOCK_C // QBLOCK if BLOCK_C > QBLOCK else 1
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    c0 = pid_c * BLOCK_C
    offs_b = c0 // 2 + tl.arange(0, BLOCK_C // 2)
    p = tl.load(packed_ptr + rows[:, None] * stride_pn + offs_b[None, :],
                mask=row_ok[:, None] & (offs_b < KP // 2)[None, :], other=0)
    kblock = c0 // QBLOCK + tl.arange(0, GROUPS)
    scale, zero_f = load_block_scales(
        scales_ptr, zeros_ptr, absmax2_ptr, code8_ptr, offset_ptr,
        kblock[None, :], rows[:, None], row_ok[:, None] & (kblock < KP // QBLOCK)[None, :], N,
        FORMAT, DQ_BLOCK)
    if LOOKUP == 3:
        w = dequantize_tile_prmt(p, scale, code_ptr, BLOCK_R, BLOCK_C // 2, GROUPS, ASM)
    else:
        w = dequantize_tile(p, scale, zero_f, code_ptr, BLOCK_R, BLOCK_C // 2, GROUPS, FORMAT,
                            LOOKUP, out_ptr.dtype.element_ty)
    cols = c0 + tl.arange(0, BLOCK_C)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :],
             w, mask=row_ok[:, None] & (cols < K)[None, :])


_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": 0}, num_warps=4),
    triton.Config({"BLOCK_R": 16, "BLOCK_C": 512, "LOOKUP": 0}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "BLOCK_C": 256, "LOOKUP": 0}, num_warps=8),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": 2}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": 1}, num_warps=4),
]
_dequantize_tuned = autotune(_CONFIGS, ["N", "K", "FORMAT", "QBLOCK"])(
    dequantize_kernel)

INTERPRETER_CONFIG = {"BLOCK_R": 16, "BLOCK_C": 128, "LOOKUP": 0}


def dequantize(w, dtype: torch.dtype = torch.bfloat16, config: dict = None) -> torch.Tensor:
    """Dense (out_features, in_features) weight in `dtype` from a quantized weight (see _launch).

    config: fixed meta-parameters (BLOCK_R, BLOCK_C, LOOKUP, num_warps) instead of autotuning;
    the CPU interpreter uses INTERPRETER_CONFIG by default.
    """
    fmt, tensors, kp, qb, dq_block = weight_args(w)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported output dtype {dtype}: expected float16, bfloat16 or float32")
    device = w.packed.device
    check_device(device)
    n, k = w.out_features, w.in_features
    out = torch.empty((n, k), dtype=dtype, device=device)
    args = (*tensors, out, n, k, kp, w.packed.stride(0), out.stride(0))
    consts = dict(FORMAT=fmt, QBLOCK=qb, DQ_BLOCK=dq_block, ASM=int(not interpreting()))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_R"]), triton.cdiv(kp, meta["BLOCK_C"]))  # noqa: E731
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is not None:
        check_lookup(config.get("LOOKUP"), fmt, dtype)
    # (the autotuner's key, N K FORMAT QBLOCK and the tensors' dtypes, which FORMAT and dtype fix)
    launch(dequantize_kernel, _dequantize_tuned, grid, args, consts, config,
           key=(n, k, fmt, qb, dq_block, dtype, device))
    return out
