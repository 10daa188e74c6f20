"""The LM head and token cross-entropy in chunks of rows, without the full logits.

For hidden states ``H: [N, d]`` (one row per supervised position), a frozen head
``W: [V, d]`` (optional bias ``b: [V]``) and targets ``y: [N]``,

    z_n = H_n W^T + b,   l_n = logsumexp(z_n) - z_n[y_n],   dl_n / dH_n = (softmax(z_n) - e_{y_n}) W

Rows whose target is ``ignore_index`` get ``l_n = 0`` and a zero gradient.  The
forward runs over chunks of ``chunk`` rows: each chunk forms its ``[chunk, V]``
logits (in the head's dtype, as the model's own head would), takes the loss and
the softmax in float32 (float64 for float64 inputs), turns the softmax into the
chunk's hidden-state gradient at once, and drops the logits.  What is kept for
the backward is ``dl_n / dH_n`` (``[N, d]``, the size of the hidden states); the
backward only scales it by the incoming gradient of each row's loss.  So no
``[N, V]`` tensor ever exists, at the price of computing the hidden-state
gradient even when no backward follows (skipped when ``H`` needs no gradient).

The head is frozen here: a head weight or bias that requires a gradient is
refused (its gradient would need the logits again in the backward).
"""

from __future__ import annotations

from typing import Any

import torch

#: Rows of hidden states per chunk: the chunk's float32 logits take
#: ``CHUNK_TOKENS * vocab * 4`` bytes (48 MiB for SmolLM2's 49,152 words).
CHUNK_TOKENS = 256

REDUCTIONS = ("none", "sum", "mean")


class LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses ``[N]`` of ``cross_entropy(H W^T + b, y)``; see the module doc."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        ignore_index: int,
        chunk: int,
    ) -> torch.Tensor:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        losses = torch.zeros(n, dtype=acc, device=hidden.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(hidden, dtype=acc) if want_grad else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            y = target[s:e]
            keep = y != ignore_index
            safe = torch.where(keep, y, torch.zeros_like(y)).unsqueeze(1)
            logits = torch.nn.functional.linear(hidden[s:e], weight, bias).to(acc)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = logits.gather(1, safe)
            losses[s:e] = torch.where(keep, (lse - picked).squeeze(1), 0.0)
            if want_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, safe, torch.full_like(picked, -1.0))
                probs.mul_(keep.unsqueeze(1).to(acc))
                # The head's own dtype for the matmul, as autograd through the head would.
                grad[s:e] = (probs.to(weight.dtype) @ weight).to(acc)
            del logits
        if want_grad:
            ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad * grad_losses.to(grad.dtype).unsqueeze(1)).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T + bias`` against ``target``,
    computed ``chunk`` rows at a time (never the full ``[N, vocab]`` logits).

    Args:
        hidden: ``[N, d]`` hidden states (the input of the LM head).
        weight: ``[vocab, d]`` frozen LM head weight; ``bias``: ``[vocab]`` or None.
        target: ``[N]`` token ids, ``ignore_index`` where no loss is taken.
        reduction: ``"none"`` (``[N]``, 0 at ignored rows), ``"sum"``, or ``"mean"``
            over the rows that are not ignored (NaN when every row is ignored,
            as ``torch.nn.functional.cross_entropy``).
        chunk: rows per chunk (>= 1).

    Returns float32 losses (float64 for float64 hidden states).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, d] and weight [vocab, d] must share d, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be [{hidden.shape[0]}], got {tuple(target.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and (
        weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        raise ValueError(
            "the chunked cross-entropy takes a frozen LM head: its weight (or bias) requires "
            "a gradient; freeze the head or use the full logits"
        )
    losses = LinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, chunk)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum().to(losses.dtype)
