"""Tests of kernels/ against quant.py (the reference) and float64 matmuls.

On the CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on small, ragged shapes: M = 1, M and N not multiples of the tile, K not a multiple of the block
size (padding) or of the tile, several K, fp16/fp32 (the interpreter's bf16 tl.dot is broken,
triton issue 11584), non-contiguous inputs, every weight format and both code lookups.
The skinny kernel is also run with every split of K (1, 2, 3, 5 splits of a padded K: the float32
partials and their reduction) and every code lookup (LOOKUP 0 global gather, 1 select tree,
2 scaled table + tl.gather) is checked in every kernel.
With CUDA the same small tests run on the GPU (bf16 instead of fp16), plus `cuda`-marked tests on
LLaMA-7B shapes, fp16 activations on one of them, every skinny candidate and SPLIT_K = 1, the skinny
kernel captured in a CUDA graph (replay == eager, bit for bit), every LOOKUP on the GPU, and against
bitsandbytes (importorskip).

Matmul tolerance (elementwise, float64 reference ref = a @ b):
    |y - ref| <= u * |ref| + 8 u * sqrt((a*a) @ (b*b)) + R * 2^-24 * (|a| @ |b|)
u is the unit roundoff of the dtype (2^-8 bf16, 2^-11 fp16, 2^-24 fp32). The first term is the
rounding of y, the second covers rounding the dequantized weight to the dtype (the skinny M = 1
kernel skips it: each product then differs by at most u relative, and the sum of R such errors has
a standard deviation below u / sqrt(3) * sqrt(sum (a b)^2), so 8u is a > 10 sigma bound), the third
is the worst case of float32 accumulation over R terms. A wrong row, block or scale index moves
whole sums, far above the bound. A few wrong codes among thousands do not: at K = 11008 one can
hide under the bound (and under y's own bf16 rounding). test_localized_errors_are_caught covers
that: x with 16 entries +-1 a row, each path against the exact weight it multiplies by, where
one wrong code or one block's scale fails.
"""

import importlib
import inspect
import itertools
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402  (after conftest has set TRITON_INTERPRET)
import quant  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

FORMATS = {  # name -> (quant_type, double_quant, block_size)
    "nf4": ("nf4", False, 64),
    "nf4dq": ("nf4", True, 64),
    "nf4dq32": ("nf4", True, 32),
    "int4": ("int4", False, 64),
    "int4g128": ("int4", False, 128),
}


def fixed_config(module):
    """On the GPU the small tests launch one fixed config (no autotuning: dozens of compiles per
    format and dtype otherwise); the CPU interpreter uses that same config by default."""
    if not ON_GPU:
        return None
    return importlib.import_module(f"kernels.{module}").INTERPRETER_CONFIG


def small_dtype(dtype):
    """fp16 on the CPU interpreter stands for the bf16 that the GPU runs."""
    return torch.bfloat16 if (ON_GPU and dtype == torch.float16) else dtype


def gaussian(*shape, seed=0, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


def make_weight(fmt, n, k, seed=0, device=DEVICE):
    qt, dq, bs = FORMATS[fmt]
    return quant.quantize_weight(gaussian(n, k, seed=seed, device=device) * 0.05, qt, bs, dq)


def assert_matmul_close(y, a, b, dtype):
    """y ~ a @ b within the bound of the module docstring (a, b: float64 or castable)."""
    a, b = a.double(), b.double()
    ref = a @ b
    u = UNIT_ROUNDOFF[dtype]
    bound = (u * ref.abs() + 8 * u * torch.sqrt((a * a) @ (b * b))
             + a.shape[1] * 2.0**-24 * (a.abs() @ b.abs()) + 1e-30)
    assert y.shape == ref.shape and y.dtype == dtype
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error up to {worst:.3g} x the bound"


def fma_bound(qw, expected):
    """Largest |got - expected| for float32 output when the GPU fuses the double-quantized absmax
    into one FMA (elementwise, float64; expected = quant.dequantize(qw, torch.float32)).

    With u = 2^-24 (float32 unit roundoff), p = code8[q] * absmax2 (exact in float64: a product
    of two float32) and o = offset, every rounding fl(t) = t (1 + d) with |d| <= u:
        reference  a_r = fl(fl(p) + o) = (p (1 + d0) + o)(1 + d1)      (quant.double_dequantize)
        kernel     a_k = fl(p + o)     = (p + o)(1 + d2)               (one FMA; or a_k = a_r)
        |a_r - a_k| = |(p + o)(d1 - d2) + p d0 (1 + d1)| <= D = 2u |p + o| + u (1 + u) |p|
    Then w = fl(c * a) with the NF4 code value c (|c| <= 1) rounds once more on each side:
        |w_r - w_k| <= |c| |a_r - a_k| + u |c a_r| + u |c a_k|
                    <= |c| D (1 + u) + 2u / (1 - u) |w_r|       (|c a_r| <= |w_r| / (1 - u))
    That is about 2-3 float32 ulps of w; a wrong code, nibble or block is off by far more.
    The factor 1 + 2^-40 covers the float64 roundings of this computation itself.
    """
    u = 2.0**-24
    k = qw.in_features
    c = qw.code.double()[quant.unpack_4bit(qw.packed).long()][:, :k]  # (N, K)
    i = torch.arange(qw.scales.numel(), device=qw.scales.device)  # block b of row n: b * N + n
    p = qw.code8.double()[qw.scales.reshape(-1).long()] * qw.absmax2.double()[i // qw.dq_block_size]
    d = 2 * u * (p + qw.offset.double()).abs() + u * (1 + u) * p.abs()
    d = d.view(qw.scales.shape).t().repeat_interleave(qw.block_size, dim=1)[:, :k]  # (N, K)
    return (c.abs() * d * (1 + u) + 2 * u / (1 - u) * expected.double().abs()) * (1 + 2.0**-40)


def ulps_apart(a, b):
    """How many steps of a 16-bit float format (bf16 or fp16) separate a and b, elementwise,
    counted on the bit patterns: read as int16, sign and magnitude become one ordered integer
    (magnitude for +, minus magnitude for -; +0 and -0 both 0), where neighbours differ by 1.
    One ulp means exactly that: the next representable value, in either binade."""
    assert a.dtype == b.dtype and a.element_size() == 2 and a.dtype.is_floating_point

    def ordered(t):
        i = t.contiguous().view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def test_ulps_apart_counts_representable_steps():
    """The helper against values written out by hand (bf16: 8 bits of mantissa precision, fp16: 11)."""
    bf = torch.bfloat16
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 2.0**-133, -1.0, 1.0], dtype=bf)
    b = torch.tensor([1 + 2**-7, 1 - 2**-8, 1 + 2**-6, 2 - 2**-6, -0.0, -(2.0**-133), -1 - 2**-7, -1.0], dtype=bf)
    assert ulps_apart(a, b).tolist() == [1, 1, 2, 2, 0, 2, 1, 32512]
    h = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-9], dtype=torch.float16)
    assert ulps_apart(h[:1].expand(3), h).tolist() == [0, 1, 2]


