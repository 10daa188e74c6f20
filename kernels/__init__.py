"""Triton kernels of gradfilter, installed as ``gradfilter.kernels``.

Each op lives in its own file with its host launcher; nothing else calls a
kernel directly: :mod:`gradfilter.norms.ops` chooses the backend.

* :mod:`.lora_norms`: per-example squared norms of outer-product (LoRA, Linear)
  gradients over packed rows, direct and Gram routes.

Importing this package does not import Triton; import the op modules
explicitly (``from gradfilter.kernels import lora_norms``) once
:func:`gradfilter.norms.ops.triton_available` says they can run.  To use the CPU
interpreter set ``TRITON_INTERPRET=1`` before that import.
"""
