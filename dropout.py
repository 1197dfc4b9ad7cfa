"""Dropout whose mask is a function of (seed, salt, element index): nothing kept, nothing redrawn.

LoRA drops out the adapter's input (lora.py): y = W x + (alpha / r) B A drop(x), with
drop(x) = x * m / (1 - p) and m_i ~ Bernoulli(1 - p). nn.Dropout draws m from the generator's stream,
so three things cost: autograd keeps m (a byte per element) and the dropped copy of x (which A's
gradient needs), once per adapter, 7 copies of a block's activations; gradient checkpointing has to
save and restore the generator to draw the same m when it recomputes a block; and a CUDA graph cannot
do that (graph_step.py). Here m is a pure function of three numbers, as in counter-based generators
(Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; Triton's tl.rand works this way):

    mix(z) = lowbias32(z), on 32-bit unsigned z (C. Wellons' hash prospector): a bijection whose every
             output bit flips with probability about 1/2 when any input bit flips
    key    = mix(seed XOR mix(salt))
    m_i    = 1  if  mix(i XOR key) >> 8  >=  ceil(p * 2^24),  else 0     (i: index in x, flat, row-major)

so P(m_i = 1) = 1 - ceil(p 2^24) / 2^24, which is 1 - p to within 2^-24. Then:
  - The backward computes m again from (seed, salt): the down-projection A drop(x) keeps only x, which
    the adapters on q, k and v share (one tensor): the memory of dropout 0 (`dropout_down`).
  - Checkpointing and CUDA graphs get the forward's masks without any generator state: the seed is a
    device tensor drawn from torch's generator (train.seed_step decides it) once per forward of the
    model (`Seed`, a forward pre-hook), not per adapter call, and a recomputed block is handed the
    seed of its own forward (`Seed.checkpoint_contexts`). In a graph the draw is replayed with the
    rest. The salt (each adapter's index) gives two adapters on the same x different masks.

A hash, not a cryptographic generator: the masks of two keys k1, k2 are the same sequence with the
indices XOR-permuted (m(k1)_i = m(k2)_(i XOR k1 XOR k2)), which does not matter for dropout; what
matters, that each mask looks like independent draws with the right rate and that two masks do not
agree more than chance, is tested (tests/test_dropout.py).

On CUDA the mask is made inside Triton kernels, which must equal this file's PyTorch version:
kernels/dropout.py (drop(x) itself, bit for bit) and kernels/dropout_down.py (A drop(x) and its
backward with the mask made inside the matmuls, for 16-bit activations; tests/test_dropout.py).
"""

from __future__ import annotations

import contextlib
import math
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

MASK32 = 0xFFFFFFFF


def _mul32(z: torch.Tensor, c: int) -> torch.Tensor:
    """z * c mod 2^32 for int64 tensors holding values below 2^32, without int64 overflow: for c < 2^31
    the product is below 2^63; otherwise z * c = -(z * (2^32 - c)) mod 2^32, with 2^32 - c < 2^31."""
    return (z * c) & MASK32 if c < 2**31 else (-(z * (2**32 - c))) & MASK32