def assert_dequantized_equal(got, expected, qw):
    """Equal, except that on the GPU a double-quantized absmax may be computed with one fused
    multiply-add (one rounding instead of two, see fma_bound):
      - float32 output: within fma_bound (the absmax of any block may move, so any number of
        values may differ, each by a couple of ulps);
      - 16-bit output: the float32 value moves by a few float32 ulps, which changes the rounded
        16-bit value only where it sits next to a rounding boundary: then by one ulp of the
        dtype (ulps_apart), and for very few values."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if not (ON_GPU and qw.double_quant):
        assert torch.equal(got, expected)
        return
    if expected.dtype == torch.float32:
        diff = (got.double() - expected.double()).abs()
        bound = fma_bound(qw, expected)
        worst = (diff / bound.clamp(min=1e-45)).max().item()
        assert worst <= 1.0, f"float32 dequantization off by up to {worst:.3g} x the FMA bound"
        return
    apart = ulps_apart(got, expected)
    assert apart.max().item() <= 1
    assert (apart > 0).float().mean().item() < 1e-3


# ------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("shape", [(40, 128), (72, 100)], ids=["40x128", "72x100pad"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["16bit", "fp32"])
def test_dequantize_equals_reference(fmt, shape, dtype):
    if ON_GPU and dtype == torch.float32:
        pytest.skip("on the GPU the 16-bit output (bf16) is the one that matters")
    dtype = small_dtype(dtype)
    qw = make_weight(fmt, *shape)
    got = kernels.dequantize(qw, dtype, config=fixed_config("dequantize"))
    assert got.shape == shape and got.dtype == dtype
    assert_dequantized_equal(got, quant.dequantize(qw, dtype), qw)


@pytest.mark.parametrize("config", [
    {"BLOCK_R": 8, "BLOCK_C": 64, "LOOKUP": 1},
    {"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": 0},
], ids=["select-64", "gather-256"])
def test_dequantize_configs(config):
    qw = make_weight("nf4dq", 40, 192, seed=1)
    assert_dequantized_equal(kernels.dequantize(qw, torch.float32, config=config),
                             quant.dequantize(qw, torch.float32), qw)


def prmt_weight(qw):
    """The weight that LOOKUP=3 (the byte-permute NF4 decoder, kernels/_tile.py) computes, by
    PyTorch: bf16(bf16(code[q]) * bf16(absmax)), each product rounded once."""
    n = qw.out_features
    codes = quant.unpack_4bit(qw.packed).view(n, -1, qw.block_size).long()
    scale = quant.block_scales(qw).t().to(torch.bfloat16).float()
    values = qw.code.to(torch.bfloat16).float()[codes]
    return (values * scale[..., None]).to(torch.bfloat16).view(n, -1)[:, : qw.in_features]


@pytest.mark.parametrize("fmt", ["nf4", "nf4dq", "nf4dq32"])
@pytest.mark.parametrize("shape", [(40, 128), (72, 100)], ids=["40x128", "72x100pad"])
def test_prmt_decoder_bit_exact(fmt, shape):
    """LOOKUP=3 through the dequantize kernel, every one of the 256 byte values: on the CPU the
    plain-Triton statement of the decoder, on the GPU the prmt assembly; both equal prmt_weight
    bit for bit (up to the double-quant FMA of assert_dequantized_equal). prmt_weight rounds three
    times (code, absmax, product: (1 + u)^3 - 1 < 3.03 u relative, u = 2^-8) where quant.py's
    float32 weight rounds once (2^-24): the bound below."""
    qw = make_weight(fmt, *shape, seed=30)
    qw.packed = torch.arange(qw.packed.numel(), device=DEVICE).remainder(256).to(torch.uint8).view_as(qw.packed)
    expected = prmt_weight(qw)
    got = kernels.dequantize(qw, torch.bfloat16, config={"BLOCK_R": 16, "BLOCK_C": 128, "LOOKUP": 3})
    assert_dequantized_equal(got, expected, qw)
    w32 = quant.dequantize(qw, torch.float32)
    assert ((expected.float() - w32).abs() <= 3.05 * 2.0**-8 * w32.abs()).all()


@pytest.mark.parametrize("fmt", ["nf4", "nf4dq", "nf4dq32"])
def test_prmt_decoder_in_the_m1_kernel(fmt):
    """LOOKUP=3 in the M = 1 kernel (no tl.dot: the interpreter runs it in bf16): bf16 code
    values (one rounding, u relative, as the skinny bound of the module docstring allows) times
    the float32 absmax, against the float64 product."""
    qw = make_weight(fmt, 72, 100, seed=31)
    x = gaussian(1, 100, seed=32, dtype=torch.bfloat16)
    for block_k in (64, 256):
        cfg = {"BLOCK_N": 16, "BLOCK_K": block_k, "LOOKUP": 3, "SPLIT_K": 2}
        assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x,
                            quant.dequantize(qw, torch.float64).t(), torch.bfloat16)


def test_prmt_decoder_only_for_nf4_bf16():
    x = gaussian(3, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="LOOKUP=3 needs an NF4 weight and bfloat16"):
        kernels.fused_matmul(x, make_weight("nf4", 40, 128), config={**fixed_config_or_default(), "LOOKUP": 3})
    with pytest.raises(ValueError, match="LOOKUP=3 needs an NF4 weight and bfloat16"):
        kernels.dequantize(make_weight("int4", 40, 128), torch.bfloat16,
                           config={"BLOCK_R": 16, "BLOCK_C": 128, "LOOKUP": 3})


# (decoder, warps, splits of the 3 blocks, cp.async ring stages: 0 = none, x in shared memory;
# the interpreter has no ring and runs those as STAGES 0, XS 0): rings longer than a split too
MMA_CONFIGS = [{"MMA": 1, "LUT": lut, "num_warps": w, "SPLIT_K": s, "STAGES": st, "XS": xs}
               for lut, w, s, st, xs in [(0, 1, 1, 0, 0), (1, 2, 2, 0, 0), (0, 1, 3, 0, 0),
                                         (1, 1, 2, 0, 0), (1, 2, 1, 2, 0), (0, 1, 2, 3, 0),
                                         (1, 1, 3, 4, 0), (0, 2, 1, 4, 0), (1, 2, 2, 2, 1),
                                         (0, 1, 1, 3, 1), (0, 2, 3, 2, 1)]]


@pytest.mark.parametrize("fmt", ["nf4", "nf4dq"])
@pytest.mark.parametrize("m", [1, 3, 8, 11, 16])
def test_mma_kernel_equals_reference(fmt, m):
    """skinny_mma (tensor cores, M <= 16): N = 40 (a partial warp of 16 rows), 1-3 splits of K
    (3 blocks), M up to 8 (one mma) and up to 16 (two), with and without the cp.async ring and x
    in shared memory (GPU, N = 48). On the CPU the kernel's plain statement (ASM=0), on the GPU
    the PTX with both decoders. bf16 code values times the absmax: the bound of the M = 1 kernel
    (module docstring), against the float64 product."""
    x = gaussian(m, 192, seed=51 + m, dtype=torch.bfloat16)
    weights = {n: make_weight(fmt, n, 192, seed=50) for n in (40, 48)}
    for cfg in MMA_CONFIGS:
        ring = cfg["STAGES"] and torch.cuda.is_available()
        qw = weights[48 if ring else 40]  # the ring needs whole 16-row tiles
        w64 = quant.dequantize(qw, torch.float64).t()
        assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x, w64, torch.bfloat16)


def test_mma_kernel_refuses_what_it_cannot_do():
    """NF4 with block 64, K a multiple of 64, bf16 x in 8-byte aligned rows: anything else is a
    clear error with an explicit config, and the tuner does not offer the kernel."""
    cfg = MMA_CONFIGS[0]
    x = gaussian(2, 192, seed=52, dtype=torch.bfloat16)
    for qw in (make_weight("int4", 40, 192), make_weight("nf4dq32", 40, 192)):
        with pytest.raises(ValueError, match="MMA kernel needs"):
            kernels.skinny_matmul(x, qw, config=cfg)
    qw = make_weight("nf4", 40, 192)
    with pytest.raises(ValueError, match="MMA kernel needs"):
        kernels.skinny_matmul(x.half(), qw, config=cfg)
    with pytest.raises(ValueError, match="MMA kernel needs"):
        kernels.skinny_matmul(gaussian(2, 100, dtype=torch.bfloat16), make_weight("nf4", 40, 100),
                              config=cfg)  # K = 100, padded to 128
    wide = gaussian(2, 193, seed=53, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="MMA kernel needs"):
        kernels.skinny_matmul(wide[:, 1:], qw, config=cfg)  # rows start 2 bytes past alignment
    sk = importlib.import_module("kernels.skinny_matmul")
    assert not sk.mma_ok(wide[:, 1:], 0, 192, 192, 64) and sk.mma_ok(x, 0, 192, 192, 64)


def fixed_config_or_default():
    return importlib.import_module("kernels.fused_matmul").INTERPRETER_CONFIG


# ------------------------------------------------------------------------------- matmuls

CASES = [  # (format, N, K, M, dtype): ragged N, M; K padded (100), not a multiple of tiles (320)
    ("nf4dq", 40, 128, 1, torch.float32),
    ("nf4dq", 72, 100, 33, torch.float16),
    ("nf4", 48, 320, 5, torch.float16),
    ("nf4", 40, 128, 17, torch.float32),
    ("int4", 72, 100, 1, torch.float16),
    ("int4g128", 48, 320, 33, torch.float32),
    ("int4", 40, 192, 5, torch.float32),
    ("nf4dq32", 72, 100, 7, torch.float16),
]
CASE_IDS = [f"{c[0]}-N{c[1]}-K{c[2]}-M{c[3]}-{str(c[4])[6:]}" for c in CASES]


@pytest.mark.parametrize("fmt,n,k,m,dtype", CASES, ids=CASE_IDS)
def test_fused_matmul_equals_reference(fmt, n, k, m, dtype):
    dtype = small_dtype(dtype)
    qw = make_weight(fmt, n, k, seed=2)
    x = gaussian(m, k, seed=3, dtype=dtype)
    y = kernels.fused_matmul(x, qw, config=fixed_config("fused_matmul"))
    assert_matmul_close(y, x, quant.dequantize(qw, dtype).t(), dtype)


@pytest.mark.parametrize("fmt,n,k,m,dtype", CASES, ids=CASE_IDS)
def test_fused_matmul_dx_equals_reference(fmt, n, k, m, dtype):
    dtype = small_dtype(dtype)
    qw = make_weight(fmt, n, k, seed=4)
    dy = gaussian(m, n, seed=5, dtype=dtype)
    dx = kernels.fused_matmul_dx(dy, qw, config=fixed_config("fused_matmul_dx"))
    assert_matmul_close(dx, dy, quant.dequantize(qw, dtype), dtype)


@pytest.mark.parametrize("fmt,n,k,m,dtype", [c for c in CASES if c[3] <= 16],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[3] <= 16])
def test_skinny_matmul_equals_reference(fmt, n, k, m, dtype):
    dtype = small_dtype(dtype)
    qw = make_weight(fmt, n, k, seed=6)
    x = gaussian(m, k, seed=7, dtype=dtype)
    y = kernels.skinny_matmul(x, qw, config=fixed_config("skinny_matmul"))
    assert_matmul_close(y, x, quant.dequantize(qw, dtype).t(), dtype)


def test_non_contiguous_inputs():
    dtype = small_dtype(torch.float16)
    qw = make_weight("nf4dq", 40, 128, seed=8)
    w = quant.dequantize(qw, dtype)
    x_t = gaussian(128, 9, seed=9, dtype=dtype).t()  # strides (1, 9)
    x_slice = gaussian(3, 256, seed=10, dtype=dtype)[:, 64:192]  # row stride 256
    x_row = gaussian(1, 384, seed=11, dtype=dtype)[:, ::3]  # column stride 3
    assert not (x_t.is_contiguous() or x_slice.is_contiguous() or x_row.is_contiguous())
    fused, skinny, dx = (fixed_config(m) for m in ("fused_matmul", "skinny_matmul", "fused_matmul_dx"))
    assert_matmul_close(kernels.fused_matmul(x_t, qw, config=fused), x_t, w.t(), dtype)
    assert_matmul_close(kernels.skinny_matmul(x_slice, qw, config=skinny), x_slice, w.t(), dtype)
    assert_matmul_close(kernels.skinny_matmul(x_row, qw, config=skinny), x_row, w.t(), dtype)
    # M = 1 reads a contiguous bf16 x as 32-bit pairs (bit operations only, so the interpreter
    # runs it too); an odd start forbids that: both paths, against the float64 product
    bf16 = torch.bfloat16
    for start in (1, 2):
        x_off = gaussian(1, 130, seed=13, dtype=bf16)[:, start:start + 128]
        assert_matmul_close(kernels.skinny_matmul(x_off, qw, config=skinny), x_off,
                            quant.dequantize(qw, torch.float64).t(), bf16)
    dy_t = gaussian(40, 6, seed=12, dtype=dtype).t()
    assert_matmul_close(kernels.fused_matmul_dx(dy_t, qw, config=dx), dy_t, w, dtype)
    dy_0 = torch.full((1, 1), 0.5, dtype=dtype, device=DEVICE).expand(5, 40)  # strides (0, 0),
    assert_matmul_close(kernels.fused_matmul_dx(dy_0, qw, config=dx), dy_0, w, dtype)  # as y.sum()


@pytest.mark.skipif(ON_GPU, reason="on the GPU these tilings compile and run through the autotuner")
@pytest.mark.parametrize("fmt", ["nf4dq", "int4g128"])
def test_tile_configs_and_lookups(fmt):
    """Other tilings than the default: K tiles spanning several blocks or part of a block,
    EVEN_K (no masks), and the select-tree NF4 lookup."""
    dtype = torch.float32
    qw = make_weight(fmt, 40, 256, seed=13)
    w = quant.dequantize(qw, dtype)
    x1, x5 = gaussian(1, 256, seed=14), gaussian(5, 256, seed=15)
    dy = gaussian(21, 40, seed=16)
    for lookup in (0, 1, 2):
        cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 1, "LOOKUP": lookup}
        assert_matmul_close(kernels.fused_matmul(dy[:, :1].expand(21, 256).contiguous() * x1, qw,
                                                 config=cfg), dy[:, :1] * x1, w.t(), dtype)
        cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "LOOKUP": lookup}
        assert_matmul_close(kernels.fused_matmul(x5, qw, config=cfg), x5, w.t(), dtype)
        cfg = {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_N": 16, "GROUP_M": 4, "LOOKUP": lookup}
        assert_matmul_close(kernels.fused_matmul_dx(dy, qw, config=cfg), dy, w, dtype)
        for block_k in (64, 256):
            cfg = {"BLOCK_N": 8 if block_k == 64 else 16, "BLOCK_K": block_k, "LOOKUP": lookup}
            assert_matmul_close(kernels.skinny_matmul(x1, qw, config=cfg), x1, w.t(), dtype)
            cfg["BLOCK_N"] = 16
            assert_matmul_close(kernels.skinny_matmul(x5, qw, config=cfg), x5, w.t(), dtype)


def config_dict(cfg):
    """A triton.Config as the dict that the launchers' `config` takes (dicts pass through)."""
    if isinstance(cfg, dict):
        return cfg
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


