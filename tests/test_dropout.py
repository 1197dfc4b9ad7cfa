"""dropout.py: masks hashed from (seed, salt, index), and the down-projection that makes them again.

References: lowbias32 written with Python integers (not torch), the module docstring's formula
element by element, binomial statistics, numerical derivatives (gradcheck), and the same model run
without gradient checkpointing. The Triton kernel (kernels/dropout.py) must equal the PyTorch version
bit for bit: in the interpreter on the CPU, compiled on the GPU. The fused down-projection
(kernels/dropout_down.py) must give the float64 sums within one rounding, and seeded_dropout's values
bit for bit where each of its outputs is a single product.
"""

import math
import os
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dropout as D  # noqa: E402
import model as M  # noqa: E402
from test_graph_step import lora_model  # noqa: E402  (tests/ is on sys.path: pytest puts it there)

M32 = 2**32 - 1


def lowbias32(z: int) -> int:
    """C. Wellons' lowbias32 on a Python int (uint32 semantics by masking)."""
    z ^= z >> 16
    z = (z * 0x7FEB352D) & M32
    z ^= z >> 15
    z = (z * 0x846CA68B) & M32
    return z ^ (z >> 16)


def test_mix32_is_lowbias32():
    g = torch.Generator().manual_seed(0)
    values = [0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**31, M32, 0xDEADBEEF]
    values += torch.randint(0, 2**32, (500,), generator=g, dtype=torch.int64).tolist()
    got = D.mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32(v) for v in values]
    assert lowbias32(1) != 1 and lowbias32(0) == 0  # a bijection with 0 as its fixed point


def test_keep_mask_is_the_docstring_formula():
    seed, salt, p = 1_234_567_891, 5, 0.3
    shape = (3, 7, 11)
    got = D.keep_mask(torch.tensor([seed]), salt, shape, p).flatten().tolist()
    key = lowbias32(seed ^ lowbias32(salt))
    want = [(lowbias32(i ^ key) >> 8) >= math.ceil(p * 2**24) for i in range(math.prod(shape))]
    assert got == want
    for wide in (seed + 2**32, seed - 2**32):  # only the seed's low 32 bits count, as in the kernel
        assert D.keep_mask(torch.tensor([wide]), salt, shape, p).flatten().tolist() == want


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_masks_look_like_independent_bernoulli_draws(p):
    n = 1 << 20
    q = 1 - math.ceil(p * 2**24) / 2**24  # P(kept), 1 - p to within 2^-24
    sd = math.sqrt(q * (1 - q) / n)
    seeds = [torch.tensor([s]) for s in (7, 8)]
    m = {(s, salt): D.keep_mask(seeds[s], salt, (n,), p).double() for s in (0, 1) for salt in (0, 1)}
    for mask in m.values():
        assert abs(mask.mean().item() - q) < 5 * sd
    # neighbours, and masks of another salt or another seed at the same index: products average q^2
    # (independent), not q (the same draw) - within 5 standard deviations of a product of two draws
    sd2 = math.sqrt(q * q * (1 - q * q) / n)
    a = m[0, 0]
    for b in (a.roll(1), a.roll(64), m[0, 1], m[1, 0], m[1, 1]):
        assert abs((a * b).mean().item() - q * q) < 5 * sd2


def test_seeded_dropout_scales_the_kept_and_zeroes_the_rest():
    x = torch.randn(300, 70)
    seed = torch.tensor([99])
    y = D.seeded_dropout(x, seed, 3, 0.25)
    kept = D.keep_mask(seed, 3, x.shape, 0.25)
    assert torch.equal(y[kept], x[kept] * (1 / 0.75)) and not y[~kept].any()
    assert torch.equal(D.seeded_dropout(x, seed, 3, 0.25), y)  # a function of its arguments
    y1, y2 = D.seeded_dropout(x, seed, 3, 0.25, x2=2 * x)  # a second tensor: the same mask
    assert torch.equal(y1, y) and torch.equal(y2, 2 * y)
    assert not torch.equal(D.seeded_dropout(x, seed, 4, 0.25), y)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        D.seeded_dropout(x, seed, 3, 1.0)


def test_dropout_down_gradients_are_numerical_derivatives():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor([2024])
    assert torch.autograd.gradcheck(lambda x, a: D.dropout_down(x, a, seed, 1, 0.4), (x, a))
    assert torch.autograd.gradcheck(lambda x: D.dropout_down(x, a.detach(), seed, 1, 0.4), (x,))  # dx only
    assert torch.autograd.gradcheck(lambda a: D.dropout_down(x.detach(), a, seed, 1, 0.4), (a,))  # da only
    h = x * D.keep_mask(seed, 1, x.shape, 0.4) / 0.6
    torch.testing.assert_close(D.dropout_down(x, a, seed, 1, 0.4), h @ a.T, rtol=1e-12, atol=1e-12)


