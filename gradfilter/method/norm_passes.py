"""Per-example gradient norms of every member of a :class:`LoRAEnsemble` from
folded eval-mode passes (the snapshot passes of a run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradfilter.method.ensemble import LoRAEnsemble


def ensemble_grad_norms(
    ens: LoRAEnsemble,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    per_param: bool = False,
    rows: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """``[M, B]``: norm of each example's loss gradient for each member's LoRA
    parameters, from one forward and one backward of the folded batch (eval mode).

    ``max_tokens``: at most this many padded tokens (all members together) in
    one folded pass; a larger batch runs in chunks of rows (the examples are
    independent, so only rounding changes).  None: 2048 on the CPU, where
    passes that stay in cache beat larger ones, no limit on a GPU.

    With a prefix cache the forward starts at block ``layers_from`` from the
    cached states of ``rows`` (the examples' row indices; None: computed for
    this batch only).  The norm engine's anchor is tied to the adapters'
    inputs, all at or above that block, so the norms are those of a full pass."""
    bsz, seq = input_ids.shape[0], input_ids.shape[1]
    if max_tokens is None:
        device = next(ens.adapters.parameters()).device
        max_tokens = 0 if device.type == "cuda" else 2048
    step = bsz if not max_tokens else max(1, min(bsz, max_tokens // (ens.fold_members * seq)))
    if rows is not None:
        rows = list(rows)
        if len(rows) != bsz:
            raise ValueError(f"{len(rows)} row indices for a batch of {bsz}")
    parts = []
    for r0 in range(0, bsz, step):
        sl = slice(r0, min(bsz, r0 + step))
        parts.append(
            _norms_pass(
                ens,
                input_ids[sl],
                labels[sl],
                None if attention_mask is None else attention_mask[sl],
                reduction,
                per_param,
                None if rows is None else rows[sl],
            )
        )
    if per_param:
        return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
    return torch.cat(parts, dim=1)


def _norms_pass(ens, input_ids, labels, attention_mask, reduction, per_param, rows):
    from gradfilter.norms.api import per_example_grad_norms

    bsz = input_ids.shape[0]
    prefix = ens.prefix_states(input_ids, attention_mask, rows)
    out = per_example_grad_norms(
        ens,
        ens.fold(input_ids),
        ens.fold(labels),
        ens.fold(attention_mask),
        reduction=reduction,
        per_param=per_param,
        model_kwargs=None if prefix is None else {"prefix_states": ens.fold(prefix)},
    )
    if per_param:
        return {k: v.reshape(ens.members, bsz) for k, v in out.items()}
    return out.reshape(ens.members, bsz)
