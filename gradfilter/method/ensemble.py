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

This class owns the stacked adapters and the folded forward.  Training
(:mod:`.training`), norm passes (:mod:`.norm_passes`) and peft export
(:mod:`.export`) are separate units that take the ensemble as an argument; the
per-step context (dropout keys, a norm recorder) reaches the adapters as an
argument of ``forward`` (``step_context``), not through stored attributes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from gradfilter.method import linear_ce
from gradfilter.method.lean import lean_activations
from gradfilter.method.linear_ce import linear_cross_entropy
from gradfilter.method.lora import (
    Adapter,
    adapter_key,
    make_adapters,
    member_dropout,
    resolve_targets,
)


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
        lean: swap the base's frozen gated MLPs and RMSNorms for versions that
            keep less for the backward, with the same outputs
            (:mod:`gradfilter.method.lean`); undone by :meth:`remove`.
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
        lean: bool = True,
    ) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be at least 1, got {members}")
        if r < 1:
            raise ValueError(f"rank r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.member_seeds = (
            list(member_seeds) if member_seeds is not None else [seed + m for m in range(members)]
        )
        if len(self.member_seeds) != members:
            raise ValueError(f"{len(self.member_seeds)} member seeds for {members} members")
        self.members, self.r, self.alpha, self.dropout = members, r, alpha, dropout
        # Members whose rows share one folded pass in the whole run (more than
        # ``members`` when other processes train the rest); it sizes the chunks.
        self.fold_members = members
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.base = base_model
        for p in self.base.parameters():
            p.requires_grad_(False)
        # Frozen MLPs and RMSNorms that keep less for the backward (gradfilter.method.lean);
        # undone by remove().
        self._restore_lean = lean_activations(base_model) if lean else (lambda: None)
        # Hugging Face causal LMs that take a tensor of positions for the LM head.
        self._keeps_logits = "logits_to_keep" in inspect.signature(base_model.forward).parameters
        # The model body and a plain linear head: the loss then runs on the body's
        # hidden states, in chunks, without the full logits (see member_ce_sums).
        # (A tuple, so that the body is not registered as a second child module.)
        self._plain = plain_head(base_model)

        self.target_modules, self.layers_from, self._targets, self._layer_index = resolve_targets(
            base_model, target_modules, layers_from
        )
        self.adapters = make_adapters(
            self._targets,
            self.member_seeds,
            r,
            self.scaling,
            dropout,
            next(base_model.parameters()),
        )

        self.step = 0  # optimiser steps taken; keys the dropout masks
        self._active = False
        self._context: dict | None = None
        self._hooks = [
            module.register_forward_hook(
                self._make_hook(self.adapters[adapter_key(name)], self._layer_index[name])
            )
            for name, module in self._targets.items()
        ]
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

    def _make_hook(self, adapter: Adapter, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if not self._active:
                return None
            x = args[0]
            ctx = self._context or {}
            if self.training and adapter.dropout > 0:
                x = member_dropout(
                    x,
                    adapter.dropout,
                    layer,
                    self.member_seeds,
                    self.step,
                    ctx.get("lengths"),
                    ctx.get("first_row", 0),
                )
            recorder = ctx.get("recorder")
            delta = adapter.lora_B(adapter.lora_A(x, recorder), recorder) * adapter.scaling
            return output + delta.to(output.dtype)

        return hook

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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ):
        """Run the base on member-major folded rows ``[M * B, T]`` with the adapters.

        ``prefix_states`` ``[M * B, T, d]`` (the hidden states entering decoder
        block ``layers_from``, see :mod:`gradfilter.method.prefix`) starts the forward
        at that block; ``input_ids`` then only give the shape.
        ``hidden_states_only=True`` runs the model body without the LM head and
        returns its output (``last_hidden_state``)."""
        if input_ids.shape[0] % self.members:
            raise ValueError(
                f"{input_ids.shape[0]} rows is not a multiple of {self.members} members; "
                "fold a batch with LoRAEnsemble.fold"
            )
        prefix = kwargs.pop("prefix_states", None)
        model = self.base
        if kwargs.pop("hidden_states_only", False):
            if self._plain[0] is None:
                raise ValueError(
                    f"{type(self.base).__name__} has no model body with a plain linear LM head "
                    "on its last hidden state; run the full model"
                )
            model = self._plain[0]
        with self._folded(kwargs.pop("step_context", None)):
            if prefix is None:
                return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return self._forward_from_prefix(model, input_ids, attention_mask, prefix, kwargs)

    def _forward_from_prefix(self, model, input_ids, attention_mask, prefix, kwargs):
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
            real = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool)
            )
            want = torch.arange(input_ids.shape[1], device=positions.device).expand_as(real)
            if not bool((positions.expand_as(real) == want)[real].all()):
                raise ValueError(
                    "a cached prefix assumes positions 0, 1, ... on real tokens (right padding)"
                )
        return run_from_layer(model, self.layers_from, prefix, attention_mask, **kwargs)

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
                raise ValueError(
                    "row indices key the prefix cache; construct the ensemble with "
                    "layers_from > 0 and prefix_cache=True"
                )
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
        **kwargs,
    ):
        """``[M, B]`` norms of each example's loss gradient for each member's LoRA
        parameters (eval mode); see :func:`gradfilter.method.norm_passes.ensemble_grad_norms`."""
        from gradfilter.method.norm_passes import ensemble_grad_norms

        return ensemble_grad_norms(self, input_ids, labels, attention_mask, **kwargs)

    def member_ce_sums(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
        step_context: dict | None = None,
        prefix_states: torch.Tensor | None = None,
        chunk: int | None = None,
        supervised: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([M], [M])``: each member's summed token cross-entropy over its block
        of folded rows, and its number of supervised tokens.  ``prefix_states``
        ``[M * B, T, d]`` start the forward at block ``layers_from``.
        ``supervised``: the flat positions in ``labels[:, 1:]`` that carry a label
        (int64, on the model's device), when the caller read them on the host;
        otherwise they are found on the device (a host sync on a GPU).

        With a plain linear LM head the head and the loss run only on each row's
        own supervised positions, ``chunk`` of them at a time (None:
        :data:`gradfilter.method.linear_ce.CHUNK_TOKENS`; see
        :func:`~gradfilter.method.linear_ce.linear_cross_entropy`): the
        ``[tokens, vocab]`` logits are never formed."""
        head = self._plain[1]
        if head is None:
            return self._member_ce_sums_full(
                input_ids, labels, attention_mask, step_context, prefix_states
            )
        out = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            step_context=step_context,
            prefix_states=prefix_states,
            hidden_states_only=True,
        )
        losses, rows = self._token_losses(out.last_hidden_state, labels, chunk, supervised)
        member = rows // (input_ids.shape[0] // self.members)
        sums = losses.new_zeros(self.members).index_add(0, member, losses)
        count = (labels[:, 1:] != -100).reshape(self.members, -1).sum(-1)
        return sums, count

    @property
    def has_hidden_state_loss(self) -> bool:
        """Whether the loss can run on the body's hidden states (a plain linear head);
        the norm engine then calls :meth:`summed_example_losses`."""
        return self._plain[1] is not None

    def summed_example_losses(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        counts: torch.Tensor,
        reduction: str,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """``sum_i L_i`` over the rows of ``hidden`` ``[N, T, d]`` (the body's last
        hidden states) with the causal shift: the token cross-entropy of each row,
        divided by its ``counts`` for ``reduction="mean"``; rows without labels weigh 0."""
        losses, rows = self._token_losses(hidden, labels, chunk)
        if reduction == "mean":
            losses = losses / counts.clamp(min=1).to(losses.dtype)[rows]
        return losses.sum() if losses.numel() else hidden.sum() * 0.0

    def _token_losses(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        chunk: int | None,
        supervised: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([K], [K])``: the cross-entropy at each supervised position of ``hidden``
        ``[N, T, d]`` (position t predicts ``labels[:, t + 1]``), and its row.
        ``supervised``: those positions, flat in ``labels[:, 1:]`` (else found here)."""
        head = self._plain[1]
        n, t, d = hidden.shape
        if t < 2:  # no position predicts a next token
            out = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            return hidden.new_zeros(0, dtype=out), labels.new_zeros(0)
        if supervised is None:
            supervised = (labels[:, 1:] != -100).reshape(-1).nonzero().flatten()
        rows = supervised // (t - 1)
        at = rows * t + supervised % (t - 1)  # the same positions in [N, T]
        losses = linear_cross_entropy(
            hidden.reshape(n * t, d).index_select(0, at),  # [K, d]: supervised only
            head.weight,
            labels.reshape(-1).index_select(0, at + 1),
            head.bias,
            reduction="none",
            chunk=chunk or linear_ce.CHUNK_TOKENS,
        )
        return losses, rows

    def _member_ce_sums_full(self, input_ids, labels, attention_mask, step_context, prefix_states):
        """:meth:`member_ce_sums` through the model's own LM head (full logits)."""
        target = labels[:, 1:]
        kwargs = {}
        if self._keeps_logits:
            # The LM head only where some row has a label: prompts, padding and the
            # last position carry no loss.  Positions are shared by the rows of the
            # batch (the model's logits_to_keep), so rows of similar length gain most.
            keep = (target != -100).any(0).nonzero().flatten()
            kwargs["logits_to_keep"] = keep
            target = target[:, keep]
        out = self(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            step_context=step_context,
            prefix_states=prefix_states,
            **kwargs,
        )
        logits = out.logits if kwargs else out.logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        ce = torch.nn.functional.cross_entropy(
            flat,
            target.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(self.members, -1)
        count = (target != -100).reshape(self.members, -1).sum(-1)
        return ce.sum(-1), count

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapters.parameters()]

    def make_optimizer(self, lr: float = 2e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW over the stacked factors: elementwise, so M independent optimisers."""
        return torch.optim.AdamW(self.trainable_parameters(), lr=lr, weight_decay=weight_decay)

    def train_step(self, member_batches, optimizer, *args, **kwargs):
        """One optimiser step for all members, each on its own batch; see
        :func:`gradfilter.method.training.train_step`."""
        from gradfilter.method.training import train_step

        return train_step(self, member_batches, optimizer, *args, **kwargs)

    # -- members ----------------------------------------------------------------------

    @property
    def targets(self) -> dict[str, nn.Module]:
        """The adapted layers of the base, by module name."""
        return dict(self._targets)

    def member_state(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's factors under peft's key names (``<layer>.lora_A.weight``)."""
        from gradfilter.method.export import member_state

        return member_state(self, m)

    def export_member(self, m: int, path: str) -> str:
        """Write member m as a standard peft LoRA adapter (``PeftModel.from_pretrained``)."""
        from gradfilter.method.export import export_member

        return export_member(self, m, path)

    def remove(self) -> nn.Module:
        """Detach from the base model (removes the hooks) and return the base."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._restore_lean()
        return self.base


#: Config fields of models whose logits are not a plain linear map of the body's
#: last hidden state (soft-capping, scaling): those keep their own LM head.
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def plain_head(model: nn.Module) -> tuple[nn.Module | None, nn.Linear | None]:
    """``(body, head)`` when ``model``'s logits are ``head(body(...).last_hidden_state)``
    with a frozen ``nn.Linear`` head, else ``(None, None)``."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(model, "config", None)
    transformed = any(getattr(config, k, None) not in (None, 1, 1.0) for k in _HEAD_TRANSFORMS)
    if (
        not isinstance(body, nn.Module)
        or body is model
        or type(head) is not nn.Linear
        or transformed
        or any(p.requires_grad for p in head.parameters())
    ):
        return None, None
    return body, head
