"""Fused per-example squared norms of outer-product gradients over packed rows.

Maths.  Rows are packed: ``left [N, a]``, ``right [N, b]`` and ``cu_seqlens
[B + 1]`` (int32 or int64, non-decreasing); example ``i`` owns the rows
``cu_seqlens[i] : cu_seqlens[i + 1]`` (possibly none).  Or they stay in place
in a padded batch: ``left [B, T, a]``, ``right [B, T, b]`` and ``spans =
(starts, ends)``; example ``i`` owns ``left[i, starts[i] : ends[i]]``.  The
kernels read both forms alike (a start and an end per example, and a stride per
example that is 0 for packed rows), at any strides, so nothing is copied to
pack a batch.  Its gradient is::

    G_i = sum_{t in i} left[t] (x) right[t] = L_i^T R_i        [a, b]

and both kernels return ``||G_i||_F^2`` in float32, shape ``[B]``, without
holding ``G_i`` of the whole batch in memory:

* direct route, ``_outer_sq_norm_direct_kernel``: ``G_i`` is cut into
  ``BLOCK_A x BLOCK_B`` tiles; one program accumulates its tile
  ``L_i[:, a_blk]^T R_i[:, b_blk]`` on chip over the example's rows in steps of
  ``BLOCK_T`` and writes the tile's square-sum.  About ``2 n a b`` FLOPs.
* Gram route, ``_outer_sq_norm_gram_kernel``: ``||L^T R||^2 = <L L^T, R R^T>
  = sum_{t,s} (L_t . L_s)(R_t . R_s)``.  The ``n x n`` pair space is cut into
  ``BLOCK_T x BLOCK_T`` blocks ``(p, q)``; one program forms both Gram tiles
  (reducing over ``a`` and ``b`` in steps of ``BLOCK_K``) and writes the sum of
  their elementwise product.  Both Gram matrices are symmetric, so only blocks
  ``p <= q`` are computed, off-diagonal ones counted twice.  About
  ``n^2 (a + b)`` FLOPs.

Grid.  One flat axis (no 65535 limit on the example count):

* direct: ``(example, T-chunk, a-tile, b-tile)``, b-tile fastest so that the
  programs sharing one example's rows run together.  A tile's square-sum is not
  additive over row chunks (``||G' + G''||^2 != ||G'||^2 + ||G''||^2``), so when
  an example is split along T (only done when ``B x tiles`` alone would leave
  the GPU idle) each program writes its float32 *tile* into a buffer
  ``[B, n_chunks, a, b]`` that the host sums over chunks before squaring; the
  automatic split bounds that buffer by about ``programs x tile`` elements;
* Gram: ``(example, block pair p <= q)``; the pairs are the split along T.

Training pass, ``_outer_grad_sq_norm_kernel``: the same direct tiles, but a
program walks a run of examples of one *group* (a member of the ensemble) and
keeps, besides each example's tile square-sum, the running sum of the tiles:
the summed weight gradient that training needs comes out of the same pass
(``outer_grad_sq_norms``).  Grid ``(group, example chunk, a-tile, b-tile)``.

Partial results go to a buffer (``[B, slots]`` or the tile buffer above) that
is reduced with torch on the host side: no atomics, so the result is
deterministic and the kernels run under the Triton interpreter.  Programs whose
rows lie beyond their example's length do no work and write zero.

Accumulation is float32 throughout; fp32 inputs use IEEE-exact ``tl.dot``
unless ``allow_tf32=True``.  Inputs: float32, float16 and (on GPU) bfloat16.

Configurations come from a fixed table (:func:`fixed_config`, a pure function
of shapes, dtype and precision) unless autotuning is asked for; see
:mod:`gradfilter.kernels.configs`.

Host syncs.  A launch reads nothing back from the device when it is told the
longest example (``max_seqlen``) and, for the training op, the largest group
(``max_group``), and is given the route; :mod:`gradfilter.norms.ops` passes
them from the batch's :class:`gradfilter.norms.layout.RowLayout`, read once per
batch before the forward.  Without them the launcher reads the bounds once to
check them.

Interpreter (CPU): set ``TRITON_INTERPRET=1`` before this module (or triton)
is imported.  Autotuning is then off; bfloat16 is refused there because the
interpreter mis-handles it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gradfilter.kernels.configs import (
    AUTOTUNE_KEYS,
    MIN_DOT,
    autotune_configs,
    autotune_requested,
    canonical_route,
    fixed_config,
    pow2_clamp,
    precision_of,
    prune_direct,
    prune_gram,
)
from gradfilter.norms import routes
from gradfilter.norms.routes import choose_packed_route

__all__ = [
    "autotune_configs",
    "choose_packed_route",
    "fixed_config",
    "interpreted",
    "outer_grad_sq_norms",
    "outer_sq_norms",
    "outer_sq_norms_direct",
    "outer_sq_norms_gram",
]

# Rows per program below which an example is never split along T (direct).
MIN_SPLIT_ROWS = 256
# Programs per streaming multiprocessor the launch heuristics aim for.
PROGRAMS_PER_SM = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _accumulate_rows(
    acc,
    left_ptr,
    right_ptr,
    row0,
    n_rows,
    offs_a,
    offs_b,
    mask_a,
    mask_b,
    stride_lm,
    stride_la,
    stride_rm,
    stride_rb,
    BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``acc + L[row0 : row0 + n_rows, a_blk]^T R[row0 : row0 + n_rows, b_blk]``, in
    steps of ``BLOCK_T`` rows (fp32 accumulation)."""
    offs_t = tl.arange(0, BLOCK_T)
    for t in range(0, n_rows, BLOCK_T):
        rows = row0 + t + offs_t
        mask_t = (t + offs_t) < n_rows
        l_tile = tl.load(
            left_ptr + rows[:, None] * stride_lm + offs_a[None, :] * stride_la,
            mask=mask_t[:, None] & mask_a[None, :],
            other=0.0,
        )
        r_tile = tl.load(
            right_ptr + rows[:, None] * stride_rm + offs_b[None, :] * stride_rb,
            mask=mask_t[:, None] & mask_b[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(l_tile), r_tile, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _outer_sq_norm_direct_kernel(
    left_ptr,
    right_ptr,
    start_ptr,
    end_ptr,
    part_ptr,
    a,
    b,
    n_chunks,
    rows_per_program,
    len_bucket,
    stride_le,
    stride_lm,
    stride_la,
    stride_re,
    stride_rm,
    stride_rb,
    stride_pe,
    stride_pc,
    stride_pa,
    stride_pb,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SPLIT_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``BLOCK_A x BLOCK_B`` tile of ``G_i = L_i^T R_i`` over one chunk of rows.

    Program ``pid = ((example * n_chunks + chunk) * tiles_a + tile_a) * tiles_b
    + tile_b``.  The chunk covers rows ``starts[i] + chunk * rows_per_program`` up to
    at most ``rows_per_program`` rows, clipped to the example.
    ``SPLIT_T=False`` (one chunk): writes ``sum(tile**2)`` to
    ``part[example, tile]`` (``stride_pe``; the slot stride is 1).
    ``SPLIT_T=True``: writes the tile itself to ``part[example, chunk, a_blk,
    b_blk]``.  ``len_bucket`` only keys the autotuner.
    """
    pid = tl.program_id(0).to(tl.int64)
    tiles_a = tl.cdiv(a, BLOCK_A)
    tiles_b = tl.cdiv(b, BLOCK_B)
    n_tiles = tiles_a * tiles_b
    tile = pid % n_tiles
    rest = pid // n_tiles
    chunk = rest % n_chunks
    example = rest // n_chunks
    tile_a = tile // tiles_b
    tile_b = tile % tiles_b

    start = tl.load(start_ptr + example).to(tl.int64)
    end = tl.load(end_ptr + example).to(tl.int64)
    row0 = start + chunk * rows_per_program
    row1 = tl.minimum(end, row0 + rows_per_program)
    n_rows = tl.maximum(row1 - row0, 0).to(tl.int32)

    offs_a = tile_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tile_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < a
    mask_b = offs_b < b

    acc = _accumulate_rows(
        tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32),
        left_ptr + example * stride_le,
        right_ptr + example * stride_re,
        row0,
        n_rows,
        offs_a,
        offs_b,
        mask_a,
        mask_b,
        stride_lm,
        stride_la,
        stride_rm,
        stride_rb,
        BLOCK_T,
        INPUT_PRECISION,
    )

    if SPLIT_T:
        tl.store(
            part_ptr
            + example * stride_pe
            + chunk * stride_pc
            + offs_a[:, None] * stride_pa
            + offs_b[None, :] * stride_pb,
            acc,
            mask=mask_a[:, None] & mask_b[None, :],
        )
    else:
        tl.store(part_ptr + example * stride_pe + tile, tl.sum(acc * acc))


@triton.jit
def _outer_sq_norm_gram_kernel(
    left_ptr,
    right_ptr,
    start_ptr,
    end_ptr,
    part_ptr,
    a,
    b,
    max_len,
    len_bucket,
    stride_le,
    stride_lm,
    stride_la,
    stride_re,
    stride_rm,
    stride_rb,
    stride_pe,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``w * sum(Gl * Gr)`` for one block pair ``(p, q)``, ``p <= q``, of one example.

    ``Gl = L[p_blk] L[q_blk]^T`` and ``Gr = R[p_blk] R[q_blk]^T`` are
    ``BLOCK_T x BLOCK_T`` fp32 tiles; ``w = 2`` off the diagonal, 1 on it.
    Program ``pid = example * n_pairs + pair`` with ``pair = q (q + 1) / 2 + p``
    and ``n_pairs`` from ``cdiv(max_len, BLOCK_T)`` blocks; writes
    ``part[example, pair]`` (``stride_pe``; the slot stride is 1).
    ``len_bucket`` only keys the autotuner.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(max_len, BLOCK_T).to(tl.int64)
    n_pairs = n_blocks * (n_blocks + 1) // 2
    pair = pid % n_pairs
    example = pid // n_pairs
    # Invert pair = q (q + 1) / 2 + p; the float guess is off by at most one.
    q = ((tl.sqrt((8 * pair + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
    q = tl.where(q * (q + 1) // 2 > pair, q - 1, q)
    q = tl.where((q + 1) * (q + 2) // 2 <= pair, q + 1, q)
    p = pair - q * (q + 1) // 2

    start = tl.load(start_ptr + example).to(tl.int64)
    end = tl.load(end_ptr + example).to(tl.int64)
    n = end - start
    left_ptr += example * stride_le
    right_ptr += example * stride_re
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    rows_p = start + p * BLOCK_T + offs_t
    rows_q = start + q * BLOCK_T + offs_t
    mask_p = (p * BLOCK_T + offs_t) < n
    mask_q = (q * BLOCK_T + offs_t) < n
    # Blocks past the end of the example (q >= p) skip the reductions.
    live = q * BLOCK_T < n
    a_end = tl.where(live, a, 0)
    b_end = tl.where(live, b, 0)

    gram_l = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k in range(0, a_end, BLOCK_K):
        cols = k + offs_k
        mask_k = cols < a
        lp = tl.load(
            left_ptr + rows_p[:, None] * stride_lm + cols[None, :] * stride_la,
            mask=mask_p[:, None] & mask_k[None, :],
            other=0.0,
        )
        lq = tl.load(
            left_ptr + rows_q[:, None] * stride_lm + cols[None, :] * stride_la,
            mask=mask_q[:, None] & mask_k[None, :],
            other=0.0,
        )
        gram_l = tl.dot(lp, tl.trans(lq), gram_l, input_precision=INPUT_PRECISION)

    gram_r = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k in range(0, b_end, BLOCK_K):
        cols = k + offs_k
        mask_k = cols < b
        rp = tl.load(
            right_ptr + rows_p[:, None] * stride_rm + cols[None, :] * stride_rb,
            mask=mask_p[:, None] & mask_k[None, :],
            other=0.0,
        )
        rq = tl.load(
            right_ptr + rows_q[:, None] * stride_rm + cols[None, :] * stride_rb,
            mask=mask_q[:, None] & mask_k[None, :],
            other=0.0,
        )
        gram_r = tl.dot(rp, tl.trans(rq), gram_r, input_precision=INPUT_PRECISION)

    weight = tl.where(p < q, 2.0, 1.0)
    tl.store(part_ptr + example * stride_pe + pair, weight * tl.sum(gram_l * gram_r))


@triton.jit
def _outer_grad_sq_norm_kernel(
    left_ptr,
    right_ptr,
    start_ptr,
    end_ptr,
    group_ptr,
    sq_ptr,
    grad_ptr,
    a,
    b,
    n_chunks,
    examples_per_program,
    len_bucket,
    stride_le,
    stride_lm,
    stride_la,
    stride_re,
    stride_rm,
    stride_rb,
    stride_se,
    stride_gg,
    stride_gc,
    stride_ga,
    stride_gb,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One ``BLOCK_A x BLOCK_B`` tile of the summed gradient of a run of examples
    of one group, and that tile's square-sum for each of those examples.

    Program ``pid = ((group * n_chunks + chunk) * tiles_a + tile_a) * tiles_b +
    tile_b``.  Group ``g`` owns the examples ``group[g] : group[g + 1]``; chunk
    ``c`` takes ``examples_per_program`` of them from ``group[g] + c *
    examples_per_program``.  For each example the tile of ``L_i^T R_i`` is
    accumulated on chip over the example's rows, its square-sum written to
    ``sq[example, tile]`` (the slot stride is 1) and the tile added to the
    chunk's sum, written at the end to ``grad[group, chunk, a_blk, b_blk]``.
    """
    pid = tl.program_id(0).to(tl.int64)
    tiles_a = tl.cdiv(a, BLOCK_A)
    tiles_b = tl.cdiv(b, BLOCK_B)
    n_tiles = tiles_a * tiles_b
    tile = pid % n_tiles
    rest = pid // n_tiles
    chunk = rest % n_chunks
    group = rest // n_chunks
    tile_a = tile // tiles_b
    tile_b = tile % tiles_b

    g_start = tl.load(group_ptr + group).to(tl.int64)
    g_end = tl.load(group_ptr + group + 1).to(tl.int64)
    e0 = g_start + chunk * examples_per_program
    e1 = tl.minimum(g_end, e0 + examples_per_program)

    offs_a = tile_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tile_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < a
    mask_b = offs_b < b

    total = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for example in range(e0, e1):
        start = tl.load(start_ptr + example).to(tl.int64)
        n_rows = (tl.load(end_ptr + example).to(tl.int64) - start).to(tl.int32)
        acc = _accumulate_rows(
            tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32),
            left_ptr + example * stride_le,
            right_ptr + example * stride_re,
            start,
            n_rows,
            offs_a,
            offs_b,
            mask_a,
            mask_b,
            stride_lm,
            stride_la,
            stride_rm,
            stride_rb,
            BLOCK_T,
            INPUT_PRECISION,
        )
        tl.store(sq_ptr + example * stride_se + tile, tl.sum(acc * acc))
        total += acc

    tl.store(
        grad_ptr
        + group * stride_gg
        + chunk * stride_gc
        + offs_a[:, None] * stride_ga
        + offs_b[None, :] * stride_gb,
        total,
        mask=mask_a[:, None] & mask_b[None, :],
    )


# ----------------------------------------------------------------------------
# Configurations (the table and the autotune candidates live in .configs)
# ----------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether the kernels of this module run in the Triton interpreter.

    Triton decides when the kernels are decorated, i.e. from ``TRITON_INTERPRET``
    at the time this module was first imported.
    """
    return type(_outer_sq_norm_direct_kernel).__name__ == "InterpretedFunction"


def _interpret_env() -> bool:
    """Whether ``TRITON_INTERPRET`` is set now (the interpreter reads it at run time too)."""
    return routes.interpret_requested()


_TUNED: dict[str, Callable] = {}


def _tuned_kernel(route: str):
    """The autotuned wrapper of a route's kernel, built on first use (GPU only)."""
    if route not in _TUNED:
        kernel, cands, prune, zero = {
            "direct": (_outer_sq_norm_direct_kernel, "direct", prune_direct, "part_ptr"),
            "fused": (_outer_grad_sq_norm_kernel, "direct", prune_direct, "sq_ptr"),
            "ghost": (_outer_sq_norm_gram_kernel, "ghost", prune_gram, "part_ptr"),
        }[route]
        _TUNED[route] = triton.autotune(
            configs=autotune_configs(cands),
            key=AUTOTUNE_KEYS[route],
            prune_configs_by={"early_config_prune": prune},
            reset_to_zero=[zero],
        )(kernel)
    return _TUNED[route]


def _use_autotune(autotune: bool | None) -> bool:
    """Autotune only when asked (``autotune=True`` or ``GRADFILTER_AUTOTUNE=1``),
    never in the interpreter (multi-config autotune does not work there)."""
    if interpreted():
        return False
    return autotune_requested() if autotune is None else bool(autotune)


# ----------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """Checked inputs of a launch: where each example's rows are.

    Packed (``cu_seqlens``): one ``[N, d]`` row space shared by all examples,
    example strides 0, ``starts = cu[:-1]``, ``ends = cu[1:]``.  In place
    (``spans``): ``[B, T, d]``, example i reads rows ``starts[i] : ends[i]`` of
    its own ``[T, d]`` slice.  ``width``: the rows an example may reach.
    """

    left: torch.Tensor
    right: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    n_ex: int
    width: int
    strides: tuple[int, ...]  # stride_le, stride_lm, stride_la, stride_re, stride_rm, stride_rb
    cu: torch.Tensor | None  # the packed offsets, None for rows in place

    @property
    def packed(self) -> bool:
        return self.cu is not None

    @property
    def a(self) -> int:
        return self.left.shape[-1]

    @property
    def b(self) -> int:
        return self.right.shape[-1]


def _check_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _packed_rows(left: torch.Tensor, right: torch.Tensor, cu_seqlens: torch.Tensor) -> _Rows:
    _check_tensor("cu_seqlens", cu_seqlens)
    if left.dim() != 2 or right.dim() != 2:
        raise ValueError(
            "left and right must be packed rows [N, a] and [N, b], got shapes "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    if left.shape[0] != right.shape[0]:
        raise ValueError(
            f"left and right must have the same number of rows, got {left.shape[0]} and "
            f"{right.shape[0]}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [B + 1], got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.contiguous()
    strides = (0, left.stride(0), left.stride(1), 0, right.stride(0), right.stride(1))
    return _Rows(left, right, cu[:-1], cu[1:], cu.numel() - 1, left.shape[0], strides, cu)


def _spans_rows(left: torch.Tensor, right: torch.Tensor, spans: tuple) -> _Rows:
    if not isinstance(spans, (tuple, list)) or len(spans) != 2:
        raise TypeError("spans must be a pair (starts, ends) of [B] integer tensors")
    starts, ends = spans
    _check_tensor("spans' starts", starts)
    _check_tensor("spans' ends", ends)
    if left.dim() != 3 or right.dim() != 3 or left.shape[:2] != right.shape[:2]:
        raise ValueError(
            "with spans, left and right must be [B, T, a] and [B, T, b], got shapes "
            f"{tuple(left.shape)} and {tuple(right.shape)}"
        )
    bsz = left.shape[0]
    if starts.shape != (bsz,) or ends.shape != (bsz,):
        raise ValueError(
            f"spans must be two [B] = [{bsz}] tensors, got {tuple(starts.shape)} and "
            f"{tuple(ends.shape)}"
        )
    if starts.dtype not in _INDEX_DTYPES or ends.dtype not in _INDEX_DTYPES:
        raise TypeError(f"spans must be int32 or int64, got {starts.dtype} and {ends.dtype}")
    strides = (*left.stride(), *right.stride())
    return _Rows(
        left, right, starts.contiguous(), ends.contiguous(), bsz, left.shape[1], strides, None
    )


def _check_inputs(
    left: torch.Tensor,
    right: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Rows:
    """Validate types, shapes and devices (no host read of device data); no copy
    of ``left`` or ``right``: the kernels take any strides."""
    _check_tensor("left", left)
    _check_tensor("right", right)
    if (cu_seqlens is None) == (spans is None):
        raise ValueError("give either cu_seqlens (packed rows) or spans (rows in place)")
    if spans is None:
        rows = _packed_rows(left, right, cu_seqlens)
    else:
        rows = _spans_rows(left, right, spans)
    if left.dtype not in _DTYPES or right.dtype not in _DTYPES:
        raise TypeError(
            f"left and right must be float32, float16 or bfloat16, got {left.dtype} and "
            f"{right.dtype} (use gradfilter.norms.reference for other dtypes)"
        )
    if left.dtype != right.dtype:
        raise TypeError(
            f"left and right must have the same dtype, got {left.dtype} and {right.dtype}"
        )
    devices = {left.device, right.device, rows.starts.device, rows.ends.device}
    if len(devices) != 1:
        what = "cu_seqlens" if spans is None else "spans"
        raise ValueError(
            f"left, right and {what} must be on one device, got "
            f"{left.device}, {right.device} and {rows.starts.device}"
        )
    if interpreted():
        if not _interpret_env():
            raise RuntimeError(
                "the kernels were loaded for the Triton interpreter but TRITON_INTERPRET is no "
                "longer set; the interpreter needs it while kernels run, so set it back to 1"
            )
        if left.device.type != "cpu":
            raise RuntimeError(
                f"the Triton interpreter (TRITON_INTERPRET=1) needs CPU tensors, got {left.device}"
            )
        if left.dtype == torch.bfloat16:
            raise TypeError(
                "bfloat16 is not supported under the Triton interpreter (its results are wrong "
                "there); use float16 or float32, or run on a GPU"
            )
    elif left.device.type != "cuda":
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {left.device}); set TRITON_INTERPRET=1 before "
            "importing them to run on the CPU"
        )
    return rows


def _host_lengths(rows: _Rows) -> torch.Tensor:
    """Example lengths ``[B]`` (int64, CPU) after checking the bounds (one device sync)."""
    if rows.packed:
        cu = rows.cu.detach().to("cpu", torch.int64)
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) < 0:
            raise ValueError(f"cu_seqlens must start at 0 or more, got {int(cu[0])}")
        if lengths.numel() and int(lengths.min()) < 0:
            bad = int(torch.nonzero(lengths < 0)[0, 0])
            raise ValueError(
                f"cu_seqlens must be non-decreasing; cu_seqlens[{bad + 1}] = "
                f"{int(cu[bad + 1])} < cu_seqlens[{bad}] = {int(cu[bad])}"
            )
        if int(cu[-1]) > rows.width:
            raise ValueError(
                f"cu_seqlens ends at {int(cu[-1])} but left and right have only {rows.width} rows"
            )
        return lengths
    starts = rows.starts.detach().to("cpu", torch.int64)
    ends = rows.ends.detach().to("cpu", torch.int64)
    lengths = ends - starts
    bad = (starts < 0) | (lengths < 0) | (ends > rows.width)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(
            f"spans of example {i} are {int(starts[i])}:{int(ends[i])}; they must satisfy "
            f"0 <= start <= end <= {rows.width} (the tokens per example)"
        )
    return lengths


def _max_len(rows: _Rows, max_seqlen: int | None) -> int:
    """The longest example: ``max_seqlen`` when given (no host read, not checked),
    else read from the bounds (one device sync, bounds checked)."""
    if max_seqlen is not None:
        if int(max_seqlen) < 0:
            raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
        return int(max_seqlen)
    lengths = _host_lengths(rows)
    return int(lengths.max()) if lengths.numel() else 0


def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: a few per SM on GPU; 1 (no split) otherwise."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * sms


def _auto_rows_per_program(
    n_examples: int, a: int, b: int, max_len: int, device: torch.device
) -> int:
    """Rows per direct program: the whole example unless ``B x tiles`` underfills the GPU.

    Splits into chunks of a power of two (>= ``MIN_SPLIT_ROWS``) rows, at most as
    many as needed to reach the target program count, and keeps the partial tile
    buffer ``B x n_chunks x a x b`` under ``gradfilter.norms.routes.TEMP_BUDGET``.
    """
    tile_a, tile_b = pow2_clamp(a, MIN_DOT, 64), pow2_clamp(b, MIN_DOT, 64)
    tiles = triton.cdiv(a, tile_a) * triton.cdiv(b, tile_b)
    base = n_examples * tiles
    target = _target_programs(device)
    if base >= target or max_len <= MIN_SPLIT_ROWS:
        return max_len
    chunks = min(triton.cdiv(target, base), triton.cdiv(max_len, MIN_SPLIT_ROWS))
    chunks = min(chunks, max(1, routes.TEMP_BUDGET // max(1, n_examples * a * b)))
    if chunks <= 1:
        return max_len
    return max(MIN_SPLIT_ROWS, triton.next_power_of_2(triton.cdiv(max_len, chunks)))


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch: Triton launches on the current CUDA
    device, so tensors on ``cuda:1`` would otherwise be read from ``cuda:0``'s
    context.  A no-op on the CPU (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_config(cfg: triton.Config, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in cfg.kwargs or int(cfg.kwargs[key]) < MIN_DOT:
            raise ValueError(f"config needs {key} >= {MIN_DOT}, got {cfg.kwargs.get(key)}")


def _launch_options(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _common_args(rows: _Rows) -> tuple:
    return (rows.left, rows.right, rows.starts, rows.ends)


def outer_sq_norms_direct(
    left: torch.Tensor,
    right: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    rows_per_program: int | None = None,
    config: triton.Config | None = None,
    autotune: bool | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``||sum_{t in i} left[t] (x) right[t]||_F^2`` per example, direct route.

    Rows packed: left ``[N, a]``, right ``[N, b]`` (same float dtype and
    device), cu_seqlens ``[B + 1]`` int32/int64.  Or rows in place: left ``[B,
    T, a]``, right ``[B, T, b]`` and ``spans = (starts, ends)``, two ``[B]``
    int tensors: example i owns ``left[i, starts[i] : ends[i]]`` (a padded
    batch read without packing it).  Any strides; nothing is copied.  Returns
    float32 ``[B]``.

    ``max_seqlen``: an upper bound on the example lengths; with it the launch
    reads nothing back from the device (the bounds are then not checked), so
    it never waits for the GPU.  ``rows_per_program``: split each example into
    chunks of that many rows (default: only when the GPU would be underfilled).
    ``config``: a fixed launch configuration (``BLOCK_A``, ``BLOCK_B``,
    ``BLOCK_T``) instead of the table's (:func:`fixed_config`).  ``autotune``:
    time the candidates instead (default: ``GRADFILTER_AUTOTUNE``, off; never
    in the interpreter).  ``allow_tf32``: fp32 inputs through TF32 tensor cores.
    """
    rows = _check_inputs(left, right, cu_seqlens, spans)
    a, b, n_ex, device = rows.a, rows.b, rows.n_ex, left.device
    out = torch.zeros(n_ex, dtype=torch.float32, device=device)
    if n_ex == 0 or a == 0 or b == 0:
        return out
    max_len = _max_len(rows, max_seqlen)
    if max_len == 0:
        return out

    if rows_per_program is None:
        rpp = _auto_rows_per_program(n_ex, a, b, max_len, device)
    else:
        if int(rows_per_program) < 1:
            raise ValueError(f"rows_per_program must be >= 1, got {rows_per_program}")
        rpp = min(int(rows_per_program), max_len)
    n_chunks = triton.cdiv(max_len, rpp)
    split = n_chunks > 1
    precision = precision_of(left.dtype, allow_tf32)
    tuned = config is None and _use_autotune(autotune)
    cfg = config or fixed_config("direct", a, b, max_len, left.dtype, precision)
    _check_config(cfg, ("BLOCK_A", "BLOCK_B", "BLOCK_T"))

    if split:
        # Every (example, chunk, a, b) element is written by exactly one program.
        part = torch.empty(n_ex, n_chunks, a, b, dtype=torch.float32, device=device)
        strides = tuple(part.stride())
    else:
        # One slot per tile of the finest tiling any candidate config may use.
        cands = autotune_configs("direct") if tuned else [cfg]
        min_a = min(c.kwargs["BLOCK_A"] for c in cands)
        min_b = min(c.kwargs["BLOCK_B"] for c in cands)
        slots = triton.cdiv(a, min_a) * triton.cdiv(b, min_b)
        part = torch.zeros(n_ex, slots, dtype=torch.float32, device=device)
        strides = (part.stride(0), 0, 0, 0)

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"])
        return (n_ex * n_chunks * tiles,)

    args = (
        *_common_args(rows),
        part,
        a,
        b,
        n_chunks,
        rpp,
        triton.next_power_of_2(max_len),
        *rows.strides,
        *strides,
    )
    with _on_device(device):
        if tuned:
            _tuned_kernel("direct")[grid](*args, SPLIT_T=split, INPUT_PRECISION=precision)
        else:
            _outer_sq_norm_direct_kernel[grid](
                *args, SPLIT_T=split, INPUT_PRECISION=precision, **_launch_options(cfg)
            )

    if split:
        return part.sum(dim=1).square().sum(dim=(1, 2))
    return part.sum(dim=1)


def outer_sq_norms_gram(
    left: torch.Tensor,
    right: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    config: triton.Config | None = None,
    autotune: bool | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """``<L_i L_i^T, R_i R_i^T>`` per example, Gram ("ghost") route.

    Same inputs and output as :func:`outer_sq_norms_direct`.  Each example is
    split along T into ``BLOCK_T`` row blocks; every block pair ``p <= q`` is
    one program.  ``config`` fixes ``BLOCK_T`` and ``BLOCK_K``.
    """
    rows = _check_inputs(left, right, cu_seqlens, spans)
    a, b, n_ex, device = rows.a, rows.b, rows.n_ex, left.device
    out = torch.zeros(n_ex, dtype=torch.float32, device=device)
    if n_ex == 0 or a == 0 or b == 0:
        return out
    max_len = _max_len(rows, max_seqlen)
    if max_len == 0:
        return out

    precision = precision_of(left.dtype, allow_tf32)
    tuned = config is None and _use_autotune(autotune)
    cfg = config or fixed_config("ghost", a, b, max_len, left.dtype, precision)
    _check_config(cfg, ("BLOCK_T", "BLOCK_K"))

    def n_pairs(block_t: int) -> int:
        blocks = triton.cdiv(max_len, block_t)
        return blocks * (blocks + 1) // 2

    cands = autotune_configs("ghost") if tuned else [cfg]
    slots = n_pairs(min(c.kwargs["BLOCK_T"] for c in cands))
    part = torch.zeros(n_ex, slots, dtype=torch.float32, device=device)

    def grid(meta: dict) -> tuple[int]:
        return (n_ex * n_pairs(meta["BLOCK_T"]),)

    args = (
        *_common_args(rows),
        part,
        a,
        b,
        max_len,
        triton.next_power_of_2(max_len),
        *rows.strides,
        part.stride(0),
    )
    with _on_device(device):
        if tuned:
            _tuned_kernel("ghost")[grid](*args, INPUT_PRECISION=precision)
        else:
            _outer_sq_norm_gram_kernel[grid](
                *args, INPUT_PRECISION=precision, **_launch_options(cfg)
            )
    return part.sum(dim=1)


def outer_sq_norms(
    left: torch.Tensor,
    right: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    route: str | None = None,
    *,
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    autotune: bool | None = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Per-example squared norms by either route; float32 ``[B]``.

    Inputs as for :func:`outer_sq_norms_direct`.  ``route`` is ``"direct"``,
    ``"ghost"`` (alias ``"gram"``) or None: chosen by :func:`choose_packed_route`
    from the example lengths, read from the device (one host sync; pass the
    route and ``max_seqlen`` to launch without any).
    """
    if route is None:
        rows = _check_inputs(left, right, cu_seqlens, spans)
        lengths = _host_lengths(rows)
        route = choose_packed_route(lengths, rows.a, rows.b)
        if max_seqlen is None:
            max_seqlen = int(lengths.max()) if lengths.numel() else 0
    route = canonical_route(route)
    launch = outer_sq_norms_direct if route == "direct" else outer_sq_norms_gram
    return launch(
        left,
        right,
        cu_seqlens,
        spans=spans,
        max_seqlen=max_seqlen,
        autotune=autotune,
        allow_tf32=allow_tf32,
    )


def _check_groups(groups: torch.Tensor, n_ex: int, device: torch.device) -> None:
    """Shape, dtype and device of ``groups`` (nothing read from the device)."""
    if not isinstance(groups, torch.Tensor):
        raise TypeError(f"groups must be a torch.Tensor, got {type(groups).__name__}")
    if groups.dim() != 1 or groups.numel() < 2:
        raise ValueError(
            f"groups must be a 1-D tensor [G + 1] with G >= 1, got shape {tuple(groups.shape)}"
        )
    if groups.dtype not in _INDEX_DTYPES:
        raise TypeError(f"groups must be int32 or int64, got {groups.dtype}")
    if groups.device != device:
        raise ValueError(f"groups must be on {device}, got {groups.device}")


def _largest_group(groups: torch.Tensor, n_ex: int) -> int:
    """The most examples in one group, after checking ``groups`` (one device sync)."""
    g = groups.detach().to("cpu", torch.int64)
    if int(g[0]) != 0 or int(g[-1]) != n_ex:
        raise ValueError(
            f"groups must run from 0 to the number of examples {n_ex}, "
            f"got {int(g[0])} .. {int(g[-1])}"
        )
    if bool((g[1:] < g[:-1]).any()):
        raise ValueError("groups must be non-decreasing")
    return int((g[1:] - g[:-1]).max())


def outer_grad_sq_norms(
    left: torch.Tensor,
    right: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    groups: torch.Tensor,
    *,
    spans: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    max_group: int | None = None,
    examples_per_program: int | None = None,
    config: triton.Config | None = None,
    autotune: bool | None = None,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed gradient per group and per-example squared norms, in one pass.

    left, right and cu_seqlens (or ``spans``) as for
    :func:`outer_sq_norms_direct`; groups ``[G + 1]`` (int32/int64) cuts the
    examples into G consecutive groups (``groups[0] = 0``, ``groups[-1] = B``).
    Returns ``(grad, sq)``: float32 ``[G, a, b]`` with ``grad[g] = sum over the
    group's examples of L_i^T R_i``, and float32 ``[B]`` with ``sq[i] =
    ||L_i^T R_i||_F^2``.  Per-example gradients never leave the chip.
    ``max_seqlen`` and ``max_group`` (the most examples in one group): with
    both, nothing is read back from the device (and neither the bounds nor
    ``groups`` is checked).  ``examples_per_program``: how many examples one
    program walks (default: a group's worth, cut further when ``G x tiles``
    alone would leave the GPU idle).  Examples are never split along T here,
    since a tile must be whole before it is squared.
    """
    rows = _check_inputs(left, right, cu_seqlens, spans)
    a, b, n_ex, device = rows.a, rows.b, rows.n_ex, left.device
    _check_groups(groups, n_ex, device)
    n_groups = groups.numel() - 1
    largest = _largest_group(groups, n_ex) if max_group is None else int(max_group)
    grad = torch.zeros(n_groups, a, b, dtype=torch.float32, device=device)
    sq = torch.zeros(n_ex, dtype=torch.float32, device=device)
    if n_ex == 0 or a == 0 or b == 0:
        return grad, sq
    max_len = _max_len(rows, max_seqlen)
    if max_len == 0 or largest == 0:
        return grad, sq
    if examples_per_program is None:
        tiles = triton.cdiv(a, pow2_clamp(a, MIN_DOT, 64)) * triton.cdiv(
            b, pow2_clamp(b, MIN_DOT, 64)
        )
        chunks = max(1, min(largest, triton.cdiv(_target_programs(device), n_groups * tiles)))
        epp = triton.cdiv(largest, chunks)
    else:
        if int(examples_per_program) < 1:
            raise ValueError(f"examples_per_program must be >= 1, got {examples_per_program}")
        epp = int(examples_per_program)
    n_chunks = max(1, triton.cdiv(largest, epp))
    precision = precision_of(left.dtype, allow_tf32)
    tuned = config is None and _use_autotune(autotune)
    cfg = config or fixed_config("fused", a, b, max_len, left.dtype, precision)
    _check_config(cfg, ("BLOCK_A", "BLOCK_B", "BLOCK_T"))

    cands = autotune_configs("direct") if tuned else [cfg]
    slots = triton.cdiv(a, min(c.kwargs["BLOCK_A"] for c in cands)) * triton.cdiv(
        b, min(c.kwargs["BLOCK_B"] for c in cands)
    )
    sq_part = torch.zeros(n_ex, slots, dtype=torch.float32, device=device)
    # Every (group, chunk, a, b) element is written by exactly one program.
    part = torch.empty(n_groups, n_chunks, a, b, dtype=torch.float32, device=device)

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(a, meta["BLOCK_A"]) * triton.cdiv(b, meta["BLOCK_B"])
        return (n_groups * n_chunks * tiles,)

    args = (
        *_common_args(rows),
        groups.contiguous(),
        sq_part,
        part,
        a,
        b,
        n_chunks,
        epp,
        triton.next_power_of_2(max_len),
        *rows.strides,
        sq_part.stride(0),
        *part.stride(),
    )
    with _on_device(device):
        if tuned:
            _tuned_kernel("fused")[grid](*args, INPUT_PRECISION=precision)
        else:
            _outer_grad_sq_norm_kernel[grid](
                *args, INPUT_PRECISION=precision, **_launch_options(cfg)
            )
    return part.sum(dim=1), sq_part.sum(dim=1)
