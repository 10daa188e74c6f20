"""Where each example's rows lie in a padded ``[B, T]`` batch, known on the host.

The norm reductions run inside the backward, once per layer.  Everything they
need to know about the batch's shape (how many rows each example has, whether
they form one run, the common window, packing offsets) is read here once per
batch, before the forward, from the ``[B, T]`` mask of rows that carry
gradient.  The layers then only enqueue device work: no ``.item()``, no
``.tolist()``, no boolean-mask indexing, no copies to the host.

A :class:`RowLayout` holds the host numbers as Python ints and, per device, the
few index tensors the kernels read (built by :meth:`RowLayout.prepare` before
the forward, copied to the device once from pinned memory, without waiting for
the copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: on CUDA through
    pinned memory and an asynchronous copy (a copy from pageable memory would wait
    for the work already queued)."""
    device = torch.device(device)
    if host.device.type == "cpu" and device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True, eq=False)
class RowLayout:
    """The rows of a ``[B, T]`` batch that carry gradient.

    lengths: rows per example; first: the position of each example's first row
    (0 when it has none); runs: whether every example's rows are the single run
    ``first[i] : first[i] + lengths[i]`` (right or left padding, no holes), so
    that kernels can read them in place; window ``(lo, hi)``: the positions that
    hold any row; mask: the ``[B, T]`` bool mask itself, on the host.
    """

    mask: torch.Tensor
    lengths: tuple[int, ...]
    first: tuple[int, ...]
    runs: bool
    window: tuple[int, int]
    full_window: bool  # every position of the window carries gradient
    _device: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, valid: torch.Tensor) -> RowLayout:
        """Read a ``[B, T]`` bool mask (on any device: one copy to the host)."""
        if not isinstance(valid, torch.Tensor) or valid.dim() != 2:
            got = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"the row mask must be a [batch, tokens] tensor, got {got}")
        mask = valid.detach().to("cpu", torch.bool)
        bsz, seq = mask.shape
        lengths = mask.sum(1)
        positions = torch.arange(seq)
        first = torch.where(mask, positions, seq).amin(1) if seq else torch.zeros(bsz)
        first = torch.where(lengths > 0, first, 0)
        last = torch.where(mask, positions, -1).amax(1) if seq else torch.full((bsz,), -1)
        runs = bool(((last - first + 1 == lengths) | (lengths == 0)).all())
        cols = mask.any(0).nonzero()
        window = (int(cols.min()), int(cols.max()) + 1) if cols.numel() else (0, 0)
        return cls(
            mask=mask,
            lengths=tuple(int(n) for n in lengths.tolist()),
            first=tuple(int(s) for s in first.tolist()),
            runs=runs,
            window=window,
            full_window=bool(mask[:, window[0] : window[1]].all()),
        )

    # -- host numbers -------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def seq(self) -> int:
        return self.mask.shape[1]

    @property
    def all_valid(self) -> bool:
        """Every position of every example carries gradient."""
        return all(n == self.seq for n in self.lengths)

    def window_full(self, window: tuple[int, int]) -> bool:
        """Whether every position of ``window`` carries gradient (read from the
        host mask only for a window other than :attr:`window`)."""
        if tuple(window) == self.window:
            return self.full_window
        lo, hi = window
        return bool(self.mask[:, lo:hi].all())

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    @property
    def total(self) -> int:
        """Rows in all: the length of the packed form."""
        return sum(self.lengths)

    def length_counts(self) -> dict[int, int]:
        """``{length: examples with that many rows}`` (what the route chooser needs)."""
        out: dict[int, int] = {}
        for n in self.lengths:
            out[n] = out.get(n, 0) + 1
        return out

    # -- device tensors (built once per device) -------------------------------------

    def _cached(self, key: tuple, device: torch.device, build) -> torch.Tensor:
        device = torch.device(device)
        full = (*key, str(device))
        if full not in self._device:
            self._device[full] = to_device(build(), device)
        return self._device[full]

    def prepare(self, device: torch.device) -> RowLayout:
        """Build, on ``device``, the index tensors the reductions of one factor per
        parameter will use, so that none is built (or copied) in the backward.
        Returns ``self``."""
        self.device_mask(device)
        self.cu_seqlens(device)
        if self.runs:
            self.spans(device)
        if not self.all_valid:
            self.packed_index(device)
        return self

    def spans(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(starts, ends)`` int64 ``[B]`` on ``device``: example i's rows are
        positions ``starts[i] : ends[i]`` of its own row of the batch (only when
        :attr:`runs`)."""
        if not self.runs:
            raise ValueError("the batch's rows do not form one run per example")

        def build() -> torch.Tensor:
            first = torch.tensor(self.first, dtype=torch.int64)
            return torch.stack([first, first + torch.tensor(self.lengths, dtype=torch.int64)])

        both = self._cached(("spans",), device, build)
        return both[0], both[1]

    def cu_seqlens(self, device: torch.device, factors: int = 1) -> torch.Tensor:
        """Packed offsets ``[B + 1]`` int64 on ``device``, for ``factors`` row sets
        per example (a parameter used by several layer calls)."""

        def build() -> torch.Tensor:
            cu = torch.zeros(self.batch + 1, dtype=torch.int64)
            cu[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0) * factors
            return cu

        return self._cached(("cu", factors), device, build)

    def packed_index(self, device: torch.device, factors: int = 1) -> torch.Tensor:
        """Flat row indices ``[factors * total]`` (int64, on ``device``) that pack
        ``factors`` row sets of shape ``[B, T]``, concatenated along T, example by
        example: index ``i * factors * T + k * T + t`` for each example i, set k
        and valid position t, in that order."""

        def build() -> torch.Tensor:
            seq = self.seq
            tiled = self.mask.repeat(1, factors)  # [B, factors * T]
            return tiled.reshape(-1).nonzero().reshape(-1) if seq else torch.zeros(0).long()

        return self._cached(("index", factors), device, build)

    def example_rows(self, i: int, device: torch.device) -> torch.Tensor | slice:
        """The positions of example i: a slice when its rows are one run, else an
        index tensor on ``device``."""
        if self.runs:
            return slice(self.first[i], self.first[i] + self.lengths[i])
        return self._cached(
            ("rows", i), device, lambda: self.mask[i].nonzero().reshape(-1).to(torch.int64)
        )

    def device_mask(self, device: torch.device) -> torch.Tensor:
        """The ``[B, T]`` bool mask on ``device``."""
        return self._cached(("mask",), device, lambda: self.mask)
