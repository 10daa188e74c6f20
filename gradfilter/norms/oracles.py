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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

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

#: Label value excluded from the loss (the Hugging Face / PyTorch convention).
IGNORE_INDEX = -100

Reduction = Literal["mean", "sum"]

#: Either a tensor of norms ``[B]`` or a mapping ``name -> squared norms [B]``.
NormsResult = torch.Tensor | dict[str, torch.Tensor]


# ----------------------------------------------------------------------------
# Shared pieces of the definition
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# 3. Opacus
# ----------------------------------------------------------------------------

_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


@contextmanager
def _opacus_session(
    model: nn.Module, params: list[tuple[str, nn.Parameter]]
) -> Iterator[list[nn.Module]]:
    """Prepare ``model`` for Opacus hooks and undo every side effect afterwards.

    Opacus only records activations of modules whose ``training`` flag is
    set. Rather than switching the whole model to train mode (which would
    enable dropout everywhere), only the modules that directly own trainable
    parameters get ``training = True``, non-recursively; for ``nn.Linear``,
    ``nn.Embedding``, norms and similar leaf layers the flag changes nothing
    in their forward, so the computation is the one of the caller's mode.
    On exit the ``training`` flag of every module and the ``.grad`` of every
    trainable parameter are restored, and attributes that Opacus leaves on
    modules (``activations``, ``max_batch_len``...) are removed.

    Yields:
        The list of modules that directly own trainable parameters.
    """
    saved_grads = {p: p.grad for _, p in params}
    preexisting = {
        (m, attr) for m in model.modules() for attr in _OPACUS_MODULE_ATTRS if attr in m.__dict__
    }
    owners = [
        m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    try:
        with _preserve_modes(model):
            for _, p in params:
                p.grad = None
            for m in owners:
                m.training = True
            yield owners
    finally:
        for p, g in saved_grads.items():
            p.grad = g
        for m in model.modules():
            for attr in _OPACUS_MODULE_ATTRS:
                if attr in m.__dict__ and (m, attr) not in preexisting:
                    delattr(m, attr)


def _opacus_wrap(model: nn.Module, cls: type, **kwargs: Any) -> nn.Module:
    """Wrap with an Opacus grad-sample class, with a readable error on unsupported layers."""
    try:
        return cls(model, batch_first=True, loss_reduction="sum", strict=True, **kwargs)
    except NotImplementedError as err:
        raise NotImplementedError(
            "Opacus cannot compute per-sample gradients for this model: a module that owns "
            "trainable parameters also has buffers (Opacus' functorch fallback, used for "
            "layers without a registered grad sampler, refuses such modules). Freeze those "
            f"parameters or use another baseline. Opacus said: {err}"
        ) from err


def _opacus_forward_backward(
    wrapped: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    reduction: Reduction,
) -> torch.Tensor:
    """One forward of the whole batch and one backward of ``sum_i L_i``; returns ``n_i``."""
    with torch.enable_grad(), warnings.catch_warnings():
        # PyTorch warns when a full backward hook fires on a module whose inputs do not
        # require grad (the first LoRA layer behind frozen embeddings); that is expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        logits = wrapped(**_model_kwargs(input_ids, attention_mask)).logits
        losses, counts = per_example_losses(logits, labels, reduction)
        # Examples without labels contribute 0 (not NaN) to the sum.
        losses.sum().backward()
    return counts


def opacus_per_example_grad_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    per_param: bool = False,
) -> NormsResult:
    """Per-example gradient norms from Opacus' ``GradSampleModule``.

    The model is wrapped in ``opacus.GradSampleModule(batch_first=True,
    loss_reduction="sum")``; one forward pass over the padded batch and one
    backward pass of ``sum_i L_i`` make the hooks store ``p.grad_sample``
    (``[B, *p.shape]``, row ``i`` equal to ``grad_p L_i`` because ``L_i``
    depends on example ``i`` only). Layers with a registered grad sampler
    (``nn.Linear`` -- which includes peft's ``lora_A``/``lora_B`` --,
    ``nn.Embedding``, ``nn.LayerNorm``, ...) use closed-form formulas, e.g.
    ``grad_sample = einsum("btj,bti->bji", dL/dy, x)`` for a linear layer;
    other trainable layers (GPT-2's ``Conv1D``, ``LlamaRMSNorm``) fall back to
    Opacus' per-layer ``torch.func`` path.

    Side effects are undone before returning: the hooks are removed
    (``GradSampleModule._close``), the ``grad_sample`` and other attributes
    Opacus adds are deleted and every ``.grad`` is restored to its previous
    value (``None`` for a fresh model).

    Mode: Opacus records activations only for modules in training mode. Only
    the modules that own trainable parameters are switched to training mode
    (non-recursively), so dropout layers (including peft's ``lora_dropout``)
    stay in the caller's mode and the result equals the other baselines. (If
    the whole model were put in train mode instead, LoRA dropout would have
    to be 0 for the results to agree.) All ``training`` flags are restored.

    Args and returns: as :func:`loop_per_example_grad_norms`.

    Raises:
        NotImplementedError: a module that owns trainable parameters is not
            supported by Opacus (e.g. it has buffers), or Opacus did not
            produce a per-sample gradient for some trainable parameter.
    """
    from opacus import GradSampleModule

    labels, attention_mask = _check_inputs(input_ids, labels, attention_mask, reduction)
    params = _trainable(model)
    out_dtype = _result_dtype(params)
    batch = input_ids.shape[0]
    with _opacus_session(model, params):
        wrapped = _opacus_wrap(model, GradSampleModule)
        try:
            counts = _opacus_forward_backward(wrapped, input_ids, labels, attention_mask, reduction)
            sq_norms = {}
            for name, p in params:
                gs = getattr(p, "grad_sample", None)
                if not isinstance(gs, torch.Tensor) or gs.shape != (batch, *p.shape):
                    raise NotImplementedError(
                        f"Opacus produced no usable per-sample gradient for {name!r} "
                        f"(got {type(gs).__name__}"
                        f"{'' if not isinstance(gs, torch.Tensor) else ' ' + str(tuple(gs.shape))}"
                        "); its layer type may not be supported."
                    )
                sq_norms[name] = gs.detach().to(out_dtype).pow(2).flatten(1).sum(1)
        finally:
            wrapped._close()  # removes hooks and grad_sample/_forward_counter/... attributes
    return _finish(sq_norms, counts, per_param)


