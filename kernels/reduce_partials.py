"""The second kernel of a split-K skinny matmul: y = the sum of its SPLIT_K float32 partial sums.

skinny_matmul.py splits K between programs (gemv.py, skinny_matmul_kernel, skinny_mma.py), each
writing partials[s] for its split s; this kernel adds them in a fixed order (deterministic, no
atomics) and rounds to y's dtype, one element per lane:
    y.flat[i] = sum_{s = 0 .. SPLIT_K - 1} partials[s].flat[i]
Memory layout: partials (SPLIT_K, SIZE) float32, contiguous; y (SIZE,) contiguous.
"""

import triton
import triton.language as tl

from ._launch import pdl_chain


@triton.jit
def reduce_partials_kernel(part_ptr, y_ptr, SIZE, SPLIT_K, BLOCK: tl.constexpr, PDL: tl.constexpr = 0):
    """y.flat[i] = sum_s partials[s].flat[i], s in order (float32), rounded to y's dtype.

    With PDL (programmatic dependent launch, Hopper) this kernel is launched while the one that
    writes the partials still runs, and waits here for it to finish (pdl_chain): its launch
    overlaps the other's work instead of following it."""
    pdl_chain(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < SIZE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * SIZE + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
