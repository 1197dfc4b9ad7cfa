"""Python-side helpers of the launchers: checking a quantized weight and an activation, turning the
weight into kernel arguments, choosing between the autotuned kernel and a fixed config, and the
GPU's SM count (for grid sizes); and programmatic dependent launch (pdl_ok, with its one
device-side call, pdl_chain).

A "quantized weight" is any object with the attributes of quant.QuantizedWeight (duck typing, so
that kernels/ does not import quant.py): quant_type, out_features, in_features, block_size,
packed, scales, zeros, code, double_quant, absmax2, offset, code8, dq_block_size.
"""

import inspect
import os
import weakref

import torch
import triton
import triton.language as tl

FORMAT_NF4, FORMAT_NF4_DQ, FORMAT_INT4 = 0, 1, 2
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_sm_count = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 in the CPU interpreter)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count:
        _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_count[idx]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def weight_args(w):
    """Check a quantized weight; return (FORMAT, the 7 pointer tensors, KP, QBLOCK, DQ_BLOCK).

    Pointer order: packed, scales, zeros, absmax2, code, code8, offset (unused ones get `packed`);
    for NF4, code is code_with_tables(w).
    """
    needed = ("quant_type", "out_features", "in_features", "block_size", "packed", "scales")
    if not all(hasattr(w, a) for a in needed):
        raise TypeError(f"w must be a quant.QuantizedWeight (or have its attributes), got {type(w).__name__}")
    n, k, qb = w.out_features, w.in_features, w.block_size
    packed = w.packed
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError("packed must be a contiguous 2-D uint8 tensor (N, K_pad/2)")
    kp = 2 * packed.shape[1]
    if packed.shape[0] != n or kp < k or kp % qb:
        raise ValueError(f"packed shape {tuple(packed.shape)} does not fit a {n}x{k} weight "
                         f"with block size {qb}")
    if qb < 16 or qb & (qb - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {qb}")
    if tuple(w.scales.shape) != (kp // qb, n) or not w.scales.is_contiguous():
        raise ValueError(f"scales must be contiguous with shape {(kp // qb, n)}, "
                         f"got {tuple(w.scales.shape)}")
    if w.quant_type == "nf4":
        if w.code is None or w.code.numel() != 16 or w.code.dtype != torch.float32:
            raise ValueError("NF4 weight needs a float32 code table of 16 values")
        if w.double_quant:
            fmt = FORMAT_NF4_DQ
            if w.scales.dtype != torch.uint8 or w.code8 is None or w.code8.numel() != 256:
                raise ValueError("double-quantized NF4 needs uint8 scales and a 256-value code8")
            if w.absmax2 is None or w.offset is None:
                raise ValueError("double-quantized NF4 needs absmax2 and offset")
            dq = getattr(w, "dq_block_size", 256)
            n2 = -(-w.scales.numel() // dq)  # one absmax2 per dq block of scales, the last one partial
            if (w.absmax2.dtype != torch.float32 or w.absmax2.numel() != n2 or not w.absmax2.is_contiguous()
                    or w.offset.dtype != torch.float32 or w.offset.numel() != 1):
                raise ValueError(f"double-quantized NF4 needs {n2} contiguous float32 absmax2 values "
                                 f"(one per {dq} scales) and one float32 offset, got "
                                 f"{w.absmax2.numel()} {w.absmax2.dtype} and {w.offset.numel()} {w.offset.dtype}")
        else:
            fmt = FORMAT_NF4
            if w.scales.dtype != torch.float32:
                raise ValueError("NF4 absmax (scales) must be float32")
    elif w.quant_type == "int4":
        fmt = FORMAT_INT4
        if w.scales.dtype != torch.float32 or w.zeros is None or w.zeros.dtype != torch.uint8:
            raise ValueError("INT4 needs float32 scales and uint8 zeros")
        if w.zeros.shape != w.scales.shape or not w.zeros.is_contiguous():
            raise ValueError(f"zeros must be contiguous with the scales' shape {tuple(w.scales.shape)}, "
                             f"got {tuple(w.zeros.shape)}")
    else:
        raise ValueError(f"unknown quant_type {w.quant_type!r}")
    code = code_with_tables(w) if w.quant_type == "nf4" else None
    tensors = [packed, w.scales, w.zeros, w.absmax2, code, w.code8, w.offset]
    for t in tensors:
        if t is not None and t.device != packed.device:
            raise ValueError(f"all tensors of the weight must be on {packed.device}, one is on {t.device}")
    tensors = [packed if t is None else t for t in tensors]
    return fmt, tensors, kp, qb, getattr(w, "dq_block_size", 256)


_code_tables = {}  # id(code tensor) -> (weak reference to it, its version, code_with_tables)


def code_with_tables(w) -> torch.Tensor:
    """w.code (16 float32) followed by the 12 words of the LOOKUP=3 decoder's byte tables
    (kernels/_tile.py) and the 256 code pairs of skinny_mma's table, stored as float32 bit
    patterns: the kernels' `code` argument.

    Built on the code's device with tensor ops and cached per code tensor (weights usually share
    one): build it outside CUDA-graph capture (any eager call does). Once built, it is never
    written again, and the build is waited for (one stream synchronization per code tensor), so
    that skinny_mma may read it before its PDL wait (pdl_chain): no kernel still running can be
    writing it.
    """
    code = w.code
    cached = _code_tables.get(id(code))
    if cached is not None and cached[0]() is code and cached[1] == code._version:
        return cached[2]
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the NF4 decoder tables of a weight are built on its first use, which "
                           "cannot happen inside CUDA-graph capture: call the layer once before")
    bits = code.detach().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    shifts = torch.tensor([0, 8, 16, 24], device=bits.device)
    words = torch.cat([((bits >> 8).view(4, 4) << shifts).sum(1),     # high bytes: 4 words
                       ((bits & 0xFF).view(4, 4) << shifts).sum(1),   # low bytes: 4 words
                       torch.tensor([0x01010101, 0, 0, 0], device=bits.device)])
    # the 256 byte pairs (skinny_mma's shared-memory table): byte b -> bf16(code[b & 15]) << 16
    # | bf16(code[b >> 4]), the two weights of a packed byte as one bf16x2 word
    b = torch.arange(256, device=bits.device)
    pairs = (bits[b & 15] << 16) | bits[b >> 4]
    words = torch.cat([words, pairs])
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    ext = torch.cat([code.detach().float(), words.view(torch.float32)])
    if ext.is_cuda:
        torch.cuda.current_stream(ext.device).synchronize()
    _code_tables[id(code)] = (weakref.ref(code), code._version, ext)
    return ext


def prmt_ok(fmt: int, dtype: torch.dtype) -> bool:
    """LOOKUP=3 (the byte-permute NF4 decoder of _tile.py) exists for NF4 weights and bf16 only."""
    return fmt != FORMAT_INT4 and dtype == torch.bfloat16


def check_lookup(lookup, fmt: int, dtype: torch.dtype):
    if lookup == 3 and not prmt_ok(fmt, dtype):
        raise ValueError(f"LOOKUP=3 needs an NF4 weight and bfloat16 (got format {fmt}, {dtype})")


def check_activation(x: torch.Tensor, features: int, device: torch.device, name: str = "x"):
    """x must be a 2-D float16/bfloat16/float32 tensor (M, features) on `device`."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (M, {features}), got {shape}")
    if x.shape[1] != features:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected {features}")
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"unsupported {name} dtype {x.dtype}: expected float16, bfloat16 or float32")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the weight on {device}")
    check_device(x.device)


def check_device(device: torch.device):
    """The kernels run on CUDA tensors, or on CPU tensors in the interpreter. (tests/
    gpu_compile.py lifts this check: there the launchers compile for a GPU and launch nothing.)"""
    if device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")


# Whether Triton fuses a * b + c into one FMA: on by default up to Triton 3.9 (which warns that
# the default changes), off from 3.10. The kernels were measured, and the tests' error bounds
# written (fma_bound), with fusion on: every launch asks for it.
FP_FUSION = {"enable_fp_fusion": True}


def split_config(config: dict):
    """A config dict -> (meta-parameters, launch options num_warps/num_stages)."""
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    return meta, opts


def autotune(configs: list, key: list):
    """triton.autotune, with its timings kept on disk where Triton has that (`cache_results`,
    Triton 3.4 and later): a new process that meets the same kernel source, GPU target, configs
    and key values (the shapes) takes the fastest config from Triton's cache (~/.triton/cache)
    instead of timing every config again (each autotuner times each of its configs for about
    0.1 s per shape: on an H100 a one-shot generate.py on the bundled model waited 1.7-2.0 s for
    its first token instead of 3.8-4.1; BENCHMARKS.md). Delete the cache to tune again."""
    cache = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **cache)


_tuned_choice = {}  # (autotuned kernel, key) -> the config its autotuner chose at the first call


def launch(kernel, tuned, grid, args, consts: dict, config: dict = None, key=None):
    """Run `tuned` (the autotuned kernel), or `kernel` with the fixed `config` when one is given.
    grid: meta-parameters -> launch grid. key: what the autotuner's choice depends on (it must
    cover the autotuner's own key). With a key the choice is kept after the first call, and later
    calls launch `kernel` with it, without the autotuner's per-call work (25 us of host time a
    call on the H100 machine, which training pays three times per layer and step: BENCHMARKS.md,
    twenty-ninth session)."""
    if config is None and key is not None:
        config = _tuned_choice.get((tuned, key))
    if config is None:
        tuned[grid](*args, **consts, **FP_FUSION)
        if key is not None:
            best = tuned.best_config
            _tuned_choice[(tuned, key)] = {**best.kwargs, "num_warps": best.num_warps,
                                           "num_stages": best.num_stages}
    else:
        meta, opts = split_config(config)
        kernel[grid(meta)](*args, **consts, **meta, **opts, **FP_FUSION)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


_pdl = {}  # device -> pdl_ok


@triton.jit
def pdl_chain(PDL: tl.constexpr):
    """With PDL (every kernel of a skinny matmul is launched with launch_pdl): wait here until the
    kernel before this one in the stream has finished and its writes are visible
    (griddepcontrol.wait), then let the kernel after this one start (launch_dependents); it
    waits in turn. So each launch overlaps the work before it instead of following it. Call it
    before the kernel reads or writes anything a kernel before it may write: first thing, but
    for skinny_mma's table fill (the decoder table is never written after its build)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def pdl_ok(device) -> bool:
    """Programmatic dependent launch: a CUDA device of compute capability 9.0 or more, and a Triton
    that has it (launch_pdl, griddepcontrol); never in the interpreter."""
    if interpreting() or device.type != "cuda":
        return False
    if device not in _pdl:
        from triton.backends.nvidia.compiler import CUDAOptions
        _pdl[device] = (torch.cuda.get_device_capability(device)[0] >= 9
                        and "launch_pdl" in CUDAOptions.__dataclass_fields__
                        and hasattr(tl.extra.cuda, "gdc_wait"))
    return _pdl[device]
