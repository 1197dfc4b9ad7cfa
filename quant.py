"""4-bit weights for QLoRA: NF4 with double quantization, and INT4, in plain PyTorch.

This file is the *reference*: every Triton kernel in kernels/ must give the same numbers (one
exception, documented and bounded in kernels/_tile.py: the fast NF4 path for bf16, LOOKUP=3, rounds
the code value and the absmax to bf16 before multiplying). It runs on any device; on CUDA it
dispatches the matmuls to kernels/ (imported lazily), elsewhere it computes them here.

What it follows (QLoRA, Dettmers et al. 2023, section 3):

NF4 (4-bit NormalFloat). A 16-value code built from quantiles of the standard normal N(0, 1),
asymmetric so that it has an exact zero: 8 positive values, 7 negative values and 0. With
    offset = 1/2 * ((1 - 1/(2*15)) + (1 - 1/(2*16))) = 0.96770833...
the positive values are Q(p) for the 8 probabilities p = linspace(offset, 1/2, 9) without its last
point, the negative values are -Q(p) for the 7 probabilities linspace(offset, 1/2, 8) without its
last point (Q is the normal quantile function, torch.special.ndtri), and all 16 are divided by the
largest so that the code spans [-1, 1]. The table published with QLoRA / bitsandbytes was made with
the offset written to 7 decimals (0.9677083) and float32 arithmetic (float32 linspace, quantile in
float64, division in float32); `nf4_code` does exactly that and reproduces the published values bit
for bit (the unrounded offset would move them by up to 3e-7).

A weight W (out_features N x in_features K) is cut, along each row, into blocks of `block_size`
(64) consecutive weights. Each block keeps absmax = max |w| (float32), and each weight keeps the
index of the code value nearest to w / absmax (computed as w * (1 / absmax) in float32, as
bitsandbytes does; a tie goes to the smaller value; a block of zeros gets absmax 0 and the code of
0). Dequantization is  w_hat = code[q] * absmax  in float32, then rounded to the compute dtype.
On Gaussian weights ||W - W_hat|| / ||W|| is about 0.092 at block size 64.

Double quantization (QLoRA 3, "Double Quantization"). The float32 absmax values (0.5 bit per
weight) are quantized again, as bitsandbytes does: their mean is subtracted (one float32 `offset`
per tensor), then they are cut into blocks of 256 and each block is quantized with 8-bit
*dynamic* quantization (bitsandbytes' signed "dynamic tree" code, `dynamic_code_8bit`, nearest
value of x / absmax2, one float32 absmax2 per block). The absmax is recovered as
    absmax_hat = code8[q] * absmax2 + offset      (float32, two roundings as bitsandbytes)
Its error is at most max_gap/2 * absmax2, where max_gap/2 = 0.00703 is the largest distance from a
point of [-1, 1] to the dynamic code (tests/test_quant.py checks this bound), i.e. about 0.7% of the
largest |absmax - mean| in the block of 256; the NF4 round-trip error on Gaussian weights hardly
moves (0.09198 -> 0.09200 on a 1024 x 4096 Gaussian matrix). Storage: 4 + 8/64 + 32/(64*256)
= 4.127 bits per weight (`bits_per_weight`); without double quantization 4 + 32/64 = 4.5.

INT4 (the QLoRA baseline "Int4"): asymmetric round-to-nearest with one float32 scale and one
integer zero point per group of `block_size` (64 or 128) weights along a row. With
lo = min(min w, 0) and hi = max(max w, 0) (the range always contains 0, so the zero point fits in
[0, 15]):  scale = (hi - lo) / 15,  zero = round(-lo / scale),  q = clamp(round(w / scale) + zero,
0, 15),  w_hat = (q - zero) * scale. Every weight is then within scale / 2 of w_hat. Storage is
4 + (32 + 8) / block_size bits per weight (4.625 at 64, 4.3125 at 128); on Gaussian weights
||W - W_hat|| / ||W|| is 0.0911 at 64 and 0.1006 at 128 (NF4 at 64: 0.0920 with fewer bits).

Packed layout (shared by NF4 and INT4, designed for the kernels):
  - `packed`: uint8 (N, K_pad / 2), row-major. Byte j of row n holds the codes of columns 2j (high
    nibble) and 2j+1 (low nibble): the first element sits in the high nibble, which is
    bitsandbytes' order, so for K a multiple of the block size our bytes equal those of
    bitsandbytes.functional.quantize_4bit on the same matrix. A kernel tile of rows x BLOCK_K
    columns reads BLOCK_K / 2 contiguous bytes per row.
  - per-block numbers (`scales`, and `zeros` for INT4) are stored *transposed*, shape
    (K_pad / block_size, N): the numbers that one K step of a kernel tile needs (one per row of the
    tile) are contiguous. (bitsandbytes stores them as (N, K / block_size); the set of numbers is
    the same.) `scales` is the float32 absmax (NF4), the uint8 double-quantized absmax index (NF4
    with double quantization) or the float32 scale (INT4).
  - double quantization runs over `scales` flattened in that order, so the 256 absmax values of
    one second-level block are 256 consecutive rows of one K block. (bitsandbytes runs it row by
    row: its second-level blocks, and so its absmax codes, equal ours for a single row or a
    single K block; tests/test_quant.py compares both on such a weight.)
  - K that is not a multiple of block_size is padded with zero columns up to K_pad (the tiny
    stories260K model has K = 172); dequantize() returns the first K columns.

Autograd: `QuantLinear.forward` computes y = x @ W_hat.T through `_QuantLinearFunction`, which saves
only the packed tensors (never x, never a dequantized W) and dequantizes again in backward for
dx = dy @ W_hat. W is frozen: it is stored in buffers, not parameters, and gets no gradient.
This works under LoRA wrappers (a module holding QuantLinear as `.base`) and under
torch.utils.checkpoint (non-reentrant).

Left out: FP4, paged optimizers, 8-bit (LLM.int8) matmul, quantization kernels (quantizing runs
here, in PyTorch, once per layer while loading), storing/loading quantized checkpoints, autocast
(the matmul computes in the dtype of x).
"""

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SKINNY_MAX_M",
    "DEQUANT_MATMUL_MIN_M",
    "FUSED_SM90_MIN_TILES",
    "FUSED_SM90_MIN_WEIGHTS",
    "graph_bound",
    "nf4_code",
    "dynamic_code_8bit",
    "pack_4bit",
    "unpack_4bit",
    "QuantizedWeight",
    "quantize_nf4",
    "quantize_int4",
    "quantize_weight",
    "double_quantize",
    "double_dequantize",
    "dequantize",
    "bits_per_weight",
    "quant_linear",
    "QuantLinear",
    "quantize_module",
    "quantize_model",
    "make_quantize_fn",
]

