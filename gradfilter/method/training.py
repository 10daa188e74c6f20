"""One optimiser step of every member of a :class:`LoRAEnsemble`, each on its own
batch, in one folded forward and backward; per-example norms on the side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from gradfilter.method.lora import pad_right
from gradfilter.norms.fused import NormRecorder
from gradfilter.norms.layout import to_device

if TYPE_CHECKING:
    from gradfilter.method.ensemble import LoRAEnsemble


def train_step(
    ens: LoRAEnsemble,
    member_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_tokens: int | None = None,
    member_rows: Sequence[Sequence[int]] | None = None,
    record_norms: bool = False,
    reduction: str = "mean",
    by_factor: bool = False,
    pad_to: int | None = None,
    part_of: tuple[torch.Tensor, int, Sequence[int]] | None = None,
    grad_sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One optimiser step for all members, each on its own batch.

    member_batches: M tuples ``(input_ids, labels, attention_mask)`` of equal
    batch size (right-padded; lengths may differ).  Member m's loss is its mean
    token cross-entropy over its batch (the Hugging Face convention).  With
    ``max_tokens``, the folded step runs in chunks of rows of at most that many
    padded tokens, accumulating the same gradient.  With a prefix cache,
    ``member_rows`` (M lists of row indices) key the cached states; the
    forward starts at block ``layers_from``.  Returns the ``[M]`` losses.

    ``record_norms=True`` also returns ``[M, B]`` float64: for each member and
    row of its batch, the squared norm of the gradient of that row's own loss
    (the mean token cross-entropy of its response, or the sum with
    ``reduction="sum"``; training itself is unaffected) with respect to the member's
    LoRA parameters, at the parameters before the step and with the step's
    dropout masks.  They come out of the step's own backward (the weight
    gradient kernel returns them), not from an extra pass.  Rows with no
    supervised token get NaN.  With ``by_factor=True`` a third value follows:
    ``{"A": [M, B], "B": [M, B]}``, the same squared norms restricted to the
    ``lora_A`` and to the ``lora_B`` factors (they add up to the total).

    ``pad_to``: pad the folded batch to at least this length, and chunks are sized
    for ``ens.fold_members`` members: a process that trains a share of a larger
    ensemble computes what that ensemble's folded step computes for its members.

    Data-parallel (``part_of`` and ``grad_sync``): the batches are rows
    ``first_row..`` of larger member batches that other processes hold the rest
    of.  ``part_of = (counts, first_row, lengths)``: the whole batches' ``[M]``
    supervised token counts (the loss is their mean), the place of these rows in
    them (their dropout masks) and each member's whole padded length.
    ``grad_sync(total)`` is called after the backward, before the optimiser
    step: it sums the LoRA gradients and the ``[M]`` token-loss sums over the
    processes and returns the summed losses.  The batches may then be empty.
    """
    if len(member_batches) != ens.members:
        raise ValueError(f"{len(member_batches)} batches for {ens.members} members")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    ids, labels, mask, lengths, host = _stack_batches(ens, member_batches, pad_to)
    bsz, seq = ids.shape[1], ids.shape[2]
    first_row = 0
    if part_of is None:
        counts_host = (host[0][:, :, 1:] != -100).sum(dim=(1, 2)).clamp(min=1)
    else:
        whole, first_row, lengths = part_of
        counts_host = torch.as_tensor(whole, dtype=torch.int64).clamp(min=1)
        lengths = list(lengths)
    counts = to_device(counts_host, ids.device)
    prefix = _prefix_states(ens, ids, mask, member_rows, max_tokens) if bsz else None
    rows = (
        max(1, bsz) if not max_tokens else max(1, min(bsz, max_tokens // (ens.fold_members * seq)))
    )
    was = ens.training
    ens.train()
    ens.base.eval()  # base dropout off; only the adapters' dropout is active
    optimizer.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            total, sq_norms, parts = _chunked_backward(
                ens, (ids, labels, mask), host, counts, prefix, lengths, rows, record_norms,
                first_row,
            )  # fmt: skip
            if grad_sync is not None:
                total = grad_sync(total)
            optimizer.step()
    finally:
        ens.train(was)
    ens.step += 1
    losses = (total / counts_host).float()
    if not record_norms:
        return losses
    own, scale = _own_loss_scale(host[0], counts_host, reduction)
    nan = torch.full_like(sq_norms, float("nan"))
    total_sq = torch.where(own > 0, sq_norms * scale, nan)
    if not by_factor:
        return losses, total_sq
    return losses, total_sq, {k: torch.where(own > 0, v * scale, nan) for k, v in parts.items()}


def _stack_batches(
    ens: LoRAEnsemble,
    member_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    pad_to: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], tuple[torch.Tensor, ...]]:
    """The member batches right-padded to one length and stacked, ``[M, B, T]`` each
    on the adapters' device, each member's own padded length, and ``(labels,
    mask)`` on the host: the step reads its shapes there (supervised positions,
    token counts, row layouts), so the device never has to wait for the host."""
    bsz = member_batches[0][0].shape[0]
    if any(b[0].shape[0] != bsz for b in member_batches):
        raise ValueError("every member needs a batch of the same size")
    seq = max([b[0].shape[1] for b in member_batches] + [pad_to or 0])
    lengths = [b[0].shape[1] for b in member_batches]
    device = next(ens.adapters.parameters()).device
    stacked = [
        torch.stack([pad_right(b[k], seq, v) for b in member_batches])
        for k, v in ((0, 0), (1, -100), (2, 0))
    ]  # [M, B, T], where the batches were (the host, from a data loader)
    host = tuple(t if t.device.type == "cpu" else t.cpu() for t in stacked[1:])
    ids, labels, mask = (to_device(t, device) for t in stacked)
    return ids, labels, mask, lengths, host


def _prefix_states(
    ens: LoRAEnsemble,
    ids: torch.Tensor,
    mask: torch.Tensor,
    member_rows: Sequence[Sequence[int]] | None,
    max_tokens: int | None,
) -> torch.Tensor | None:
    """The frozen prefix's output ``[M, B, T, d]`` when the forward starts at block
    ``layers_from`` (a prefix cache or ``member_rows``), else None."""
    if member_rows is not None and len(member_rows) != ens.members:
        raise ValueError(f"{len(member_rows)} row lists for {ens.members} members")
    if ens.prefix_cache is None and member_rows is None:
        return None
    bsz, seq = ids.shape[1], ids.shape[2]
    flat_rows = None if member_rows is None else [int(r) for rs in member_rows for r in rs]
    prefix = ens.prefix_states(
        ids.reshape(-1, seq), mask.reshape(-1, seq), flat_rows, max_tokens=max_tokens
    )
    return prefix.reshape(ens.members, bsz, seq, -1)  # [M, B, T, d]


def _chunked_backward(
    ens: LoRAEnsemble,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    host: tuple[torch.Tensor, torch.Tensor],
    counts: torch.Tensor,
    prefix: torch.Tensor | None,
    lengths: list[int],
    rows: int,
    record_norms: bool,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Forward and backward of the step's loss in chunks of ``rows`` rows per member,
    accumulating the gradient.

    Returns the ``[M]`` summed token losses and, with ``record_norms``, the
    recorded ``[M, B]`` squared norms (total and per factor) of the step's loss.
    """
    ids, labels, mask = batch
    host_labels, host_mask = host
    bsz, seq = ids.shape[1], ids.shape[2]
    dev = ids.device
    # Everything accumulates where the gradients are; one copy to the host at the end.
    total = torch.zeros(ens.members, dtype=torch.float64, device=dev)
    sq_norms = torch.zeros(ens.members, bsz, dtype=torch.float64, device=dev)
    parts = {k: torch.zeros(ens.members, bsz, dtype=torch.float64, device=dev) for k in "AB"}
    for r0 in range(0, bsz, rows):
        sl = slice(r0, min(bsz, r0 + rows))
        recorder = None
        if record_norms:
            valid = host_mask[:, sl].reshape(-1, seq).bool()
            recorder = NormRecorder(ens.members, sl.stop - sl.start, valid=valid, device=dev)
        # the supervised positions of the chunk, read on the host
        keep = to_device((host_labels[:, sl, 1:] != -100).reshape(-1).nonzero().flatten(), dev)
        sums, _ = ens.member_ce_sums(
            ids[:, sl].reshape(-1, seq),
            labels[:, sl].reshape(-1, seq),
            mask[:, sl].reshape(-1, seq),
            step_context={"lengths": lengths, "first_row": first_row + r0, "recorder": recorder},
            prefix_states=None
            if prefix is None
            else prefix[:, sl].reshape(-1, seq, prefix.shape[-1]),
            supervised=keep,
        )
        (sums / counts).sum().backward()
        total += sums.detach().double()
        if recorder is not None:
            for k, dest in (None, sq_norms), *parts.items():
                got = recorder.on_device(k)
                if got is not None:
                    dest[:, sl] = got
    if not record_norms:
        return total.cpu(), None, {}
    return total.cpu(), sq_norms.cpu(), {k: v.cpu() for k, v in parts.items()}


def _own_loss_scale(
    labels: torch.Tensor, counts: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's supervised token count ``n_i`` ``[M, B]`` and the factor that turns
    its recorded squared norm into the squared norm of its own loss.

    The recorder saw the gradient of the step's loss, in which row i of member m
    weighs 1 / count_m (count_m: the member's supervised tokens in the step).  The
    row's own loss weighs its tokens by 1 / n_i (mean) or 1 (sum), so its squared
    norm is the recorded one times (count_m / n_i)^2, or count_m^2.
    """
    own = (labels[:, :, 1:] != -100).sum(-1).cpu().double()
    scale = counts.cpu().double().unsqueeze(1).square()
    if reduction == "mean":
        scale = scale / own.square()
    return own, scale
