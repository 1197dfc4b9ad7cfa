"""Compile every Triton kernel the launchers can choose, for a GPU of your choice, without one.

    python tests/gpu_compile.py [--arch 90] [--dtype bfloat16] [--out DIR] [--jobs N]
        (DIR: the Gluon kernels' .ptx, .cubin; N: processes that compile side by side)

Triton compiles for the GPU its active driver reports. This script makes that a stand-in for an
sm_<arch> GPU (StandInGPU: its compute capability and shared memory per block; it launches
nothing) and calls the launchers with CPU tensors and each config of the tuners' lists:
dequantize, fused_matmul, fused_matmul_dx and skinny_matmul, for NF4 with double quantization and
INT4 weights, the seeded dropout (kernels/dropout.py, one tensor and two) and the fused
down-projection with dropout (kernels/dropout_down.py, forward and backward), with bf16
activations (or fp16: generate.py's default on GPUs without bf16, such as a T4, sm_75; the
byte-permute and tensor-core decoders are bf16 only, so their lists are left out); with bf16 on
sm_90 also the Gluon kernels (decode_sm90 and fused_matmul_sm90, which it compiles with a
4096x4096 weight's arguments).

Why: Triton releases and GPU generations move under these kernels (inline PTX an older GPU lacks,
such as mul.bf16x2 before sm_90; Gluon's renames; tiles larger than a GPU's shared memory), and
on a machine without a GPU nothing else compiles them. tests/test_kernels.py runs this script for
sm_80 (A100), sm_89 (RTX 40xx, L4), sm_90 (H100) and sm_120 (RTX 50xx), so that CI, which
installs the newest Triton, sees a break.

A config that needs more shared memory than the GPU has is not an error: the tuners skip it
(Triton's autotuner on OutOfResources, skinny_matmul's tuner on any failure). A list of which no
config fits is one, and so is any other compile failure. Prints one line per kernel, list and
weight format, and exits 1 after listing the errors.
"""

import argparse
import importlib
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

# shared memory per block (opt-in maximum, bytes) of each compute capability
SHARED = {75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# the kernels' launchers, each with its tuners' config lists and the rows of x they serve
LISTS = {
    "dequantize": [("_CONFIGS", 0)],
    "fused_matmul": [("LARGE_M_CONFIGS", 256), ("SMALL_M_CONFIGS", 64),
                     ("PRMT_LARGE_M_CONFIGS", 256), ("PRMT_SMALL_M_CONFIGS", 64)],
    "fused_matmul_dx": [("LARGE_M_CONFIGS", 256), ("SMALL_M_CONFIGS", 64)],
    "skinny_matmul": [("CANDIDATES_M1", 1), ("PRMT_CANDIDATES_M1", 1), ("MMA_CANDIDATES_M1", 1),
                      ("CANDIDATES_M16", 16), ("PRMT_CANDIDATES_M16", 16),
                      ("MMA_CANDIDATES_M16", 16), ("MMA_CANDIDATES_M16", 5)],
}


class StandInGPU:
    """The part of a Triton driver that compiling and launching ask for: device 0, stream 0, an
    sm_<arch> target, its shared memory; loading a kernel and launching it do nothing."""

    def __init__(self, arch: int):
        self.arch = arch
        self.utils = self

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED[self.arch], "multiprocessor_count": 132}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # (module, function, registers, spills, max threads)

    def unload_module(self, module):
        pass

    def launcher_cls(self, src, metadata):
        return lambda *args, **kwargs: None


def compile_decode(w, x):
    """decode_sm90_kernel with decode_sm90.launch's arguments (132 programs, an H100's SMs)."""
    from kernels import decode_sm90 as d
    from kernels._launch import weight_args
    n, k = w.out_features, w.in_features
    _fmt, tensors, _kp, _qb, dq = weight_args(w)
    y = torch.empty(1, n, dtype=torch.bfloat16)
    scratch, flags = torch.zeros(132 * 16), torch.zeros(132, dtype=torch.int32)
    grid, args, options = d.kernel_call(x, tensors, y, scratch, flags, n, k, dq, d.STAGES, 132, True)
    return d.decode_sm90_kernel.warmup(*args, grid=grid, **options)


def compile_fused(w, x):
    """fused_matmul_sm90_kernel with launch_into's arguments (no split tiles, no table yet)."""
    from kernels import fused_matmul_sm90 as f
    from kernels._launch import weight_args
    _fmt, tensors, kp, _qb, dq = weight_args(w)
    y = torch.empty(x.shape[0], w.out_features, dtype=torch.bfloat16)
    ws, cands = torch.empty(1), torch.full((1,), -1, dtype=torch.int32)
    grid, args, options = f.kernel_call(y, x, tensors, kp, dq, f.STAGES, 132, 1, ws,
                                        ws.view(torch.int32), cands)
    return f.fused_matmul_sm90_kernel.warmup(*args, grid=grid, **options)


