"""Baseline selectors that run through the same data path and proxy as G-SNR.

Scores (higher = keep unless stated):

* ``random``: a seeded uniform draw per row.
* ``loss``: the proxy's per-example loss ``L_i`` (mean token cross-entropy over
  the response given the prompt, no adapter, no training); high-loss rows rank
  first (the "hard examples" baseline; ``exp(L_i)`` is the perplexity).
* ``ifd`` (Superfiltering's Instruction-Following Difficulty, loss-ratio form):
  ``IFD_i = L(response | instruction) / L(response alone)``.
* ``ifd_ppl`` (the perplexity-ratio form that Superfiltering's released code
  ranks by): ``PPL(response | instruction) / PPL(response alone)
  = exp(L_cond - L_alone)``.

  For both IFD forms, rows with ``IFD >= 1`` (the instruction does not help
  predict the response) are discarded: they rank after every kept row and are
  never selected.  Among kept rows, higher IFD ranks first.
* ``grand``: GraNd-like, the ensemble's mean squared LoRA gradient norm after
  the early epoch; and the G-SNR ablations ``drop`` and ``late_var`` (lower
  variance first) come from the ensemble run itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def random_scores(n: int, seed: int) -> np.ndarray:
    """``n`` seeded uniform scores in [0, 1)."""
    return np.random.default_rng(seed).random(n)


def ifd_from_losses(
    cond_loss: np.ndarray, alone_loss: np.ndarray, form: str = "loss_ratio"
) -> np.ndarray:
    """IFD from the conditioned and the unconditioned mean response losses.

    ``loss_ratio``: ``L_cond / L_alone``; ``ppl_ratio``: ``exp(L_cond) / exp(L_alone)``.
    NaN where either loss is missing or ``L_alone`` is 0 (loss-ratio form).
    """
    cond = np.asarray(cond_loss, dtype=np.float64)
    alone = np.asarray(alone_loss, dtype=np.float64)
    if cond.shape != alone.shape:
        raise ValueError(f"loss arrays differ in shape: {cond.shape} vs {alone.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if form == "loss_ratio":
            out = np.where(alone > 0, cond / alone, np.nan)
        elif form == "ppl_ratio":
            out = np.exp(cond - alone)
        else:
            raise ValueError(f"IFD form must be 'loss_ratio' or 'ppl_ratio', got {form!r}")
    return out


def ifd_rank_scores(ifd: np.ndarray) -> np.ndarray:
    """Scores for ranking by IFD with Superfiltering's rule: IFD >= 1 is
    discarded (NaN, so it ranks after the kept rows and is never selected)."""
    ifd = np.asarray(ifd, dtype=np.float64)
    return np.where(ifd < 1.0, ifd, np.nan)


@torch.no_grad()
def example_losses(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``[B]`` mean token cross-entropy over each example's supervised tokens
    (causal shift); NaN for an example without supervised tokens."""
    device = next(model.parameters()).device
    out = model(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
    )
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:].to(device)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).reshape(target.shape)
    count = (target != -100).sum(-1)
    loss = ce.sum(-1) / count.clamp(min=1)
    return torch.where(count > 0, loss, torch.full_like(loss, float("nan"))).cpu()