AUTOTUNE_LISTS = [  # (kernel module, config list, M to run it at)
    ("fused_matmul", "LARGE_M_CONFIGS", 200),
    ("fused_matmul", "SMALL_M_CONFIGS", 40),
    ("fused_matmul_dx", "LARGE_M_CONFIGS", 200),
    ("fused_matmul_dx", "SMALL_M_CONFIGS", 40),
    ("skinny_matmul", "CANDIDATES_M1", 1),
    ("skinny_matmul", "CANDIDATES_M16", 11),
    ("dequantize", "_CONFIGS", 0),
]


@pytest.mark.skipif(ON_GPU, reason="the GPU tests exercise these configs through the autotuner")
@pytest.mark.parametrize("module,configs,m", AUTOTUNE_LISTS, ids=[f"{a}-{b}" for a, b, _ in AUTOTUNE_LISTS])
def test_every_autotune_config_is_correct(module, configs, m):
    """The autotuner only returns the result of the config it picks: check each config here."""
    mod = importlib.import_module(f"kernels.{module}")
    qw = make_weight("nf4dq", 72, 192, seed=17)
    w = quant.dequantize(qw, torch.float32)
    for cfg in getattr(mod, configs):
        cfg = cfg if isinstance(cfg, dict) else config_dict(cfg)
        if module == "dequantize":
            assert torch.equal(kernels.dequantize(qw, torch.float32, config=cfg), w)
        elif module == "fused_matmul_dx":
            dy = gaussian(m, 72, seed=18)
            assert_matmul_close(kernels.fused_matmul_dx(dy, qw, config=cfg), dy, w, torch.float32)
        else:
            x = gaussian(m, 192, seed=19)
            fn = kernels.fused_matmul if module == "fused_matmul" else kernels.skinny_matmul
            assert_matmul_close(fn(x, qw, config=cfg), x, w.t(), torch.float32)


@pytest.mark.skipif(ON_GPU, reason="on the GPU the real autotuner runs in the other tests")
def test_autotuned_launch_path_in_interpreter(monkeypatch):
    """The launchers' autotuned branch (grids, keys, M buckets), with timing replaced by one run."""

    def one_run(kernel_call, quantiles):
        kernel_call()
        return [1.0, 1.0, 1.0]

    tuners = {"fused_matmul": ["_large_m_tuned", "_small_m_tuned"],
              "fused_matmul_dx": ["_large_m_tuned", "_small_m_tuned"],
              "skinny_matmul": [], "dequantize": ["_dequantize_tuned"]}
    for module, names in tuners.items():
        mod = importlib.import_module(f"kernels.{module}")
        monkeypatch.setattr(mod, "interpreting", lambda: False)  # take the autotuned branch
        for name in names:
            # (in the instance dict: reading the attribute first would look for a GPU driver)
            monkeypatch.setitem(getattr(mod, name).__dict__, "do_bench", one_run)
    # skinny_matmul tunes by itself (CUDA-graph timing): run every candidate once, pick the last
    skinny = importlib.import_module("kernels.skinny_matmul")
    tried = []

    def run_all(x, w, candidates, args):
        for cand in candidates:
            skinny._launch(x, w, cand, *args)
            tried.append(cand)
        return candidates[-1]

    monkeypatch.setattr(skinny, "_tune", run_all)
    monkeypatch.setattr(skinny, "_chosen", {})
    monkeypatch.setattr(importlib.import_module("kernels._launch"), "_tuned_choice", {})
    qw = make_weight("int4g128", 40, 256, seed=20)
    w = quant.dequantize(qw, torch.float32)
    for m in (1, 3, 130):
        x, dy = gaussian(m, 256, seed=m), gaussian(m, 40, seed=m + 1)
        assert_matmul_close(kernels.fused_matmul(x, qw), x, w.t(), torch.float32)
        assert_matmul_close(kernels.fused_matmul_dx(dy, qw), dy, w, torch.float32)
        if m <= 16:
            assert_matmul_close(kernels.skinny_matmul(x, qw), x, w.t(), torch.float32)
            assert skinny.chosen_config(x, qw) is not None
            assert_matmul_close(kernels.skinny_matmul(x, qw), x, w.t(), torch.float32)  # cached
    assert len(tried) == len(skinny.CANDIDATES_M1) + len(skinny.CANDIDATES_M16)
    # dequantize: the autotuner at the first call, then the plain kernel with the config it chose
    tuned_choice = importlib.import_module("kernels._launch")._tuned_choice
    assert torch.equal(kernels.dequantize(qw, torch.float32), w)
    assert len(tuned_choice) == 1
    assert torch.equal(kernels.dequantize(qw, torch.float32), w)


def test_skinny_tuned_config_key_sees_the_ring():
    """A tuned config is cached per _key: two weights of one shape whose tensors differ in what
    the cp.async ring needs (16-byte aligned packed bytes) get different keys, so a ring config
    tuned on one is never reused on the other (it would raise)."""
    import dataclasses
    sk = importlib.import_module("kernels.skinny_matmul")
    from kernels._launch import weight_args
    qw = make_weight("nf4dq", 48, 192, seed=54)
    buf = torch.zeros(qw.packed.numel() + 1, dtype=torch.uint8, device=qw.packed.device)
    shifted = buf[1:].view(qw.packed.shape)  # contiguous, one byte past 16-byte alignment
    shifted.copy_(qw.packed)
    other = dataclasses.replace(qw, packed=shifted)
    x = gaussian(1, 192, seed=55, dtype=torch.bfloat16)
    keys = []
    for w in (qw, other):
        fmt, tensors, kp, qb, dq_block = weight_args(w)
        keys.append(sk._key(x, w, tensors, dq_block))
    assert keys[0] != keys[1] and keys[0][:-1] == keys[1][:-1]


