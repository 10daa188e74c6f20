"""Opacus baselines of the per-example gradient norms.

:func:`opacus_per_example_grad_norms` materialises per-sample gradients with
Opacus' ``GradSampleModule``; :func:`opacus_ghost_norms` reads the per-sample
norms of ``GradSampleModuleFastGradientClipping`` with ghost clipping.  Both
compute the quantity defined in :mod:`gradfilter.norms.oracles`, which
re-exports them; Opacus is imported only when they are called.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from gradfilter.norms._oracle_common import (
    NormsResult,
    Reduction,
    _check_inputs,
    _finish,
    _model_kwargs,
    _preserve_modes,
    _result_dtype,
    _trainable,
    per_example_losses,
)

__all__ = ["opacus_ghost_norms", "opacus_per_example_grad_norms"]

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
