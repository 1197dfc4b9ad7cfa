"""Shared pytest setup: the Triton CPU interpreter when there is no GPU, and the `cuda` marker.

- Without CUDA, TRITON_INTERPRET=1 is set here, before any test module imports triton (Triton
  reads it at import), so Triton kernels run on CPU tensors in the interpreter. An explicit
  TRITON_INTERPRET in the environment is left as it is.
- `@pytest.mark.cuda` marks a test that needs a CUDA GPU; without one it is skipped with a reason.
- Under pytest-xdist (`pytest -n N`, worth it on a GPU machine, where the first run tunes and
  compiles for many minutes) each worker takes its share of the cores for torch's CPU threads,
  and so do the programs it starts (OMP_NUM_THREADS; unless the user set that). Every worker
  otherwise starts one thread per core, and the CPU training tests, spinning for cores that other
  workers hold, ran 4x slower on 2 cores with 6 workers (122 s against 30 s); on a 16-core H100
  machine five of them had not ended after 4 minutes.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:  # (xdist sets it in workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
