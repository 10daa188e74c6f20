"""Optional C++ CPU ops from ``csrc/``, built just in time on first use.

:func:`load_cpp_ext` compiles the sources with ``torch.utils.cpp_extension.load``
(a C++17 compiler with OpenMP and ``ninja`` are needed) into a build directory
that is reused by later processes, so only the first call pays for the compile
(about a minute); later ones just load the library.  The build directory is
``$GRADFILTER_CACHE`` when that is set (used as is; ninja rebuilds there when the
sources or flags change), else
``~/.cache/gradfilter/ext-<torch version>-<hash>`` where the hash covers the
sources, the compiler flags and the Python version (the library is tied to all
of them).  A library built by ``GRADFILTER_BUILD_EXT=1 pip install -e .``
(``gradfilter._C``) is used instead when it is importable.

If nothing can be built or loaded, a single warning is emitted per process and
:func:`load_cpp_ext` returns None: callers then use :mod:`gradfilter.norms.reference`.
Importing :mod:`gradfilter` never triggers a build; only calls here do.

The ops live in the ``torch.ops.gradfilter_cpp`` namespace.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "build_directory",
    "cpp_available",
    "load_cpp_ext",
    "outer_grad_sq_norms_cpp",
    "outer_sq_norms_cpp",
]

NAME = "gradfilter_cpp"
CSRC = Path(__file__).resolve().parents[2] / "csrc"  # gradfilter/norms/_ext.py -> repo root
EXTRA_CFLAGS = ["-O3", "-fopenmp"]
EXTRA_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_warned = False


def _sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


def build_directory(sources: list[Path] | None = None) -> Path:
    """The (created) directory the extension is built in and loaded from."""
    env = os.environ.get("GRADFILTER_CACHE", "").strip()
    if env:
        path = Path(env).expanduser()
    else:
        digest = hashlib.sha256()
        for src in _sources() if sources is None else sources:
            digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
        digest.update(" ".join(EXTRA_CFLAGS + EXTRA_LDFLAGS).encode())
        digest.update(sys.implementation.cache_tag.encode())
        path = (
            Path.home()
            / ".cache"
            / "gradfilter"
            / f"ext-{torch.__version__}-{digest.hexdigest()[:16]}"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def _op_registered() -> bool:
    try:
        torch.ops.gradfilter_cpp.outer_sq_norms  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; a ``pip install ninja`` puts it next to the
    interpreter, which is not on PATH when a virtual environment's python is run
    without activating it.  Add that directory for the duration of the build."""
    scripts = sysconfig.get_path("scripts")
    old = os.environ.get("PATH", "")
    if shutil.which("ninja") is None and scripts and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + old
        try:
            yield
        finally:
            os.environ["PATH"] = old
    else:
        yield


def _load() -> ModuleType:
    # Use a library that registered the ops already: loading a second one
    # would register the namespace twice, and torch aborts the process (the
    # error is raised while the library is being loaded, where it cannot be
    # caught).
    if _op_registered():
        for name in (NAME, "gradfilter._C"):
            if name in sys.modules:
                return sys.modules[name]
        return torch.ops.gradfilter_cpp
    try:
        prebuilt = importlib.import_module("gradfilter._C")
    except ImportError:
        prebuilt = None
    if prebuilt is not None and _op_registered():
        return prebuilt
    sources = _sources()
    if not sources:
        raise FileNotFoundError(f"no C++ sources in {CSRC}")
    from torch.utils import cpp_extension

    with _ninja_on_path():
        return cpp_extension.load(
            name=NAME,
            sources=[str(s) for s in sources],
            # Copies: torch appends its own link flags to the lists it is given.
            extra_cflags=list(EXTRA_CFLAGS),
            extra_ldflags=list(EXTRA_LDFLAGS),
            build_directory=str(build_directory(sources)),
            verbose=False,
        )


def load_cpp_ext() -> ModuleType | None:
    """The loaded extension module, building it first if needed; None if that fails.

    The outcome (module or None) is cached for the process, so a failed build
    is attempted once and warned about once.
    """
    global _tried, _module, _warned
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            _module = _load()
        # Anything can go wrong in a native build (no compiler or ninja,
        # compile or link errors, an unloadable library); all of it means
        # "no extension here", never an error for the caller.
        except Exception as exc:  # noqa: BLE001
            _module = None
            if not _warned:
                _warned = True
                detail = str(exc).strip().splitlines()
                warnings.warn(
                    "gradfilter: the C++ CPU extension could not be built or loaded "
                    f"({type(exc).__name__}: {detail[0] if detail else 'no details'}); "
                    "gradfilter falls back to the plain-PyTorch reference",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _tried = True
    return _module


def cpp_available() -> bool:
    """Whether the C++ ops can be used here (builds the extension on first call)."""
    return load_cpp_ext() is not None


def _require(op: str, twin: str, **tensors: torch.Tensor) -> None:
    """CPU tensors and a loaded extension, or a clear error."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            # The ops have CPU kernels only; without this check the dispatcher
            # reports a missing kernel for the tensor's backend instead.
            raise RuntimeError(f"{op} needs CPU tensors, got {name} on {t.device}")
    if load_cpp_ext() is None:
        raise RuntimeError(
            "gradfilter's C++ extension is not available (see the earlier warning); "
            f"use gradfilter.norms.reference.{twin} instead"
        )


def outer_sq_norms_cpp(
    left: torch.Tensor, right: torch.Tensor, cu_seqlens: torch.Tensor, route: str
) -> torch.Tensor:
    """``||sum_{t in i} left[t] (x) right[t]||_F^2`` per example over packed rows.

    left ``[N, a]``, right ``[N, b]`` (contiguous CPU tensors of one dtype:
    float32, float64, float16 or bfloat16), cu_seqlens ``[B + 1]`` (int64 or
    int32; starts at 0, non-decreasing, ends at N); route ``"direct"`` or
    ``"ghost"`` (alias ``"gram"``).  Returns float32 ``[B]`` (float64 for
    float64 input).  Raises RuntimeError when the extension is unavailable.
    """
    _require(
        "outer_sq_norms_cpp", "outer_sq_norms_ref", left=left, right=right, cu_seqlens=cu_seqlens
    )
    return torch.ops.gradfilter_cpp.outer_sq_norms(left, right, cu_seqlens, route)


def outer_grad_sq_norms_cpp(
    left: torch.Tensor, right: torch.Tensor, cu_seqlens: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed gradient per group and per-example squared norms, in one pass.

    left, right, cu_seqlens as for :func:`outer_sq_norms_cpp`; groups ``[G + 1]``
    (int64 or int32, from 0 to B, non-decreasing) cuts the examples into G runs.
    Returns ``(grad [G, a, b], sq [B])``, float32 (float64 for float64 input):
    ``grad[g] = sum_{i in g} L_i^T R_i`` and ``sq[i] = ||L_i^T R_i||_F^2``.
    """
    _require(
        "outer_grad_sq_norms_cpp",
        "outer_grad_sq_norms_ref",
        left=left,
        right=right,
        cu_seqlens=cu_seqlens,
        groups=groups,
    )
    return torch.ops.gradfilter_cpp.outer_grad_sq_norms(left, right, cu_seqlens, groups)
