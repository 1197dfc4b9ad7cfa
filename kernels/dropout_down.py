"""LoRA's down-projection with dropout, fused: low = drop(x) A^T and its backward, masks made on chip.

Math (dropout.py is the reference: drop(x) = m * x * s, m the mask hashed from (seed, salt, flat
index) exactly as kernels/dropout.py makes it, s = 1 / (1 - p)); x is (M, K), A is (r, K):
    forward    low[t, j] = s * sum_k  m[t, k] x[t, k] A[j, k]           (M x r)
    backward   dx[t, k]  = s * m[t, k] * sum_j dlow[t, j] A[j, k]       (M x K)
               dA[j, k]  = s * sum_t  dlow[t, j] m[t, k] x[t, k]        (r x K)
where m[t, k] belongs to flat index t K + k. The sums run in float32 and each result is rounded once.

Why fuse: r is small (8 to 64), so these are passes over M x K tensors, bound by the bytes and by
the mask's hash (about a dozen integer operations an element). Unfused (dropout.py on the CPU), the
forward writes drop(x) and the GEMM reads it back: 3 passes over M x K for the 1 needed; the backward
writes dlow A, reads it and x, writes drop(x) and dx, and reads drop(x) again for dA: 6 passes for
the 2 needed (read x, write dx), and the hash made twice. Here the mask is made once per pass, on
values already in registers.

Layout: x (M, K), A (r, K) and dlow (M, r), all contiguous, in one 16-bit dtype. r is padded to R
(a power of two, at least 16: tl.dot's smallest size) by masked loads; r <= MAX_R.
  forward   grid (cdiv(M, BM), S). Program (pm, ps) sums its share of K (K_SHARE columns, a
            multiple of BK) for rows pm BM ... into a BM x R float32 tile: its part of low's rows.
  backward  grid (cdiv(K, BK), S). Program (pk, ps) walks its share of the rows (M_SHARE, a
            multiple of BM) in steps of BM: it writes dx's BM x BK tile at once and adds the step's
            R x BK product into a float32 tile: its part of dA's columns.
S (at most MAX_SPLITS, a compile-time constant) is chosen so that about 4 programs per SM run: r is
too small to give enough programs by itself. The S parts of a block are added without a second
launch (add_parts): each program stores its part to part[ps], then counts itself with an atomic; the
one that counts last adds the S parts in the order 0, 1, ..., S - 1, multiplies by 1 / (1 - p) and
rounds. So the bits do not depend on which program ends last: CUDA graph replays and the tests need
the same bits at every call, which float32 atomics on the output (adding in varying order) would not
give. This is CUTLASS's serial split-K reduction without its waiting: no program ever waits for
another.
"""

import torch
import triton
import triton.language as tl

from ._launch import check_device, sm_count
from .dropout import check_mask_args, kept, mask_key

MAX_R = 128  # larger adapters take the unfused path (dropout.py): the R-wide tiles would not fit
BM, BK = 64, 64
MIN_SHARE, MAX_SPLITS = 4, 16  # tiles a split at least, splits at most


