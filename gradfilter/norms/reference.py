"""Plain-PyTorch per-example squared gradient norms from layer factors.

Every parameter gradient that gradfilter handles on a fast route has, for one
example ``i``, the form of a sum over that example's token rows ``t``::

    outer:  grad_i = sum_t left[t] (x) right[t]       left: [n, a], right: [n, b] -> [a, b]
    sum:    grad_i = sum_t rows[t]                    rows: [n, a]              -> [a]
    index:  grad_i = sum_t onehot(idx[t]) (x) right[t] idx: [n], right: [n, b]  -> [V, b]

(``outer`` covers Linear / Conv1D weights and LoRA A and B, ``sum`` biases and
norm weights, ``index`` embeddings.)  The squared Frobenius norm of ``grad_i``
is computed without ever holding the per-example gradients of the whole batch:

* direct route: form the ``[a, b]`` gradient of a few examples at a time and
  square-sum it, about ``2 n a b`` FLOPs per example;
* Gram ("ghost") route: ``||L^T R||^2 = <L L^T, R R^T>``, about
  ``2 n^2 (a + b)`` FLOPs per example.

Rows are given as padded ``[B, W, .]`` tensors in which every row that does not
belong to an example is exactly zero, so both routes are exact.  These
functions are the reference twins of the fused kernels, the fallback on any
device, and the oracle in tests.
"""

from __future__ import annotations

import torch

from gradfilter.norms import routes
from gradfilter.norms.routes import choose_route


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half-precision inputs in float32; keep float32 and float64."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def outer_sq_norms_direct_ref(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``||left[i]^T right[i]||_F^2`` for each i; left ``[B, W, a]``, right ``[B, W, b]``."""
    bsz, _, a = left.shape
    b = right.shape[-1]
    out = left.new_zeros(bsz)
    # Block over gradient rows (a) when one example's tile is too large,
    # and over examples otherwise.
    rows = max(1, min(a, routes.TEMP_BUDGET // max(1, b)))
    per_block = max(1, routes.TEMP_BUDGET // max(1, rows * b))
    for i0 in range(0, bsz, per_block):
        i1 = min(bsz, i0 + per_block)
        r = right[i0:i1]
        for j0 in range(0, a, rows):
            tile = torch.bmm(left[i0:i1, :, j0 : j0 + rows].transpose(1, 2), r)
            out[i0:i1] += tile.square().sum(dim=(1, 2))
    return out


def outer_grad_sq_norms_ref(
    left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed gradient per group and per-example squared norms, in one pass.

    left ``[G, n, W, a]``, right ``[G, n, W, b]``: group g's example i has rows
    ``left[g, i]`` and gradient ``left[g, i]^T right[g, i]``.  Returns ``(grad
    [G, a, b], sq [G, n])``: the group sums (what training needs) and the
    squared norms, from the same per-example tiles.
    """
    groups, n, _, a = left.shape
    b = right.shape[-1]
    grad = left.new_zeros(groups, a, b)
    sq = left.new_zeros(groups, n)
    rows = max(1, min(a, routes.TEMP_BUDGET // max(1, b)))
    per_block = max(1, routes.TEMP_BUDGET // max(1, rows * b))
    for g in range(groups):
        for i0 in range(0, n, per_block):
            i1 = min(n, i0 + per_block)
            r = right[g, i0:i1]
            for j0 in range(0, a, rows):
                tile = torch.bmm(left[g, i0:i1, :, j0 : j0 + rows].transpose(1, 2), r)
                sq[g, i0:i1] += tile.square().sum(dim=(1, 2))
                grad[g, j0 : j0 + rows] += tile.sum(0)
    return grad, sq


def outer_sq_norms_ghost_ref(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``<L L^T, R R^T>`` for each example; same shapes as the direct route."""
    bsz, w, _ = left.shape
    out = left.new_zeros(bsz)
    per_block = max(1, routes.TEMP_BUDGET // max(1, 2 * w * w))
    for i0 in range(0, bsz, per_block):
        i1 = min(bsz, i0 + per_block)
        gl = torch.bmm(left[i0:i1], left[i0:i1].transpose(1, 2))
        gr = torch.bmm(right[i0:i1], right[i0:i1].transpose(1, 2))
        out[i0:i1] = (gl * gr).sum(dim=(1, 2))
    return out


def outer_sq_norms_ref(
    left: torch.Tensor, right: torch.Tensor, route: str | None = None
) -> torch.Tensor:
    """Squared norms of ``sum_t left[i,t] (x) right[i,t]``; route chosen by cost if None."""
    if route is None:
        route = choose_route(left.shape[1], left.shape[-1], right.shape[-1])
    if route == "direct":
        return outer_sq_norms_direct_ref(left, right)
    if route == "ghost":
        return outer_sq_norms_ghost_ref(left, right)
    raise ValueError(f"unknown route {route!r}; expected 'direct' or 'ghost'")


def sum_sq_norms_ref(rows: torch.Tensor) -> torch.Tensor:
    """``||sum_t rows[i, t]||^2`` for each example; rows ``[B, W, a]``."""
    return rows.sum(dim=1).square().sum(dim=-1)


def index_sq_norms_ref(
    idx: torch.Tensor, right: torch.Tensor, valid: torch.Tensor, num_rows: int | None = None
) -> torch.Tensor:
    """Squared norms of embedding-style gradients ``sum_t onehot(idx[t]) (x) right[t]``.

    idx ``[B, W]`` (int), right ``[B, W, b]``, valid ``[B, W]`` (bool): rows that
    count; num_rows: the vocabulary size (read from ``idx`` when None, one
    device sync).  Rows with the same index in the same example are summed
    first (sort the keys ``example * V + index``, then sum each run of equal
    keys), so the cost is ``O(n log n + n b)`` per example whatever the
    vocabulary size, and every shape is known in advance: nothing waits for
    the device.
    """
    bsz, w = idx.shape
    if num_rows is None:
        num_rows = int(idx.max().item()) + 1 if idx.numel() else 1
    example = torch.arange(bsz, device=idx.device).unsqueeze(1).expand(bsz, w)
    # Rows that do not count go to a key past every example and carry zeros.
    key = torch.where(valid, example * num_rows + idx.long(), bsz * num_rows).reshape(-1)
    rows = torch.where(
        valid.unsqueeze(-1), right, torch.zeros((), dtype=right.dtype, device=right.device)
    )
    rows = rows.reshape(-1, right.shape[-1])
    key, order = torch.sort(key, stable=True)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    segment = starts.long().cumsum(0) - 1  # run of equal keys each sorted row belongs to
    summed = right.new_zeros(key.numel(), right.shape[-1])
    summed.index_add_(0, segment, rows.index_select(0, order))
    owner = torch.zeros(key.numel(), dtype=torch.long, device=key.device)
    owner.scatter_(0, segment, key // num_rows)  # the example of each run (bsz: no example)
    out = right.new_zeros(bsz + 1)
    out.index_add_(0, owner, summed.square().sum(dim=-1))
    return out[:bsz]
