"""Seeded dropout: y = x * m / (1 - p), with the mask m a hash of (seed, salt, element index).

Math (dropout.py at the top level is the reference, in PyTorch; this kernel must equal it bit for bit):
    mix(z)  = lowbias32: z ^= z >> 16; z *= 0x7FEB352D; z ^= z >> 15; z *= 0x846CA68B; z ^= z >> 16
              (32-bit unsigned arithmetic, products modulo 2^32)
    key     = mix(seed XOR mix(salt))
    m_i     = 1 if (mix(i XOR key) >> 8) >= threshold else 0,   threshold = ceil(p * 2^24)
    y_i     = m_i ? x_i * scale : 0,  scale = 1 / (1 - p), computed in float32, rounded once to x's dtype

The seed is read from a one-element int64 device tensor, so a CUDA graph that draws it before this
kernel gets new masks at every replay, and the backward gets the forward's masks by reading it again.

Memory layout: x contiguous, seen as flat (n,); i is the flat index (so n < 2^32). One program handles
BLOCK consecutive elements: a streaming, memory-bound kernel (n elements read, n written; twice
that with a second tensor, x2, under the same mask).
"""

import torch
import triton
import triton.language as tl

from ._launch import check_device

MAX_NUMEL = 2**32  # the index is hashed as a 32-bit number


@triton.jit
def _mix32(z):
    """lowbias32 on uint32 (Wellons' hash prospector): a bijection whose output bits each flip with
    probability close to 1/2 when any input bit flips."""
    z ^= z >> 16
    z *= tl.full([], 0x7FEB352D, tl.uint32)
    z ^= z >> 15
    z *= tl.full([], 0x846CA68B, tl.uint32)
    z ^= z >> 16
    return z


@triton.jit
def mask_key(seed_ptr, salt):
    """key = mix(seed XOR mix(salt)), the seed read from its one-element int64 tensor (low 32 bits)."""
    seed = tl.load(seed_ptr).to(tl.uint32)
    return _mix32(seed ^ _mix32(tl.full([], salt, tl.uint32)))


@triton.jit
def kept(index, key, threshold):
    """m_i for flat indices i (uint32, or int64 below 2^32; any shape): True where the element is kept."""
    return (_mix32(index.to(tl.uint32) ^ key) >> 8).to(tl.int32) >= threshold


@triton.jit
def seeded_dropout_kernel(x_ptr, out_ptr, x2_ptr, out2_ptr, seed_ptr, n, salt, threshold, scale,
                          TWO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    keep = kept(offs, mask_key(seed_ptr, salt), threshold)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, tl.where(keep, x.to(tl.float32) * scale, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    if TWO:  # a second tensor of the same shape, the same mask (LoRA's backward: x and the gradient)
        x2 = tl.load(x2_ptr + offs, mask=ok, other=0.0)
        tl.store(out2_ptr + offs, tl.where(keep, x2.to(tl.float32) * scale, 0.0).to(out2_ptr.dtype.element_ty),
                 mask=ok)


def _check(x: torch.Tensor, like: torch.Tensor = None):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"seeded_dropout: unsupported dtype {x.dtype}")
    if like is not None and (x.shape != like.shape or x.device != like.device):
        raise ValueError(f"seeded_dropout: the second tensor {tuple(x.shape)} on {x.device} must have the "
                         f"first's shape {tuple(like.shape)} and device {like.device}")


def check_mask_args(name: str, x: torch.Tensor, seed: torch.Tensor, salt: int, threshold: int):
    """The mask's arguments for a masked tensor x: a ValueError that names the launcher `name`."""
    if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
        raise ValueError(f"{name}: seed must be one int64 on {x.device}, got {seed.dtype} "
                         f"{tuple(seed.shape)} on {seed.device}")
    if not 0 <= salt < 2**31 or not 0 <= threshold <= 2**24:
        raise ValueError(f"{name}: salt {salt} or threshold {threshold} out of range")
    if x.numel() >= MAX_NUMEL:
        raise ValueError(f"{name}: {x.numel()} elements; the index is 32-bit (at most {MAX_NUMEL - 1})")


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, threshold: int, scale: float,
                   x2: torch.Tensor = None):
    """x * m * scale with m as above, as a new contiguous tensor of x's shape and dtype; with x2 (the
    same shape), the pair (x * m * scale, x2 * m * scale) from one launch and one hash per element.

    seed: int64 tensor of one element on x's device; salt: 0 <= salt < 2^31; threshold: ceil(p 2^24).
    """
    check_device(x.device)
    _check(x)
    if x2 is not None:
        _check(x2, like=x)
    check_mask_args("seeded_dropout", x, seed, salt, threshold)
    x = x.contiguous()
    out = torch.empty_like(x)
    x2 = x2.contiguous() if x2 is not None else None
    out2 = torch.empty_like(x2) if x2 is not None else None
    n = x.numel()
    if n:
        block = 1024
        seeded_dropout_kernel[(triton.cdiv(n, block),)](
            x, out, x if x2 is None else x2, out if x2 is None else out2, seed, n, salt, threshold, scale,
            TWO=x2 is not None, BLOCK=block, num_warps=4,
            enable_fp_fusion=False)  # (one product per element, nothing to fuse; said, so Triton 3.9 does not warn)
    return out if x2 is None else (out, out2)