def compile_gluon(out: str = None):
    """The Hopper kernels (Gluon), compiled with a 4096x4096 NF4 weight's arguments."""
    import quant
    w = quant.quantize_weight(torch.randn(4096, 4096) * 0.02, "nf4", 64, double_quant=True)
    for name, build, x in (("decode_sm90", compile_decode, torch.randn(1, 4096)),
                           ("fused_matmul_sm90", compile_fused, torch.randn(256, 4096))):
        kernel = build(w, x.to(torch.bfloat16))
        ptx = kernel.asm["ptx"]
        features = [f for f in ("griddepcontrol.launch_dependents", "setmaxnreg", "wgmma.mma_async")
                    if f in ptx]
        print(f"{name}: compiled for sm_90 with Triton {triton.__version__}; "
              f"shared {kernel.metadata.shared} bytes; PTX has {', '.join(features) or 'none of those'}")
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"{name}.ptx"), "w") as fh:
                fh.write(ptx)
            with open(os.path.join(out, f"{name}.cubin"), "wb") as fh:
                fh.write(kernel.asm["cubin"])


def compile_dropout(dtype: torch.dtype) -> list:
    """LoRA's dropout kernels: the seeded dropout (kernels/dropout.py), one tensor and two, and the fused
    down-projection (kernels/dropout_down.py), its forward and its backward making dx and dA, dx only,
    dA only; returns the errors."""
    from kernels.dropout import seeded_dropout
    from kernels.dropout_down import dropout_down_backward, dropout_down_forward
    seed, t, s = torch.zeros(1, dtype=torch.int64), 838861, 1 / 0.95
    x, x2 = torch.randn(3, 1000).to(dtype), torch.randn(3, 1000).to(dtype)
    errors = compile_calls("seeded_dropout", "the tuner skips them", {
        "one tensor": lambda: seeded_dropout(x, seed, 1, t, s),
        "two tensors": lambda: seeded_dropout(x, seed, 1, t, s, x2)})
    # (300 x 600: K in 3 splits for the forward, M in 2 for the backward, so add_parts has parts to add)
    x, a, dlow = torch.randn(300, 600).to(dtype), torch.randn(16, 600).to(dtype), torch.randn(300, 16).to(dtype)
    calls = {"forward": lambda: dropout_down_forward(x, a, seed, 1, t, s)}
    for need in ((True, True), (True, False), (False, True)):
        calls[f"backward {need}"] = lambda need=need: dropout_down_backward(x, dlow, a, seed, 1, t, s, *need)
    return errors + compile_calls("dropout_down", "a fixed config", calls)


def compile_calls(kernel: str, note: str, calls: dict) -> list:
    """Call each launcher call (which compiles); print one line for `kernel`; return the errors."""
    errors = []
    for name, call in calls.items():
        try:
            call()
        except Exception as e:  # noqa: BLE001 (any compile failure is the finding)
            errors.append(f"{kernel} ({name}): {failure(e)}")
    print(f"{kernel}: {len(calls) - len(errors)} compiled, 0 too large for its shared memory ({note}), "
          f"{len(errors)} failed")
    return errors


def failure(e: Exception) -> str:
    """A compile failure in one line: its type and the last lines of its message."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[-3:])[:600]}"


def configs(module, list_name: str):
    """The config dicts of a launcher's list (Triton's autotune Configs or skinny_matmul's dicts)."""
    out = []
    for c in getattr(module, list_name):
        if isinstance(c, triton.Config):
            c = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        if c not in out:
            out.append(c)
    return out


def call(name: str, launcher, w, m: int, cfg: dict, dtype: torch.dtype):
    """The launcher with config cfg (it compiles, and the stand-in launches nothing); the matmuls
    with m rows of x in dtype, dequantize to dtype."""
    if name == "dequantize":
        return launcher(w, dtype, config=cfg)
    features = w.out_features if name == "fused_matmul_dx" else w.in_features
    return launcher(torch.randn(m, features).to(dtype), w, config=cfg)


def work_items(dtype: torch.dtype) -> list:
    """The work: one (launcher, list, M, format, config) per compile, in the order printed."""
    out = []
    for name, lists in LISTS.items():
        module = importlib.import_module(f"kernels.{name}")
        for list_name, m in lists:
            for fmt in ("nf4", "int4"):
                if list_name.startswith(("PRMT_", "MMA_")) and (fmt == "int4" or dtype != torch.bfloat16):
                    continue  # the byte-permute and tensor-core decoders: NF4 and bf16 only
                out += [(name, list_name, m, fmt, cfg) for cfg in configs(module, list_name)]
    return out