# ---------------------------------------------------------------------------------------------
# Dispatch on CUDA: the one place where the kernel choice is made (measure with
# benchmarks/bench_kernels.py on the target GPU and change these numbers there).
#   M = number of rows of x (tokens in the batch).
#   M <= SKINNY_MAX_M                 -> kernels.skinny_matmul (decoding; reads each byte once)
#   in a pass replayed from a CUDA graph (inside graph_bound()), on Hopper, M > 128, when the
#   Gluon fused kernel's grid has FUSED_SM90_MIN_TILES tiles or more, or W has
#   FUSED_SM90_MIN_WEIGHTS weights or more
#                                     -> kernels.fused_matmul, which runs the Gluon kernel there
#                                        (kernels/fused_matmul_sm90.py, when its sm90_ok says so)
#   M >= DEQUANT_MATMUL_MIN_M         -> kernels.dequantize into a temporary 16-bit weight, then
#                                        torch.matmul (cuBLAS); the temporary is freed right after
#   otherwise                         -> kernels.fused_matmul (dequantizes tiles on chip)
# The backward (dx = dy @ W_hat) uses kernels.fused_matmul_dx, or the dequantize+cuBLAS path when
# M >= DEQUANT_MATMUL_MIN_M. None disables the dequantize+cuBLAS path.
# float32 activations on CUDA always take the dequantize+cuBLAS path.
SKINNY_MAX_M = 16
# Measured (torch 2.11, triton 3.6, BENCHMARKS.md): from M = 64 up, dequantize+cuBLAS beat the
# fused kernel on all three LLaMA-7B shapes, on an H100 (first fused kernel) and on an H200 (at
# M = 4096: 1.04 x cuBLAS against 2.7-3.0 x). A 7B 8 x 512 training step took 1471 ms on the H100
# with the fused kernel, 482-637 ms on the H200 with this threshold at 64. The fused kernel keeps
# 17 <= M < 64 (short prompts, small batches).
DEQUANT_MATMUL_MIN_M: Optional[int] = 64
# The Hopper kernel came later (sm_90 only, M > 128; tiles of 256 tokens x 128 weight rows, one
# program per SM taking tile after tile). Its GPU time on an H100 (thirty-sixth session,
# BENCHMARKS.md) beat dequantize+cuBLAS on the three 7B shapes wherever its grid had 128 tiles or
# more (0.73-0.99x, from M = 1024 at 4096x4096, 512 at 11008x4096), not below (1.05-2.3x: SMs left
# idle), and it needs no 16-bit temporary. But launched eagerly it costs 120-270 us of host time
# per call (Python, Triton's launcher, two TMA descriptors; dequantize+cuBLAS 75-130 us), about
# its GPU time at 4096x4096: eager 7B training ran 13-19% slower with it. So only a pass that a
# CUDA graph replays takes it (graph_step.TrainStep, train.py's default: +10% at 2 x 512, +5% at
# 4 x 512, +3% at 8 x 512).
# Its backward counterpart does not exist: dx keeps the paths above. None: never.
FUSED_SM90_MIN_TILES: Optional[int] = 128
# Since the forty-first session the kernel also splits every tile along K when it has no more
# tiles than half the SMs, and then wins below 128 tiles wherever W is large (GPU time, H100,
# BENCHMARKS.md; Gluon / dequantize+cuBLAS, us): 4096x4096 at M = 256 37.4 / 40.7, 512 40.3 /
# 46.3; 4096x11008 at 256 55.0 / 108.6, 512 76.2 / 117.8; 11008x4096 at 256 (86 tiles) 51.9 /
# 92.6; but 1024x4096 (a grouped-query k / v projection) lost at every M from 256 to 2048
# (33-41 / 19-34): dequantizing a small W costs little. None: the tiles alone decide.
FUSED_SM90_MIN_WEIGHTS: Optional[int] = 4096 * 4096
_graph_bound = False  # set by graph_bound()
# ---------------------------------------------------------------------------------------------

