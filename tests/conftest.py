"""Shared pytest setup: the Triton CPU interpreter when there is no GPU, and the `cuda` marker.

- Without CUDA, TRITON_INTERPRET=1 is set here, before any test module imports triton (Triton
  reads it at import), so Triton kernels run on CPU tensors in the interpreter. An explicit
  TRITON_INTERPRET in the environment is left as it is.
- `@pytest.mark.cuda` marks a test that needs a CUDA GPU; without one it is skipped with a reason.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