def saved_activation_bytes(model, tokens):
    """Bytes of the distinct storages, other than the model's parameters, that autograd saves for
    the backward of model(tokens)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    return sum(storages.values())


def tiny_lora_model(dropout, grad_ckpt=False):
    """The bundled model in float32 on the CPU, LoRA on all seven linears, B nonzero, training mode."""
    return lora_model("cpu", torch.float32, dropout=dropout, grad_ckpt=grad_ckpt)


def test_dropout_saves_what_dropout_0_saves():
    """Seven adapters, one seed: the masks and dropped copies are made again in the backward, so a
    forward keeps the same tensors as without dropout (nn.Dropout would add a mask and a copy each)."""
    tokens = torch.randint(0, 512, (2, 48))  # (the bundled model's vocabulary: 512)
    sizes = [saved_activation_bytes(tiny_lora_model(p), tokens) for p in (0.0, 0.1)]
    assert sizes[1] == sizes[0] + 8 and sizes[0] > 0  # + the seed, one int64


@pytest.mark.parametrize("forwards", [1, 2])
def test_checkpointing_recomputes_the_forwards_masks(monkeypatch, forwards):
    """The gradients with checkpointing (each block recomputed in the backward) equal those without,
    dropout on, with the generator's state not restored for the recomputation (as in a CUDA graph
    capture, model.py): a recomputed block gets its forward's seed, also when a second forward drew
    another before the backward. A second torch seed changes them (the masks matter)."""
    def checkpoint_without_rng_state(*args, **kw):
        return checkpoint(*args, **{**kw, "preserve_rng_state": False})
    monkeypatch.setattr(M, "checkpoint", checkpoint_without_rng_state)
    tokens = torch.randint(0, 512, (forwards, 2, 40))
    runs = []
    for grad_ckpt, seed in ((False, 1), (True, 1), (True, 2)):
        model = tiny_lora_model(0.2, grad_ckpt)
        torch.manual_seed(seed)
        sum(model(t).float().square().mean() for t in tokens).backward()
        runs.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in runs[0].items():
        torch.testing.assert_close(runs[1][n], g, rtol=1e-5, atol=1e-8)
    assert any(not torch.allclose(runs[2][n], g) for n, g in runs[0].items())


def test_seed_is_drawn_per_forward_in_training_only():
    model = tiny_lora_model(0.1)
    seed = model.layers[0].self_attn.q_proj.seed
    assert all(m.seed is seed for m in model.modules() if hasattr(m, "lora_A"))  # one Seed, a salt each
    assert len({m.salt for m in model.modules() if hasattr(m, "lora_A")}) == 7 * len(model.layers)
    tokens = torch.randint(0, 512, (1, 8))
    drawn = []
    for call in (lambda: model(tokens), lambda: model(tokens=tokens)):  # positional or keyword input
        call()
        drawn.append(seed.value)
    assert drawn[0] is not drawn[1] and 0 <= int(drawn[1]) < 2**32
    with torch.no_grad():
        model.eval()(tokens)
    assert seed.value is drawn[1]  # evaluation draws nothing (and drops nothing)


def kernel_vs_reference(x, seed, salt, p):
    """The kernel on x, and on the pair (x, x2) with x2 another tensor of x's shape, against keep_mask."""
    from kernels.dropout import seeded_dropout as kernel
    keep = D.keep_mask(seed.cpu(), salt, x.shape, p).to(x.device)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(x.device)
    got, (got1, got2) = [kernel(x, seed, salt, D.threshold(p), 1.0 / (1.0 - p), *extra) for extra in ((), (x2,))]
    for out, inp in ((got, x), (got1, x), (got2, x2)):
        assert out.shape == inp.shape and out.dtype == inp.dtype
        assert torch.equal(out, torch.where(keep, inp.float() * (1.0 / (1.0 - p)), 0.0).to(inp.dtype))


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel is compiled: test_gpu_kernel_equals_reference")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_reference_in_interpreter(dtype):
    g = torch.Generator().manual_seed(0)
    seed = torch.tensor([123_456_789])
    for shape in [(1,), (1023,), (3, 1025), (0, 5)]:  # ragged ends, an empty tensor
        kernel_vs_reference(torch.randn(shape, generator=g).to(dtype), seed, 11, 0.1)
    x = torch.randn(40, 64, generator=g).to(dtype)
    kernel_vs_reference(x.T, seed, 2**31 - 1, 0.5)  # non-contiguous: masked as the contiguous copy


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=g).cuda()
    for shape, p in [((4096, 4096), 0.05), ((8, 511, 11008), 0.1), ((3, 1000), 0.5)]:
        kernel_vs_reference(torch.randn(shape, generator=g).to(dtype).cuda(), seed, 6, p)
    # salt 1 and threshold 1 (p = 1e-9), which Triton compiles as constants; seeds beyond 32 bits
    x = torch.randn(3, 1000, generator=g).to(dtype).cuda()
    for s, salt, p in [(seed, 1, 1e-9), (seed + 2**32, 0, 0.3), (torch.full_like(seed, -1), 2, 0.3)]:
        kernel_vs_reference(x, s, salt, p)


