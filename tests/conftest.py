"""Shared pytest configuration."""

import os

# Never contact the Hugging Face Hub from the tests; must be set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Without CUDA, Triton kernels run in its CPU interpreter, which must be chosen
# before any kernel is defined.  The automatic backend stays the reference on
# the CPU; only tests that force GRADFILTER_BACKEND=triton use the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
