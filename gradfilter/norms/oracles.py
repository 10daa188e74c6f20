r"""Reference implementations of per-example gradient norms for causal LMs.

These functions are deliberately simple and independent of each other. They
serve as test oracles and as baselines in benchmarks; they are not meant to be
fast. All of them compute exactly the same quantity, defined below.

Definition
----------
Inputs are a Hugging Face causal language model ``model`` (optionally wrapped
by ``peft``), token ids ``input_ids`` of shape ``[B, T]`` (long), target ids
``labels`` of shape ``[B, T]`` (long, ``-100`` = ignored) and an optional
``attention_mask`` of shape ``[B, T]`` (1 = real token, 0 = padding, padding
on the right or on the left). Labels at padded positions are ignored whatever
their value.

With ``z_{i,t} = logits[i, t]`` (shape ``[V]``) the model output for example
``i``, the usual causal shift makes position ``t`` predict ``labels[i, t+1]``.
Let ``S_i = {t : labels[i, t+1] != -100}`` and ``n_i = |S_i|``. The
per-example loss is

.. math::

    L_i(\theta) = \frac{1}{n_i} \sum_{t \in S_i}
        \mathrm{CE}(z_{i,t}, \mathrm{labels}[i, t+1]),\qquad
    \mathrm{CE}(z, y) = \log\sum_v e^{z_v} - z_y,

for ``reduction="mean"``; ``reduction="sum"`` omits the division by ``n_i``.
The cross-entropy is evaluated in the dtype of the logits (float64 for a
float64 model).

``theta`` is the set of parameters with ``requires_grad=True`` (for a LoRA
model: the adapter matrices). The result is the vector of L2 norms

.. math::

    g_i = \lVert \nabla_\theta L_i \rVert_2
        = \Big(\sum_{p \in \theta} \lVert \nabla_p L_i \rVert_F^2\Big)^{1/2},
    \qquad i = 1..B,

returned as a tensor of shape ``[B]`` in float64 if any trainable parameter is
float64 and in float32 otherwise. An example with ``n_i = 0`` has no loss and
gets ``NaN``. With ``per_param=True`` the functions instead return
``{name: ||grad_p L_i||_F^2 for i in 1..B}`` (tensors of shape ``[B]``) keyed by
the names of ``model.named_parameters()``.

When an attention mask is given, the model receives
``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)``, so that a
left-padded example sees positions ``0, 1, ...`` on its real tokens, exactly
as when it is run without padding. The model is always called with
``use_cache=False``.

Implementations
---------------
* :func:`loop_per_example_grad_norms` -- the oracle: one example at a time,
  cut to its real tokens, plain ``torch.autograd.grad``.
* :func:`functorch_per_example_grad_norms` -- ``torch.func.vmap`` of
  ``torch.func.grad`` over the batch, through ``torch.func.functional_call``.
* :func:`opacus_per_example_grad_norms` -- Opacus ``GradSampleModule`` hooks
  (materialised per-sample gradients).
* :func:`opacus_ghost_norms` -- Opacus ``GradSampleModuleFastGradientClipping``
  with ghost clipping (norms without materialising per-sample gradients of
  ``nn.Linear`` layers).

The two Opacus baselines are implemented in :mod:`gradfilter.norms.oracles_opacus`
and the shared pieces of the definition in :mod:`gradfilter.norms._oracle_common`;
all the names above are importable from this module.
"""

from __future__ import annotations

import torch
from torch import nn

from gradfilter.norms._oracle_common import (
    IGNORE_INDEX,
    NormsResult,
    Reduction,
    _check_inputs,
    _finish,
    _model_kwargs,
    _preserve_modes,
    _result_dtype,
    _trainable,
    causal_position_ids,
    per_example_losses,
)
from gradfilter.norms.oracles_opacus import opacus_ghost_norms, opacus_per_example_grad_norms

__all__ = [
    "IGNORE_INDEX",
    "Reduction",
    "causal_position_ids",
    "functorch_per_example_grad_norms",
    "loop_per_example_grad_norms",
    "opacus_ghost_norms",
    "opacus_per_example_grad_norms",
    "per_example_losses",
]


# ----------------------------------------------------------------------------
# 1. Per-example loop (the oracle)
# ----------------------------------------------------------------------------


