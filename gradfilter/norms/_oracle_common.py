"""The definition shared by the per-example gradient-norm oracles.

The quantity is defined in :mod:`gradfilter.norms.oracles`; this module holds
the pieces every implementation there and in :mod:`gradfilter.norms.oracles_opacus`
uses: the per-example loss, input checks, the forward-pass arguments and the
final reduction.  The public names are re-exported by :mod:`gradfilter.norms.oracles`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "NormsResult", "Reduction", "causal_position_ids", "per_example_losses"]

#: Label value excluded from the loss (the Hugging Face / PyTorch convention).
IGNORE_INDEX = -100

Reduction = Literal["mean", "sum"]

#: Either a tensor of norms ``[B]`` or a mapping ``name -> squared norms [B]``.
NormsResult = torch.Tensor | dict[str, torch.Tensor]


def causal_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore padding: ``(cumsum(mask) - 1).clamp(min=0)``.

    Args:
        attention_mask: ``[..., T]`` with 1 for real tokens and 0 for padding.

    Returns:
        Long tensor of the same shape. Real tokens are numbered ``0, 1, ...``
        in order; left padding gets position 0, right padding repeats the last
        position (its value does not matter: padded keys are masked out and
        padded queries carry no label).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def per_example_losses(
    logits: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example causal LM losses ``L_i`` and label counts ``n_i``.

    Args:
        logits: ``[B, T, V]``; ``logits[i, t]`` predicts ``labels[i, t+1]``.
        labels: ``[B, T]`` long, ``-100`` = ignored.
        reduction: ``"mean"`` divides the summed token losses by ``n_i``,
            ``"sum"`` does not.

    Returns:
        ``(losses, counts)``, both of shape ``[B]``. ``losses`` is in the dtype
        of ``logits``; for an example with ``n_i = 0`` the loss is 0 (the
        division uses ``max(n_i, 1)``) so that it never poisons a batch sum --
        callers turn such entries into NaN themselves. ``counts`` is long.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    batch, steps, vocab = shift_logits.shape
    token_losses = F.cross_entropy(
        shift_logits.reshape(batch * steps, vocab),
        shift_labels.reshape(batch * steps),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape(batch, steps)
    counts = (shift_labels != IGNORE_INDEX).sum(-1)
    losses = token_losses.sum(-1)
    if reduction == "mean":
        losses = losses / counts.clamp(min=1).to(losses.dtype)
    return losses, counts


def _check_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate shapes/options; return labels with padded positions set to -100."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    labels = labels.to(input_ids.device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        attention_mask = attention_mask.to(input_ids.device)
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
        # A label predicted from a padding position does not exist for the example alone.
        labels[:, 1:] = labels[:, 1:].masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)
    return labels, attention_mask


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no parameter with requires_grad=True.")
    return params


def _result_dtype(params: list[tuple[str, nn.Parameter]]) -> torch.dtype:
    """float64 when any trainable parameter is float64, else float32."""
    return torch.float64 if any(p.dtype == torch.float64 for _, p in params) else torch.float32


def _model_kwargs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments of the forward pass prescribed by the definition."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = causal_position_ids(attention_mask)
    return kwargs


@contextmanager
def _preserve_modes(model: nn.Module) -> Iterator[None]:
    """Restore the ``training`` flag of every submodule of ``model`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _finish(
    sq_norms: dict[str, torch.Tensor], counts: torch.Tensor, per_param: bool
) -> NormsResult:
    """Mark examples without labels as NaN; sum squared norms unless ``per_param``."""
    empty = (counts == 0).to(next(iter(sq_norms.values())).device)
    sq_norms = {n: v.masked_fill(empty, math.nan) for n, v in sq_norms.items()}
    if per_param:
        return sq_norms
    return torch.stack(list(sq_norms.values())).sum(0).sqrt()
