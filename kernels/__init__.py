"""Triton kernels for 4-bit (NF4 / INT4) weights, one kernel per file.

    dequantize(w, dtype)        kernels/dequantize.py      dense weight, e.g. for dequantize+cuBLAS
    fused_matmul(x, w)          kernels/fused_matmul.py    y = x @ W.T, tiles dequantized on chip
                                kernels/fused_matmul_sm90.py  the same on Hopper (Gluon), M > 128
    fused_matmul_dx(dy, w)      kernels/fused_matmul_dx.py dx = dy @ W (backward), same idea
    skinny_matmul(x, w)         kernels/skinny_matmul.py   y = x @ W.T for M <= 16 (decoding), split
                                                           along K; its tuner picks among it and:
                                kernels/gemv.py            M = 1 on CUDA cores
                                kernels/skinny_mma.py      M <= 16, mma.sync on decoded bytes
                                kernels/decode_sm90.py     M = 1 on Hopper (Gluon), persistent
                                kernels/reduce_partials.py adds the K splits' partial sums
    dropout.seeded_dropout(...)  kernels/dropout.py         LoRA's dropout, masks hashed from a seed (../dropout.py)
    dropout_down.dropout_down_forward / _backward(...)
                                kernels/dropout_down.py    A drop(x) and its backward, the masks made inside

`w` is a quant.QuantizedWeight, or anything with its attribute names (kernels/_launch.py); the
packed layout is documented in quant.py and kernels/_tile.py. This package imports only torch and
triton; quant.py imports it lazily, only on CUDA. On the CPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1 set before triton is imported), which the tests use.
"""

from .dequantize import dequantize
from .fused_matmul import fused_matmul
from .fused_matmul_dx import fused_matmul_dx
from .skinny_matmul import skinny_matmul

__all__ = ["dequantize", "fused_matmul", "fused_matmul_dx", "skinny_matmul"]
