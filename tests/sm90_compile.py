"""Compile the Gluon kernels for Hopper (sm_90) with the installed Triton, without a GPU.

    python tests/sm90_compile.py [--out DIR]     (DIR: write each kernel's .ptx and .cubin)

Triton compiles for the GPU its active driver reports; this script makes that an sm_90 GPU (a
stand-in driver, FakeHopper) and compiles decode_sm90 and fused_matmul_sm90 with arguments of a
4096x4096 NF4 weight (CPU tensors: nothing is launched). Gluon's API moves between Triton
releases, and on a machine without a GPU nothing else compiles these kernels: tests/
test_kernels.py runs this script so that CI, which installs the newest Triton, sees a break.
Prints one line per kernel: its name, the Triton version and the PTX features the kernel's
docstring relies on (programmatic dependent launch, setmaxnreg, wgmma).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class FakeHopper:
    """The part of a Triton driver that compiling asks for: device 0, stream 0, an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def compile_decode(w, x):
    """decode_sm90_kernel with decode_sm90.launch's arguments (132 programs, an H100's SMs)."""
    from kernels import decode_sm90 as d
    from kernels._launch import weight_args
    n, k = w.out_features, w.in_features
    _fmt, (packed, scales, _z, absmax2, code, code8, offset), _kp, _qb, dq = weight_args(w)
    ku, tot = d.units(n, k)
    g = 132
    y = torch.empty(1, n, dtype=torch.bfloat16)
    scratch, flags = torch.zeros(g * 16), torch.zeros(g, dtype=torch.int32)
    return d.decode_sm90_kernel.warmup(
        *d.descriptors(x, packed, scales, n, k), code, code8, absmax2, offset, y, scratch, flags,
        n, k, ku, tot, DQ_BLOCK=dq, STAGES=d.STAGES, UNIT_BLOCKS=d.UNIT_BLOCKS, KUC=ku,
        UMAX=triton.next_power_of_2(triton.cdiv(tot, g)), PDL=1, num_warps=d.WARPS,
        maxnreg=d.MAXNREG, launch_pdl=True, grid=(g,))


def compile_fused(w, x):
    """fused_matmul_sm90_kernel with launch_into's arguments (no split tiles, no table yet)."""
    from kernels import fused_matmul_sm90 as f
    from kernels._launch import weight_args
    m, n = x.shape[0], w.out_features
    _fmt, (packed, scales, _z, absmax2, code, code8, offset), kp, _qb, dq = weight_args(w)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    ws, cands = torch.empty(1), torch.full((1,), -1, dtype=torch.int32)
    return f.fused_matmul_sm90_kernel.warmup(
        *f.descriptors(x, packed, n, kp), y, y.stride(0), scales, absmax2, code, code8, offset,
        cands, ws, ws.view(torch.int32), m, n, kp, 0, 1, DQ_BLOCK=dq, BLOCK_N=f.BLOCK_N,
        STAGES=f.STAGES, GROUP_M=f.GROUP_M, WORKER_REGS=f.WORKER_REGS, num_warps=f.WARPS,
        grid=(132,))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write <kernel>.ptx and <kernel>.cubin into this folder")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    import quant
    from kernels._gluon import HAVE_GLUON
    if not HAVE_GLUON:
        sys.exit(f"Triton {triton.__version__} has no Gluon: the Hopper kernels are not used")
    driver.set_active(FakeHopper())
    torch.manual_seed(0)
    w = quant.quantize_weight(torch.randn(4096, 4096) * 0.02, "nf4", 64, double_quant=True)
    for name, build, x in (("decode_sm90", compile_decode, torch.randn(1, 4096)),
                           ("fused_matmul_sm90", compile_fused, torch.randn(256, 4096))):
        kernel = build(w, x.to(torch.bfloat16))
        ptx = kernel.asm["ptx"]
        features = [f for f in ("griddepcontrol.launch_dependents", "setmaxnreg", "wgmma.mma_async")
                    if f in ptx]
        print(f"{name}: compiled for sm_90 with Triton {triton.__version__}; "
              f"shared {kernel.metadata.shared} bytes; PTX has {', '.join(features) or 'none of those'}")
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, f"{name}.ptx"), "w") as fh:
                fh.write(ptx)
            with open(os.path.join(a.out, f"{name}.cubin"), "wb") as fh:
                fh.write(kernel.asm["cubin"])


if __name__ == "__main__":
    main()