@triton.jit
def add_parts(acc, offs, ok, part_size, part_ptr, ps, count_ptr, out_ptr, scale, S: tl.constexpr):
    """out[offs] = scale * (part[0] + part[1] + ... + part[S - 1])[offs], rounded once to out's dtype,
    where part[ps] = acc is this program's float32 tile (offs: its offsets in a part and in out, ok:
    their mask). All S programs of the block store their part and count themselves at count_ptr; the
    one that counts last adds the parts. Memory order, as CUTLASS's split-K semaphore: the barrier
    puts every thread's stores before the count (which one thread makes, for the program); the
    count's release makes them visible to the GPU before it, and its acquire shows the last program
    every part counted before it."""
    tl.store(part_ptr + ps.to(tl.int64) * part_size + offs, acc, mask=ok)
    tl.debug_barrier()
    if tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") == S - 1:
        total = tl.zeros_like(acc)
        for s in tl.static_range(S):  # unrolled: the S loads go out together, the adds in order
            total += tl.load(part_ptr + s * part_size.to(tl.int64) + offs, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offs, (total * scale).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def dropout_down_fwd_kernel(x_ptr, a_ptr, low_ptr, part_ptr, count_ptr, seed_ptr, M, K, r, salt, threshold,
                            scale, K_SHARE, S: tl.constexpr, R: tl.constexpr, BM: tl.constexpr,
                            BK: tl.constexpr):
    pm, ps = tl.program_id(0), tl.program_id(1)
    key = mask_key(seed_ptr, salt)
    rows = pm * BM + tl.arange(0, BM)
    x_rows = x_ptr + rows.to(tl.int64) * K  # (BM,) pointers to the rows
    row_index = rows.to(tl.uint32) * K  # their flat index modulo 2^32 (the hash's input)
    js = tl.arange(0, R)
    acc = tl.zeros((BM, R), tl.float32)
    k_lo = ps * K_SHARE
    for k0 in range(k_lo, tl.minimum(k_lo + K_SHARE, K), BK):
        cols = k0 + tl.arange(0, BK)
        ok = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_rows[:, None] + cols[None, :], mask=ok, other=0.0)  # (BM, BK)
        keep = kept(row_index[:, None] + cols[None, :].to(tl.uint32), key, threshold)
        x = tl.where(keep, x, tl.zeros_like(x))  # m x, exact
        at = tl.load(a_ptr + js[None, :] * K + cols[:, None],  # (BK, R): A^T's tile
                     mask=(js[None, :] < r) & (cols[:, None] < K), other=0.0)
        acc = tl.dot(x, at, acc)
    add_parts(acc, rows[:, None] * r + js[None, :], (rows[:, None] < M) & (js[None, :] < r), M * r,
              part_ptr, ps, count_ptr + pm, low_ptr, scale, S)