@pytest.mark.cuda
def test_skinny_tuner_skips_a_candidate_that_fails(monkeypatch):
    """A candidate that fails to compile or run on this GPU / Triton (as the Hopper kernels did
    on a Triton that renamed Gluon's API) is skipped with a warning: skinny_matmul runs another
    and stays correct. When every candidate fails, the error says so."""
    sk = importlib.import_module("kernels.skinny_matmul")
    real = sk._launch
    broken = []

    def failing_first(x, w, cand, *args):
        if cand is broken[0]:
            raise RuntimeError("error encountered during parsing (a stand-in compiler failure)")
        return real(x, w, cand, *args)

    qw = make_weight("nf4dq", 272, 448, seed=91)   # a shape no other test tunes
    x = gaussian(1, 448, seed=92, dtype=torch.bfloat16)
    broken.append(sk.CANDIDATES_M1[0])
    monkeypatch.setattr(sk, "_launch", failing_first)
    monkeypatch.setattr(sk, "_chosen", {})
    monkeypatch.setattr(sk, "_disk_choice", lambda *a: None)  # tune each time, keep nothing on disk
    with pytest.warns(RuntimeWarning, match="skipped, it failed here"):
        y = sk.skinny_matmul(x, qw)
    assert sk.chosen_config(x, qw) is not broken[0]
    assert_matmul_close(y, x, quant.dequantize(qw, torch.float64).t(), torch.bfloat16)
    # every candidate fails now (each is launched as the broken one)
    monkeypatch.setattr(sk, "_launch", lambda *a: failing_first(*a[:2], broken[0], *a[3:]))
    monkeypatch.setattr(sk, "_chosen", {})
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no skinny_matmul candidate"):
        sk.skinny_matmul(x, qw)


def test_skinny_split_k_values():
    """split_k_for: enough programs, never an empty split; the launcher's K ranges cover K."""
    from kernels.skinny_matmul import split_k_for
    assert split_k_for(4096, 4096, 32, 256, 4 * 132) == 4  # 128 row blocks x 4 = 512 programs
    assert split_k_for(11008, 4096, 32, 256, 4 * 132) == 2
    assert split_k_for(4096, 11008, 32, 256, 4 * 132) == 5  # 43 steps: 9 per split, 5 splits
    assert split_k_for(64, 128, 32, 256, 1000) == 1  # one step of K: nothing to split
    # fit: at most that many programs (skinny_mma's 128-row tiles, 64-column blocks)
    assert split_k_for(4096, 11008, 128, 64, 2 * 132) == 9  # 288 programs: 3 on some SMs
    assert split_k_for(4096, 11008, 128, 64, 2 * 132, fit=True) == 8  # 256
    assert split_k_for(4096, 11008, 128, 64, 3 * 132, fit=True) == 12  # 384: 3 on every SM
    assert split_k_for(11008, 4096, 128, 64, 2 * 132, fit=True) == 3  # 86 x 3 = 258
    assert split_k_for(11008, 4096, 128, 64, 100, fit=True) == 1  # fewer than the row tiles
    for n, kp, bk, programs in [(40, 192, 64, 100), (4096, 11008, 256, 528), (72, 448, 128, 7)]:
        for fit in (False, True):
            split = split_k_for(n, kp, 16, bk, programs, fit)
            steps = -(-kp // bk)
            per = -(-steps // split)
            assert (split - 1) * per < steps <= split * per  # the last split is not empty
            if fit:  # never more programs than asked (but one split at least)
                assert -(-n // 16) * split <= max(programs, -(-n // 16))


@pytest.mark.skipif(ON_GPU, reason="the GPU tests use the tuned configs")
@pytest.mark.parametrize("split_k", [1, 2, 3, 5])
@pytest.mark.parametrize("m", [1, 6])
def test_skinny_split_k(split_k, m):
    """Every split of K (with a ragged last split and a padded K) gives the same product."""
    qw = make_weight("int4", 24, 300, seed=30)  # K 300 -> KP 320: 5 steps of 64
    w = quant.dequantize(qw, torch.float32)
    x = gaussian(m, 300, seed=31)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 64, "LOOKUP": 2, "SPLIT_K": split_k}
    assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x, w.t(), torch.float32)


def test_bad_input_raises_clear_errors():
    qw = make_weight("nf4", 40, 128)
    with pytest.raises(ValueError, match="2-D"):
        kernels.fused_matmul(torch.randn(2, 3, 128, device=DEVICE), qw)
    with pytest.raises(ValueError, match="columns, expected 128"):
        kernels.fused_matmul(torch.randn(3, 127, device=DEVICE), qw)
    with pytest.raises(TypeError, match="dtype"):
        kernels.fused_matmul(torch.randn(3, 128, device=DEVICE, dtype=torch.float64), qw)
    with pytest.raises(ValueError, match="columns, expected 40"):
        kernels.fused_matmul_dx(torch.randn(3, 128, device=DEVICE), qw)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        kernels.skinny_matmul(torch.randn(17, 128, device=DEVICE), qw)
    with pytest.raises(ValueError, match="programs per SM: one of"):
        kernels.skinny_matmul(torch.randn(1, 128, device=DEVICE), qw, config={"DECODE_SM90": 3})
    with pytest.raises(TypeError, match="output dtype"):
        kernels.dequantize(qw, torch.int8)
    bad = quant.QuantizedWeight(**{**qw.__dict__, "scales": qw.scales.t().contiguous()})
    with pytest.raises(ValueError, match="scales"):
        kernels.dequantize(bad)
    bad = quant.QuantizedWeight(**{**qw.__dict__, "quant_type": "fp4"})
    with pytest.raises(ValueError, match="quant_type"):
        kernels.fused_matmul(torch.randn(3, 128, device=DEVICE), bad)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        kernels.dequantize(torch.randn(40, 128, device=DEVICE))
    # tensors of the wrong size would be read out of bounds: refused before any launch
    qd = make_weight("nf4dq", 40, 128)
    bad = quant.QuantizedWeight(**{**qd.__dict__, "absmax2": torch.empty(0, device=DEVICE)})
    with pytest.raises(ValueError, match="absmax2"):
        kernels.fused_matmul(torch.randn(3, 128, device=DEVICE), bad)
    qi = make_weight("int4", 40, 128)
    bad = quant.QuantizedWeight(**{**qi.__dict__, "zeros": qi.zeros[:1].clone()})
    with pytest.raises(ValueError, match="zeros"):
        kernels.skinny_matmul(torch.randn(1, 128, device=DEVICE), bad)
    with pytest.raises(ValueError, match="zeros"):
        quant.dequantize(bad)


# ----------------------------------------------------- localized errors (sparse x, exact weights)

def kernel_weights(qw, dtype):
    """The weights the kernels multiply x by, each exactly (float64, (N, K)), by kind:
      f32:    float32(code * absmax)                       (the M = 1 kernel with LOOKUP 0-2)
      dot:    dtype(float32(code * absmax))                (tl.dot kernels, dequantize + cuBLAS)
      prmt:   bf16(bf16(code) * bf16(absmax))              (LOOKUP 3, fused_matmul_sm90)
      code16: bf16(code) * absmax, unrounded               (skinny_mma, decode_sm90, the M = 1
                                                            kernel with LOOKUP 3: block sums of
                                                            exact products, then the scale)
    each twice: with quant.py's absmax (two roundings with double quantization) and with the one
    an FMA gives (code8[q] * absmax2 + offset rounded once: assert_dequantized_equal)."""
    n = qw.out_features
    codes = quant.unpack_4bit(qw.packed).view(n, -1, qw.block_size).long()
    variants = [quant.block_scales(qw)]
    if qw.double_quant:
        blk = torch.arange(qw.scales.numel(), device=qw.scales.device) // qw.dq_block_size
        exact = qw.code8.double()[qw.scales.reshape(-1).long()] * qw.absmax2.double()[blk]
        variants.append((exact + qw.offset.double()).float().view(qw.scales.shape))
    kinds = {}
    for absmax in variants:
        a = absmax.t()[..., None]                                     # (N, KB, 1)
        f32 = qw.code[codes] * a                                      # float32 products
        b16 = torch.bfloat16
        weights = {"f32": f32, "dot": f32.to(dtype)}
        if dtype == b16:
            weights["prmt"] = (qw.code.to(b16).float()[codes] * a.to(b16).float()).to(b16)
            weights["code16"] = qw.code.to(b16).double()[codes] * a.double()
        for kind, w in weights.items():
            kinds.setdefault(kind, []).append(w.double().view(n, -1)[:, : qw.in_features])
    return kinds


def sparse_signs(m, k, nnz, seed, dtype):
    """m rows of x, each with nnz entries +-1 at random places and zeros elsewhere: every product
    with a weight is exact, and y sums only nnz of them: small enough that one wrong code or
    block scale moves y by more than y's rounding (test_localized_errors_are_caught)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(m, k)
    for i in range(m):
        x[i, torch.randperm(k, generator=g)[:nnz]] = torch.randint(0, 2, (nnz,), generator=g).float() * 2 - 1
    return x.to(dtype=dtype, device=DEVICE)


def exact_weight_ratio(y, a, kinds):
    """max |y - a @ w.T| / bound over the outputs, for the kind of weight (kernel_weights) that
    fits y best. a: sparse_signs (products exact). Per kind, w and w_alt (the two absmax
    roundings):
        bound = u |ref| + (nnz + 2) 2^-22 (|a| @ |w.T|) + |a| @ |w - w_alt|.T
    u |ref|: y's rounding to its dtype; the second term: float32 sums of nnz exact products (and
    a block's scale, code16), 4x the round-to-nearest worst case (tensor cores' float32 sums
    need not round to nearest); the third: whichever absmax rounding the kernel used."""
    a64 = a.double()
    nnz = int((a64 != 0).sum(dim=1).max())
    u = UNIT_ROUNDOFF[y.dtype]
    best = float("inf")
    for w, w_alt in ((ws[0], ws[-1]) for ws in kinds.values()):
        ref = a64 @ w.t()
        bound = (u * ref.abs() + (nnz + 2) * 2.0**-22 * (a64.abs() @ w.abs().t())
                 + a64.abs() @ (w - w_alt).abs().t() + 1e-30)
        best = min(best, ((y.double() - ref).abs() / bound).max().item())
    return best


def check_localized(name, y, a, kinds, block_size, dx=False):
    """y = a @ W.T (or a @ W for dx) is within exact_weight_ratio's bound, and the same bound
    would catch, at x's first row and its largest output (the largest rounding for a wrong value
    to hide in), one wrong code (a change of 0.0796 x the block's absmax, the smallest gap
    between two NF4 codes) or one block's scale off by 25%."""
    if dx:
        kinds = {kind: [w.t() for w in ws] for kind, ws in kinds.items()}
    worst = exact_weight_ratio(y, a, kinds)
    assert worst <= 1.0, f"{name}: error up to {worst:.3g} x the exact-weight bound"
    out = int((a[:1].double() @ kinds["dot"][0].t()).abs().argmax())
    nonzero = a[0].nonzero()[:, 0]
    # the place of x's first row whose weight is largest (a scale multiplies weights: one near
    # zero would hide it from any x)
    pos = int(nonzero[kinds["dot"][0][out, nonzero].abs().argmax()])
    n, k = (pos, out) if dx else (out, pos)  # the weight W[n, k] that is made wrong
    blk = slice(k // block_size * block_size, (k // block_size + 1) * block_size)
    for how in ("code", "scale"):
        bad = {}
        for kind, ws in kinds.items():
            bad[kind] = []
            for w in ws:
                line = w[out].clone()  # the weights of output `out`: W[n, :], or W[:, k] (dx)
                step = 0.0796 * (w.t() if dx else w)[n, blk].abs().max()
                if how == "code":
                    line[pos] += step if line[pos] <= 0 else -step
                elif dx:
                    line[pos] *= 1.25  # (W[n, k] is the one weight of its block in this line)
                else:
                    line[blk] *= 1.25
                bad[kind].append(line[None])
        ratio = exact_weight_ratio(y[:1, out:out + 1], a[:1], bad)
        assert ratio > 1.0, f"{name}: a wrong {how} at W[{n}, {k}] would pass ({ratio:.3g} x the bound)"


LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): q/o, gate/up, down


