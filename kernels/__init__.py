"""Triton kernels of gradfilter, installed as ``gradfilter.kernels``.

Each op lives in its own file with its host launcher; nothing else calls a
kernel directly: :mod:`gradfilter.ops` chooses the backend.
"""
