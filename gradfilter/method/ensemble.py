"""M LoRA members over one frozen base, in one forward and one backward.

The member dimension is folded into the batch: a batch of B examples becomes
``M * B`` rows, member-major (rows ``m*B .. m*B+B-1`` belong to member m).
Frozen base layers see one GEMM over all rows; each adapted layer holds
stacked factors ``A: [M, r, d_in]`` and ``B: [M, d_out, r]`` and applies them
per member block with a batched matmul:

    y = x W0^T (+ b) + s * (dropout_m(x) A_m^T) B_m^T,   s = alpha / r  (rsLoRA: alpha / sqrt(r))

Members differ by seed: LoRA init, data order and dropout masks.  Because a
row only reaches its own member's slice of ``A`` and ``B``, the per-row
gradient of the stacked parameters is the per-example gradient of that
member, and :func:`gradfilter.per_example_grad_norms` on the folded batch gives
all ``[M, B]`` norms at once.  Elementwise optimisers (AdamW) over the stacked
parameters are exactly M independent optimisers.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import zlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.func import stack_module_state

from gradfilter.norms.fused import NormRecorder, StackedMatmul
from gradfilter.norms.layers import linear_rule, register_rule

ATTENTION_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class StackedLinear(nn.Module):
    """M bias-free linear maps ``[M, out, in]`` applied to member-major row blocks."""

    def __init__(self, weight: torch.Tensor, part: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.part = part  # the name its norms are also summed under ("A" / "B")
        # Set while a training step records per-example norms (see gradfilter.norms.fused).
        self.recorder: NormRecorder | None = None

    @property
    def members(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.members
        if x.shape[0] % m:
            raise ValueError(f"{x.shape[0]} rows cannot be split between {m} members")
        return StackedMatmul.apply(x.to(self.weight.dtype), self.weight, self.recorder, self.part)


# Per row, the gradient of a member's slice is g (x) x, as for nn.Linear.
register_rule(StackedLinear, linear_rule)


class _Adapter(nn.Module):
    """The stacked LoRA factors of one adapted layer."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = StackedLinear(a, "A")
        self.lora_B = StackedLinear(b, "B")
        self.scaling = scaling
        self.dropout = dropout


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # GPT-2 Conv1D: weight [in, out]
    return w.shape[0], w.shape[1]


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _default_targets(model: nn.Module) -> list[str]:
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    if mtype in ATTENTION_TARGETS:
        return ATTENTION_TARGETS[mtype]
    return LLAMA_LIKE_TARGETS


