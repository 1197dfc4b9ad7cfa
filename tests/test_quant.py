"""Tests of quant.py: the NF4 / INT4 reference, double quantization, QuantLinear and its autograd.

Independent references: the NF4 table and decision thresholds published with QLoRA /
bitsandbytes (written out below), brute-force nearest-code search, the round-to-nearest error
bound, float64 dense matmuls through autograd, torch.autograd.gradcheck, bitsandbytes' outputs
stored in tests/data (its 8-bit map, a quantized weight), and bitsandbytes itself where it is
installed (importorskip). Runs on the CPU; the `device` fixture adds CUDA when present.
"""

import hashlib
import json
import os
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import quant
from quant import QuantLinear

# NF4 as published in the QLoRA paper (Appendix E) and in bitsandbytes (functional.get_4bit_type).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# The decision thresholds of bitsandbytes' CUDA NF4 quantizer (csrc dQuantizeNF4), ascending.
PUBLISHED_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def gaussian(n, k, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------- NF4 code


def test_nf4_code_equals_published_table():
    code = quant.nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    published = torch.tensor(PUBLISHED_NF4, dtype=torch.float64)
    assert (code.double() - published).abs().max().item() <= 1e-7
    # the structure of section 3: sorted, 7 negative, an exact zero, 8 positive, spans [-1, 1]
    assert torch.all(code[1:] > code[:-1])
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8 and code[7] == 0.0
    assert code[0] == -1.0 and code[15] == 1.0


def test_nf4_offset_is_the_qlora_construction():
    # offset = mean of the two quantile ends 1 - 1/(2*15) and 1 - 1/(2*16), to 7 decimals
    assert round(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)), 7) == quant._NF4_OFFSET_7_DECIMALS
    # and the code's positive / negative halves really are normal quantiles of that offset
    code = quant.nf4_code().double()
    p = torch.linspace(quant._NF4_OFFSET_7_DECIMALS, 0.5, 9, dtype=torch.float64)[:-1]
    q = torch.special.ndtri(p)
    assert torch.allclose(code[8:].flip(0), q / q[0], atol=3e-7)


def test_nf4_thresholds_equal_bitsandbytes_tree():
    mids = quant._midpoints(quant.nf4_code())
    assert torch.equal(mids, torch.tensor(PUBLISHED_NF4_THRESHOLDS, dtype=torch.float32))


def test_nearest_code_equals_brute_force():
    code = quant.nf4_code()
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(20000, generator=g) * 2 - 1, code,
                   torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    got = quant._nearest(x, code)
    brute = (x.double()[:, None] - code.double()[None, :]).abs().argmin(dim=1)
    assert torch.equal(got.long(), brute)
    # a value exactly on a threshold goes to the smaller code (as bitsandbytes: `x > t` -> upper)
    t = quant._midpoints(code)
    assert torch.equal(quant._nearest(t, code).long(), torch.arange(15))


def test_quantize_nf4_codes_equal_brute_force():
    w = gaussian(8, 256, seed=2)
    qw = quant.quantize_nf4(w, double_quant=False)
    absmax = w.view(8, 4, 64).abs().amax(-1)
    assert torch.equal(qw.scales, absmax.t())
    scaled = w.view(8, 4, 64) * (1.0 / absmax)[..., None]
    brute = (scaled.double()[..., None] - quant.nf4_code().double()).abs().argmin(-1)
    assert torch.equal(quant.unpack_4bit(qw.packed).long(), brute.view(8, 256))


# ------------------------------------------------------------------------------- packing


def test_packing_order_first_element_in_high_nibble():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = quant.pack_4bit(codes)
    assert packed.tolist() == [[0x12, 0x34, 0xF0]]
    assert torch.equal(quant.unpack_4bit(packed), codes)
    # through the quantizer: -1 -> code 0, +1 -> code 15, 0 -> code 7 (block absmax = 1)
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([-1.0, 1.0, 0.0, 1.0])
    assert quant.quantize_nf4(w, double_quant=False).packed[0, :2].tolist() == [0x0F, 0x7F]


def test_unpack_pack_roundtrip_random():
    codes = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    assert torch.equal(quant.unpack_4bit(quant.pack_4bit(codes)), codes)


# ------------------------------------------------------------------------------- NF4 error


