"""The stacked LoRA matmul, whose backward can record per-example norms.

``StackedMatmul.apply(x, weight, recorder[, part])`` computes, for member-major row
blocks of ``x`` (rows ``m*n .. m*n+n-1`` belong to member m)::

    y[rows of m] = x[rows of m] @ weight[m]^T          weight: [M, out, in]

Its backward gives the input gradient and the summed weight gradient as usual.
When a :class:`NormRecorder` is passed, the weight gradient comes from
:func:`gradfilter.norms.ops.grad_and_sq_norms` instead, which returns in the same
pass the squared norm of every row's (every example's) share of that gradient,
and the recorder adds them up over all the stacked layers of a model.  So a
training step yields the per-example gradient norms of every member at the
cost of the weight gradient it computes anyway.

``torch.func``: the function uses the ``setup_context`` style and has a
``vmap`` rule.  Under ``vmap`` with an unbatched weight, the vmapped dimension
is folded into each member's block of rows and the function runs once; with a
batched weight (e.g. ``vmap`` over stacked parameter sets) it runs as one
batched ``einsum``.  Recording norms under ``vmap`` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradfilter.norms import ops
from gradfilter.norms.layout import RowLayout


class NormRecorder:
    """Adds up per-example squared gradient norms over the stacked layers of one
    backward.

    members, rows: the folded batch has ``members * rows`` rows, member-major.
    valid: optional ``[members * rows, T]`` bool, the positions that may carry
    gradient (e.g. the attention mask); others are skipped, not just zero.  It
    is read on the host here, once, before the forward (its
    :class:`~gradfilter.norms.layout.RowLayout`), so the layers' backward
    enqueues its work without waiting for the device; given on the host with
    ``device`` (where the gradients will be), it costs no device sync at all.
    After the backward, ``sq`` is ``[members, rows]`` (float64): for each
    member and example, the squared norm of that example's share of the
    gradient of all the recorded stacked parameters.
    """

    def __init__(
        self,
        members: int,
        rows: int,
        valid: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if members < 1 or rows < 1:
            raise ValueError(f"members and rows must be positive, got {members} and {rows}")
        if valid is not None and (valid.dim() != 2 or valid.shape[0] != members * rows):
            raise ValueError(
                f"valid must be [members * rows, T] = [{members * rows}, T], "
                f"got {tuple(valid.shape)}"
            )
        self.members, self.rows = members, rows
        # ``valid`` on the host and ``device`` (the gradients' device) given: no sync at all
        where = valid.device if device is None and valid is not None else device
        self.layout = None if valid is None else RowLayout.from_mask(valid).prepare(where)
        self._sq: torch.Tensor | None = None  # summed on the gradients' device
        self._parts: dict[str, torch.Tensor] = {}
        self.layers = 0

    def add(self, sq: torch.Tensor, part: str | None = None) -> None:
        """Add one layer's ``[members, rows]`` squared norms; ``part`` (e.g. ``"A"`` or
        ``"B"``, the LoRA factor) also adds them to that part's own sum."""
        sq = sq.detach().to(torch.float64)
        self._sq = sq if self._sq is None else self._sq + sq
        if part is not None:
            self._parts[part] = sq if part not in self._parts else self._parts[part] + sq
        self.layers += 1

    def on_device(self, name: str | None = None) -> torch.Tensor | None:
        """The sum over the layers (``name``: of one part) where the gradients are,
        without a copy to the host; None before any layer reported."""
        return self._sq if name is None else self._parts.get(name)

    def part(self, name: str) -> torch.Tensor:
        """``[members, rows]`` float64 on the CPU: the sum over the layers reported as ``name``."""
        if name not in self._parts:
            return torch.zeros(self.members, self.rows, dtype=torch.float64)
        return self._parts[name].cpu()

    @property
    def sq(self) -> torch.Tensor:
        """``[members, rows]`` float64 on the CPU (zeros before any layer reported)."""
        if self._sq is None:
            return torch.zeros(self.members, self.rows, dtype=torch.float64)
        return self._sq.cpu()


def _member_blocks(t: torch.Tensor, members: int) -> torch.Tensor:
    """``[M*n, ..., d] -> [M, n*..., d]``."""
    if t.shape[0] % members:
        raise ValueError(f"{t.shape[0]} rows cannot be split between {members} members")
    return t.reshape(members, -1, t.shape[-1])