def mix32(z: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit unsigned values."""
    z = z ^ (z >> 16)
    z = _mul32(z, 0x7FEB352D)
    z = z ^ (z >> 15)
    z = _mul32(z, 0x846CA68B)
    return z ^ (z >> 16)


def threshold(p: float) -> int:
    """ceil(p * 2^24): an element is kept when the top 24 bits of its hash are at least this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return math.ceil(p * 2**24)


def keep_mask(seed: torch.Tensor, salt: int, shape, p: float) -> torch.Tensor:
    """The bool mask m of the module docstring for a tensor of `shape` (True: kept), on seed's device."""
    n = math.prod(shape)
    key = mix32((seed.reshape(()) & MASK32) ^ mix32(torch.tensor(salt, dtype=torch.int64, device=seed.device)))
    u = mix32(torch.arange(n, dtype=torch.int64, device=seed.device) ^ key)
    return ((u >> 8) >= threshold(p)).reshape(shape)


def seeded_dropout(x: torch.Tensor, seed: torch.Tensor, salt: int, p: float, x2: torch.Tensor = None):
    """x * m / (1 - p), a new tensor (no autograd of its own: dropout_down's backward calls it). With x2,
    of x's shape: the pair (x * m / (1 - p), x2 * m / (1 - p)), the same mask for both."""
    t = threshold(p)  # (checks p)
    scale = 1.0 / (1.0 - p)
    if x.is_cuda:
        from kernels.dropout import seeded_dropout as kernel
        return kernel(x, seed, salt, t, scale, x2)
    keep = keep_mask(seed, salt, x.shape, p)

    def drop(v):  # a float32 product rounded once for 16-bit v, as the kernel (and F.dropout) do
        return torch.where(keep, v.to(torch.promote_types(v.dtype, torch.float32)) * scale, 0.0).to(v.dtype)
    return drop(x) if x2 is None else (drop(x), drop(x2))


class DropoutDown(torch.autograd.Function):
    """low = drop(x) @ a^T, with drop's mask made again in the backward instead of kept:
        d a = dlow^T drop(x)          dx = drop(dlow a)   (the same m, the same 1 / (1 - p))
    Saves x, a and the seed: x is the tensor the other adapters on the same input save anyway."""

    @staticmethod
    def forward(ctx, x, a, seed, salt: int, p: float):
        ctx.save_for_backward(x, a, seed)
        ctx.salt, ctx.p = salt, p
        if _fused(x, a):
            from kernels.dropout_down import dropout_down_forward
            return dropout_down_forward(x, a, seed, salt, threshold(p), 1.0 / (1.0 - p))
        return F.linear(seeded_dropout(x, seed, salt, p), a)

    @staticmethod
    def backward(ctx, dlow):
        x, a, seed = ctx.saved_tensors
        if _fused(x, a):
            from kernels.dropout_down import dropout_down_backward
            dx, da = dropout_down_backward(x, dlow, a, seed, ctx.salt, threshold(ctx.p), 1.0 / (1.0 - ctx.p),
                                           *ctx.needs_input_grad[:2])
            return dx, da, None, None, None
        dx = da = None
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:  # one pass makes both: drop(x), drop(dlow a)
            h, dx = seeded_dropout(x, seed, ctx.salt, ctx.p, x2=dlow @ a)
        elif ctx.needs_input_grad[0]:
            dx = seeded_dropout(dlow @ a, seed, ctx.salt, ctx.p)
        elif ctx.needs_input_grad[1]:
            h = seeded_dropout(x, seed, ctx.salt, ctx.p)
        if ctx.needs_input_grad[1]:
            da = dlow.reshape(-1, dlow.shape[-1]).T @ h.reshape(-1, h.shape[-1])
        return dx, da, None, None, None


def _fused(x: torch.Tensor, a: torch.Tensor) -> bool:
    """On CUDA, 16-bit x and a go through kernels/dropout_down.py: the mask is made inside the matmuls,
    and neither drop(x) nor dlow a is ever written to memory. This file's code is its reference."""
    if not x.is_cuda:
        return False
    from kernels.dropout_down import fits
    return fits(x, a)


def dropout_down(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int, p: float) -> torch.Tensor:
    """drop(x) @ a^T, x (..., in), a (r, in), as DropoutDown."""
    return DropoutDown.apply(x, a, seed, salt, p)


class Seed:
    """The seed of the masks: a one-element int64 device tensor, drawn anew (32 random bits) at each
    forward of `module` in training mode (a forward pre-hook on it), from torch's generator.

    lora.add_lora hooks the whole model, and its adapters share one Seed. Code that calls the model's
    blocks directly, not the model, never draws: its masks stay those of the last draw.
    """

    def __init__(self, module: nn.Module, device: torch.device):
        self.value = torch.zeros(1, dtype=torch.int64, device=device)
        self.owner = weakref.ref(module)  # the module whose forwards draw (graph_step.graphs_ok asks)
        self.handle = module.register_forward_pre_hook(self._draw, with_kwargs=True)

    def _draw(self, module: nn.Module, args, kwargs):
        if module.training:
            # on the input's device (the model may have moved since); a new tensor, not an in-place
            # write: a backward still to come keeps the one it saved
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            device = tensors[0].device if tensors else self.value.device
            self.value = torch.randint(0, 2**32, (1,), dtype=torch.int64, device=device)

    def checkpoint_contexts(self):
        """torch.utils.checkpoint's context_fn, called at each checkpointed block's forward: its
        recomputation in the backward runs with the seed that forward saw, even if later forwards
        (two before one backward, as in preference pairs) have drawn new ones."""
        seen = self.value

        @contextlib.contextmanager
        def recompute():
            now, self.value = self.value, seen
            try:
                yield
            finally:
                self.value = now
        return contextlib.nullcontext(), recompute()

    def remove(self):
        self.handle.remove()
