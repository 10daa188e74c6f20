"""Shared pytest configuration."""

import os

# Never contact the Hugging Face Hub from the tests; must be set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA, Triton kernels run in its CPU interpreter, which must be chosen
# before any kernel is defined.  The automatic backend stays the reference on
# the CPU; only tests that force GRADFILTER_BACKEND=triton use the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