QUANT_TYPES = ("nf4", "int4")
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NF4_OFFSET_7_DECIMALS = 0.9677083  # round(1/2 * ((1 - 1/30) + (1 - 1/32)), 7), as published
DQ_BLOCK_SIZE = 256  # bitsandbytes' block size for the second quantization


# --------------------------------------------------------------------------- the two codes


@functools.lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    offset = _NF4_OFFSET_7_DECIMALS
    # 9 probabilities from offset down to 1/2 (dropped: Q(1/2) = 0) -> 8 positive values;
    # 8 probabilities -> 7 negative values; plus the exact zero: 16 values.
    p_pos = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1]
    p_neg = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1]
    positive = torch.special.ndtri(p_pos.double()).float()
    negative = -torch.special.ndtri(p_neg.double()).float()
    values = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return values / values.max()


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values (float32, ascending, code[0] = -1, code[7] = 0, code[15] = 1)."""
    return _nf4_code_cpu().to(device=device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_code_8bit_cpu() -> torch.Tensor:
    # Signed dynamic tree quantization (Dettmers 2016, "8-Bit Approximations for Parallelism in
    # Deep Learning"), bitsandbytes' default 8-bit code: 1 sign bit; for exponent e = 0..6 the
    # magnitudes 10^(e-6) * m, where m runs over the 2^e midpoints of a uniform grid of 2^e + 1
    # points on [0.1, 1]; plus 0 and +1. 2 * (1 + 2 + ... + 64) + 2 = 256 values.
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        magnitudes = (10.0 ** (e - 6)) * mids
        values += magnitudes.tolist() + (-magnitudes).tolist()
    code = torch.tensor(values, dtype=torch.float32).sort().values
    assert code.numel() == 256
    return code


def dynamic_code_8bit(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 float32 values, ascending, in [-1, 1])."""
    return _dynamic_code_8bit_cpu().to(device=device, copy=True)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    # Decision thresholds of nearest-value rounding; float32 (a + b) * 0.5 is the float32 rounding
    # of the exact midpoint, the same constants as bitsandbytes' dQuantizeNF4 tree.
    return (code[:-1] + code[1:]) * 0.5


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code value; a value exactly on a midpoint goes to the smaller one."""
    return torch.bucketize(scaled, _midpoints(code), out_int32=True)


# --------------------------------------------------------------------------- packing


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) integers in [0, 16) with K even -> (N, K/2) uint8, column 2j in the high nibble."""
    if codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_4bit expects (N, even K) codes, got shape {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_4bit: (N, K/2) uint8 -> (N, K) uint8 codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_4bit expects 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(packed.shape[0], -1)


# --------------------------------------------------------------------------- the container


@dataclass
class QuantizedWeight:
    """A 4-bit weight of shape (out_features, in_features); layout in the module docstring.

    The kernels in kernels/ read these attribute names (duck typing), so they work on this
    dataclass without importing quant.py.
    """

    quant_type: str  # "nf4" | "int4"
    out_features: int  # N
    in_features: int  # K (before padding)
    block_size: int  # weights per absmax (NF4) or per scale/zero group (INT4)
    packed: torch.Tensor  # uint8 (N, K_pad/2)
    scales: torch.Tensor  # (K_pad/block_size, N): f32 absmax | u8 double-quantized absmax | f32 scale
    zeros: Optional[torch.Tensor] = None  # INT4: uint8 zero points (K_pad/block_size, N)
    code: Optional[torch.Tensor] = None  # NF4: float32 (16,)
    double_quant: bool = False  # NF4 only
    absmax2: Optional[torch.Tensor] = None  # double quant: float32 (ceil(numel(scales)/256),)
    offset: Optional[torch.Tensor] = None  # double quant: float32 (1,), the subtracted mean
    code8: Optional[torch.Tensor] = None  # double quant: float32 (256,) dynamic code
    dq_block_size: int = DQ_BLOCK_SIZE

    @property
    def shape(self) -> tuple:
        return (self.out_features, self.in_features)

    @property
    def padded_in_features(self) -> int:
        return 2 * self.packed.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> dict:
        """The tensor fields (None where unused), by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in _TENSOR_FIELDS}


_TENSOR_FIELDS = ("packed", "scales", "zeros", "code", "absmax2", "offset", "code8")


# --------------------------------------------------------------------------- quantize


def _check_weight(weight: torch.Tensor, block_size: int) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.dtype not in _WEIGHT_DTYPES:
        raise TypeError(
            f"unsupported weight dtype {weight.dtype}: expected float16, bfloat16 or float32"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight is empty: shape {tuple(weight.shape)}")
    if not (isinstance(block_size, int) and block_size >= 16 and block_size & (block_size - 1) == 0):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains inf or NaN; cannot quantize it")


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """float32 (N, K_pad/block_size, block_size), K padded with zero columns."""
    n, k = weight.shape
    k_pad = -(-k // block_size) * block_size
    w = weight.detach().float()
    if k_pad != k:
        w = F.pad(w, (0, k_pad - k))
    return w.view(n, k_pad // block_size, block_size)


def double_quantize(values: torch.Tensor, block_size: int = DQ_BLOCK_SIZE):
    """Quantize float32 values (the absmax of NF4 blocks) to 8 bits, as bitsandbytes.

    offset = mean(values); each block of `block_size` consecutive values of (values - offset)
    keeps absmax2 = max |.| (float32) and, per value, the index of the dynamic code value nearest
    to (value - offset) * (1 / absmax2). Returns (q uint8 like values.flatten(), absmax2 float32
    (num_blocks,), offset float32 (1,)).
    """
    flat = values.detach().float().reshape(-1)
    n = flat.numel()
    offset = flat.mean().reshape(1)
    centered = flat - offset
    n_pad = -(-n // block_size) * block_size
    blocks = F.pad(centered, (0, n_pad - n)).view(-1, block_size)  # zeros do not change absmax2
    absmax2 = blocks.abs().amax(dim=1)
    inv = torch.where(absmax2 > 0, 1.0 / absmax2, torch.zeros_like(absmax2))
    code8 = dynamic_code_8bit(flat.device)
    q = _nearest(blocks * inv[:, None], code8).to(torch.uint8).reshape(-1)[:n]
    return q.view(values.shape), absmax2, offset


def double_dequantize(q, absmax2, offset, block_size: int = DQ_BLOCK_SIZE, code8=None):
    """float32 code8[q] * absmax2[block] + offset (same shape as q)."""
    if code8 is None:
        code8 = dynamic_code_8bit(q.device)
    flat = q.reshape(-1).long()
    block_of = torch.arange(flat.numel(), device=q.device) // block_size
    return (code8[flat] * absmax2[block_of] + offset).view(q.shape)


def quantize_nf4(
    weight: torch.Tensor, block_size: int = 64, double_quant: bool = True
) -> QuantizedWeight:
    """NF4-quantize a 2-D weight (module docstring). Works on any device, in float32."""
    _check_weight(weight, block_size)
    if not isinstance(double_quant, bool):  # ("no" would count as true)
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    n, k = weight.shape
    blocks = _blocks(weight, block_size)
    absmax = blocks.abs().amax(dim=2)  # (N, KB)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    code = nf4_code(weight.device)
    codes = _nearest(blocks * inv[..., None], code)  # (N, KB, B) int32
    packed = pack_4bit(codes.view(n, -1))
    scales = absmax.t().contiguous()  # (KB, N): see "Packed layout"
    qw = QuantizedWeight("nf4", n, k, block_size, packed, scales, code=code)
    if double_quant:
        q, absmax2, offset = double_quantize(scales)
        qw.scales, qw.absmax2, qw.offset = q, absmax2, offset
        qw.double_quant, qw.code8 = True, dynamic_code_8bit(weight.device)
    return qw


def quantize_int4(weight: torch.Tensor, block_size: int = 64) -> QuantizedWeight:
    """INT4 asymmetric round-to-nearest, one scale and zero point per group (module docstring)."""
    _check_weight(weight, block_size)
    n, k = weight.shape
    groups = _blocks(weight, block_size)
    lo = groups.amin(dim=2).clamp(max=0.0)
    hi = groups.amax(dim=2).clamp(min=0.0)
    # A tensor divisor, not the Python scalar 15: PyTorch's CUDA kernels turn division by a scalar
    # into multiplication by its reciprocal (a different rounding), and CPU and GPU must agree.
    scale = (hi - lo) / torch.full_like(hi, 15.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    packed = pack_4bit(q.view(n, -1))
    return QuantizedWeight(
        "int4",
        n,
        k,
        block_size,
        packed,
        scale.t().contiguous(),
        zeros=zero.t().contiguous().to(torch.uint8),
    )


def quantize_weight(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                    double_quant: bool = True) -> QuantizedWeight:
    """quantize_nf4 or quantize_int4 by name (double_quant applies to NF4 only)."""
    if quant_type == "nf4":
        return quantize_nf4(weight, block_size, double_quant)
    if quant_type == "int4":
        return quantize_int4(weight, block_size)
    raise ValueError(f"unknown quant_type {quant_type!r}: expected one of {QUANT_TYPES}")


# --------------------------------------------------------------------------- dequantize


def block_scales(qw: QuantizedWeight) -> torch.Tensor:
    """float32 per-block multipliers, shape (K_pad/block_size, N): absmax (NF4) or scale (INT4)."""
    if qw.quant_type == "nf4" and qw.double_quant:
        return double_dequantize(qw.scales, qw.absmax2, qw.offset, qw.dq_block_size, qw.code8)
    return qw.scales


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (out_features, in_features) weight: the float32 values below, rounded to dtype.

    NF4: code[q] * absmax;  INT4: (q - zero) * scale  (each one float32 multiply).
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize returns floating point weights, got dtype {dtype}")
    if qw.quant_type == "int4" and (qw.zeros is None or qw.zeros.shape != qw.scales.shape):
        raise ValueError(f"INT4 zeros must have the scales' shape {tuple(qw.scales.shape)}, got "
                         f"{None if qw.zeros is None else tuple(qw.zeros.shape)}")
    n = qw.out_features
    codes = unpack_4bit(qw.packed).view(n, -1, qw.block_size)  # (N, KB, B)
    scales = block_scales(qw).t()  # (N, KB)
    if qw.quant_type == "nf4":
        values = qw.code[codes.long()]
    elif qw.quant_type == "int4":
        values = codes.float() - qw.zeros.t().float()[..., None]
    else:
        raise ValueError(f"unknown quant_type {qw.quant_type!r}")
    w = (values * scales[..., None]).view(n, -1)[:, : qw.in_features]
    return w.to(dtype)


def bits_per_weight(qw: QuantizedWeight) -> float:
    """Stored bits per weight (packed codes + per-block numbers; the code tables are constants)."""
    stored = [qw.packed, qw.scales, qw.zeros, qw.absmax2, qw.offset]
    bits = sum(t.numel() * t.element_size() * 8 for t in stored if t is not None)
    return bits / (qw.out_features * qw.in_features)


# --------------------------------------------------------------------------- matmul + autograd


@functools.lru_cache(maxsize=None)
def _kernels():
    """This project's kernels/ package, or None where Triton is missing (then the reference path
    is used). Only called for CUDA tensors."""
    try:
        module = importlib.import_module("kernels")
    except ModuleNotFoundError as e:
        if e.name == "triton":
            return None
        raise
    ours = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
    found = os.path.dirname(os.path.abspath(getattr(module, "__file__", None) or "?"))
    if found != ours:  # e.g. Hugging Face's `kernels` package, imported first by transformers
        raise RuntimeError(f"`import kernels` gives {found}, not this project's {ours}: another "
                           "package named `kernels` shadows it; import quant (or kernels) first")
    return module


def _kernels_for(t: torch.Tensor):
    if t.is_cuda and t.dtype in (torch.float16, torch.bfloat16):
        return _kernels()
    return None


@contextlib.contextmanager
def graph_bound():
    """Inside, the 4-bit matmuls are chosen for a pass that a CUDA graph will replay: by their GPU
    time alone, the host's launch cost being paid once, at capture. graph_step.TrainStep enters it
    for the passes it captures and for the eager pass before each capture, which compiles the same
    kernels (the Triton autotuners cannot time them inside a capture)."""
    global _graph_bound
    before, _graph_bound = _graph_bound, True
    try:
        yield
    finally:
        _graph_bound = before


def _gluon_wins(sm90, m: int, n: int, k: int) -> bool:
    """Whether the Gluon fused kernel beats dequantize+cuBLAS on x (m, k) @ W.T, W (n, k), by the
    measured rule above: m > 128 (where kernels.fused_matmul runs it), and its grid (module sm90:
    tiles of BLOCK_M tokens x BLOCK_N weight rows) has at least FUSED_SM90_MIN_TILES tiles, or W
    at least FUSED_SM90_MIN_WEIGHTS weights."""
    if FUSED_SM90_MIN_TILES is None or m <= 128:
        return False
    if FUSED_SM90_MIN_WEIGHTS is not None and n * k >= FUSED_SM90_MIN_WEIGHTS:
        return True
    return -(-m // sm90.BLOCK_M) * -(-n // sm90.BLOCK_N) >= FUSED_SM90_MIN_TILES


def _matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """y = x @ W_hat.T for 2-D x, in x.dtype."""
    k = _kernels_for(x)
    if k is None:
        if x.dtype == torch.float32 and x.is_cuda and _kernels() is not None:  # dequantize kernel + cuBLAS
            return x @ _kernels().dequantize(qw, x.dtype).t()
        return F.linear(x, dequantize(qw, x.dtype))
    m = x.shape[0]
    if 0 < m <= SKINNY_MAX_M:
        return k.skinny_matmul(x, qw)
    sm90 = k.fused_matmul_sm90
    if _graph_bound and _gluon_wins(sm90, m, qw.out_features, qw.in_features) and sm90.sm90_ok(x, qw):
        return k.fused_matmul(x, qw)
    if DEQUANT_MATMUL_MIN_M is not None and m >= DEQUANT_MATMUL_MIN_M:
        return x @ k.dequantize(qw, x.dtype).t()
    return k.fused_matmul(x, qw)


def _matmul_dx(dy: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """dx = dy @ W_hat for 2-D dy, in dy.dtype."""
    k = _kernels_for(dy)
    if k is None:
        if dy.dtype == torch.float32 and dy.is_cuda and _kernels() is not None:
            return dy @ _kernels().dequantize(qw, dy.dtype)
        return dy @ dequantize(qw, dy.dtype)
    if DEQUANT_MATMUL_MIN_M is not None and dy.shape[0] >= DEQUANT_MATMUL_MIN_M:
        return dy @ k.dequantize(qw, dy.dtype)
    return k.fused_matmul_dx(dy, qw)


class _QuantLinearFunction(torch.autograd.Function):
    """y = x @ W_hat.T; keeps only the 4-bit weight, dequantizes again for dx = dy @ W_hat.

    The weight goes on ctx as it is, not through save_for_backward: its tensors are the module's
    buffers, alive anyway, and saved-tensor hooks (checkpointing's, torch's save_on_cpu) have
    nothing to do with them. (Saved, they would also be rebuilt into a QuantizedWeight at every
    backward: Python time per layer that the host spends between kernels.)
    """

    @staticmethod
    def forward(ctx, x, qw: QuantizedWeight):
        ctx.qw = qw
        return _matmul(x, qw)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None
        return _matmul_dx(dy, ctx.qw), None


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None):
    """F.linear with a 4-bit weight: x (..., in_features) -> (..., out_features), in x.dtype."""
    if not x.is_floating_point():
        raise TypeError(f"input must be floating point, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"input must have a last dim of {qw.in_features} features, got a scalar")
    if x.shape[-1] != qw.in_features:
        raise ValueError(
            f"input has {x.shape[-1]} features in its last dim, the layer expects {qw.in_features}"
        )
    if x.device != qw.device:
        raise ValueError(f"input on {x.device}, weight on {qw.device}")
    x2 = x.reshape(-1, qw.in_features)
    if torch.is_grad_enabled() and x.requires_grad:
        y = _QuantLinearFunction.apply(x2, qw)
    else:  # inference (decoding): skip the autograd bookkeeping
        y = _matmul(x2, qw)
    if x.dim() != 2:  # a 2-D x gets y itself, not a view: LoRALinear adds into it in place
        y = y.view(*x.shape[:-1], qw.out_features)
    return y if bias is None else y + bias.to(y.dtype)


# --------------------------------------------------------------------------- the module


class QuantLinear(nn.Module):
    """A frozen 4-bit nn.Linear: y = x @ W_hat.T (+ bias). W lives in buffers (no gradient).

    dequantize(dtype) returns the dense (out_features, in_features) weight, e.g. to merge LoRA.
    .to(device) moves it; .to(dtype) casts only the bias: the quantization buffers keep their
    dtypes (see _apply). The matmul runs in the dtype of its input.
    """

    def __init__(self, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.quant_type = qweight.quant_type
        self.block_size = qweight.block_size
        self.double_quant = qweight.double_quant
        self.dq_block_size = qweight.dq_block_size
        self.weight_dtype = weight_dtype  # dtype of the weight it replaced; dequantize() default
        for name, t in qweight.tensors().items():
            # The code tables are constants (rebuilt by the quantizer), not part of the checkpoint.
            self.register_buffer(name, t, persistent=name not in ("code", "code8"))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._qweight_cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", block_size: int = 64,
                    double_quant: bool = True) -> "QuantLinear":
        w = linear.weight.detach()
        qw = quantize_weight(w, quant_type, block_size, double_quant)
        return cls(qw, linear.bias, weight_dtype=w.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating-point buffer; the
        # quantization state (float32 absmax, scales, code tables) must keep its dtypes, so only
        # device moves reach it. The bias follows the module's dtype like any buffer.
        kept = {name: self._buffers.pop(name) for name in _TENSOR_FIELDS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                if t is not None:
                    moved = fn(t)
                    t = moved if moved.dtype == t.dtype else t.to(moved.device)
                self._buffers[name] = t
            self._qweight_cache = None  # do not keep the tensors of the old device alive
        return self

    def qweight(self) -> QuantizedWeight:
        """The buffers as a QuantizedWeight (no copies); cached while the buffers stay the same
        tensors (per-call Python overhead matters when decoding)."""
        cached = self._qweight_cache
        if cached is None or any(getattr(cached, n) is not self._buffers[n] for n in _TENSOR_FIELDS):
            cached = QuantizedWeight(
                self.quant_type, self.out_features, self.in_features, self.block_size,
                double_quant=self.double_quant, dq_block_size=self.dq_block_size,
                **{name: self._buffers[name] for name in _TENSOR_FIELDS},
            )
            self._qweight_cache = cached
        return cached

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.weight_dtype
        qw = self.qweight()
        if qw.device.type == "cuda" and dtype != torch.float64 and _kernels() is not None:
            return _kernels().dequantize(qw, dtype)
        return dequantize(qw, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.qweight(), self.bias)

    def bits_per_weight(self) -> float:
        return bits_per_weight(self.qweight())

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"quant_type={self.quant_type}, block_size={self.block_size}")
        if self.quant_type == "nf4":
            s += f", double_quant={self.double_quant}"
        return s + f", bias={self.bias is not None}"


# --------------------------------------------------------------------------- whole models


def quantize_module(module: nn.Module, quant_type: str = "nf4", block_size: int = 64,
                    double_quant: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear inside `module` by a QuantLinear; returns `module`.

    Use it as load_model's `quantize` callback (see make_quantize_fn): each Block is quantized
    right after its 16-bit weights reach the device, and those weights are freed as soon as the
    nn.Linear is replaced, so loading holds at most one layer's 16-bit weights on the GPU.
    If `module` is itself an nn.Linear, the new QuantLinear is returned instead.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
    if isinstance(module, nn.Linear):
        return QuantLinear.from_linear(module, quant_type, block_size, double_quant)
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, QuantLinear.from_linear(linear, quant_type, block_size, double_quant))
        del linear  # drop our reference so the 16-bit weight can be freed now
    return module


def make_quantize_fn(quant_type: str = "nf4", block_size: int = 64,
                     double_quant: bool = True) -> Callable[[nn.Module], nn.Module]:
    """The `quantize` callback for model.load_model: quantizes one Block's linears in place."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
    return functools.partial(quantize_module, quant_type=quant_type, block_size=block_size,
                             double_quant=double_quant)


def quantize_model(model: nn.Module, quant_type: str = "nf4", block_size: int = 64,
                   double_quant: bool = True, include_lm_head: bool = False) -> nn.Module:
    """Quantize every nn.Linear inside model.layers (and model.lm_head if asked), in place.

    The embedding is never quantized; lm_head stays 16-bit unless include_lm_head (and is then
    untied from the embedding, which keeps its own 16-bit weight).
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
    if not hasattr(model, "layers"):
        raise ValueError("quantize_model expects a model with a .layers ModuleList (model.Transformer)")
    for block in model.layers:
        quantize_module(block, quant_type, block_size, double_quant)
    if include_lm_head:
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            raise ValueError("include_lm_head=True but model.lm_head is not an nn.Linear")
        model.lm_head = QuantLinear.from_linear(model.lm_head, quant_type, block_size, double_quant)
    return model
