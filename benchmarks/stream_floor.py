"""How fast can any kernel read a 4-bit weight, call after call? The floor under decoding (M = 1).

    python3 benchmarks/stream_floor.py          (about 30 seconds on an H100, compiles included)

A decoding matmul reads each packed byte of W once, so no kernel can be faster than one that only
reads those bytes. This script times such a kernel: each program sums its share of the bytes
(int32 words, a whole share in one load so that every read is in flight at once) and writes one
number. As in bench_kernels.py's "skinny HBM" column, 16 calls are captured in a CUDA graph that
cycles through 8 copies of the bytes (8 x the weight > the 50 MB L2: they come from HBM), and the
graph is replayed back to back; microseconds per call, median of 7 replays of 20 graphs.
(bench_kernels.py times one replay of a 20-call graph at a time, which adds the graph's start to
every call: BENCHMARKS.md, twenty-third session. Back to back is the floor's own measure.)

Three ways to chain the calls (MODE):
  0  plain launches: a call starts once the one before has ended;
  1  programmatic dependent launch (PDL), the reads before the wait: each program lets the next
     kernel start at once (griddepcontrol.launch_dependents), issues its reads, and only then
     waits for the kernel before (griddepcontrol.wait) to read the one word that kernel could
     have written (x, in a matmul). W is never written by a kernel, so this is legal for it;
  2  PDL, the wait first: every read after the kernel before has ended.
MODE 1 is the floor for a decoding kernel that brings its weights before x; what such a kernel
does after x arrives (the decoding and the products) comes on top. Printed against a
device-to-device copy of 512 MiB timed in the same run (bench_kernels.copy_gbps: the
"measured HBM bandwidth" of the M = 1 target) and the 60% the target asks for, beside our decoding matmul
(kernels.skinny_matmul, what QuantLinear runs at M = 1) timed the same way on 8 NF4 weights.
BENCHMARKS.md has the numbers.
"""

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kernels import COPIES, SHAPES, bench_graph, copy_gbps, cycling  # noqa: E402 (beside this file)


@triton.jit
def read_kernel(w_ptr, x_ptr, y_ptr, n_words, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """y[pid] = sum of words pid * BLOCK .. + BLOCK of w (wrapping int32) + x[pid]."""
    pid = tl.program_id(0)
    if MODE == 1:
        tl.extra.cuda.gdc_launch_dependents()
    if MODE == 2:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    total = tl.sum(tl.load(w_ptr + offs, mask=offs < n_words, other=0), axis=0)
    if MODE == 1:
        tl.extra.cuda.gdc_wait()  # only x depends on the kernel before
    tl.store(y_ptr + pid, total + tl.load(x_ptr + pid))


def time_graph(call) -> float:
    """Microseconds per call: 16 calls cycling over the COPIES copies in a CUDA graph, the graph
    replayed 20 times back to back, median of 7 such timings (bench_kernels.bench_graph)."""
    for i in range(COPIES):
        call(i)  # each copy once before the capture (a weight builds its decoder tables on first use)
    return bench_graph(cycling(call), calls=16, replays=7, back_to_back=20)


def ours_us(n: int, k: int, device) -> float:
    """kernels.skinny_matmul at M = 1 on 8 NF4 weights (double quantization), as time_graph."""
    import kernels
    import quant
    weights = [quant.quantize_nf4(torch.randn(n, k, device=device) * 0.02) for _ in range(COPIES)]
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    return time_graph(lambda i: kernels.skinny_matmul(x, weights[i]))


def main():
    device = torch.device("cuda")
    gbps = copy_gbps(device)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy: {gbps:.0f} GB/s (read + write)\n")
    print("| N x K | MB read | BLOCK words, warps | mode 0 us | mode 1 us | mode 2 us | 60% needs | ours |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n, k in SHAPES:
        # what a decoding call reads: packed codes, 8-bit absmax codes, float32 absmax2 (NF4 + DQ)
        nbytes = n * k // 2 + n * k // 64 + n * k // 64 // 256 * 4
        n_words = triton.cdiv(nbytes, 4)
        copies = [torch.randint(-2**31, 2**31 - 1, (n_words,), dtype=torch.int32, device=device)
                  for _ in range(COPIES)]
        floor_us = nbytes / (gbps * 1e9) * 1e6
        ours = ours_us(n, k, device)
        for block, warps in ((8192, 8), (16384, 16)):
            grid = triton.cdiv(n_words, block)
            x = torch.zeros(grid, dtype=torch.int32, device=device)
            y = torch.empty_like(x)
            cells = []
            for mode in (0, 1, 2):
                def call(i, mode=mode):
                    read_kernel[(grid,)](copies[i], x, y, n_words, BLOCK=block, MODE=mode,
                                         num_warps=warps, **({"launch_pdl": True} if mode else {}))
                us = time_graph(call)
                cells.append(f"{us:.2f} ({100 * floor_us / us:.0f}%)")
            print(f"| {n}x{k} | {nbytes / 1e6:.2f} | {block}, {warps} | " + " | ".join(cells)
                  + f" | {floor_us / 0.6:.2f} | {ours:.2f} ({100 * floor_us / ours:.0f}%) |")
        del copies


if __name__ == "__main__":
    main()