class StackedMatmul(torch.autograd.Function):
    """``y = x W_m^T`` per member block of rows; see the module docstring."""

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor,
        recorder: NormRecorder | None,
        part: str | None = None,
    ) -> torch.Tensor:
        members = weight.shape[0]
        y = torch.bmm(_member_blocks(x.to(weight.dtype), members), weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], weight.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, recorder = inputs[:3]
        ctx.save_for_backward(x, weight)
        ctx.recorder = recorder
        ctx.part = inputs[3] if len(inputs) > 3 else None
        ctx.n_inputs = len(inputs)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        members = weight.shape[0]
        gy = _member_blocks(grad_y, members)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(gy, weight).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            x = x.to(weight.dtype)  # x is saved in its own dtype (see forward)
            rec = ctx.recorder
            if rec is None:
                grad_w = torch.bmm(gy.transpose(1, 2), _member_blocks(x, members))
            else:
                if rec.members != members or x.shape[0] != members * rec.rows:
                    raise ValueError(
                        f"the recorder expects {rec.members} members x {rec.rows} rows, the layer "
                        f"got {members} members and {x.shape[0]} rows"
                    )
                seq = x[0].numel() // x.shape[-1]  # positions per row
                left = grad_y.reshape(members, rec.rows, seq, grad_y.shape[-1])
                right = x.reshape(members, rec.rows, seq, x.shape[-1])
                if rec.layout is not None and rec.layout.seq != seq:
                    raise ValueError(
                        f"the recorder's valid mask has {rec.layout.seq} positions per row, "
                        f"the layer has {seq}"
                    )
                grad_w, sq = ops.grad_and_sq_norms(left, right, layout=rec.layout)
                grad_w = grad_w.to(weight.dtype)
                rec.add(sq, ctx.part)
        return (grad_x, grad_w) + (None,) * (ctx.n_inputs - 2)

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple,
        x: torch.Tensor,
        weight: torch.Tensor,
        recorder: NormRecorder | None,
        part: str | None = None,
    ):
        if recorder is not None:
            raise RuntimeError(
                "per-example norms cannot be recorded under torch.func.vmap; record them from a "
                "plain backward, or use gradfilter.per_example_grad_norms"
            )
        x_dim, w_dim = in_dims[0], in_dims[1]
        size = info.batch_size
        if w_dim is None:
            members = weight.shape[0]
            xs = x.movedim(x_dim, 0)  # [V, rows, ..., in]
            rows, rest = xs.shape[1], xs.shape[2:]
            if rows % members:
                raise ValueError(f"{rows} rows cannot be split between {members} members")
            n = rows // members
            folded = (
                xs.reshape(size, members, n, *rest)
                .transpose(0, 1)
                .reshape(members * size * n, *rest)
            )
            y = StackedMatmul.apply(folded, weight, None)
            out = y.shape[1:]
            y = y.reshape(members, size, n, *out).transpose(0, 1).reshape(size, rows, *out)
            return y, 0
        ws = weight.movedim(w_dim, 0)  # [V, M, out, in]
        members = ws.shape[1]
        xs = x.movedim(x_dim, 0) if x_dim is not None else x.unsqueeze(0).expand(size, *x.shape)
        rows = xs.shape[1]
        if rows % members:
            raise ValueError(f"{rows} rows cannot be split between {members} members")
        folded = xs.to(ws.dtype).reshape(size, members, -1, xs.shape[-1])
        y = torch.einsum("vmki,vmoi->vmko", folded, ws)
        return y.reshape(*xs.shape[:-1], ws.shape[2]), 0


class StackedLinear(nn.Module):
    """M bias-free linear maps ``weight: [M, out, in]`` applied to member-major row
    blocks (the module form of :class:`StackedMatmul`).

    ``part`` names the share of a recorder's norms its layers add to (``"A"`` /
    ``"B"`` for LoRA factors).  ``forward(x, recorder)`` passes a
    :class:`NormRecorder` for one backward; nothing is stored on the module.  Per
    row, the gradient of a member's slice is ``g (x) x`` as for ``nn.Linear``, and
    the norm engine's rule for it is registered in :mod:`gradfilter.norms.layers`.
    """

    def __init__(self, weight: torch.Tensor, part: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.part = part

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, recorder: NormRecorder | None = None) -> torch.Tensor:
        m = self.members
        if x.shape[0] % m:
            raise ValueError(f"{x.shape[0]} rows cannot be split between {m} members")
        # x goes in its own dtype: the matmul casts it, and the backward keeps x
        # itself, shared by the adapters that read the same input, not a cast copy each.
        return StackedMatmul.apply(x, self.weight, recorder, self.part)