# ---------------------------------------------------------------------------------------------
# kernels/dropout_down.py: A drop(x) and its backward with the mask made inside the matmuls
# ---------------------------------------------------------------------------------------------

def fused_vs_float64(M, K, r, p, dtype, device, salt=3):
    """The fused forward and backward on random x, A, dlow against the module docstring's sums in
    float64. Bound per element: one rounding to dtype (u |ref|) plus float32 summation of n terms
    (n 2^-23 sum |terms|), n = K for low, r for dx, M for dA."""
    from kernels.dropout_down import dropout_down_backward, dropout_down_forward
    g = torch.Generator().manual_seed(M * K + r)
    x, dlow = torch.randn(M, K, generator=g), torch.randn(M, r, generator=g)
    a = torch.randn(r, K, generator=g) / K ** 0.5
    seed = torch.randint(0, 2**40, (1,), generator=g)
    x, a, dlow = (t.to(dtype).to(device) for t in (x, a, dlow))
    s = 1.0 / (1.0 - p)
    m = D.keep_mask(seed, salt, (M, K), p).double()
    xd, ad, gd = x.double().cpu(), a.double().cpu(), dlow.double().cpu()
    want = {"low": (s * m * xd) @ ad.T, "dx": s * m * (gd @ ad), "dA": s * gd.T @ (m * xd)}
    terms = {"low": (s * m * xd.abs()) @ ad.abs().T, "dx": s * m * (gd.abs() @ ad.abs()),
             "dA": s * gd.abs().T @ (m * xd.abs())}
    n = {"low": K, "dx": r, "dA": M}
    seed = seed.to(device)
    got = {"low": dropout_down_forward(x, a, seed, salt, D.threshold(p), s)}
    got["dx"], got["dA"] = dropout_down_backward(x, dlow, a, seed, salt, D.threshold(p), s)
    u = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    for name in want:
        assert got[name].dtype == dtype and got[name].shape == want[name].shape, name
        err = (got[name].double().cpu() - want[name]).abs()
        bound = u * want[name].abs() + n[name] * 2.0**-23 * terms[name]
        assert (err <= bound).all(), (name, M, K, r, (err / bound).max().item())
    for need in ((True, False), (False, True)):  # one of the two: the same values
        dx, da = dropout_down_backward(x, dlow, a, seed, salt, D.threshold(p), s, *need)
        assert (dx is None) != (da is None)
        assert torch.equal(dx if need[0] else da, got["dx"] if need[0] else got["dA"])


def fused_selections_equal_seeded_dropout(M, K, r, p, dtype, device, salt=5):
    """With A, or dlow, a selection (a row of the identity in each row), each output is one product
    and the kernels' sums add only zeros: low, dx and dA must equal seeded_dropout bit for bit, mask
    and rounding alike (the random-A test above cannot see a single wrong mask element)."""
    from kernels.dropout_down import dropout_down_backward, dropout_down_forward
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    seed = torch.randint(0, 2**31, (1,), generator=g).to(device)
    t, s = D.threshold(p), 1.0 / (1.0 - p)
    drop_x = D.seeded_dropout(x.cpu(), seed.cpu(), salt, p).to(device)  # the PyTorch reference
    for c0 in range(0, K, r):  # A selects columns c0 ... c0 + r - 1 of x
        cols = torch.arange(c0, min(c0 + r, K))
        a = torch.zeros(r, K, dtype=dtype)
        a[torch.arange(len(cols)), cols] = 1
        a = a.to(device)
        low = dropout_down_forward(x, a, seed, salt, t, s)
        assert torch.equal(low[:, :len(cols)], drop_x[:, cols]) and not low[:, len(cols):].any()
        dlow = torch.nn.functional.pad(x[:, cols.to(device)], (0, r - len(cols)))  # dx[:, cols] = drop(x)[:, cols]
        dx, _ = dropout_down_backward(x, dlow, a, seed, salt, t, s, need_da=False)
        outside = torch.ones(K, dtype=torch.bool)
        outside[cols] = False  # columns A does not select: A's column there is 0
        assert torch.equal(dx[:, cols], drop_x[:, cols]) and not dx[:, outside.to(device)].any()
    for t0 in range(0, M, r):  # dlow selects rows t0 ... t0 + r - 1: dA's row j is drop(x)'s row t0 + j
        rows = torch.arange(t0, min(t0 + r, M))
        dlow = torch.zeros(M, r, dtype=dtype)
        dlow[rows, torch.arange(len(rows))] = 1
        _, da = dropout_down_backward(x, dlow.to(device), x.new_zeros(r, K), seed, salt, t, s, need_dx=False)
        assert torch.equal(da[:len(rows)], drop_x[rows.to(device)]) and not da[len(rows):].any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels are compiled: test_gpu_fused_dropout_down")