@triton.jit
def dropout_down_bwd_kernel(x_ptr, dlow_ptr, a_ptr, dx_ptr, da_ptr, part_ptr, count_ptr, seed_ptr, M, K, r,
                            salt, threshold, scale, M_SHARE, S: tl.constexpr, DX: tl.constexpr, DA: tl.constexpr,
                            R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    pk, ps = tl.program_id(0), tl.program_id(1)
    key = mask_key(seed_ptr, salt)
    cols = pk * BK + tl.arange(0, BK)
    js = tl.arange(0, R)
    a = tl.load(a_ptr + js[:, None] * K + cols[None, :],  # (R, BK): A's tile, the same for every row
                mask=(js[:, None] < r) & (cols[None, :] < K), other=0.0)
    acc = tl.zeros((R, BK), tl.float32)
    m_lo = ps * M_SHARE
    for m0 in range(m_lo, tl.minimum(m_lo + M_SHARE, M), BM):
        rows = m0 + tl.arange(0, BM)
        dlow = tl.load(dlow_ptr + rows[:, None] * r + js[None, :],  # (BM, R)
                       mask=(rows[:, None] < M) & (js[None, :] < r), other=0.0)
        offs = rows[:, None].to(tl.int64) * K + cols[None, :]  # (BM, BK) into x and dx
        ok = (rows[:, None] < M) & (cols[None, :] < K)
        keep = kept((rows.to(tl.uint32) * K)[:, None] + cols[None, :].to(tl.uint32), key, threshold)
        if DX:
            g = tl.dot(dlow, a)  # (BM, BK) float32: dlow A
            tl.store(dx_ptr + offs, tl.where(keep, g * scale, 0.0).to(dx_ptr.dtype.element_ty), mask=ok)
        if DA:
            x = tl.load(x_ptr + offs, mask=ok, other=0.0)
            acc = tl.dot(tl.trans(dlow), tl.where(keep, x, tl.zeros_like(x)), acc)  # += dlow^T (m x)
    if DA:
        add_parts(acc, js[:, None] * K + cols[None, :], (js[:, None] < r) & (cols[None, :] < K), r * K,
                  part_ptr, ps, count_ptr + pk, da_ptr, scale, S)


def fits(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the fused kernels take this call: 16-bit x and A of one dtype, r <= MAX_R."""
    return x.dtype in (torch.float16, torch.bfloat16) and a.dtype == x.dtype and a.dim() == 2 \
        and 1 <= a.shape[0] <= MAX_R and a.shape[1] == x.shape[-1]


def _check(name: str, x: torch.Tensor, a: torch.Tensor, seed, salt: int, threshold: int):
    check_device(x.device)
    if not fits(x, a) or a.device != x.device:
        raise ValueError(f"{name}: x {tuple(x.shape)} {x.dtype} on {x.device} and A {tuple(a.shape)} {a.dtype} on "
                         f"{a.device}: they need one 16-bit dtype, one device, A (r, K) with r <= {MAX_R}")
    check_mask_args(name, x, seed, salt, threshold)


def _share(tiles: int, other_programs: int, device: torch.device) -> int:
    """Tiles per program along the split dimension: enough splits for about 4 programs per SM in all,
    but at least MIN_SHARE tiles each and at most MAX_SPLITS splits (each adds a part to add)."""
    want = triton.cdiv(4 * sm_count(device), other_programs)
    splits = max(1, min(triton.cdiv(tiles, MIN_SHARE), want, MAX_SPLITS))
    return triton.cdiv(tiles, splits)


def _pad_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def dropout_down_forward(x: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int, threshold: int,
                         scale: float) -> torch.Tensor:
    """low = (m x s) A^T for x (..., K), A (r, K): (..., r) in x's dtype. The mask m as in
    kernels/dropout.py (threshold = ceil(p 2^24)), s = scale = 1 / (1 - p)."""
    _check("dropout_down_forward", x, a, seed, salt, threshold)
    K, r = x.shape[-1], a.shape[0]
    x2, a = x.reshape(-1, K).contiguous(), a.contiguous()
    M = x2.shape[0]
    if M == 0 or K == 0:
        return x.new_zeros(*x.shape[:-1], r)
    blocks = triton.cdiv(M, BM)
    k_share = _share(triton.cdiv(K, BK), blocks, x.device) * BK
    splits = triton.cdiv(K, k_share)
    low = torch.empty(M, r, device=x.device, dtype=x.dtype)
    part = torch.empty(splits, M, r, device=x.device, dtype=torch.float32)
    count = torch.zeros(blocks, device=x.device, dtype=torch.int32)
    dropout_down_fwd_kernel[(blocks, splits)](
        x2, a, low, part, count, seed, M, K, r, salt, threshold, scale, k_share,
        S=splits, R=_pad_r(r), BM=BM, BK=BK, num_warps=4)
    return low.view(*x.shape[:-1], r)


def dropout_down_backward(x: torch.Tensor, dlow: torch.Tensor, a: torch.Tensor, seed: torch.Tensor, salt: int,
                          threshold: int, scale: float, need_dx: bool = True, need_da: bool = True):
    """(dx, dA) of dropout_down_forward for the gradient dlow (..., r): dx of x's shape and dtype (None
    unless need_dx), dA (r, K) in A's dtype (None unless need_da)."""
    _check("dropout_down_backward", x, a, seed, salt, threshold)
    K, r = x.shape[-1], a.shape[0]
    if dlow.shape != (*x.shape[:-1], r) or dlow.dtype != x.dtype or dlow.device != x.device:
        raise ValueError(f"dropout_down_backward: dlow {tuple(dlow.shape)} {dlow.dtype} must be "
                         f"{(*x.shape[:-1], r)} {x.dtype} on {x.device}")
    if not (need_dx or need_da):
        return None, None
    x2, a, g = x.reshape(-1, K).contiguous(), a.contiguous(), dlow.reshape(-1, r).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2) if need_dx else None
    if M == 0 or K == 0:
        return (dx.view(x.shape) if need_dx else None), (torch.zeros_like(a) if need_da else None)
    blocks = triton.cdiv(K, BK)
    m_share = _share(triton.cdiv(M, BM), blocks, x.device) * BM
    splits = triton.cdiv(M, m_share)
    da = part = count = None
    if need_da:
        da = torch.empty_like(a)
        part = torch.empty(splits, r, K, device=x.device, dtype=torch.float32)
        count = torch.zeros(blocks, device=x.device, dtype=torch.int32)
    unused = x2  # (a pointer for the outputs not asked for: never read or written)
    dropout_down_bwd_kernel[(blocks, splits)](
        x2, g, a, unused if dx is None else dx, unused if da is None else da, unused if part is None else part,
        unused if count is None else count, seed, M, K, r, salt, threshold, scale, m_share,
        S=splits, DX=need_dx, DA=need_da, R=_pad_r(r), BM=BM, BK=BK, num_warps=4)
    return (dx.view(x.shape) if need_dx else None), da
