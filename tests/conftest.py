"""Test configuration.

TRITON_INTERPRET=1 is set here, before any ``@triton.jit`` is defined, when CUDA is unavailable, so that the
Triton kernels run on CPU tensors in CI (docs/design.md §5). On a GPU machine the kernels run natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # the marker itself: `"gpu" in item.keywords` also matches a checkout folder named gpu
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


def gpu_available() -> bool:
    return torch.cuda.is_available()


def triton_devices() -> list[str]:
    """Devices on which impl='triton' is tested: CUDA when present, else CPU under the interpreter."""
    return ["cuda"] if torch.cuda.is_available() else ["cpu"]