def rel_error(w, w_hat):
    return ((w.double() - w_hat.double()).norm() / w.double().norm()).item()


def test_nf4_roundtrip_error_on_gaussian_weights():
    w = gaussian(1024, 4096, seed=0)
    err = rel_error(w, quant.dequantize(quant.quantize_nf4(w, double_quant=False)))
    assert 0.0915 < err < 0.0925, err  # bitsandbytes gives 0.09198 on these very weights
    err_dq = rel_error(w, quant.dequantize(quant.quantize_nf4(w, double_quant=True)))
    assert 0.0915 < err_dq < 0.0925 and 0 <= err_dq - err < 1e-3, (err, err_dq)


def test_nf4_every_weight_within_half_gap_of_its_code():
    w = gaussian(16, 512, seed=3)
    qw = quant.quantize_nf4(w, double_quant=False)
    absmax = qw.scales.t().repeat_interleave(64, dim=1)
    gap = (quant.nf4_code()[1:] - quant.nf4_code()[:-1]).max().item()
    assert ((w - quant.dequantize(qw)).abs() <= gap / 2 * absmax * (1 + 1e-6)).all()


def test_nf4_block_of_zeros_and_padding():
    w = gaussian(3, 100, seed=4)  # K = 100: padded to 128 with zero columns
    w[1, :64] = 0.0  # an all-zero block: absmax 0, codes of 0, no NaN
    qw = quant.quantize_nf4(w, double_quant=False)
    assert qw.packed.shape == (3, 64) and qw.scales.shape == (2, 3)
    d = quant.dequantize(qw)
    assert d.shape == (3, 100) and torch.isfinite(d).all()
    assert torch.equal(d[1, :64], torch.zeros(64))
    # the padded columns change nothing: same as quantizing the zero-padded matrix
    padded = quant.dequantize(quant.quantize_nf4(F.pad(w, (0, 28)), double_quant=False))
    assert torch.equal(d, padded[:, :100])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_output_dtype_is_rounded_float32(dtype):
    """code[q] * absmax computed in float64 (exact: a product of two float32), rounded to float32
    (what one float32 multiply gives), then to dtype."""
    w = gaussian(4, 128, seed=5)
    qw = quant.quantize_nf4(w)
    codes = quant.unpack_4bit(qw.packed).view(4, 2, 64).long()
    exact = qw.code.double()[codes] * quant.block_scales(qw).t().double()[..., None]
    assert torch.equal(quant.dequantize(qw, dtype), exact.view(4, 128).float().to(dtype))


# ------------------------------------------------------------------------------- double quant


def test_dynamic_code_structure():
    code = quant.dynamic_code_8bit()
    assert code.shape == (256,) and torch.all(code[1:] > code[:-1])
    assert code.max() == 1.0 and (code == 0).sum() == 1 and code.min() > -1
    # symmetric apart from +1: the negatives mirror the positives below 1
    pos, neg = code[code > 0], code[code < 0]
    assert torch.equal(pos[:-1], (-neg).flip(0))
    assert torch.allclose(pos.min(), torch.tensor(1e-6 * 0.55))  # smallest: 10^-6 * (0.1+1)/2


def test_dynamic_code_equals_bitsandbytes():
    bf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(quant.dynamic_code_8bit(), bf.create_dynamic_map(signed=True))


BNB_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                             "bitsandbytes_nf4_reference.json")


