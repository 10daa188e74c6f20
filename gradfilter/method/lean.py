"""Frozen blocks that keep less for the backward.

An ensemble's base model is frozen: its backward only carries gradients back to
the adapters' inputs.  Two blocks of Llama-family models save more than that
needs, per token and layer (SmolLM2-135M in bfloat16, ``benchmarks/bench_memory.py``):

* the gated MLP ``down(silu(gate(x)) * up(x))`` keeps ``gate``, ``silu(gate)``
  and ``up`` (three ``[tokens, f]`` tensors, a third of everything saved);
  :class:`SwiGLU` keeps ``gate`` and ``up`` and recomputes ``silu(gate)`` in the
  backward, with the very ops autograd uses, so the gradients are bitwise the
  same;
* RMSNorm normalises in float32 and keeps that float32 copy of its input;
  :class:`FrozenRMSNorm` keeps the input in its own dtype and the ``[tokens, 1]``
  inverse root mean square, and computes the input gradient from them with the
  steps autograd takes through the model's code, in the same order.

:func:`lean_activations` swaps the ``forward`` of every such module whose weights
are frozen, and returns the function that restores them.  The forward outputs are
bitwise those of the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: Module classes with the gated-SiLU MLP ``down(act(gate(x)) * up(x))``.
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
#: Module classes with Llama's RMSNorm (float32 statistics, ``weight * x.to(dtype)``).
RMSNORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            g_up = grad * F.silu(gate)
        return g_gate, g_up


class FrozenRMSNorm(torch.autograd.Function):
    """Llama's RMSNorm with a frozen weight: ``weight * (x * rstd).to(dtype)`` with
    ``rstd = rsqrt(mean(x^2) + eps)`` in float32; saves ``x`` and ``rstd``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xf = x.to(_stats_dtype(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (xf * rstd).to(x.dtype), rstd  # rstd: kept, not differentiated

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, weight, output[1])

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor, _rstd_grad: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # autograd's own steps for the model's code, in its order (so the bits agree):
        # y = w * cast(n), n = xf * r, r = rsqrt(mean(xf^2) + eps).
        xf = x.to(rstd.dtype)
        dn = (grad * weight).to(rstd.dtype)
        direct = dn * rstd
        dr = (dn * xf).sum(-1, keepdim=True)
        dvar = (-0.5 * dr) * rstd.pow(3)
        dsq = dvar.expand_as(xf) / xf.shape[-1]
        dx = direct + dsq * (2 * xf)
        return dx.to(x.dtype), None, None


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, as the model's own RMSNorm; float64 stays float64 (checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def _lean_mlp(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(SwiGLU.apply(module.gate_proj(x), module.up_proj(x)))

    return forward


def _lean_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return FrozenRMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)[0]

    return forward


def lean_activations(model: nn.Module) -> Callable[[], None]:
    """Swap in the lean blocks for every frozen gated-SiLU MLP and RMSNorm of
    ``model``; returns the function that puts the model's own back."""
    swapped: list[nn.Module] = []
    for module in model.modules():
        name = type(module).__name__
        frozen = not any(p.requires_grad for p in module.parameters())
        if not frozen or "forward" in vars(module):
            continue
        if name in MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            if all(hasattr(module, k) for k in ("gate_proj", "up_proj", "down_proj")):
                module.forward = _lean_mlp(module)
                swapped.append(module)
        elif name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = _lean_norm(module)
            swapped.append(module)

    def restore() -> None:
        for module in swapped:
            vars(module).pop("forward", None)
        swapped.clear()

    return restore
