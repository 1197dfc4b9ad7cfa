"""M = 1 decoding with the weight read from HBM, not from L2.

A CUDA graph that replays y = x @ W.T on one weight keeps W in the H100's 50 MB L2 cache (an
11008x4096 NF4 weight is 22.5 MB), which is not what decoding a model does: every layer's weight
is read once per token. Here the graph cycles through 8 different weights of the shape (8 x
22.5 MB > L2) and is compared with the same weight every call, for our tuned skinny kernel, two
fixed configs, and bitsandbytes.matmul_4bit (if it imports). Two references put the numbers in
perspective: a kernel that only reads the same bytes (the floor for any 4-bit kernel launched
this way) and cuBLAS's bf16 x @ W.T (four times the bytes). Microseconds per call (median).

    python benchmarks/bench_decode_cold.py
"""

import importlib
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels  # noqa: E402
import quant  # noqa: E402
from bench_kernels import COPIES, bench_graph, cycling  # noqa: E402

CALLS = 24  # per graph: 3 rounds of the 8 weights (COPIES, bench_kernels.py)
PEAK_TB_S = 3.35  # H100 SXM HBM3


@triton.jit
def read_only_kernel(words_ptr, out_ptr, n_words, PER: tl.constexpr, BLOCK: tl.constexpr):
    """XOR of PER blocks of BLOCK int64 words per program: reads every byte once, computes
    nothing worth the name."""
    offs = tl.program_id(0) * PER * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int64)
    for i in range(PER):
        acc ^= tl.load(words_ptr + offs + i * BLOCK, mask=offs + i * BLOCK < n_words, other=0)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), acc)


def read_only(packed, out):
    words = packed.view(-1).view(torch.int64)  # the packed bytes (N*K/2, a multiple of 8)
    grid = (triton.cdiv(words.numel(), 4 * 2048),)
    read_only_kernel[grid](words, out, words.numel(), PER=4, BLOCK=2048, num_warps=8)


def main():
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    sk = importlib.import_module("kernels.skinny_matmul")
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf
    except Exception as e:  # optional
        bnb = None
        print(f"bitsandbytes not usable: {e}")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        qws = [quant.quantize_nf4(w) for w in ws]
        bws = None if bnb is None else [bf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                         compress_statistics=True) for w in ws]
        del ws
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for q in qws:  # tune, and build each weight's decoder tables, outside the capture
            kernels.skinny_matmul(x, q)
        configs = {"tuned": sk.chosen_config(x, qws[0]), "gemv LOOKUP 3": sk.PRMT_CANDIDATES_M1[0],
                   "mma table": sk._mma_cand(8, 2, 1), "mma table + ring": sk._mma_cand(8, 2, 1, 2),
                   "mma table + ring + x shared": sk._mma_cand(8, 2, 1, 2, xs=1)}
        if sk.decode_sm90.decode_ok(x, qws[0]):  # the persistent Gluon kernel (Hopper)
            for cand in sk.DECODE_SM90_CANDIDATES:
                configs[f"decode_sm90, {cand['DECODE_SM90']} per SM"] = cand
        nbytes = qws[0].packed.numel() + qws[0].scales.numel()
        for name, cfg in configs.items():
            warm = bench_graph(lambda: kernels.skinny_matmul(x, qws[0], config=cfg), calls=CALLS)
            cold = bench_graph(cycling(lambda i: kernels.skinny_matmul(x, qws[i], config=cfg)), calls=CALLS)
            print(f"{n}x{k} {name}: 1 weight {warm:.2f} us, {COPIES} weights {cold:.2f} us "
                  f"({nbytes / cold / 1e6 / PEAK_TB_S:.0%} of {PEAK_TB_S} TB/s)  {cfg}", flush=True)
        out = torch.empty(triton.cdiv(nbytes, 8) + 4 * 2048, device="cuda", dtype=torch.int64)
        cold = bench_graph(cycling(lambda i: read_only(qws[i].packed, out)), calls=CALLS)
        print(f"{n}x{k} read-only kernel (the packed bytes): {COPIES} weights {cold:.2f} us "
              f"({qws[0].packed.numel() / cold / 1e6:.2f} TB/s)", flush=True)
        if bws is not None:
            warm = bench_graph(lambda: bnb.matmul_4bit(x, bws[0][0].t(), quant_state=bws[0][1]), calls=CALLS)
            cold = bench_graph(cycling(lambda i: bnb.matmul_4bit(x, bws[i][0].t(), quant_state=bws[i][1])),
                               calls=CALLS)
            print(f"{n}x{k} bitsandbytes: 1 weight {warm:.2f} us, {COPIES} weights {cold:.2f} us", flush=True)
        del qws, bws
        torch.cuda.empty_cache()
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(COPIES)]
        cold = bench_graph(cycling(lambda i: x @ ws[i].t()), calls=CALLS)
        print(f"{n}x{k} cuBLAS bf16 x @ W.T: {COPIES} weights {cold:.2f} us "
              f"({n * k * 2 / cold / 1e6:.2f} TB/s)", flush=True)
        del ws
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