@pytest.mark.parametrize("n,k", [(72, 320)] + (LLAMA_SHAPES if ON_GPU else []), ids=lambda v: str(v))
def test_localized_errors_are_caught(n, k):
    """Every matmul path against the exact weight it multiplies by (kernel_weights), on x with 16
    entries +-1 a row (sparse_signs): a bound far tighter than assert_matmul_close's, which must
    allow the roundings of full Gaussian rows and so cannot see one wrong code among thousands.
    Here one wrong code or one block's scale off by 25% would fail (check_localized). NF4 with
    double quantization; on the CPU in the interpreter (fp16: its bf16 tl.dot is broken,
    DESIGN.md), on the GPU in bf16 as quant.py dispatches and tunes it, at the LLaMA shapes."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    qw = make_weight("nf4dq", n, k, seed=90)
    kinds = kernel_weights(qw, dtype)
    for m in (1, 7, 16, 512) if ON_GPU else (1, 5, 20):
        x = sparse_signs(m, k, 16, seed=91 + m, dtype=dtype)
        runs = [("quant._matmul", quant._matmul(x, qw), x, False)]
        if m <= 16:
            runs.append(("skinny_matmul", kernels.skinny_matmul(x, qw), x, False))
        if m >= 16 or not ON_GPU:  # (on the GPU quant.py runs these from 17 rows)
            dy = sparse_signs(m, n, 16, seed=92 + m, dtype=dtype)
            runs.append(("fused_matmul", kernels.fused_matmul(x, qw), x, False))
            runs.append(("fused_matmul_dx", kernels.fused_matmul_dx(dy, qw), dy, True))
        for name, y, a, dx in runs:
            check_localized(f"{name} M={m}", y, a, kinds, qw.block_size, dx)


# ------------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", LLAMA_SHAPES, ids=[f"{n}x{k}" for n, k in LLAMA_SHAPES])
def test_gpu_llama_shapes_bf16(n, k):
    """The production path: NF4 + double quantization, bf16, as quant.py dispatches it."""
    dtype = torch.bfloat16
    qw = quant.quantize_nf4(gaussian(n, k, seed=20, dtype=dtype) * 0.02)
    w = quant.dequantize(qw, dtype)
    assert_dequantized_equal(kernels.dequantize(qw, dtype), w, qw)
    for m in (1, 7, 16, 512, 4096):
        x = gaussian(m, k, seed=m, dtype=dtype)
        if m <= 16:
            assert_matmul_close(kernels.skinny_matmul(x, qw), x, w.t(), dtype)
        if m >= 16:  # below 16 rows quant.py never runs the fused kernel
            assert_matmul_close(kernels.fused_matmul(x, qw), x, w.t(), dtype)
        assert_matmul_close(quant._matmul(x, qw), x, w.t(), dtype)  # whatever the dispatch picks
        if m >= 16:
            dy = gaussian(m, n, seed=m + 1, dtype=dtype)
            assert_matmul_close(kernels.fused_matmul_dx(dy, qw), dy, w, dtype)


TUNE_TWICE = """
import sys, torch
sys.path.insert(0, {root!r})
import kernels, quant
torch.manual_seed(0)
qw = quant.quantize_nf4(torch.randn(384, 320, device="cuda", dtype=torch.bfloat16) * 0.02)
x = torch.randn(64, 320, device="cuda", dtype=torch.bfloat16)
torch.save((kernels.dequantize(qw, torch.bfloat16), kernels.fused_matmul(x, qw),
            kernels.skinny_matmul(x[:1], qw)), sys.argv[1])