@pytest.mark.parametrize("case", ["plain", "dq"])
def test_nf4_equals_stored_bitsandbytes(case):
    """Our quantizer against bitsandbytes' own, stored (tests/data/README.md; runs without it):
    its signed 8-bit dynamic map, then quantize_4bit (NF4, blocks of 64) of a fixed weight, without
    double quantization (32 x 256: the packed bytes and the float32 absmax) and with it (1 x 20480:
    the packed bytes, absmax codes, nested absmax and offset; one row, where bitsandbytes'
    second-level blocks of 256 are ours, quant.py's layout notes), all equal; and
    dequantize_4bit's float32 values, bit for bit (the first 64 stored, all of them by SHA-256)."""
    with open(BNB_REFERENCE) as f:
        ref = json.load(f)
    assert torch.equal(quant.dynamic_code_8bit(), torch.tensor(ref["dynamic_map_signed"], dtype=torch.float32))
    r = ref[case]
    seed, shape = (0, (32, 256)) if case == "plain" else (1, (1, 20480))
    assert r["weight"].startswith(f"numpy.random.RandomState({seed}).standard_normal({shape})")
    w = torch.from_numpy((np.random.RandomState(seed).standard_normal(shape) * 0.05).astype(np.float32))
    qw = quant.quantize_nf4(w, ref["blocksize"], double_quant=r["compress_statistics"])
    assert qw.packed.numpy().tobytes().hex() == r["packed_hex"]
    stored_order = qw.scales.t().contiguous()  # ours (block, row), bitsandbytes' row by row
    if qw.double_quant:
        assert stored_order.numpy().tobytes().hex() == r["absmax_codes_hex"]
        assert qw.dq_block_size == r["nested_blocksize"] and qw.absmax2.numel() == 2
        assert torch.equal(qw.absmax2, torch.tensor(r["nested_absmax"], dtype=torch.float32))
        assert qw.offset.item() == r["offset"]
    else:
        assert torch.equal(stored_order.view(-1), torch.tensor(r["absmax"], dtype=torch.float32))
    d = quant.dequantize(qw, torch.float32).contiguous()
    assert d.view(-1)[:64].tolist() == r["dequantized_first"]
    assert hashlib.sha256(d.numpy().tobytes()).hexdigest() == r["dequantized_sha256"]


def max_distance_to_code(code):
    """Largest distance from a point of [-1, 1] to the nearest code value."""
    half_gaps = (code[1:] - code[:-1]) / 2
    return max(half_gaps.max().item(), (code[0] + 1).item(), (1 - code[-1]).item())