def opacus_ghost_norms(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: Reduction = "mean",
    per_param: bool = False,
) -> NormsResult:
    r"""Per-example gradient norms from Opacus' ghost-clipping norm computation.

    Uses ``opacus.grad_sample.GradSampleModuleFastGradientClipping`` with
    ``use_ghost_clipping=True`` and reads the per-sample norms it computes
    during a single backward pass of ``sum_i L_i`` (no optimizer, no clipping
    and no second backward are involved). For an ``nn.Linear`` layer with
    input ``a_i`` (``[T, d_in]``) and output gradient ``g_i`` (``[T, d_out]``)
    the squared norm is obtained without forming ``g_i^T a_i``:

    .. math::

        \lVert g_i^T a_i \rVert_F^2 = \langle g_i g_i^T,\ a_i a_i^T \rangle_F ,

    which costs ``O(T^2 (d_in + d_out))``; other trainable layers
    materialise their per-sample gradients and take their norms. Ghost
    clipping does not support a parameter shared by several ``nn.Linear`` /
    ``nn.Embedding`` layers (tied embeddings being trained); Opacus raises
    ``NotImplementedError`` then.

    Mode and clean-up are handled as in :func:`opacus_per_example_grad_norms`.

    Args and returns: as :func:`loop_per_example_grad_norms`.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    labels, attention_mask = _check_inputs(input_ids, labels, attention_mask, reduction)
    params = _trainable(model)
    out_dtype = _result_dtype(params)
    batch = input_ids.shape[0]
    with _opacus_session(model, params):
        wrapped = _opacus_wrap(
            model,
            GradSampleModuleFastGradientClipping,
            max_grad_norm=1.0,
            use_ghost_clipping=True,
        )
        try:
            counts = _opacus_forward_backward(wrapped, input_ids, labels, attention_mask, reduction)
            sq_norms = {}
            for name, p in params:
                ns = getattr(p, "_norm_sample", None)
                if not isinstance(ns, torch.Tensor) or ns.shape != (batch,):
                    raise NotImplementedError(
                        f"Opacus produced no per-sample norm for {name!r}; its layer type may "
                        "not be supported."
                    )
                sq_norms[name] = ns.detach().to(out_dtype).pow(2)
        finally:
            wrapped._close()
    return _finish(sq_norms, counts, per_param)