"""


@pytest.mark.cuda
def test_gpu_autotuned_choices_kept_on_disk(tmp_path):
    """kernels._launch.autotune and skinny_matmul's tuner: a second process with the same Triton
    cache takes their choices from it instead of timing the configs again (each prints a line for
    each tuning it runs), and computes the same bits."""
    import triton
    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"Triton {triton.__version__} keeps no autotuning on disk (3.4 and later do)")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_PRINT_AUTOTUNING": "1"}
    script = TUNE_TWICE.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"out{i}.pt")], env=env,
                           capture_output=True, text=True, timeout=300) for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    tuned = [r.stdout.count("Triton autotuning for function") for r in runs]
    assert tuned[0] == 2 and tuned[1] == 0, (tuned, runs[0].stdout, runs[1].stdout)  # dequantize, fused_matmul
    skinny = [r.stdout.count("skinny_matmul tuned for") for r in runs]
    assert skinny == [1, 0], (runs[0].stdout, runs[1].stdout)
    first, second = (torch.load(tmp_path / f"out{i}.pt") for i in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_skinny_choice_kept_on_disk(tmp_path, monkeypatch):
    """skinny_matmul._disk_choice (CPU, a fake GPU name): a stored choice is found by the same key,
    GPU and candidates only, and a damaged or foreign file is not taken (a warning, then tuning)."""
    sk = importlib.import_module("kernels.skinny_matmul")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    dev = torch.device("cuda", 0)
    key = (4096, 4096, "nf4", True, 64, True, torch.bfloat16, dev, True, True, True)
    cands = sk.CANDIDATES_M1 + sk.DECODE_SM90_CANDIDATES
    assert sk._disk_choice(key, dev, cands) is None
    sk._disk_choice(key, dev, cands, cands[2])
    assert sk._disk_choice(key, dev, cands) == cands[2]  # what the next process finds
    assert sk._disk_choice(key, dev, cands[:-1]) is None
    assert sk._disk_choice(key[:6] + (torch.float16,) + key[7:], dev, cands) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sk._disk_choice(key, dev, cands) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    [path] = list(tmp_path.rglob("skinny_matmul.json"))
    path.write_text('{"config": {"BLOCK_N": 999}}')
    assert sk._disk_choice(key, dev, cands) is None
    path.write_text("not json")
    with pytest.warns(RuntimeWarning, match="could not be kept on disk"):
        assert sk._disk_choice(key, dev, cands) is None


def test_skinny_stored_choice_that_fails_is_tuned_again(monkeypatch):
    """A choice kept on disk that fails to launch here (its name covers the GPU, Triton, torch and
    the sources, not the driver) gives a warning, then a live tuning whose choice is stored and
    used; one that launches is used without tuning. On the CPU, with the disk, launch and tuner
    stood in for (they are tested elsewhere)."""
    sk = importlib.import_module("kernels.skinny_matmul")
    qw = make_weight("nf4dq", 32, 128, seed=31)
    x = gaussian(1, 128, seed=32, dtype=torch.float32)
    monkeypatch.setattr(sk, "interpreting", lambda: False)
    monkeypatch.setattr(sk, "_chosen", {})
    stored, tuned = sk.CANDIDATES_M1[1], sk.CANDIDATES_M1[0]
    disk, tunings = {"config": stored}, []

    def disk_choice(key, device, candidates, config=None):
        if config is None:
            return disk["config"]
        disk["config"] = config

    def launch(x, w, config, *args):
        if config == stored and disk.get("broken"):
            raise RuntimeError("no kernel image is available for execution on the device")
        return ("y of", config)

    monkeypatch.setattr(sk, "_disk_choice", disk_choice)
    monkeypatch.setattr(sk, "_launch", launch)
    monkeypatch.setattr(sk, "_tune", lambda *a: tunings.append(1) or tuned)
    assert sk.skinny_matmul(x, qw) == ("y of", stored) and not tunings  # taken from disk
    monkeypatch.setattr(sk, "_chosen", {})
    disk["broken"] = True
    with pytest.warns(RuntimeWarning, match="kept on disk.*failed here.*tuning again"):
        assert sk.skinny_matmul(x, qw) == ("y of", tuned)
    assert tunings == [1] and disk["config"] == tuned   # the new choice is stored
    assert sk.skinny_matmul(x, qw) == ("y of", tuned) and tunings == [1]   # and kept in memory


def check_first_configs(qw, w, dtype):
    """Each kernel with the first config of each of its lists (autotuning every format and dtype
    would compile every config again) at M = 1, 16 and 512, against w = qw dequantized."""
    mods = {m: importlib.import_module(f"kernels.{m}") for m in
            ("dequantize", "fused_matmul", "fused_matmul_dx", "skinny_matmul")}
    first = config_dict(mods["dequantize"]._CONFIGS[0])
    assert_dequantized_equal(kernels.dequantize(qw, dtype, config=first), w, qw)
    n, k = w.shape
    for m in (1, 16, 512):
        x = gaussian(m, k, seed=m, dtype=dtype)
        dy = gaussian(m, n, seed=m + 1, dtype=dtype)
        if m <= 16:
            sk = mods["skinny_matmul"]
            cfg = config_dict((sk.CANDIDATES_M1 if m == 1 else sk.CANDIDATES_M16)[0])
            assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x, w.t(), dtype)
        for name, a, b in (("fused_matmul", x, w.t()), ("fused_matmul_dx", dy, w)):
            cfgs = getattr(mods[name], "LARGE_M_CONFIGS" if m > 128 else "SMALL_M_CONFIGS")
            assert_matmul_close(getattr(kernels, name)(a, qw, config=config_dict(cfgs[0])), a, b, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4", "int4", "int4g128"])
def test_gpu_other_formats_bf16(fmt):
    """Formats other than NF4 + double quant (the dequantized values exactly equal)."""
    qw = make_weight(fmt, 4096, 4096, seed=21)
    check_first_configs(qw, quant.dequantize(qw, torch.bfloat16), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4dq", "int4"])
def test_gpu_fp16(fmt, monkeypatch):
    """fp16 activations on the GPU (generate.py's default on GPUs without bf16, such as a T4;
    `--dtype float16` elsewhere): each kernel with the first config of its lists, then quant.py's
    dispatch with its tuners and a QuantLinear's backward, both with and without the
    dequantize + cuBLAS path. The small tests run bf16 on the GPU, and the bf16-only kernels
    (decode_sm90, fused_matmul_sm90, the byte-permute and tensor-core decoders) must not be
    chosen for fp16: a wrong dtype there would give wrong numbers, not an error."""
    dtype = torch.float16
    n, k = 4096, 4096
    qw = make_weight(fmt, n, k, seed=24)
    w = quant.dequantize(qw, dtype)
    check_first_configs(qw, w, dtype)
    assert_dequantized_equal(kernels.dequantize(qw, dtype), w, qw)  # tuned
    ql = quant.QuantLinear(qw)
    for threshold in (None, 64):  # fused for every M, then dequantize + cuBLAS from M = 64
        monkeypatch.setattr(quant, "DEQUANT_MATMUL_MIN_M", threshold)
        for m in (1, 7, 16, 200):
            x = gaussian(m, k, seed=m + 2, dtype=dtype).requires_grad_()
            y = ql(x)
            assert_matmul_close(y.detach(), x.detach(), w.t(), dtype)
            dy = gaussian(m, n, seed=m + 3, dtype=dtype)
            y.backward(dy)
            assert_matmul_close(x.grad, dy, w, dtype)


@pytest.mark.cuda
def test_gpu_quantlinear_autograd_and_dequant_matmul_path(monkeypatch):
    dtype = torch.bfloat16
    ql = quant.QuantLinear.from_linear(torch.nn.Linear(1024, 768, bias=False).cuda().to(dtype))
    w = quant.dequantize(ql.qweight(), dtype)  # the reference, not the kernel
    # fused for every M; dequantize+cuBLAS from M = 64; then on Hopper the Gluon kernel (M > 128)
    for threshold, graphed in ((None, False), (64, False), (64, True)):
        monkeypatch.setattr(quant, "DEQUANT_MATMUL_MIN_M", threshold)
        monkeypatch.setattr(quant, "FUSED_SM90_MIN_TILES", 1)
        monkeypatch.setattr(quant, "_graph_bound", graphed)
        for m in (3, 200):
            x = gaussian(m, 1024, seed=m, dtype=dtype).requires_grad_()
            y = ql(x)
            dy = gaussian(m, 768, seed=m + 1, dtype=dtype)
            y.backward(dy)
            assert_matmul_close(y.detach(), x.detach(), w.t(), dtype)
            assert_matmul_close(x.grad, dy, w, dtype)


def boundary_mismatches(ours, theirs, scaled, code):
    """Codes that differ between two quantizers must be neighbours, with the value within a few
    float32 ulps of the threshold between them (w * (1/absmax) rounded differently: bitsandbytes
    is compiled with --use_fast_math). Returns how many differ."""
    differ = ours != theirs
    if not differ.any():
        return 0
    lo = torch.minimum(ours, theirs)[differ].long()
    hi = torch.maximum(ours, theirs)[differ].long()
    assert torch.equal(hi - lo, torch.ones_like(lo)), "codes differ by more than one step"
    t = quant._midpoints(code)[lo]
    assert ((scaled[differ] - t).abs() <= 4 * torch.finfo(torch.float32).eps * t.abs().clamp(min=1e-30)).all()
    return int(differ.sum())


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", LLAMA_SHAPES[:2], ids=["4096x4096", "11008x4096"])
def test_gpu_nf4_equals_bitsandbytes(n, k):
    bf = pytest.importorskip("bitsandbytes.functional")
    w = gaussian(n, k, seed=22, dtype=torch.bfloat16) * 0.02
    packed_bnb, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    deq_bnb = bf.dequantize_4bit(packed_bnb, state)
    qw = quant.quantize_nf4(w, 64, double_quant=False)
    absmax = state.absmax.view(n, k // 64)
    assert torch.equal(qw.scales.t(), absmax)
    scaled = (w.float().view(n, -1, 64) * (1.0 / absmax)[..., None]).view(n, k)
    ours_codes = quant.unpack_4bit(qw.packed)
    bnb_codes = quant.unpack_4bit(packed_bnb.view(n, k // 2))
    count = boundary_mismatches(ours_codes, bnb_codes, scaled, qw.code)
    assert count <= 1e-5 * n * k
    same = ours_codes == bnb_codes
    for ours in (quant.dequantize(qw, torch.bfloat16), kernels.dequantize(qw, torch.bfloat16)):
        assert ulps_apart(ours, deq_bnb)[same].max().item() <= 1  # the "one bf16 ulp"


@pytest.mark.cuda
def test_gpu_double_quant_codes_equal_bitsandbytes():
    bf = pytest.importorskip("bitsandbytes.functional")
    w = gaussian(4096, 4096, seed=23, dtype=torch.bfloat16)
    qw = quant.quantize_nf4(w, 64, double_quant=False)
    absmax = qw.scales.reshape(-1)
    q, absmax2, offset = quant.double_quantize(absmax)
    q_bnb, state2 = bf.quantize_blockwise(absmax - offset, blocksize=256)
    assert torch.equal(state2.absmax, absmax2)
    scaled = ((absmax - offset).view(-1, 256) * (1.0 / absmax2)[:, None]).view(-1)
    code8 = quant.dynamic_code_8bit("cuda")
    assert boundary_mismatches(q, q_bnb.view(-1), scaled, code8) <= 1e-4 * q.numel()


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 5])
def test_gpu_skinny_every_candidate_and_old_kernel(m):
    """Every split-K candidate (K = 11008: 43 steps of 256, a ragged last split) and the
    unsplit kernel (SPLIT_K = 1) on a LLaMA down-projection shape."""
    sk = importlib.import_module("kernels.skinny_matmul")  # (kernels.skinny_matmul is the function)
    dtype = torch.bfloat16
    n, k = 4096, 11008
    qw = quant.quantize_nf4(gaussian(n, k, seed=40, dtype=dtype) * 0.02)
    w = quant.dequantize(qw, dtype)
    x = gaussian(m, k, seed=41, dtype=dtype)
    cands = sk.CANDIDATES_M1 if m == 1 else sk.CANDIDATES_M16
    for cfg in cands + [{**cands[0], "SPLIT_K": 1}, {**cands[0], "SPLIT_K": 7}]:
        assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x, w.t(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", LLAMA_SHAPES, ids=[f"{n}x{k}" for n, k in LLAMA_SHAPES])
def test_gpu_prmt_decoder_every_config(n, k):
    """Every LOOKUP=3 config of the fused and skinny kernels, against x @ prmt_weight(qw).T."""
    fm, sk = (importlib.import_module(f"kernels.{m}") for m in ("fused_matmul", "skinny_matmul"))
    dtype = torch.bfloat16
    qw = quant.quantize_nf4(gaussian(n, k, seed=48, dtype=dtype) * 0.02)
    w = prmt_weight(qw)
    for m in (1, 7, 9, 16, 40, 512):
        x = gaussian(m, k, seed=49 + m, dtype=dtype)
        if m == 1:  # the gemv kernel: bf16 code values times the float32 absmax
            for cfg in sk.PRMT_CANDIDATES_M1:
                assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x,
                                    quant.dequantize(qw, torch.float64).t(), dtype)
        elif m <= 16:
            for cfg in sk.PRMT_CANDIDATES_M16:
                assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x, w.t(), dtype)
        if m <= 16:  # skinny_mma (both decoders): bf16 code values, like the gemv kernel
            for cfg in sk.MMA_CANDIDATES_M1 + sk.MMA_CANDIDATES_M16:
                assert_matmul_close(kernels.skinny_matmul(x, qw, config=cfg), x,
                                    quant.dequantize(qw, torch.float64).t(), dtype)
        if m >= 16:
            for cfg in fm.PRMT_LARGE_M_CONFIGS + fm.PRMT_SMALL_M_CONFIGS:
                if cfg.kwargs["LOOKUP"] != 3:
                    continue
                assert_matmul_close(kernels.fused_matmul(x, qw, config=config_dict(cfg)), x, w.t(), dtype)


SM90 = ON_GPU and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the Gluon kernel kernels/fused_matmul_sm90.py needs an sm_90 GPU")
@pytest.mark.parametrize("fmt", ["nf4dq"])
@pytest.mark.parametrize("n,k", [(256, 320), (4096, 4096), (11008, 4096), (4096, 11008), (128, 296), (17024, 128),
                                 (17024, 256)],
                         ids=["256x320", "4096x4096", "11008x4096", "4096x11008", "128x296pad", "17024x128",
                              "17024x256"])
def test_gpu_fused_sm90(fmt, n, k):
    """The Hopper kernel against x @ prmt_weight(qw).T (its weights are LOOKUP 3's) with M not a
    multiple of its 256 tokens, few K steps and K padded to 320, and fused_matmul's dispatch to
    it for M > 128 (a second call: the same bits). The last wave's tiles split along K
    (_split_last_wave) on an H100's 132 SMs: 11008x4096 at M = 333 (172 tiles: 40 in 3 parts)
    and 4096 (1376: 56 in 2); with at most 66 tiles all of them, 4096x4096 at M = 1 and 129 (32
    tiles in 4 parts), 333 (64 in 2), 256x320 and 128x296 (2-3 steps a part); 17024x256 at
    M = 1 and 129 (133 tiles: 1 in 2 parts of two steps), 333 and 4096 (266 and 2128 tiles: 2
    and 16 in 2); 17024x128 (two K steps, too few to split: a stored tile keeps two stages for
    y) is not, and at M = 4096 runs 16 tiles of two steps in a row on a program. Where sm90_ok refuses (x strided along K, N not a
    multiple of 128, NF4 without double quantization, a single K step), fused_matmul runs the
    Triton kernel."""
    sm90 = importlib.import_module("kernels.fused_matmul_sm90")
    dtype = torch.bfloat16
    qw = make_weight(fmt, n, k, seed=60)
    w = prmt_weight(qw)
    for m in (1, 129, 333, 4096):
        x = gaussian(m, k, seed=61 + m, dtype=dtype)
        assert sm90.sm90_ok(x, qw)
        y = sm90.fused_matmul_sm90(x, qw)
        assert_matmul_close(y, x, w.t(), dtype)
        if m > 128:
            assert torch.equal(kernels.fused_matmul(x, qw), y)
        flags = sm90._FLAGS.get(x.device)  # the split tiles' flags: lowered again after each call
        assert flags is None or not flags.any()
    x = gaussian(300, 2 * k, seed=62, dtype=dtype)[:, ::2]  # stride along K: not for TMA
    assert not sm90.sm90_ok(x, qw)
    assert_matmul_close(kernels.fused_matmul(x, qw), x, w.t(), dtype)  # the Triton kernel
    for other in (make_weight(fmt, n + 72, k, seed=63), make_weight("nf4", n, k, seed=64),
                  make_weight(fmt, n, 64, seed=68)):
        x = gaussian(300, other.in_features, seed=65, dtype=dtype)
        assert not sm90.sm90_ok(x, other)
        assert_matmul_close(kernels.fused_matmul(x, other), x, prmt_weight(other).t(), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the Gluon kernel kernels/fused_matmul_sm90.py needs an sm_90 GPU")
def test_gpu_fused_sm90_table():
    """The Hopper kernel decodes through a shared-memory table whose address it must find (Gluon
    cannot name it in inline PTX): from the second call on it is found, and its results equal bit
    for bit those decoded with the table read from global memory, wherever it is not found."""
    sm90 = importlib.import_module("kernels.fused_matmul_sm90")
    qw = make_weight("nf4dq", 4096, 4096, seed=66)
    x = gaussian(333, 4096, seed=67, dtype=torch.bfloat16)
    sm90.fused_matmul_sm90(x, qw)  # the first call: candidates from the compiled kernel
    y = sm90.fused_matmul_sm90(x, qw)
    assert sm90.table_offset(x.device, dq_block=qw.dq_block_size) >= 0
    key = (x.device, sm90.STAGES, qw.dq_block_size)
    saved = sm90._TABLE_CANDIDATES[key]
    try:  # a wrong guess (offset 0 is the x ring): the check must refuse it
        sm90._TABLE_CANDIDATES[key] = torch.tensor([0, -1], dtype=torch.int32, device=x.device)
        y_global = sm90.fused_matmul_sm90(x, qw)
        assert sm90.table_offset(x.device, dq_block=qw.dq_block_size) == -1
    finally:
        sm90._TABLE_CANDIDATES[key] = saved
    assert torch.equal(y, y_global)


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the Gluon kernel kernels/fused_matmul_sm90.py needs an sm_90 GPU")
def test_gpu_fused_sm90_in_cuda_graph(monkeypatch):
    """The Hopper kernel with split tiles (4096x4096 at M = 256: 32 tiles in 4 parts) captured in
    a CUDA graph before any eager call has made the shared flags (_flags: the graph zeroes its
    own), replayed on new x, and eager calls after it (the shared flags, made then): every result
    equals the eager one bit for bit, and the flags are down after each."""
    sm90 = importlib.import_module("kernels.fused_matmul_sm90")
    dtype = torch.bfloat16
    qw = make_weight("nf4dq", 4096, 4096, seed=69)
    x = gaussian(256, 4096, seed=70, dtype=dtype)
    monkeypatch.setattr(sm90, "_FLAGS", {})
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled (and the table found) outside the capture
        sm90.fused_matmul_sm90(x, qw)
    torch.cuda.current_stream().wait_stream(side)
    sm90._FLAGS.clear()  # as if no eager call had come first
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sm90.fused_matmul_sm90(x, qw)
    assert sm90._FLAGS == {}
    for seed in (71, 72):
        x.copy_(gaussian(256, 4096, seed=seed, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        eager = sm90.fused_matmul_sm90(x, qw)
        assert torch.equal(y, eager)
        assert not sm90._FLAGS[x.device].any()
    assert_matmul_close(y, x, prmt_weight(qw).t(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 7])
def test_gpu_skinny_in_cuda_graph(m):
    """Decoding replays a CUDA graph: the split-K kernel + reduction must capture, and replaying
    must give exactly the eager result (fixed summation order: deterministic)."""
    dtype = torch.bfloat16
    n, k = 11008, 4096
    qw = quant.quantize_nf4(gaussian(n, k, seed=42, dtype=dtype) * 0.02)
    x = gaussian(m, k, seed=43, dtype=dtype)
    eager = kernels.skinny_matmul(x, qw)  # chooses the config (timing) outside the capture
    assert torch.equal(kernels.skinny_matmul(x, qw), eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernels.skinny_matmul(x, qw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.skinny_matmul(x, qw)
    x.copy_(gaussian(m, k, seed=44, dtype=dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, kernels.skinny_matmul(x, qw))
    assert_matmul_close(y, x, quant.dequantize(qw, dtype).t(), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["nf4dq", "int4"])
def test_gpu_every_lookup(fmt):
    """LOOKUP 0 (global gather), 1 (select tree), 2 (scaled table + tl.gather), 3 (byte permutes,
    NF4 only) on the GPU, on the first large tile of each kernel, a 4096x4096 weight and 512 rows."""
    fm, fdx = (importlib.import_module(f"kernels.{m}") for m in ("fused_matmul", "fused_matmul_dx"))
    dtype = torch.bfloat16
    qw = make_weight(fmt, 4096, 4096, seed=45)
    w = quant.dequantize(qw, dtype)
    x, dy = gaussian(512, 4096, seed=46, dtype=dtype), gaussian(512, 4096, seed=47, dtype=dtype)
    # On the GPU (Triton 3.6, sm_90) the fused kernel compiles only with LOOKUP=2 and the dx
    # kernel not with LOOKUP=0 ("Illegal shared layout"): their autotuners offer only those.
    for lookup in (0, 1, 2, 3):
        if lookup == 3:  # NF4 and bf16 only; its weight is prmt_weight
            if fmt == "nf4dq":
                cfg = config_dict(fm.PRMT_LARGE_M_CONFIGS[0])
                assert_matmul_close(kernels.fused_matmul(x, qw, config=cfg), x, prmt_weight(qw).t(), dtype)
                cfg = {"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": 3, "num_warps": 4}
                assert_dequantized_equal(kernels.dequantize(qw, dtype, config=cfg), prmt_weight(qw), qw)
            continue
        if lookup == 2:
            cfg = {**config_dict(fm.LARGE_M_CONFIGS[0]), "LOOKUP": lookup}
            assert_matmul_close(kernels.fused_matmul(x, qw, config=cfg), x, w.t(), dtype)
        if lookup != 0:
            cfg = {**config_dict(fdx.LARGE_M_CONFIGS[0]), "LOOKUP": lookup}
            assert_matmul_close(kernels.fused_matmul_dx(dy, qw, config=cfg), dy, w, dtype)
        cfg = {"BLOCK_R": 32, "BLOCK_C": 256, "LOOKUP": lookup, "num_warps": 4}
        assert_dequantized_equal(kernels.dequantize(qw, dtype, config=cfg), w, qw)


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the Gluon kernel kernels/decode_sm90.py needs an sm_90 GPU")
def test_gpu_decode_sm90_x_alignment():
    """decode_sm90 reads x by TMA (16-byte aligned): a row only 8-byte aligned, after the tuner
    has chosen for this shape with an aligned one (on the H100 it picks decode_sm90 there), gets
    a kernel that can read it and the right result; an explicit DECODE_SM90 config for it is a
    clear error."""
    n, k = 4096, 4096
    qw = quant.quantize_nf4(gaussian(n, k, seed=73, dtype=torch.bfloat16) * 0.02)
    x = gaussian(1, k, seed=74, dtype=torch.bfloat16)
    ref = quant.dequantize(qw, torch.float64).t()
    assert_matmul_close(kernels.skinny_matmul(x, qw), x, ref, torch.bfloat16)
    x8 = torch.empty(k + 4, dtype=torch.bfloat16, device=x.device)[4:].view(1, k)
    x8.copy_(x)
    assert x8.data_ptr() % 16 == 8
    assert_matmul_close(kernels.skinny_matmul(x8, qw), x, ref, torch.bfloat16)
    with pytest.raises(ValueError, match="16-byte aligned"):
        kernels.skinny_matmul(x8, qw, config={"DECODE_SM90": 1})


@pytest.mark.cuda
@pytest.mark.skipif(not SM90, reason="the Gluon kernel kernels/decode_sm90.py needs an sm_90 GPU")
@pytest.mark.parametrize("n, k, programs", [(4096, 4096, None), (11008, 4096, None), (4096, 11008, None),
                                            (4096, 4096, 7), (48, 192, 5), (64, 4096, 3),
                                            (4096, 4096, "2 per SM"), (11008, 4096, "2 per SM"),
                                            (4096, 11008, "2 per SM")])
def test_gpu_decode_sm90(n, k, programs):
    """The persistent M = 1 kernel against the float64 product (the bound of the M = 1 kernels).
    `programs` below one per SM makes row tiles cross programs in other places (48x192: one unit
    per row tile, 5 programs for 3 units -> 3; 64x4096: 8 units in 3 shares, one tile handed over);
    two per SM is the tuner's other candidate, which skinny_matmul's config {"DECODE_SM90": 2}
    launches (the same bits). Calls repeat bit for bit, and the hand-over flags are all zero after
    each call. An infinite x[k] makes each row +-inf (or NaN where its weight at k is NF4's exact
    zero), as in the float64 product: the kernel's discarded mma columns, which pair one block's
    weights with another block's x, must not turn an infinity into NaN."""
    dec = importlib.import_module("kernels.decode_sm90")
    qw = quant.quantize_nf4(gaussian(n, k, seed=70, dtype=torch.bfloat16) * 0.02)
    x = gaussian(1, k, seed=71, dtype=torch.bfloat16)
    assert dec.decode_ok(x, qw)
    if programs == "2 per SM":
        programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
        assert torch.equal(kernels.skinny_matmul(x, qw, config={"DECODE_SM90": 2}),
                           dec.decode_sm90(x, qw, programs=programs))
    y = dec.decode_sm90(x, qw, programs=programs)
    w64 = quant.dequantize(qw, torch.float64).t()
    assert_matmul_close(y, x, w64, torch.bfloat16)
    assert torch.equal(dec.decode_sm90(x, qw, programs=programs), y)
    assert int(dec._handover(x.device)[1].abs().sum()) == 0
    x_inf = x.clone()
    x_inf[0, k // 3] = float("inf")
    y_inf, ref = dec.decode_sm90(x_inf, qw, programs=programs).double(), x_inf.double() @ w64
    assert ref.isinf().any() and torch.equal(y_inf.isnan(), ref.isnan())
    assert torch.equal(y_inf[ref.isinf()], ref[ref.isinf()])
    assert int(dec._handover(x.device)[1].abs().sum()) == 0
    assert not dec.decode_ok(x.float(), qw) and not dec.decode_ok(gaussian(2, k, dtype=torch.bfloat16), qw)
    x8 = torch.empty(k + 4, dtype=torch.bfloat16, device=x.device)[4:].view(1, k)  # TMA: 16-byte aligned
    assert x8.data_ptr() % 16 == 8 and not dec.decode_ok(x8, qw)
    with pytest.raises(ValueError):
        dec.decode_sm90(x, quant.quantize_weight(gaussian(n, k, seed=72) * 0.05, "int4", 64, False))


@pytest.mark.parametrize("arch,dtype", [(80, "bfloat16"), (89, "bfloat16"), (90, "bfloat16"),
                                        (120, "bfloat16"), (75, "float16")])
def test_kernels_compile_for_gpus(arch, dtype):
    """Every config the launchers can choose compiles for an A100 (sm_80), an RTX 40xx / L4
    (sm_89), an H100 (sm_90) and an RTX 50xx (sm_120) with bf16 activations, and for a T4
    (sm_75, no bf16) with fp16 ones, generate.py's default there; with the installed Triton, GPU
    or not (tests/gpu_compile.py, in a subprocess: it stands in a driver for that GPU and needs
    the interpreter off). Configs too large for a GPU's shared memory may be skipped (the tuners
    do), but every tuner list keeps one that fits. Triton releases move under the kernels
    (Gluon's renames, kernels/_gluon.py) and older GPUs lack instructions (mul.bf16x2 before
    sm_90): without this, a machine without a GPU would see neither. On sm_90 the Gluon kernels'
    PTX must hold what their docstrings rely on: the decoder's programmatic dependent launch, the
    fused kernel's wgmma, both kernels' register reallocation (setmaxnreg)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    jobs = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    run = subprocess.run([sys.executable, script, "--arch", str(arch), "--dtype", dtype, "--jobs", jobs],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    counts = [ln for ln in run.stdout.splitlines() if " compiled, " in ln]
    # (fp16 has no byte-permute or tensor-core decoder lists: 14 lines against 21 with bf16)
    assert len(counts) >= (20 if dtype == "bfloat16" else 14), run.stdout
    assert all(" 0 failed" in ln for ln in counts), run.stdout
    assert any(ln.startswith("seeded_dropout: 2 compiled") for ln in counts), run.stdout
    assert any(ln.startswith("dropout_down: 4 compiled") for ln in counts), run.stdout
    if arch != 90 or not importlib.import_module("kernels._gluon").HAVE_GLUON:
        return  # (no Gluon in this Triton: the Hopper kernels are never used)
    lines = {ln.split(":")[0]: ln for ln in run.stdout.splitlines() if ": compiled for sm_90" in ln}
    assert set(lines) == {"decode_sm90", "fused_matmul_sm90"}, run.stdout
    assert "griddepcontrol.launch_dependents" in lines["decode_sm90"]
    assert "wgmma.mma_async" in lines["fused_matmul_sm90"]
    assert all("setmaxnreg" in ln for ln in lines.values())


def test_decode_sm90_swizzle_view():
    """W_VIEW (kernels/decode_sm90.py) is the inverse of the map it states: 8-byte word of
    (warp w, g, t, r) = 256 (w // 4) + 16 p + 2 ((2 (w % 4) + t // 2) ^ (p % 8)) + t % 2 with
    p = 2 g + r (bytes 32 (w % 4) + 8 t of row p of box w // 4, 128-byte swizzle: 16-byte chunk j
    of row p at chunk j ^ (p % 8)). Checked over all 512 words, on the basis the layout is built
    from (independent of Gluon, which may be missing here). And the 16 lanes g = 0..3 (or 4..7)
    that one pass of an 8-byte load serves read 16 different 8-byte bank slots: no conflict."""
    dec = importlib.import_module("kernels.decode_sm90")
    bases = dec.W_VIEW_BASES
    seen = {}
    for off in range(512):
        idx = [0, 0, 0, 0]
        for bit, basis in enumerate(bases):
            if off >> bit & 1:
                idx = [a ^ b for a, b in zip(idx, basis)]
        w, g, t, r = idx
        p = 2 * g + r
        assert off == 256 * (w // 4) + 16 * p + 2 * ((2 * (w % 4) + t // 2) ^ (p % 8)) + t % 2
        seen[tuple(idx)] = off
    assert len(seen) == 512
    for w, r, half in itertools.product(range(8), range(2), range(2)):
        slots = {seen[w, g, t, r] % 16 for g in range(4 * half, 4 * half + 4) for t in range(4)}
        assert len(slots) == 16, (w, r, half)
