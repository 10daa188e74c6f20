"""Public entry point: :func:`per_example_grad_norms`."""

from __future__ import annotations

import torch
from torch import nn

from gradfilter.norms.engine import _Pass

REDUCTIONS = ("mean", "sum")


def per_example_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    per_param: bool = False,
    train: bool = False,
    model_kwargs: dict | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Per-example L2 norms of the gradient of each example's LM loss.

    For example i with supervised positions ``S_i = {t : labels[i, t+1] != -100}``
    (the causal shift of Hugging Face causal LMs),
    ``L_i = (1/|S_i|) sum_{t in S_i} CE(logits[i, t], labels[i, t+1])``
    (``reduction="mean"``; ``"sum"`` drops the ``1/|S_i|``), and the result is
    ``||d L_i / d theta||_2`` over every parameter theta of ``model`` with
    ``requires_grad=True``.

    Args:
        model: a Hugging Face causal LM (GPT-2, Llama family, ...), plain or
            wrapped by peft; any trainable parameters.
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` target ids, -100 where no loss is taken (prompt, padding).
        attention_mask: ``[B, T]`` with 1 for real tokens and 0 for padding, on the
            right or the left; None means no padding.
        reduction: ``"mean"`` or ``"sum"`` over an example's supervised tokens.
        per_param: return ``{parameter name: squared norms [B]}`` instead.
        train: run the model in train mode (dropout active) instead of eval mode.
        model_kwargs: extra keyword arguments for the model's forward (for example a
            :class:`gradfilter.LoRAEnsemble`'s ``prefix_states``).

    Returns:
        float32 ``[B]`` norms (or the per-parameter dict of squared norms).  An
        example with no supervised token gets NaN.

    One forward and one backward for the batch; per-example gradients of the
    batch are never stored.  The model is left as it was found: no hooks,
    ``.grad`` untouched, train/eval mode restored.
    """
    input_ids, labels, attention_mask = _check_inputs(model, input_ids, labels, attention_mask)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if _checkpointing(model):
        raise ValueError(
            "gradient checkpointing re-runs layers in the backward; disable it "
            "(model.gradient_checkpointing_disable()) for per-example norms"
        )
    bsz = input_ids.shape[0]
    was_training = model.training
    engine = _Pass(model)
    if bsz == 0:
        sq = {s.name: torch.zeros(0) for s in engine.params}
    else:
        model.train(train)
        device = _device_of(model)
        try:
            # The labels and mask as given (on the host when the data loader's
            # tensors are) tell the engine the batch's shape without a device read.
            sq = engine.run(
                input_ids.to(device),
                labels.to(device),
                attention_mask.to(device),
                reduction,
                model_kwargs,
                host=(labels, attention_mask),
            )
        finally:
            model.train(was_training)
    if per_param:
        return sq
    total = torch.stack(list(sq.values())).sum(0)
    return total.sqrt()


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a [batch, tokens] tensor, got "
            f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}"
        )
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if not torch.is_tensor(labels) or labels.shape != input_ids.shape:
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {got}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer ids (-100 = ignored), got {labels.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        got = (
            tuple(attention_mask.shape)
            if torch.is_tensor(attention_mask)
            else type(attention_mask).__name__
        )
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}"
        )
    bad = ~((attention_mask == 0) | (attention_mask == 1))
    if bool(bad.any()):
        row = int(bad.any(-1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} holds values other than 0 and 1")
    vocab = _vocab_size(model)
    if vocab is not None and input_ids.numel():
        bad = (input_ids < 0) | (input_ids >= vocab)
        bad &= attention_mask.bool()
        if bool(bad.any()):
            row = int(bad.any(-1).nonzero()[0])
            raise ValueError(
                f"input_ids row {row} holds token id {int(input_ids[row][bad[row]][0])} "
                f"outside the model's vocabulary [0, {vocab})"
            )
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            row = int(bad.any(-1).nonzero()[0])
            raise ValueError(
                f"labels row {row} holds {int(labels[row][bad[row]][0])}: labels must be "
                f"token ids in [0, {vocab}) or -100"
            )
    # A label counts only where it and the token that predicts it are real tokens,
    # so a padded example gives exactly what it gives alone.
    labels = labels.masked_fill(attention_mask == 0, -100)
    if labels.shape[1] > 1:
        labels[:, 1:] = labels[:, 1:].masked_fill(attention_mask[:, :-1] == 0, -100)
    return input_ids, labels, attention_mask


def _vocab_size(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    return getattr(emb, "num_embeddings", None)


def _checkpointing(model: nn.Module) -> bool:
    # Hugging Face marks every module that re-runs in the backward this way.
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