def loop_per_example_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    per_param: bool = False,
) -> NormsResult:
    """Per-example gradient norms by running each example alone (the oracle).

    For each ``i`` the example is cut to its real tokens (positions where
    ``attention_mask[i] == 1``; all positions without a mask), run with batch
    size 1 and no padding (attention mask of ones, positions ``0..n-1``), and
    ``torch.autograd.grad(L_i, theta)`` gives the gradient. ``.grad`` fields
    are never touched and the model runs in the mode the caller left it in.
    The real tokens of an example are assumed to be contiguous (ordinary left
    or right padding).

    Args:
        model: causal LM returning ``.logits`` of shape ``[1, n, V]``.
        input_ids: ``[B, T]`` long.
        labels: ``[B, T]`` long, ``-100`` = ignored.
        attention_mask: optional ``[B, T]``, 1 = real token, 0 = padding.
        reduction: ``"mean"`` (default) or ``"sum"`` over the example's tokens.
        per_param: return ``{name: squared norms [B]}`` instead of norms.

    Returns:
        ``[B]`` norms (NaN for examples without labels), or the per-parameter
        dictionary of squared norms.
    """
    labels, attention_mask = _check_inputs(input_ids, labels, attention_mask, reduction)
    params = _trainable(model)
    out_dtype = _result_dtype(params)
    batch = input_ids.shape[0]
    device = input_ids.device
    sq_norms = {n: torch.zeros(batch, dtype=out_dtype, device=device) for n, _ in params}
    counts = torch.zeros(batch, dtype=torch.long)
    with _preserve_modes(model), torch.enable_grad():
        for i in range(batch):
            if attention_mask is None:
                ids_i, labels_i, mask_i = input_ids[i : i + 1], labels[i : i + 1], None
            else:
                keep = attention_mask[i] != 0
                ids_i = input_ids[i, keep].unsqueeze(0)
                labels_i = labels[i, keep].unsqueeze(0)
                mask_i = torch.ones_like(ids_i)
            n_i = int((labels_i[:, 1:] != IGNORE_INDEX).sum())
            counts[i] = n_i
            if n_i == 0:
                continue
            logits = model(**_model_kwargs(ids_i, mask_i)).logits
            loss = per_example_losses(logits, labels_i, reduction)[0][0]
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            for (name, _), g in zip(params, grads, strict=False):
                if g is not None:
                    sq_norms[name][i] = g.detach().to(out_dtype).pow(2).sum()
    return _finish(sq_norms, counts, per_param)


# ----------------------------------------------------------------------------
# 2. torch.func: vmap(grad(...))
# ----------------------------------------------------------------------------


def functorch_per_example_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    per_param: bool = False,
) -> NormsResult:
    """Per-example gradient norms with ``torch.func.vmap(torch.func.grad(...))``.

    The model is made functional with :func:`torch.func.functional_call`: the
    trainable parameters form the differentiated argument, the frozen
    parameters and the buffers are passed alongside without gradient. ``vmap``
    maps over the batch; inside it every example is fed to the model as a
    batch of one (``[1, T]``, padding included) with its own attention mask
    and position ids, so the result is ``grad L_i`` stacked over ``i`` as
    ``[B, *p.shape]`` for each trainable ``p``.

    Memory is ``B`` times the size of the trainable parameters plus the
    vmapped activations. The model must use an attention implementation whose
    mask handling has no data-dependent control flow (``eager`` works; the
    ``sdpa`` path inspects the mask values and fails under ``vmap``).
    Dropout, if active, is sampled independently per example.

    Args and returns: as :func:`loop_per_example_grad_norms`.
    """
    from torch.func import functional_call, grad, vmap

    labels, attention_mask = _check_inputs(input_ids, labels, attention_mask, reduction)
    params = _trainable(model)
    out_dtype = _result_dtype(params)
    trainable = {n: p.detach() for n, p in params}
    # Frozen parameters and buffers; named_parameters/named_buffers drop tied duplicates
    # and functional_call re-ties them (tie_weights=True).
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))

    def example_loss(
        theta: dict[str, torch.Tensor],
        ids: torch.Tensor,
        lab: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        one_mask = None if mask is None else mask.unsqueeze(0)
        logits = functional_call(
            model, (theta, constants), args=(), kwargs=_model_kwargs(ids.unsqueeze(0), one_mask)
        ).logits
        return per_example_losses(logits, lab.unsqueeze(0), reduction)[0][0]

    in_dims = (None, 0, 0, None if attention_mask is None else 0)
    per_example_grad = vmap(grad(example_loss), in_dims=in_dims, randomness="different")
    try:
        with torch.enable_grad():
            grads = per_example_grad(trainable, input_ids, labels, attention_mask)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise RuntimeError(
            "torch.func.vmap could not trace the model's forward pass (attention "
            f"implementation: {impl!r}). Mask handling with data-dependent control flow, "
            "such as the 'sdpa' path, is not vmappable; load the model with "
            "attn_implementation='eager'."
        ) from err
    sq_norms = {n: g.to(out_dtype).pow(2).flatten(1).sum(1) for n, g in grads.items()}
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    # Keep the order of model.named_parameters().
    return _finish({n: sq_norms[n] for n, _ in params}, counts, per_param)