def test_double_quantization_error_bound():
    w = gaussian(512, 1024, seed=6)
    absmax = w.view(512, 16, 64).abs().amax(-1).t().contiguous()  # (KB, N) as stored
    q, absmax2, offset = quant.double_quantize(absmax)
    assert q.dtype == torch.uint8 and q.shape == absmax.shape
    assert absmax2.shape == (absmax.numel() // 256,) and offset.shape == (1,)
    assert torch.allclose(offset, absmax.double().mean().float())
    recovered = quant.double_dequantize(q, absmax2, offset)
    err = (recovered - absmax).abs().view(-1, 256)
    dist = max_distance_to_code(quant.dynamic_code_8bit())
    assert abs(dist - 0.00703) < 1e-4  # the documented number
    slack = 4 * torch.finfo(torch.float32).eps * absmax.abs().max()  # float32 roundings
    assert (err <= dist * absmax2[:, None] + slack).all()
    # relative to absmax itself: Gaussian absmax values sit near 2.4, the error is ~0.1% of it
    assert (err.view_as(absmax) / absmax).max() < 0.01
    # codes are the nearest: brute force on the centered, scaled values
    scaled = (absmax.view(-1) - offset).view(-1, 256) * (1.0 / absmax2)[:, None]
    brute = (scaled.double()[..., None] - quant.dynamic_code_8bit().double()).abs().argmin(-1)
    assert torch.equal(q.view(-1, 256).long(), brute)


def test_bits_per_weight():
    w = gaussian(256, 4096, seed=7)
    n, k = w.shape
    dq = quant.quantize_nf4(w)
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 32 / (n * k)  # codes, u8 absmax, absmax2, offset
    assert quant.bits_per_weight(dq) == pytest.approx(expected, rel=1e-12)
    assert abs(quant.bits_per_weight(dq) - 4.127) < 1e-3
    assert quant.bits_per_weight(quant.quantize_nf4(w, double_quant=False)) == 4.5
    assert quant.bits_per_weight(quant.quantize_int4(w, 64)) == 4 + 40 / 64
    assert quant.bits_per_weight(quant.quantize_int4(w, 128)) == 4 + 40 / 128


# ------------------------------------------------------------------------------- INT4


@pytest.mark.parametrize("group", [64, 128])
def test_int4_round_to_nearest_bound(group):
    w = gaussian(32, 512, seed=8) * 0.02 + 0.003  # off-center weights, realistic scale
    qw = quant.quantize_int4(w, group)
    scale = qw.scales.t().repeat_interleave(group, dim=1)
    zero = qw.zeros.t().repeat_interleave(group, dim=1).float()
    codes = quant.unpack_4bit(qw.packed).float()
    assert codes.max() <= 15 and qw.zeros.max() <= 15
    # by hand: w_hat = (q - zero) * scale
    w_hat = (codes - zero) * scale
    assert torch.equal(quant.dequantize(qw), w_hat)
    assert ((w - w_hat).abs() <= scale / 2 * (1 + 1e-5)).all()
    # the scale is the group's range (including 0) over 15 levels
    g = w.view(32, -1, group)
    rng = g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
    assert torch.allclose(qw.scales.t(), rng / 15)


def test_int4_roundtrip_error_on_gaussian_weights():
    w = gaussian(1024, 4096, seed=0)
    err64 = rel_error(w, quant.dequantize(quant.quantize_int4(w, 64)))
    err128 = rel_error(w, quant.dequantize(quant.quantize_int4(w, 128)))
    # uniform rounding error: scale/sqrt(12) with scale = range/15, range of 64 normals ~ 4.8 sigma
    assert 0.0905 < err64 < 0.0915, err64
    assert 0.0995 < err128 < 0.1015, err128


def test_int4_constant_and_zero_groups_are_exact():
    w = torch.zeros(2, 128)
    w[0, :64] = 0.25
    w[1, 64:] = -3.0
    assert torch.equal(quant.dequantize(quant.quantize_int4(w)), w)


# ------------------------------------------------------------------------------- bad input


def test_bad_weights_raise_clear_errors():
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_int4(torch.randn(2, 4, 64))
    with pytest.raises(TypeError, match="dtype"):
        quant.quantize_nf4(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        quant.quantize_int4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_nf4(torch.full((4, 64), float("nan")))
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize_nf4(torch.randn(4, 64), block_size=48)
    with pytest.raises(ValueError, match="quant_type"):
        quant.quantize_weight(torch.randn(4, 64), "fp4")
    with pytest.raises(TypeError, match="double_quant"):
        quant.quantize_nf4(torch.randn(4, 64), double_quant="no")
    ql = QuantLinear.from_linear(nn.Linear(64, 8, bias=False))
    with pytest.raises(ValueError, match="expects 64"):
        ql(torch.randn(3, 65))
    with pytest.raises(TypeError, match="floating point"):
        ql(torch.ones(3, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="scalar"):
        ql(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating point"):
        quant.dequantize(ql.qweight(), torch.int8)
    with pytest.raises(ValueError, match="quant_type"):  # before it looks at the model
        quant.quantize_model(nn.Module(), "fp4")


# ------------------------------------------------------------------------------- QuantLinear


QUANT_KINDS = [("nf4", True, 64), ("nf4", False, 64), ("int4", False, 64), ("int4", False, 128)]


def make_qlinear(n, k, kind, device, bias=False, seed=9):
    qt, dq, bs = kind
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(gaussian(n, k, seed) * 0.05)
        if bias:
            lin.bias.copy_(gaussian(1, n, seed + 1)[0])
    return QuantLinear.from_linear(lin.to(device), qt, bs, dq)


@pytest.mark.parametrize("kind", QUANT_KINDS, ids=lambda k: f"{k[0]}-dq{int(k[1])}-{k[2]}")
def test_quantlinear_is_frozen_and_equals_dense_forward(kind, device):
    ql = make_qlinear(24, 192, kind, device, bias=True)
    assert list(ql.parameters()) == [] and not any(b.requires_grad for b in ql.buffers())
    x = gaussian(7, 192, seed=10, device=device)
    w = quant.dequantize(ql.qweight(), torch.float32)  # the reference, not the kernel
    assert w.shape == (24, 192)
    expected = x.double() @ w.double().t() + ql.bias.double()
    y = ql(x)
    assert y.dtype == torch.float32 and y.shape == (7, 24)
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    # leading batch dims
    assert torch.allclose(ql(x.view(1, 7, 192))[0], y)


def test_quantlinear_backward_gradcheck_float64():
    ql = make_qlinear(6, 64, ("nf4", True, 64), "cpu")
    x = gaussian(3, 64, seed=11).double().requires_grad_()
    assert torch.autograd.gradcheck(ql, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", QUANT_KINDS, ids=lambda k: f"{k[0]}-dq{int(k[1])}-{k[2]}")
def test_backward_equals_autograd_through_dequantized_weight(kind, device):
    n, k = 40, 192
    ql = make_qlinear(n, k, kind, device)
    w64 = ql.dequantize(torch.float64)
    for dtype in ([torch.float64, torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]):
        x = gaussian(9, k, seed=12, device=device).to(dtype).requires_grad_()
        dy = gaussian(9, n, seed=13, device=device).to(dtype)
        ql(x).backward(dy)
        x_ref = x.detach().double().requires_grad_()
        (x_ref @ w64.t()).backward(dy.double())
        if dtype == torch.float64:
            assert torch.allclose(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        else:
            u = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7}[dtype]
            scale = dy.double().abs() @ w64.abs()
            assert ((x.grad.double() - x_ref.grad).abs() <= u * scale + 1e-6).all()


class LoRAWrapper(nn.Module):
    """The shape of a LoRA layer: a frozen base plus a trainable low-rank path."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * 2.0


def test_lora_on_top_and_gradient_checkpointing_match_dense(device):
    torch.manual_seed(0)
    ql = make_qlinear(32, 128, ("nf4", True, 64), device)
    layer = nn.Sequential(LoRAWrapper(ql), nn.SiLU(), nn.Linear(32, 8)).to(device)
    dense = nn.Linear(128, 32, bias=False).to(device)
    with torch.no_grad():
        dense.weight.copy_(quant.dequantize(ql.qweight(), torch.float32))  # (the reference)
    dense.weight.requires_grad_(False)
    ref = nn.Sequential(LoRAWrapper(dense), nn.SiLU(), nn.Linear(32, 8)).to(device)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items()
                         if not k.startswith("0.base.")}, strict=False)
    x = gaussian(2 * 5, 128, seed=14, device=device).view(2, 5, 128).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()

    def grads(model, inp, use_checkpoint):
        model.zero_grad()
        inp.grad = None
        out = checkpoint(model, inp, use_reentrant=False) if use_checkpoint else model(inp)
        out.square().sum().backward()
        return [inp.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    expected = grads(ref, x_ref, False)
    for use_checkpoint in (False, True):
        got = grads(layer, x, use_checkpoint)
        assert len(got) == len(expected) == 5  # x, lora_A, lora_B, linear weight and bias
        for g, e in zip(got, expected):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-5)


def test_nothing_dense_is_kept_for_backward():
    """The backward keeps the 4-bit weight (the module's own buffers) and nothing else: neither x
    nor a dequantized W is saved, and what the graph node holds is those very buffers."""
    ql = make_qlinear(48, 256, ("nf4", True, 64), "cpu")
    x = gaussian(8, 256, seed=15).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ql(x)
    assert saved == []
    node = y.grad_fn  # (a 2-D x gets the function's output itself, not a view of it)
    on_node = {name: v for name, v in vars(node).items() if isinstance(v, (torch.Tensor, list, tuple, dict))}
    assert on_node == {}  # no tensor (a dequantized W) put on ctx beside the 4-bit weight
    kept = node.qw.tensors()
    buffers = dict(ql.named_buffers())
    assert all(t is buffers[name] for name, t in kept.items() if t is not None)
    y.sum().backward()
    torch.testing.assert_close(x.grad, quant.dequantize(ql.qweight()).sum(0).expand(8, -1))


def test_cuda_dispatch_follows_its_thresholds(monkeypatch):
    """Which kernel quant.py's dispatch runs at each M, as its table says (the kernels' results
    are tested in test_kernels.py): a stand-in for the kernels package records the choice."""
    chosen = []

    class Kernels:  # what quant.py calls on the package, each returning the right shape
        class fused_matmul_sm90:
            hopper = True
            BLOCK_M, BLOCK_N = 256, 128  # the Gluon kernel's tile (kernels/fused_matmul_sm90.py)

            @staticmethod
            def sm90_ok(x, w):
                return Kernels.fused_matmul_sm90.hopper

        def skinny_matmul(x, w):
            return chosen.append("skinny") or x.new_zeros(x.shape[0], w.out_features)

        def fused_matmul(x, w):
            return chosen.append("fused") or x.new_zeros(x.shape[0], w.out_features)

        def fused_matmul_dx(dy, w):
            return chosen.append("fused") or dy.new_zeros(dy.shape[0], w.in_features)

        def dequantize(w, dtype):
            return chosen.append("dequantize+cuBLAS") or quant.dequantize(w, dtype)

    monkeypatch.setattr(quant, "_kernels_for", lambda t: Kernels)
    skinny, dequant, tiles = quant.SKINNY_MAX_M, quant.DEQUANT_MATMUL_MIN_M, quant.FUSED_SM90_MIN_TILES
    assert skinny < dequant <= 128 and tiles == 128

    def pick(fn, m, n, k=64):  # the kernel fn takes for x (m, k) or dy (m, n), W (n, k)
        chosen.clear()
        qw = quant.quantize_nf4(gaussian(n, k, seed=3))
        fn(torch.zeros(m, n if fn is quant._matmul_dx else k, dtype=torch.bfloat16), qw)
        return chosen[0]

    eager = {1: "skinny", skinny: "skinny", skinny + 1: "fused", dequant - 1: "fused",
             dequant: "dequantize+cuBLAS", 4096: "dequantize+cuBLAS"}
    assert {m: pick(quant._matmul, m, 4096) for m in eager} == eager
    with quant.graph_bound():  # a replayed pass: the Gluon kernel once its grid has 128 tiles
        assert {m: pick(quant._matmul, m, 4096) for m in eager} == {**eager, 4096: "fused"}
        # tiles of 256 tokens x 128 rows: 4 x 32 at M = 769, N = 4096; 3 x 32 at 768; 16 x 8 at 3841, 1024
        assert pick(quant._matmul, 769, 4096) == "fused"
        assert pick(quant._matmul, 768, 4096) == "dequantize+cuBLAS"
        assert pick(quant._matmul, 3841, 1024) == "fused"
        assert pick(quant._matmul, 3840, 1024) == "dequantize+cuBLAS"
        assert pick(quant._matmul, 128, 32768) == "dequantize+cuBLAS"  # M <= 128: not the Gluon kernel's
        # or a large W (4096 x 4096 weights and more) at any M > 128: few tiles are split along K
        assert quant.FUSED_SM90_MIN_WEIGHTS == 4096 * 4096
        assert pick(quant._matmul, 129, 4096, k=4096) == "fused"
        assert pick(quant._matmul, 129, 4096, k=4032) == "dequantize+cuBLAS"
        assert pick(quant._matmul, 128, 4096, k=4096) == "dequantize+cuBLAS"
        assert pick(quant._matmul_dx, 4096, 4096) == "dequantize+cuBLAS"  # no Gluon dx
        Kernels.fused_matmul_sm90.hopper = False  # elsewhere the Triton fused kernel loses from M = 64
        assert pick(quant._matmul, 4096, 4096) == "dequantize+cuBLAS"
    assert not quant._graph_bound
    expected_dx = {1: "fused", dequant - 1: "fused", dequant: "dequantize+cuBLAS"}
    assert {m: pick(quant._matmul_dx, m, 256) for m in expected_dx} == expected_dx


def test_to_dtype_keeps_quantization_buffers():
    ql = make_qlinear(16, 128, ("nf4", True, 64), "cpu", bias=True)
    w = ql.dequantize(torch.float32)
    ql = ql.to(torch.bfloat16)
    assert ql.absmax2.dtype == torch.float32 and ql.code.dtype == torch.float32
    assert ql.bias.dtype == torch.bfloat16
    assert torch.equal(ql.dequantize(torch.float32), w)
    state = ql.state_dict()
    assert "packed" in state and "scales" in state and "code" not in state


# ------------------------------------------------------------------------------- whole models


class TinyBlock(nn.Module):
    def __init__(self, d=64, h=96):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(d, d, bias=False), "o_proj": nn.Linear(d, d, bias=False)})
        self.mlp = nn.Sequential(nn.Linear(d, h, bias=False), nn.SiLU(), nn.Linear(h, d, bias=False))
        self.norm = nn.LayerNorm(d)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 64)
        self.layers = nn.ModuleList(TinyBlock() for _ in range(2))
        self.lm_head = nn.Linear(64, 32, bias=False)


def test_quantize_model_replaces_linears_inside_layers_only():
    model = quant.quantize_model(TinyModel(), "nf4")
    inside = [m for m in model.layers.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert len(inside) == 8 and all(isinstance(m, QuantLinear) for m in inside)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed_tokens, nn.Embedding)
    assert isinstance(model.layers[0].norm, nn.LayerNorm)
    model = quant.quantize_model(TinyModel(), "int4", block_size=128, include_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.quant_type == "int4"
    with pytest.raises(ValueError, match="quant_type"):
        quant.make_quantize_fn("nf5")


def test_quantize_callback_frees_the_16bit_weights():
    block = TinyBlock().half()
    refs = [weakref.ref(m.weight) for m in block.modules() if isinstance(m, nn.Linear)]
    expected = {n: quant.dequantize(quant.quantize_nf4(m.weight), torch.float16)
                for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    quant.make_quantize_fn("nf4")(block)
    assert all(r() is None for r in refs)  # nothing keeps the 16-bit weights alive
    for name, m in block.named_modules():
        if name in expected:
            assert isinstance(m, QuantLinear) and m.weight_dtype == torch.float16
            assert torch.equal(m.dequantize(), expected[name])


def test_load_model_quantizes_each_block_before_the_next_is_made(monkeypatch):
    """Quantize while loading: when the callback gets a block, its 7 linears are the only 16-bit
    ones of any block that exists (the earlier blocks are quantized, the later ones not made)."""
    model_py = pytest.importorskip("model")
    blocks = []  # every Block built during the load, in order
    build = model_py.Block.__init__

    def recorded(self, *args, **kwargs):
        build(self, *args, **kwargs)
        blocks.append(self)

    monkeypatch.setattr(model_py.Block, "__init__", recorded)
    seen = []

    def quantize(block):
        dense = [(i, m) for i, b in enumerate(blocks) for m in b.modules()
                 if isinstance(m, nn.Linear) and m.weight.device.type != "meta"]
        seen.append((len(dense), {i for i, _ in dense} == {blocks.index(block)}))
        quant.make_quantize_fn("nf4")(block)

    model = model_py.load_model("models/stories260K", quantize=quantize)
    assert len(blocks) == len(model.layers) == 5
    assert seen == [(7, True)] * 5


def test_load_model_with_quantize_callback_equals_quantizing_after():
    model_py = pytest.importorskip("model")
    folder = "models/stories260K"
    a = model_py.load_model(folder, quantize=quant.make_quantize_fn("nf4"))
    b = quant.quantize_model(model_py.load_model(folder), "nf4")
    tokens = torch.tensor([[1, 72, 34, 300, 12, 9]])
    with torch.no_grad():
        la, lb = a(tokens), b(tokens)
    assert torch.equal(la, lb)
    assert sum(isinstance(m, QuantLinear) for m in a.modules()) == 7 * len(a.layers)
    with torch.no_grad():
        full = model_py.load_model(folder)(tokens)
    # NF4 changes the logits of this tiny model, but not beyond recognition
    assert 0 < rel_error(full, la) < 0.3


# ------------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("kind", QUANT_KINDS, ids=lambda k: f"{k[0]}-dq{int(k[1])}-{k[2]}")
def test_quantize_on_cuda_equals_cpu(kind):
    qt, dq, bs = kind
    w = gaussian(256, 1088, seed=16, dtype=torch.bfloat16)
    a = quant.quantize_weight(w, qt, bs, dq)
    b = quant.quantize_weight(w.cuda(), qt, bs, dq)
    for name, t in a.tensors().items():
        if t is None:
            assert getattr(b, name) is None
        elif name == "offset":  # a mean: summation order may differ
            assert torch.allclose(t, getattr(b, name).cpu(), rtol=1e-6)
        elif name == "absmax2" and dq:  # max |absmax - offset| of each block: moves with it
            assert torch.allclose(t, b.absmax2.cpu(), rtol=1e-6)
        elif name == "scales" and dq:  # codes of absmax - offset: a value that the offset moved
            # across a threshold between two codes takes the neighbour, and such values are rare
            step = (t.int() - b.scales.cpu().int()).abs()
            assert step.max() <= 1 and (step > 0).float().mean() < 1e-3
        else:
            assert torch.equal(t, getattr(b, name).cpu()), name


def test_a_shadowing_kernels_package_is_reported(monkeypatch):
    import types

    fake = types.ModuleType("kernels")
    fake.__file__ = "/site-packages/kernels/__init__.py"  # e.g. Hugging Face's `kernels`
    monkeypatch.setitem(__import__("sys").modules, "kernels", fake)
    with pytest.raises(RuntimeError, match="shadows"):
        quant._kernels.__wrapped__()
