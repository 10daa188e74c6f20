"""The one seam between the engine and the norm implementations.

``factor_sq_norms`` turns the row factors that one parameter collected over a
pass into per-example squared gradient norms.  Backend choice happens here and
nowhere else: ``GRADFILTER_BACKEND`` (``auto`` by default, or ``reference``)
overrides the capability probe.  The plain-PyTorch twins in
:mod:`gradfilter.norms.reference` are the fallback on every device.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gradfilter.norms import reference as ref
from gradfilter.norms import routes
from gradfilter.norms.layers import Factor

BACKENDS = ("reference", "triton", "cpp")


def backend(device: torch.device | str | None = None) -> str:
    """The backend in use: ``GRADFILTER_BACKEND`` if set, else the best available
    for ``device``: Triton on a CUDA device, the plain-PyTorch reference on the
    CPU.  The C++ extension (``cpp``, built just in time on first use) is opt-in:
    measured on 2 cores it is not yet faster than the reference's batched GEMMs
    (see the README's benchmark table)."""
    wanted = os.environ.get("GRADFILTER_BACKEND", "auto").strip().lower()
    if wanted in ("", "auto"):
        on_cuda = (
            torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        )
        return "triton" if on_cuda and triton_available() else "reference"
    if wanted not in BACKENDS:
        raise ValueError(
            f"GRADFILTER_BACKEND={wanted!r} is unknown; choose one of "
            f"{', '.join(('auto',) + BACKENDS)}"
        )
    if wanted == "triton" and not triton_available():
        raise ValueError(
            "GRADFILTER_BACKEND=triton needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    if wanted == "cpp":
        from gradfilter.norms._ext import cpp_available

        if not cpp_available():
            raise ValueError("GRADFILTER_BACKEND=cpp: the C++ extension could not be built here")
    return wanted


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _outer_packed(
    factors: list[Factor], valid: torch.Tensor, dtype: torch.dtype, which: str
) -> torch.Tensor:
    """Pack each example's rows (of every factor) without padding and reduce with
    the Triton or C++ kernels; same result as the reference routes."""
    masks = torch.cat([_mask(f, valid) for f in factors], dim=1)  # [B, K*T]
    left = torch.cat([f.left for f in factors], dim=1)[masks]
    right = torch.cat([f.right for f in factors], dim=1)[masks]
    lengths = masks.sum(1)
    cu = _cu_seqlens(lengths)
    if which == "triton":
        from gradfilter.kernels.lora_norms import outer_sq_norms

        return outer_sq_norms(left, right, cu).to(dtype)
    from gradfilter.norms._ext import outer_sq_norms_cpp

    route = routes.choose_packed_route(lengths, left.shape[-1], right.shape[-1])
    return outer_sq_norms_cpp(left.contiguous(), right.contiguous(), cu, route).to(dtype)


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0 + l1, ...]`` (int64): example i owns packed rows ``cu[i] : cu[i + 1]``."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu


def _rows(t: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` with every row outside ``mask`` set to exactly zero, in ``dtype``."""
    t = t.to(dtype)
    if bool(mask.all()):
        return t
    return torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=dtype, device=t.device))


def _mask(f: Factor, valid: torch.Tensor) -> torch.Tensor:
    return valid if f.valid is None else valid & f.valid


def _as_outer(f: Factor) -> Factor:
    if f.kind != "index":
        return f
    onehot = F.one_hot(f.left.long(), f.num_rows).to(f.right.dtype)
    return Factor("outer", onehot, f.right, valid=f.valid)


def factor_sq_norms(
    factors: list[Factor],
    valid: torch.Tensor,
    window: tuple[int, int],
    loop_examples: bool | None = None,
) -> torch.Tensor:
    """Per-example squared norm of the gradient whose row factors are ``factors``.

    factors: the factors of one parameter from each layer call that uses it (a
    parameter shared between layers or a layer called twice has several; their
    gradients add, so their rows are concatenated).  valid ``[B, T]``: rows that
    belong to an example and carry gradient; window ``(lo, hi)``: the columns
    that hold any valid row.  ``loop_examples`` reduces each example over its own
    rows only (no padding FLOPs) instead of the batch over the common window;
    None decides by cost (padding FLOPs against per-example launches).
    Returns ``[B]`` in the factors' compute dtype.
    """
    which = backend(valid.device)
    kinds = {f.kind for f in factors}
    lo, hi = window
    v = valid[:, lo:hi]
    dtype = ref.compute_dtype(
        factors[0].left.dtype if factors[0].kind != "index" else factors[0].right.dtype
    )
    if kinds == {"sum"}:
        total = sum(
            _rows(f.left[:, lo:hi], _mask(f, valid)[:, lo:hi], dtype).sum(1) for f in factors
        )
        return total.square().sum(-1)
    if kinds == {"index"}:
        idx = torch.cat([f.left[:, lo:hi] for f in factors], dim=1)
        right = torch.cat([f.right[:, lo:hi].to(dtype) for f in factors], dim=1)
        ok = torch.cat([_mask(f, valid)[:, lo:hi] for f in factors], dim=1)
        return ref.index_sq_norms_ref(idx, right, ok)
    if "sum" in kinds:
        raise ValueError(f"one parameter got incompatible gradient forms {sorted(kinds)}")
    factors = [_as_outer(f) for f in factors]
    packed_ok = {"triton": _TRITON_DTYPES, "cpp": _TRITON_DTYPES + (torch.float64,)}.get(which, ())
    if all(
        f.left.dtype in packed_ok and f.right.dtype in packed_ok and f.left.dtype == f.right.dtype
        for f in factors
    ):
        return _outer_packed(factors, valid, dtype, which)
    if loop_examples is None:
        a, b = factors[0].left.shape[-1], factors[0].right.shape[-1]
        k = len(factors)
        lengths = v.sum(-1).tolist()
        batched = len(lengths) * routes.route_cost(k * (hi - lo), a, b)
        looped = sum(routes.route_cost(k * n, a, b) + routes.LAUNCH_FLOPS for n in lengths)
        loop_examples = looped < batched
    if not loop_examples:
        lefts = [_rows(f.left[:, lo:hi], _mask(f, valid)[:, lo:hi], dtype) for f in factors]
        rights = [_rows(f.right[:, lo:hi], _mask(f, valid)[:, lo:hi], dtype) for f in factors]
        if len(factors) == 1:  # the usual case: no copy
            return ref.outer_sq_norms_ref(lefts[0], rights[0])
        return ref.outer_sq_norms_ref(torch.cat(lefts, dim=1), torch.cat(rights, dim=1))
    out = torch.zeros(v.shape[0], dtype=dtype, device=valid.device)
    for i in range(v.shape[0]):
        rows = [_mask(f, valid)[i] for f in factors]
        left = torch.cat([f.left[i][m].to(dtype) for f, m in zip(factors, rows, strict=False)])
        if left.shape[0] == 0:
            continue
        right = torch.cat([f.right[i][m].to(dtype) for f, m in zip(factors, rows, strict=False)])
        out[i] = ref.outer_sq_norms_ref(left.unsqueeze(0), right.unsqueeze(0))[0]
    return out


def grad_and_sq_norms(
    left: torch.Tensor,
    right: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training backward of stacked factors with per-example norms on the side.

    left ``[G, n, T, a]``, right ``[G, n, T, b]`` (G members of n examples of T
    rows), valid ``[G, n, T]`` (bool; rows that may carry gradient, None = all).
    Returns ``(grad [G, a, b], sq [G, n])``: ``grad[g] = sum_i left[g,i]^T
    right[g,i]`` over the valid rows, the weight gradient, and ``sq[g, i] =
    ||left[g,i]^T right[g,i]||^2``, the squared norm of each example's share of
    it.  Triton and C++ compute both in one kernel (per-example tiles stay on
    chip / in cache); the reference forms the tiles of a block of examples with
    batched GEMMs.
    Results are in the compute dtype of the inputs.
    """
    if left.dim() != 4 or right.dim() != 4 or left.shape[:3] != right.shape[:3]:
        raise ValueError(
            f"left and right must be [G, n, T, a] and [G, n, T, b], got {tuple(left.shape)} "
            f"and {tuple(right.shape)}"
        )
    dtype = ref.compute_dtype(left.dtype)
    groups, n, seq, a = left.shape
    b = right.shape[-1]
    if valid is not None and valid.shape != left.shape[:3]:
        raise ValueError(f"valid must be {tuple(left.shape[:3])}, got {tuple(valid.shape)}")
    which = backend(left.device)
    packed_ok = {"triton": _TRITON_DTYPES, "cpp": _TRITON_DTYPES + (torch.float64,)}.get(which, ())
    if left.dtype in packed_ok and left.dtype == right.dtype:
        if valid is None:
            lrows, rrows = left.reshape(-1, a), right.reshape(-1, b)
            lengths = torch.full((groups * n,), seq, dtype=torch.int64, device=left.device)
        else:
            flat = valid.reshape(-1, seq)
            lrows, rrows = left.reshape(-1, seq, a)[flat], right.reshape(-1, seq, b)[flat]
            lengths = flat.sum(1)
        cu = _cu_seqlens(lengths)
        cuts = torch.arange(groups + 1, dtype=torch.int64, device=left.device) * n
        if which == "triton":
            from gradfilter.kernels.lora_norms import outer_grad_sq_norms

            grad, sq = outer_grad_sq_norms(lrows, rrows, cu, cuts, max_seqlen=seq)
        else:
            from gradfilter.norms._ext import outer_grad_sq_norms_cpp

            grad, sq = outer_grad_sq_norms_cpp(lrows.contiguous(), rrows.contiguous(), cu, cuts)
        return grad.to(dtype), sq.reshape(groups, n).to(dtype)
    left, right = left.to(dtype), right.to(dtype)
    if valid is not None and not bool(valid.all()):
        zero = torch.zeros((), dtype=dtype, device=left.device)
        left = torch.where(valid.unsqueeze(-1), left, zero)
    return ref.outer_grad_sq_norms_ref(left, right)


# ----------------------------------------------------------------------------
# Triton capability probe (used by the kernel backend; changes nothing above)
# ----------------------------------------------------------------------------


def triton_available() -> bool:
    """Whether the Triton kernels can run here.

    True when ``import triton`` works and either a CUDA device is available or
    ``TRITON_INTERPRET=1`` (the CPU interpreter) is set.
    """
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # absent, or a broken install
        return False
    if routes.interpret_requested():
        return True
    return torch.cuda.is_available()
