"""Gluon (triton.experimental.gluon), imported once for the Hopper kernels, under one set of names.

Gluon is experimental and renames things between Triton releases. The kernels use the names of
Triton 3.9 (torch 2.13); on Triton 3.5 and 3.6 (the lent H100 has torch 2.11 with 3.6) this module
sets them on Triton's own objects, as aliases of the old names:
    gl.barrier()             was gl.thread_barrier()                (a CTA barrier, bar.sync)
    smem.reinterpret(...)    was smem._reinterpret(...)             (a view of shared memory)
    tma.async_load(...)      was tma.async_copy_global_to_shared()  (a TMA copy to shared memory)
    tma.async_store(...)     was tma.async_copy_shared_to_global()  (a TMA copy to global memory)
tests/test_kernels.py compiles both kernels for sm_90 with the installed Triton, without a GPU,
so that the next rename shows up there (HAVE_GLUON is False where Gluon cannot be imported: the
plain Triton kernels run instead).
"""

try:  # Gluon ships with Triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = None
    HAVE_GLUON = False

if HAVE_GLUON:
    if not hasattr(gl, "barrier"):  # Triton 3.5, 3.6
        gl.barrier = gl.thread_barrier
    _smem = gl.shared_memory_descriptor
    if not hasattr(_smem, "reinterpret"):  # Triton 3.5, 3.6
        _smem.reinterpret = _smem._reinterpret
    if not hasattr(tma, "async_load"):  # Triton 3.5, 3.6
        tma.async_load = tma.async_copy_global_to_shared
    if not hasattr(tma, "async_store"):  # Triton 3.5, 3.6
        tma.async_store = tma.async_copy_shared_to_global
