"""Per-layer rules: how a layer's per-example parameter gradients factor.

A rule looks at one call of a layer, its input ``x`` ``[B, T, d_in]`` (or token
ids ``[B, T]``) and the gradient of the loss with respect to its output ``g``
``[B, T, d_out]``, and returns, for each parameter it owns, a :class:`Factor`
such that the per-example gradient is a sum over token rows (see
:mod:`gradfilter.norms.reference`).  Nothing here is per-example yet: the engine
windows the rows by example and reduces them to squared norms.

Rules are keyed by exact layer type, because a subclass may change the maths.
Anything without a rule goes to the exact generic fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Factor:
    """Row factors of one parameter's gradient for one layer call.

    kind ``"outer"``: grad_i = sum_t left[i,t] (x) right[i,t]   (left [B,T,a], right [B,T,b])
    kind ``"sum"``:   grad_i = sum_t left[i,t]                  (left [B,T,a])
    kind ``"index"``: grad_i = sum_t onehot(left[i,t]) (x) right[i,t]  (left int [B,T])
    ``valid`` optionally masks rows that do not contribute (e.g. ``padding_idx``);
    ``num_rows`` is the first gradient dimension of an ``index`` factor.
    """

    kind: str
    left: torch.Tensor
    right: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    num_rows: int = 0


Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict[str, Factor]]


def _trainable(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.requires_grad


def _linear(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    # y = x W^T + b, W: [out, in]  ->  grad W = sum_t g_t (x) x_t
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = Factor("outer", g, x)
    if _trainable(module, "bias"):
        out["bias"] = Factor("sum", g)
    return out


def _conv1d(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    # GPT-2's Conv1D: y = x W + b, W: [in, out]  ->  grad W = sum_t x_t (x) g_t
    out = {}
    if _trainable(module, "weight"):
        out["weight"] = Factor("outer", x, g)
    if _trainable(module, "bias"):
        out["bias"] = Factor("sum", g)
    return out


def _embedding(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    # grad W[v] = sum_{t: x_t = v} g_t; PyTorch leaves the padding_idx row without gradient.
    valid = None if module.padding_idx is None else x != module.padding_idx
    return {"weight": Factor("index", x, g, valid=valid, num_rows=module.num_embeddings)}


def _layer_norm(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    # y = xhat * w + b  ->  grad w = sum_t g_t * xhat_t, grad b = sum_t g_t
    out = {}
    if _trainable(module, "weight"):
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        out["weight"] = Factor("sum", g * xhat)
    if _trainable(module, "bias"):
        out["bias"] = Factor("sum", g)
    return out


def _rms_norm(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    xhat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    return {"weight": Factor("sum", g * xhat)}


def _llama_rms_norm(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    # LlamaRMSNorm normalises in float32 and casts back before scaling by w.
    xf = x.to(torch.float32)
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return {"weight": Factor("sum", g * xhat.to(x.dtype))}


def _is_hf(module: nn.Module, name: str, where: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith(where)


_REGISTRY: dict[type, Rule] = {}


def register_rule(cls: type, rule: Rule) -> None:
    """Give layer type ``cls`` (exactly, not its subclasses) a fast-route rule.

    ``rule(module, x, g)`` returns ``{local parameter name: Factor}`` for the
    trainable ``weight`` / ``bias`` of one call; see :class:`Factor`.
    """
    _REGISTRY[cls] = rule


def linear_rule(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, Factor]:
    """The rule of ``y = x W^T (+ b)``: any layer whose per-row gradient is ``g (x) x``."""
    return _linear(module, x, g)


def rule_for(module: nn.Module) -> Rule | None:
    """The fast-route rule for ``module``'s own parameters, or None (fallback)."""
    cls = type(module)
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if cls is nn.Linear:
        return _linear
    if _is_hf(module, "StackedLinear", "gradfilter.norms.fused"):
        return _linear  # the ensemble's stacked LoRA factor: per row, like nn.Linear
    if _is_hf(module, "Conv1D", "transformers.pytorch_utils"):
        return _conv1d
    if cls is nn.Embedding:
        if module.max_norm is None and not module.scale_grad_by_freq and not module.sparse:
            return _embedding
        return None
    if cls is nn.LayerNorm:
        return _layer_norm if len(module.normalized_shape) == 1 else None
    if cls is nn.RMSNorm:
        return _rms_norm if len(module.normalized_shape) == 1 else None
    if _is_hf(module, "LlamaRMSNorm", "transformers.models.llama"):
        return _llama_rms_norm
    return None


RULE_PARAMS = ("weight", "bias")
"""Parameter names a rule may own; any other trainable parameter falls back."""
