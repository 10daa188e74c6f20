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
from gradfilter.norms.layout import RowLayout

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
_PACKED_OK = {"triton": _TRITON_DTYPES, "cpp": _TRITON_DTYPES + (torch.float64,)}


def _layout_of(rows: RowLayout | torch.Tensor) -> RowLayout:
    return rows if isinstance(rows, RowLayout) else RowLayout.from_mask(rows)


def _own_rows(f: Factor, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a factor's ``[B, T, d]`` rows) with the rows the factor itself
    excludes (``f.valid``, e.g. an embedding's padding index) set to zero:
    masked arithmetic, so nothing waits for the device."""
    if f.valid is None:
        return t
    return torch.where(f.valid.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))


def _outer_packed(
    factors: list[Factor], layout: RowLayout, dtype: torch.dtype, which: str
) -> torch.Tensor:
    """Reduce each example's rows (of every factor) with the Triton or C++ kernels;
    same result as the reference routes, and nothing read back from the device.

    Triton reads one factor's rows where they lie (``spans``) when each example's
    rows form one run; otherwise (several factors, rows with holes, or the C++
    op, which needs packed contiguous rows) the rows are gathered with the
    layout's precomputed index, which is what the old boolean-mask packing
    produced, row for row.
    """
    device = factors[0].left.device
    k = len(factors)
    a, b = factors[0].left.shape[-1], factors[0].right.shape[-1]
    route = routes.choose_packed_route({k * n: c for n, c in layout.length_counts().items()}, a, b)
    lefts = [_own_rows(f, f.left) for f in factors]
    rights = [f.right for f in factors]
    if which == "triton":
        from gradfilter.kernels.lora_norms import outer_sq_norms

        if k == 1 and layout.runs:
            return outer_sq_norms(
                lefts[0],
                rights[0],
                route=route,
                spans=layout.spans(device),
                max_seqlen=layout.max_len,
            ).to(dtype)
    if k == 1 and layout.all_valid:  # every row counts: packed already, as a view when it can
        left, right = lefts[0].reshape(-1, a), rights[0].reshape(-1, b)
    else:
        index = layout.packed_index(device, k)
        left = torch.cat(lefts, dim=1).reshape(-1, a).index_select(0, index)
        right = torch.cat(rights, dim=1).reshape(-1, b).index_select(0, index)
    cu = layout.cu_seqlens(device, k)
    if which == "triton":
        return outer_sq_norms(left, right, cu, route, max_seqlen=k * layout.max_len).to(dtype)
    from gradfilter.norms._ext import outer_sq_norms_cpp

    return outer_sq_norms_cpp(left.contiguous(), right.contiguous(), cu, route).to(dtype)


def _rows(
    f: Factor, t: torch.Tensor, layout: RowLayout, window: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``t[:, lo:hi]`` (a factor's rows in the window) with every row that does not
    count set to exactly zero, in ``dtype``.  The decision to mask is taken on
    the host (from the layout); the masking itself is a ``where`` on the device."""
    lo, hi = window
    t = t[:, lo:hi].to(dtype)
    if f.valid is None and layout.window_full(window):
        return t
    mask = layout.device_mask(t.device)[:, lo:hi]
    if f.valid is not None:
        mask = mask & f.valid[:, lo:hi]
    return torch.where(mask.unsqueeze(-1), t, torch.zeros((), dtype=dtype, device=t.device))


def _as_outer(f: Factor) -> Factor:
    if f.kind != "index":
        return f
    onehot = F.one_hot(f.left.long(), f.num_rows).to(f.right.dtype)
    return Factor("outer", onehot, f.right, valid=f.valid)


def factor_sq_norms(
    factors: list[Factor],
    rows: RowLayout | torch.Tensor,
    window: tuple[int, int] | None = None,
    loop_examples: bool | None = None,
) -> torch.Tensor:
    """Per-example squared norm of the gradient whose row factors are ``factors``.

    factors: the factors of one parameter from each layer call that uses it (a
    parameter shared between layers or a layer called twice has several; their
    gradients add, so their rows are concatenated).  rows: the batch's
    :class:`RowLayout` (or its ``[B, T]`` bool mask of rows that belong to an
    example and carry gradient, read on the host here); window ``(lo, hi)``:
    the columns that hold any valid row (default: the layout's).
    ``loop_examples`` reduces each example over its own rows only (no padding
    FLOPs) instead of the batch over the common window; None decides by cost
    (padding FLOPs against per-example launches).  Returns ``[B]`` in the
    factors' compute dtype.

    With a :class:`RowLayout` nothing here reads the device: every decision is
    taken from the layout's host numbers, and rows are selected by masked
    arithmetic, slices or precomputed indices.
    """
    layout = _layout_of(rows)
    first = factors[0]
    device = first.left.device
    which = backend(device)
    kinds = {f.kind for f in factors}
    window = layout.window if window is None else window
    dtype = ref.compute_dtype(first.left.dtype if first.kind != "index" else first.right.dtype)
    if kinds == {"sum"}:
        total = sum(_rows(f, f.left, layout, window, dtype).sum(1) for f in factors)
        return total.square().sum(-1)
    if kinds == {"index"}:
        return _index_sq_norms(factors, layout, window, dtype)
    if "sum" in kinds:
        raise ValueError(f"one parameter got incompatible gradient forms {sorted(kinds)}")
    factors = [_as_outer(f) for f in factors]
    packed_ok = _PACKED_OK.get(which, ())
    if all(
        f.left.dtype in packed_ok and f.right.dtype in packed_ok and f.left.dtype == f.right.dtype
        for f in factors
    ):
        return _outer_packed(factors, layout, dtype, which)
    lo, hi = window
    if loop_examples is None:
        a, b = first.left.shape[-1], first.right.shape[-1]
        k = len(factors)
        batched = layout.batch * routes.route_cost(k * (hi - lo), a, b)
        looped = sum(routes.route_cost(k * n, a, b) + routes.LAUNCH_FLOPS for n in layout.lengths)
        loop_examples = looped < batched
    if not loop_examples:
        lefts = [_rows(f, f.left, layout, window, dtype) for f in factors]
        rights = [_rows(f, f.right, layout, window, dtype) for f in factors]
        if len(factors) == 1:  # the usual case: no copy
            return ref.outer_sq_norms_ref(lefts[0], rights[0])
        return ref.outer_sq_norms_ref(torch.cat(lefts, dim=1), torch.cat(rights, dim=1))
    return _loop_outer_sq_norms(factors, layout, dtype)


def _loop_outer_sq_norms(
    factors: list[Factor], layout: RowLayout, dtype: torch.dtype
) -> torch.Tensor:
    """Each example over its own rows (a slice, or the layout's index when they
    have holes); examples without rows are skipped on the host's word."""
    device = factors[0].left.device
    out = torch.zeros(layout.batch, dtype=dtype, device=device)
    for i, n in enumerate(layout.lengths):
        if n == 0:
            continue
        sel = layout.example_rows(i, device)

        def pick(f: Factor, t: torch.Tensor, i: int = i, sel=sel) -> torch.Tensor:
            rows = t[i][sel] if isinstance(sel, slice) else t[i].index_select(0, sel)
            if f.valid is not None:
                own = f.valid[i][sel] if isinstance(sel, slice) else f.valid[i].index_select(0, sel)
                rows = torch.where(
                    own.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype, device=device)
                )
            return rows.to(dtype)

        left = torch.cat([pick(f, f.left) for f in factors])
        right = torch.cat([pick(f, f.right) for f in factors])
        out[i] = ref.outer_sq_norms_ref(left.unsqueeze(0), right.unsqueeze(0))[0]
    return out


def _index_sq_norms(
    factors: list[Factor], layout: RowLayout, window: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """Embedding-style factors: the sync-free reference with the vocabulary size
    known from the factors."""
    lo, hi = window
    device = factors[0].left.device
    mask = layout.device_mask(device)
    idx = torch.cat([f.left[:, lo:hi] for f in factors], dim=1)
    right = torch.cat([f.right[:, lo:hi].to(dtype) for f in factors], dim=1)
    ok = torch.cat(
        [
            mask[:, lo:hi] if f.valid is None else mask[:, lo:hi] & f.valid[:, lo:hi]
            for f in factors
        ],
        dim=1,
    )
    vocab = max(f.num_rows for f in factors)
    return ref.index_sq_norms_ref(idx, right, ok, num_rows=vocab)


def grad_and_sq_norms(
    left: torch.Tensor,
    right: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    layout: RowLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training backward of stacked factors with per-example norms on the side.

    left ``[G, n, T, a]``, right ``[G, n, T, b]`` (G members of n examples of T
    rows), valid ``[G, n, T]`` (bool; rows that may carry gradient, None = all)
    or, instead, ``layout``: the :class:`RowLayout` of those ``[G * n, T]`` rows,
    read once per batch (then nothing here reads the device).
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
    groups, n, seq, _ = left.shape
    if valid is not None:
        if valid.shape != left.shape[:3]:
            raise ValueError(f"valid must be {tuple(left.shape[:3])}, got {tuple(valid.shape)}")
        if layout is None:
            layout = RowLayout.from_mask(valid.reshape(-1, seq))
    if layout is not None and (layout.batch, layout.seq) != (groups * n, seq):
        raise ValueError(
            f"the row layout is for [{layout.batch}, {layout.seq}] rows, the factors have "
            f"[{groups * n}, {seq}]"
        )
    if layout is not None and layout.all_valid:
        layout = None  # every row counts: the plain form below needs no index
    device = left.device
    which = backend(device)
    if left.dtype in _PACKED_OK.get(which, ()) and left.dtype == right.dtype:
        grad, sq = _grad_packed(left, right, layout, which)
        return grad.to(dtype), sq.reshape(groups, n).to(dtype)
    left, right = left.to(dtype), right.to(dtype)
    if layout is not None:
        mask = layout.device_mask(device).reshape(groups, n, seq)
        left = torch.where(mask.unsqueeze(-1), left, torch.zeros((), dtype=dtype, device=device))
    return ref.outer_grad_sq_norms_ref(left, right)


def _grad_packed(
    left: torch.Tensor, right: torch.Tensor, layout: RowLayout | None, which: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernels of :func:`grad_and_sq_norms`; ``layout`` None: every row."""
    groups, n, seq, a = left.shape
    b = right.shape[-1]
    device = left.device
    cuts = torch.arange(groups + 1, dtype=torch.int64, device=device) * n
    if which == "triton":
        from gradfilter.kernels.lora_norms import outer_grad_sq_norms

        lrows, rrows = left.reshape(-1, seq, a), right.reshape(-1, seq, b)
        if layout is None:
            ends = torch.full((groups * n,), seq, dtype=torch.int64, device=device)
            spans, max_len = (torch.zeros_like(ends), ends), seq
        elif layout.runs:
            spans, max_len = layout.spans(device), layout.max_len
        else:
            spans = None
        if spans is not None:
            return outer_grad_sq_norms(
                lrows, rrows, None, cuts, spans=spans, max_seqlen=max_len, max_group=n
            )
    if layout is None:
        lrows, rrows = left.reshape(-1, a), right.reshape(-1, b)
        cu = torch.arange(groups * n + 1, dtype=torch.int64, device=device) * seq
        max_len = seq
    else:
        index = layout.packed_index(device)
        lrows = left.reshape(-1, a).index_select(0, index)
        rrows = right.reshape(-1, b).index_select(0, index)
        cu, max_len = layout.cu_seqlens(device), layout.max_len
    if which == "triton":
        return outer_grad_sq_norms(lrows, rrows, cu, cuts, max_seqlen=max_len, max_group=n)
    from gradfilter.norms._ext import outer_grad_sq_norms_cpp

    return outer_grad_sq_norms_cpp(lrows.contiguous(), rrows.contiguous(), cu, cuts)


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