def _match(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


class LoRAEnsemble(nn.Module):
    """An ensemble of M LoRA adapters on one frozen causal LM.

    Args:
        base_model: a Hugging Face causal LM; its parameters are frozen.
        members: M, the number of adapters.
        r, alpha: LoRA rank and alpha; ``use_rslora`` scales by alpha/sqrt(r).
        dropout: LoRA dropout probability (train mode only; each member draws
            its own masks from its own generator).
        target_modules: layer name suffixes to adapt; None = all attention
            projections; ``"all-linear"`` = every Linear / Conv1D but the LM head.
        seed: member m's seed is ``seed + m`` unless ``member_seeds`` is given.
        layers_from: k; adapt only targets inside decoder layers ``k .. L-1``
            (0 = every match, also outside the decoder layers).  A target keeps
            its init and dropout keys whatever k is.
        prefix_cache: with k > 0, compute the frozen prefix (embeddings and
            layers below k) once per example and start the folded forward at
            block k (:mod:`gradfilter.method.prefix`); the cache is keyed by the
            ``rows`` / ``member_rows`` given to the passes.
    """

    def __init__(
        self,
        base_model: nn.Module,
        members: int = 5,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.05,
        target_modules: Sequence[str] | str | None = None,
        seed: int = 0,
        *,
        member_seeds: Sequence[int] | None = None,
        use_rslora: bool = False,
        layers_from: int = 0,
        prefix_cache: bool = False,
    ) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        if r < 1:
            raise ValueError(f"rank r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.member_seeds = list(member_seeds) if member_seeds is not None else [
            seed + m for m in range(members)
        ]
        if len(self.member_seeds) != members:
            raise ValueError(f"{len(self.member_seeds)} member seeds for {members} members")
        self.members, self.r, self.alpha, self.dropout = members, r, alpha, dropout
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.base = base_model
        for p in self.base.parameters():
            p.requires_grad_(False)
        # Hugging Face causal LMs that take a tensor of positions for the LM head.
        self._keeps_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters

        if target_modules is None:
            target_modules = _default_targets(base_model)
        self.target_modules = target_modules
        lm_head = base_model.get_output_embeddings() if hasattr(base_model, "get_output_embeddings") else None
        matched: list[tuple[str, nn.Module]] = []
        for name, module in base_model.named_modules():
            if not (isinstance(module, nn.Linear) or _is_conv1d(module)) or module is lm_head:
                continue
            if target_modules == "all-linear" or (
                not isinstance(target_modules, str) and _match(name, target_modules)
            ):
                matched.append((name, module))
        if not matched:
            raise ValueError(
                f"no Linear or Conv1D layer of the model matches target_modules={target_modules!r}"
            )
        self.layers_from = _check_layers_from(base_model, layers_from)
        # A target's dropout key uses its position among all matches, so it is the
        # same whatever layers_from leaves out.
        self._layer_index: dict[str, int] = {}
        self._targets: dict[str, nn.Module] = {}
        if self.layers_from:
            from gradfilter.method.prefix import decoder_layers

            blocks = decoder_layers(base_model)[0]
        for index, (name, module) in enumerate(matched):
            if self.layers_from and not _in_layers_from(blocks, name, self.layers_from):
                continue
            self._targets[name] = module
            self._layer_index[name] = index
        if not self._targets:
            raise ValueError(
                f"no layer matching target_modules={target_modules!r} lies in decoder layers "
                f"{self.layers_from}..; lower layers_from or widen the targets"
            )

        param = next(base_model.parameters())
        # Adapters (and so the optimiser state) stay in float32 over a half-precision base.
        adapter_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.adapters = nn.ModuleDict()
        for name, module in self._targets.items():
            d_in, d_out = _in_out(module)
            a, b = self._init_factors(name, d_in, d_out, adapter_dtype, param.device)
            self.adapters[_key(name)] = _Adapter(a, b, self.scaling, dropout)

        self.step = 0  # optimiser steps taken; keys the dropout masks
        self._active = False
        self._context: dict | None = None
        self._hooks = [
            module.register_forward_hook(
                self._make_hook(self.adapters[_key(name)], self._layer_index[name]))
            for name, module in self._targets.items()
        ]
        self._prefix_states: torch.Tensor | None = None  # folded, for the pass in flight
        self.prefix_cache = None
        if prefix_cache:
            if not self.layers_from:
                raise ValueError(
                    "prefix_cache needs layers_from > 0: with adapters from layer 0 no frozen "
                    "prefix is shared by the members"
                )
            from gradfilter.method.prefix import PrefixCache

            self.prefix_cache = PrefixCache(base_model, self.layers_from)
        self.eval()

    # -- construction ---------------------------------------------------------------

    def _init_factors(self, layer: str, d_in: int, d_out: int, dtype: torch.dtype,
                      device: torch.device):
        """Per-member init from the member's seed: A as nn.Linear's default
        (Kaiming-uniform), B zero, stacked with ``torch.func.stack_module_state``."""
        mods = []
        for s in self.member_seeds:
            gen = torch.Generator().manual_seed(_mix(s, zlib.crc32(layer.encode())))
            lin = nn.Linear(d_in, self.r, bias=False)
            bound = 1.0 / math.sqrt(d_in)
            with torch.no_grad():
                lin.weight.copy_(torch.rand(self.r, d_in, generator=gen) * 2 * bound - bound)
            mods.append(lin)
        params, _ = stack_module_state(mods)
        a = params["weight"].detach().to(device=device, dtype=dtype).clone()
        b = torch.zeros(self.members, d_out, self.r, dtype=dtype, device=device)
        return a, b

    def _make_hook(self, adapter: _Adapter, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if not self._active:
                return None
            x = args[0]
            if self.training and adapter.dropout > 0:
                x = self._dropout(x, adapter.dropout, layer)
            delta = adapter.lora_B(adapter.lora_A(x)) * adapter.scaling
            return output + delta.to(output.dtype)

        return hook

    def _dropout(self, x: torch.Tensor, p: float, layer: int) -> torch.Tensor:
        """Inverted dropout whose mask for a row is a function of (member seed,
        optimiser step, layer, row of the member's batch) alone, drawn over the
        member's own batch length.  So a member gets the same masks whether it
        trains alone or with others, and however a step is split into chunks."""
        m = self.members
        blocks = x.reshape(m, -1, *x.shape[1:])
        ctx = self._context or {}
        lengths = ctx.get("lengths") or [x.shape[1]] * m
        first = ctx.get("first_row", 0)
        mask = torch.ones_like(blocks)
        for i in range(m):
            for j in range(blocks.shape[1]):
                key = _mix(self.member_seeds[i], ((self.step * 65537 + layer) * 1000003) + first + j)
                gen = torch.Generator(device=x.device).manual_seed(key)
                keep = torch.rand((lengths[i], *x.shape[2:]), generator=gen, device=x.device) >= p
                mask[i, j, : lengths[i]] = keep.to(x.dtype) / (1.0 - p)
        return (blocks * mask).reshape(x.shape)

    # -- running --------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    @contextmanager
    def _folded(self, context: dict | None = None) -> Iterator[None]:
        self._active, self._context = True, context
        try:
            yield
        finally:
            self._active, self._context = False, None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Run the base on member-major folded rows ``[M * B, T]`` with the adapters.

        ``prefix_states`` ``[M * B, T, d]`` (the hidden states entering decoder
        block ``layers_from``, see :mod:`gradfilter.method.prefix`) starts the forward
        at that block; ``input_ids`` then only give the shape."""
        if input_ids.shape[0] % self.members:
            raise ValueError(
                f"{input_ids.shape[0]} rows is not a multiple of {self.members} members; "
                "fold a batch with LoRAEnsemble.fold"
            )
        prefix = kwargs.pop("prefix_states", None)
        if prefix is None:
            prefix = self._prefix_states
        with self._folded(kwargs.pop("dropout_context", None)):
            if prefix is None:
                return self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return self._forward_from_prefix(input_ids, attention_mask, prefix, kwargs)

    def _forward_from_prefix(self, input_ids, attention_mask, prefix, kwargs):
        from gradfilter.method.prefix import run_from_layer

        if not self.layers_from:
            raise ValueError("prefix_states need layers_from > 0")
        if tuple(prefix.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"prefix_states {tuple(prefix.shape)} do not match the folded rows "
                f"{tuple(input_ids.shape)}"
            )
        if self.base.training:
            raise ValueError("a cached prefix is computed in eval mode; run the base in eval mode")
        positions = kwargs.get("position_ids")
        if positions is not None:
            real = (attention_mask.bool() if attention_mask is not None
                    else torch.ones_like(input_ids, dtype=torch.bool))
            want = torch.arange(input_ids.shape[1], device=positions.device).expand_as(real)
            if not bool((positions.expand_as(real) == want)[real].all()):
                raise ValueError("a cached prefix assumes positions 0, 1, ... on real tokens "
                                 "(right padding)")
        return run_from_layer(self.base, self.layers_from, prefix, attention_mask, **kwargs)

    def prefix_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> torch.Tensor | None:
        """``[B, T, d]`` hidden states entering block ``layers_from`` for a
        right-padded batch, from the prefix cache (``rows``: the examples' row
        indices, the cache keys; None computes them without storing), or None
        when the ensemble has no prefix cache."""
        if self.prefix_cache is None:
            if rows is not None:
                raise ValueError("row indices key the prefix cache; construct the ensemble with "
                                 "layers_from > 0 and prefix_cache=True")
            return None
        return self.prefix_cache.states(input_ids, attention_mask, rows, max_tokens=max_tokens)

    def fold(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, ...] -> [M * B, ...]``: every member sees the same batch."""
        return None if t is None else t.repeat(self.members, *([1] * (t.dim() - 1)))

    def per_example_grad_norms(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
        per_param: bool = False,
        rows: Sequence[int] | None = None,
        max_tokens: int | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """``[M, B]``: norm of each example's loss gradient for each member's LoRA
        parameters, from one forward and one backward of the folded batch (eval mode).

        ``max_tokens``: at most this many padded tokens (all members together) in
        one folded pass; a larger batch runs in chunks of rows (the examples are
        independent, so only rounding changes).  None: 2048 on the CPU, where
        passes that stay in cache beat larger ones, no limit on a GPU.

        With a prefix cache the forward starts at block ``layers_from`` from the
        cached states of ``rows`` (the examples' row indices; None: computed for
        this batch only).  The norm engine's anchor is tied to the adapters'
        inputs, all at or above that block, so the norms are those of a full pass."""
        bsz, seq = input_ids.shape[0], input_ids.shape[1]
        if max_tokens is None:
            device = next(self.adapters.parameters()).device
            max_tokens = 0 if device.type == "cuda" else 2048
        step = bsz if not max_tokens else max(1, min(bsz, max_tokens // (self.members * seq)))
        if rows is not None:
            rows = list(rows)
            if len(rows) != bsz:
                raise ValueError(f"{len(rows)} row indices for a batch of {bsz}")
        parts = []
        for r0 in range(0, bsz, step):
            sl = slice(r0, min(bsz, r0 + step))
            parts.append(self._norms_pass(
                input_ids[sl], labels[sl], None if attention_mask is None else attention_mask[sl],
                reduction, per_param, None if rows is None else rows[sl]))
        if per_param:
            return {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        return torch.cat(parts, dim=1)

    def _norms_pass(self, input_ids, labels, attention_mask, reduction, per_param, rows):
        from gradfilter.norms.api import per_example_grad_norms

        bsz = input_ids.shape[0]
        prefix = self.prefix_states(input_ids, attention_mask, rows)
        self._prefix_states = self.fold(prefix)
        try:
            out = per_example_grad_norms(
                self, self.fold(input_ids), self.fold(labels), self.fold(attention_mask),
                reduction=reduction, per_param=per_param,
            )
        finally:
            self._prefix_states = None
        if per_param:
            return {k: v.reshape(self.members, bsz) for k, v in out.items()}
        return out.reshape(self.members, bsz)

    def member_ce_sums(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
        dropout_context: dict | None = None,
        prefix_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([M], [M])``: each member's summed token cross-entropy over its block
        of folded rows, and its number of supervised tokens.  ``prefix_states``
        ``[M * B, T, d]`` start the forward at block ``layers_from``."""
        target = labels[:, 1:]
        kwargs = {}
        if self._keeps_logits:
            # The LM head only where some row has a label: prompts, padding and the
            # last position carry no loss.  Positions are shared by the rows of the
            # batch (the model's logits_to_keep), so rows of similar length gain most.
            keep = (target != -100).any(0).nonzero().flatten()
            kwargs["logits_to_keep"] = keep
            target = target[:, keep]
        out = self(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   dropout_context=dropout_context, prefix_states=prefix_states, **kwargs)
        logits = out.logits if kwargs else out.logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        ce = torch.nn.functional.cross_entropy(
            flat, target.reshape(-1), ignore_index=-100, reduction="none",
        ).reshape(self.members, -1)
        count = (target != -100).reshape(self.members, -1).sum(-1)
        return ce.sum(-1), count

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters()]

    def make_optimizer(self, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW over the stacked factors: elementwise, so M independent optimisers."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    def train_step(
        self,
        member_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        max_tokens: int | None = None,
        member_rows: Sequence[Sequence[int]] | None = None,
        record_norms: bool = False,
        reduction: str = "mean",
        by_factor: bool = False,
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
        """
        if len(member_batches) != self.members:
            raise ValueError(f"{len(member_batches)} batches for {self.members} members")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        bsz = member_batches[0][0].shape[0]
        if any(b[0].shape[0] != bsz for b in member_batches):
            raise ValueError("every member needs a batch of the same size")
        seq = max(b[0].shape[1] for b in member_batches)
        lengths = [b[0].shape[1] for b in member_batches]
        device = next(self.adapters.parameters()).device
        ids, labels, mask = (
            torch.stack([_pad_right(b[k], seq, v) for b in member_batches]).to(device)
            for k, v in ((0, 0), (1, -100), (2, 0))
        )  # [M, B, T]
        counts = (labels[:, :, 1:] != -100).sum(dim=(1, 2)).clamp(min=1)
        prefix = None
        if member_rows is not None and len(member_rows) != self.members:
            raise ValueError(f"{len(member_rows)} row lists for {self.members} members")
        if self.prefix_cache is not None or member_rows is not None:
            flat_rows = None if member_rows is None else [int(r) for rs in member_rows for r in rs]
            prefix = self.prefix_states(ids.reshape(-1, seq), mask.reshape(-1, seq), flat_rows,
                                        max_tokens=max_tokens)
            prefix = prefix.reshape(self.members, bsz, seq, -1)  # [M, B, T, d]
        rows = bsz if not max_tokens else max(1, min(bsz, max_tokens // (self.members * seq)))
        was = self.training
        self.train()
        self.base.eval()  # base dropout off; only the adapters' dropout is active
        total = torch.zeros(self.members, dtype=torch.float64)
        sq_norms = torch.zeros(self.members, bsz, dtype=torch.float64) if record_norms else None
        parts = {k: torch.zeros(self.members, bsz, dtype=torch.float64) for k in ("A", "B")}
        stacked = [m for m in self.adapters.modules() if isinstance(m, StackedLinear)]
        optimizer.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                for r0 in range(0, bsz, rows):
                    sl = slice(r0, min(bsz, r0 + rows))
                    recorder = None
                    if record_norms:
                        recorder = NormRecorder(self.members, sl.stop - sl.start,
                                                valid=mask[:, sl].reshape(-1, seq).bool())
                    for mod in stacked:
                        mod.recorder = recorder
                    sums, _ = self.member_ce_sums(
                        ids[:, sl].reshape(-1, seq), labels[:, sl].reshape(-1, seq),
                        mask[:, sl].reshape(-1, seq),
                        dropout_context={"lengths": lengths, "first_row": r0},
                        prefix_states=None if prefix is None
                        else prefix[:, sl].reshape(-1, seq, prefix.shape[-1]),
                    )
                    (sums / counts).sum().backward()
                    total += sums.detach().double().cpu()
                    if recorder is not None:
                        sq_norms[:, sl] = recorder.sq
                        for k in parts:
                            parts[k][:, sl] = recorder.part(k)
                optimizer.step()
        finally:
            for mod in stacked:
                mod.recorder = None
            self.train(was)
        self.step += 1
        losses = (total / counts.cpu()).float()
        if not record_norms:
            return losses
        # The step's loss weighs row i of member m by 1 / count_m; its own loss by
        # 1 / n_i (mean) or 1 (sum).
        own = (labels[:, :, 1:] != -100).sum(-1).cpu().double()
        scale = counts.cpu().double().unsqueeze(1).square()
        if reduction == "mean":
            scale = scale / own.square()
        nan = torch.full_like(sq_norms, float("nan"))
        total_sq = torch.where(own > 0, sq_norms * scale, nan)
        if not by_factor:
            return losses, total_sq
        return losses, total_sq, {k: torch.where(own > 0, v * scale, nan) for k, v in parts.items()}

    # -- members ----------------------------------------------------------------------

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's factors under peft's key names (``<layer>.lora_A.weight``)."""
        out = {}
        for name in self._targets:
            ad = self.adapters[_key(name)]
            out[f"base_model.model.{name}.lora_A.weight"] = ad.lora_A.weight[m].detach().clone()
            out[f"base_model.model.{name}.lora_B.weight"] = ad.lora_B.weight[m].detach().clone()
        return out

    def export_member(self, m: int, path: str) -> str:
        """Write member m as a standard peft LoRA adapter (``PeftModel.from_pretrained``)."""
        from safetensors.torch import save_file

        if not 0 <= m < self.members:
            raise IndexError(f"member {m} out of range [0, {self.members})")
        os.makedirs(path, exist_ok=True)
        conv1d = any(_is_conv1d(mod) for mod in self._targets.values())
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": getattr(getattr(self.base, "config", None), "_name_or_path", None),
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": sorted(self._targets),
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "init_lora_weights": True,
            "inference_mode": True,
        }
        with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        state = {k: v.contiguous() for k, v in self.member_state(m).items()}
        save_file(state, os.path.join(path, "adapter_model.safetensors"))
        return path

    def remove(self) -> nn.Module:
        """Detach from the base model (removes the hooks) and return the base."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base


def _check_layers_from(model: nn.Module, layers_from: int) -> int:
    if isinstance(layers_from, bool) or not isinstance(layers_from, int):
        raise ValueError(f"layers_from must be an int, got {layers_from!r}")
    if layers_from == 0:
        return 0
    from gradfilter.method.prefix import decoder_layers

    n = len(decoder_layers(model)[3])
    if not 0 <= layers_from < n:
        raise ValueError(
            f"layers_from must be in [0, {n}) for a model with {n} decoder layers, got {layers_from}"
        )
    return layers_from


def _in_layers_from(blocks: str, name: str, layers_from: int) -> bool:
    """Whether module ``name`` lies inside decoder layer ``layers_from`` or above
    of the decoder layer list named ``blocks``."""
    prefix = blocks + "."
    if not name.startswith(prefix):
        return False
    return int(name[len(prefix):].split(".", 1)[0]) >= layers_from


def _key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "__", name)


def _mix(seed: int, salt: int) -> int:
    """A 63-bit seed from (seed, salt), so streams of different purposes differ."""
    x = (seed * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def _pad_right(t: torch.Tensor, seq: int, value: int) -> torch.Tensor:
    if t.shape[1] == seq:
        return t
    pad = torch.full((t.shape[0], seq - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def member_schedule(
    lengths: Sequence[int],
    batch_size: int,
    epoch: int,
    member_seeds: Sequence[int],
    data_seed: int,
    level_batches: int = 4,
) -> list[list[list[int]]]:
    """Training batches of one epoch: ``steps x members x row indices``.

    Rows are sorted by length and cut into levels of ``level_batches`` batches.
    The order of the levels is shared (``data_seed``), so at every step all
    members train on rows of similar length and the folded batch has little
    padding; within a level each member draws its own order (its seed), so the
    members see different data orders.  Every row is seen once per epoch by
    every member.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    size = batch_size * level_batches
    levels = [order[i : i + size] for i in range(0, n, size)]
    shared = torch.Generator().manual_seed(_mix(data_seed, 1000 + epoch))
    level_order = torch.randperm(len(levels), generator=shared).tolist()
    per_member = []
    for s in member_seeds:
        gen = torch.Generator().manual_seed(_mix(s, 2000 + epoch))
        steps = []
        for li in level_order:
            level = levels[li]
            perm = torch.randperm(len(level), generator=gen).tolist()
            shuffled = [level[j] for j in perm]
            steps += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
        per_member.append(steps)
    return [list(step) for step in zip(*per_member)]