def set_up(arch: int):
    """This process compiles for the stand-in sm_<arch> GPU (again: no harm)."""
    driver.set_active(StandInGPU(arch))
    lift_device_checks(arch)


def sample_weights() -> dict:
    """The weights every config is compiled with: 256 x 512, NF4 and INT4, double quantization."""
    import quant
    torch.manual_seed(0)
    return {fmt: quant.quantize_weight(torch.randn(256, 512) * 0.02, fmt, 64, double_quant=True)
            for fmt in ("nf4", "int4")}


_WEIGHTS = {}   # this process's sample_weights (a worker sets itself up on its first config)


def compile_one(arch: int, dtype: torch.dtype, job) -> tuple:
    """One config through its launcher (it compiles, and the stand-in launches nothing):
    ("done", ""), ("too large", why) or ("failed", why)."""
    if not _WEIGHTS:
        set_up(arch)
        _WEIGHTS.update(sample_weights())
    name, list_name, m, fmt, cfg = job
    launcher = getattr(importlib.import_module(f"kernels.{name}"), name)
    try:
        call(name, launcher, _WEIGHTS[fmt], m, cfg, dtype)
        return "done", ""
    except OutOfResources as e:
        return "too large", f"{cfg} ({e.required} bytes)"
    except Exception as e:  # noqa: BLE001 (any compile failure is the finding)
        return "failed", f"{cfg}: {failure(e)}"


def compile_lists(arch: int, dtype: torch.dtype, workers: int) -> list:
    """Every config of every list through its launcher, in `workers` processes (Triton compiles
    on one core; each config is independent); prints a line per list and format, returns the
    errors (lines)."""
    work = work_items(dtype)
    if workers > 1:
        # spawn: a fresh interpreter per worker (no forked torch threads), which sets itself up
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.starmap(compile_one, [(arch, dtype, job) for job in work], chunksize=1)
    else:
        results = [compile_one(arch, dtype, job) for job in work]
    errors, groups = [], {}
    for (name, list_name, m, fmt, _cfg), result in zip(work, results):
        label = f"{name} {list_name}" + (f" M={m}" if m else "") + f" {fmt}"
        groups.setdefault(label, []).append(result)
    for label, group in groups.items():
        done = sum(kind == "done" for kind, _ in group)
        too_large = [why for kind, why in group if kind == "too large"]
        failed = [why for kind, why in group if kind == "failed"]
        print(f"{label}: {done} compiled, {len(too_large)} too large for its shared "
              f"memory (the tuner skips them), {len(failed)} failed")
        errors += [f"{label}: {f}" for f in failed]
        if not done and not failed:
            errors.append(f"{label}: no config fits sm_{arch}: {'; '.join(too_large)}")
    return errors


def lift_device_checks(arch: int):
    """The launchers refuse CPU tensors outside the interpreter, and programmatic dependent
    launch needs a CUDA device: here they compile for the stand-in GPU instead."""
    for name in ("_launch", "dequantize", "skinny_matmul", "dropout", "dropout_down"):
        module = importlib.import_module(f"kernels.{name}")
        if hasattr(module, "check_device"):
            module.check_device = lambda device: None
        if hasattr(module, "pdl_ok"):
            module.pdl_ok = lambda device: arch >= 90


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, choices=sorted(SHARED),
                    help="compute capability x 10 of the GPU to compile for (default 90, H100)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="the activations' dtype (default bfloat16; GPUs before sm_80 have no bf16)")
    ap.add_argument("--out", help="write <kernel>.ptx and <kernel>.cubin of the Gluon kernels here")
    ap.add_argument("--jobs", type=int, default=1,
                    help="compile in this many processes (default 1; tests/test_kernels.py uses one "
                         "per core)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.arch < 80 and dtype == torch.bfloat16:
        ap.error(f"sm_{a.arch} has no bf16: use --dtype float16")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")
    from kernels._gluon import HAVE_GLUON
    print(f"Triton {triton.__version__}, sm_{a.arch}, {a.dtype}: {SHARED[a.arch]} bytes of shared "
          "memory per block", flush=True)
    set_up(a.arch)
    errors = compile_lists(a.arch, dtype, max(1, a.jobs)) + compile_dropout(dtype)
    if a.arch == 90 and dtype == torch.bfloat16:  # the Hopper kernels take bf16 only
        if HAVE_GLUON:
            compile_gluon(a.out)
        else:
            print(f"Triton {triton.__version__} has no Gluon: the Hopper kernels are not used")
    for e in errors:
        print("ERROR", e)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