def test_fused_dropout_down_in_interpreter():
    # ragged M and K (not multiples of the 64 x 64 tiles), r padded to 16; K split in 3 (20 x 600: 10
    # tiles, 4 + 4 + 2) and M split in 3 (520 x 130: 9 tiles, 3 each)
    from kernels.dropout_down import _share
    cpu = torch.device("cpu")
    assert _share(10, 1, cpu) == 4 and _share(9, 3, cpu) == 3  # (the interpreter counts 4 SMs)
    for shape in [(1, 64, 16, 0.5), (7, 100, 4, 0.3), (20, 600, 16, 0.1), (520, 130, 40, 0.5)]:
        fused_vs_float64(*shape, torch.float16, "cpu")
    fused_selections_equal_seeded_dropout(70, 150, 32, 0.3, torch.float16, "cpu")


@pytest.mark.cuda
def test_gpu_fused_dropout_down():
    for shape in [(4096, 4096, 16, 0.05), (8 * 511, 11008, 64, 0.1), (7, 4096, 8, 0.3), (300, 1000, 128, 0.5)]:
        fused_vs_float64(*shape, torch.bfloat16, "cuda")
    fused_vs_float64(512, 4096, 16, 0.1, torch.float16, "cuda")
    # the split parts are added by whichever program ends last, always in the same order: the same
    # bits at every call, however the programs were scheduled
    from kernels.dropout_down import dropout_down_backward, dropout_down_forward
    g = torch.Generator().manual_seed(1)
    x, a, dlow = (torch.randn(shape, generator=g).bfloat16().cuda() for shape in ((4096, 4096), (16, 4096), (4096, 16)))
    seed, t = torch.tensor([3], device="cuda"), D.threshold(0.1)
    first = [dropout_down_forward(x, a, seed, 2, t, 1 / 0.9), *dropout_down_backward(x, dlow, a, seed, 2, t, 1 / 0.9)]
    for _ in range(20):
        again = [dropout_down_forward(x, a, seed, 2, t, 1 / 0.9), *dropout_down_backward(x, dlow, a, seed, 2, t, 1 / 0.9)]
        assert all(torch.equal(u, v) for u, v in zip(first, again))
    for dtype in (torch.bfloat16, torch.float16):
        fused_selections_equal_seeded_dropout(1000, 333, 64, 0.3, dtype, "cuda")
    # dropout_down takes the fused kernels on CUDA: its output and gradients are theirs, bit for bit
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 512, generator=g).bfloat16().cuda().requires_grad_()
    a = (torch.randn(16, 512, generator=g) / 20).bfloat16().cuda().requires_grad_()
    seed, dlow = torch.tensor([99], device="cuda"), torch.randn(2, 300, 16, generator=g).bfloat16().cuda()
    low = D.dropout_down(x, a, seed, 4, 0.1)
    low.backward(dlow)
    t, s = D.threshold(0.1), 1.0 / 0.9
    assert torch.equal(low, dropout_down_forward(x.detach(), a.detach(), seed, 4, t, s))
    dx, da = dropout_down_backward(x.detach(), dlow, a.detach(), seed, 4, t, s)
    assert torch.equal(x.grad, dx) and torch.equal(a.grad, da)


def test_fused_dropout_down_errors():
    from kernels.dropout_down import dropout_down_backward, dropout_down_forward
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (the interpreter on the CPU)
    x, a = torch.zeros(4, 64, dtype=torch.float16, device=device), torch.zeros(16, 64, dtype=torch.float16, device=device)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="one 16-bit dtype"):
        dropout_down_forward(x.float(), a.float(), seed, 0, 1, 1.0)
    with pytest.raises(ValueError, match="r <= 128"):
        dropout_down_forward(x, x.new_zeros(129, 64), seed, 0, 1, 1.0)
    with pytest.raises(ValueError, match="seed must be one int64"):
        dropout_down_forward(x, a, seed.int(), 0, 1, 1.0)
    with pytest.raises(ValueError, match="dlow"):
        dropout_down_backward(x, x.new_zeros(4, 8), a, seed, 0, 1, 1.0)
