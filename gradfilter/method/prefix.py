"""The frozen prefix of a causal LM, computed once per example.

When LoRA adapters sit only on decoder layers ``k .. L-1``, the embeddings and
layers ``0 .. k-1`` are frozen and carry no member state: the hidden state
that enters decoder block k,

    h_k(x) = block_{k-1}( ... block_0(embed(x)) ... )

is the same for every member, epoch and snapshot pass.  :class:`PrefixCache`
computes ``h_k`` once per example (over the B rows of a batch, not the
``M * B`` folded rows), keeps it unpadded per row index in the base dtype, and
pads it back when a batch is assembled.  :func:`run_from_layer` then runs the
model from block k on given hidden states: the model's own forward, with its
decoder layer list cut to ``layers[k:]`` and the input of block k replaced, so
attention masks, positions (rotary or learned), the final norm and the LM head
are exactly those of a full forward.

Limits: right padding only (padded positions hold zeros; with right padding no
real token attends to them); the base runs in eval mode (no base dropout);
models whose decoder layers differ by kind (a ``config.layer_types`` with
several kinds, as in sliding-window hybrids) are refused, because their forward
looks layers up by position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.Module, str, nn.ModuleList]:
    """The decoder block list of a causal LM: ``(qualified name, owner, attribute, list)``.

    It is the ``nn.ModuleList`` of ``config.num_hidden_layers`` entries nearest
    the root (``model.layers`` in the Llama family, ``transformer.h`` in GPT-2).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n) and len(module):
            found.append((name.count("."), name, module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no list of {n if n is not None else 'decoder'} "
            "decoder layers (nn.ModuleList); cannot place adapters by layer or cache a prefix"
        )
    _, name, layers = min(found, key=lambda t: t[0])
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return name, owner, attr, layers


def check_uniform_layers(model: nn.Module) -> None:
    kinds = getattr(getattr(model, "config", None), "layer_types", None)
    if kinds and len(set(kinds)) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes decoder layer kinds ({sorted(set(kinds))}); its forward "
            "looks layers up by position, so it cannot start mid-model: no prefix cache"
        )


class _Stop(Exception):
    """Raised by the capture hook to end a forward once block k's input is known."""


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        old = args[0]
        args = (hidden, *args[1:])
    else:
        old = kwargs.get("hidden_states")
        kwargs = {**kwargs, "hidden_states": hidden}
    if not torch.is_tensor(old) or old.shape != hidden.shape:
        got = tuple(old.shape) if torch.is_tensor(old) else type(old).__name__
        raise ValueError(
            f"decoder block input is {got}, the given hidden states {tuple(hidden.shape)}"
        )
    return args, kwargs


@contextmanager
def _starting_at(model: nn.Module, k: int, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s forward runs decoder layers ``k..L-1`` only
    and block k receives ``hidden`` as its input."""
    _, owner, attr, layers = decoder_layers(model)

    def pre(module: nn.Module, args: tuple, kwargs: dict):
        return _replace_hidden(args, kwargs, hidden)

    handle = layers[k].register_forward_pre_hook(pre, with_kwargs=True)
    owner._modules[attr] = layers[k:]
    try:
        yield
    finally:
        owner._modules[attr] = layers
        handle.remove()


def run_from_layer(
    model: nn.Module,
    k: int,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """Run causal LM ``model`` from decoder block ``k`` on ``hidden`` ``[N, T, d]``,
    the input of block k; ``attention_mask`` ``[N, T]`` and the other keyword
    arguments (``position_ids``, ``use_cache``, ...) are those of a full forward.
    Returns the model's output (with ``logits``)."""
    kwargs.pop("input_ids", None)
    kwargs.pop("inputs_embeds", None)
    with _starting_at(model, k, hidden):
        # inputs_embeds gives the model the batch shape, dtype and device; block k
        # then takes `hidden` itself (GPT-2 would add position embeddings to it).
        return model(inputs_embeds=hidden, attention_mask=attention_mask, **kwargs)


def _check_right_padded(mask: torch.Tensor) -> torch.Tensor:
    """Per-row lengths of a right-padded ``[B, T]`` 0/1 mask."""
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, tokens], got {tuple(mask.shape)}")
    m = mask.long()
    if mask.shape[1] > 1 and bool((m[:, 1:] > m[:, :-1]).any()):
        row = int((m[:, 1:] > m[:, :-1]).any(-1).nonzero()[0])
        raise ValueError(
            f"the prefix cache needs right padding; attention_mask row {row} has padding "
            "before a real token"
        )
    return m.sum(-1)


class PrefixCache:
    """Hidden states entering decoder block ``layers_from``, one entry per example.

    Args:
        model: the causal LM (its embeddings and layers below ``layers_from``
            must be frozen).
        layers_from: k, the first decoder block that is not part of the prefix
            (``0 < k < L``).

    Entries are keyed by a row index chosen by the caller (its position in the
    dataset) and hold ``[n_tokens, d]`` in the model's dtype, on its device,
    next to the row's token ids, which are compared on every reuse.
    """

    def __init__(self, model: nn.Module, layers_from: int) -> None:
        _, _, _, layers = decoder_layers(model)
        n = len(layers)
        if not isinstance(layers_from, int) or not 0 < layers_from < n:
            raise ValueError(
                f"a prefix cache needs 0 < layers_from < {n} (the model has {n} decoder layers), "
                f"got {layers_from!r}"
            )
        check_uniform_layers(model)
        below = [layers[i] for i in range(layers_from)]
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        for part in below + ([emb] if emb is not None else []):
            for name, p in part.named_parameters():
                if p.requires_grad:
                    raise ValueError(
                        f"parameter {name!r} below decoder layer {layers_from} is trainable; "
                        "the cached prefix must be frozen"
                    )
        self.model = model
        self.layers_from = layers_from
        self._layers = layers
        self._states: dict[int, torch.Tensor] = {}
        self._ids: dict[int, torch.Tensor] = {}
        self.computed_rows = 0  # rows whose prefix was run (cache misses)

    def __len__(self) -> int:
        return len(self._states)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._states.values())

    def clear(self) -> None:
        self._states.clear()
        self._ids.clear()

    @torch.no_grad()
    def compute(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]``: the input of block k for a right-padded batch, uncached
        (eval mode, no adapters' state involved)."""
        layers = self._layers
        captured: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, kwargs: dict):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        was = self.model.training
        handle = layers[self.layers_from].register_forward_pre_hook(grab, with_kwargs=True)
        self.model.eval()
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
            self.model.train(was)
        if not captured:
            raise RuntimeError(f"decoder layer {self.layers_from} was not reached in the forward")
        self.computed_rows += input_ids.shape[0]
        return captured[0]

    def states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        *,
        max_tokens: int | None = None,
    ) -> torch.Tensor:
        """``[B, T, d]`` hidden states entering block k for a right-padded batch,
        zeros at padded positions.

        With ``rows`` (B row indices), rows seen before come from the cache and
        the others are computed (in chunks of at most ``max_tokens`` padded
        tokens) and stored; without, the batch is computed and nothing is stored.
        """
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                f"{tuple(input_ids.shape)}"
            )
        lengths = _check_right_padded(attention_mask).tolist()
        bsz, seq = input_ids.shape
        if rows is None:
            h = self.compute(input_ids, attention_mask)
            return h * attention_mask.unsqueeze(-1).to(h.dtype)
        rows = [int(r) for r in rows]
        if len(rows) != bsz:
            raise ValueError(f"{len(rows)} row indices for a batch of {bsz} rows")

        todo: dict[int, int] = {}  # row index -> batch position, rows to compute
        for j, r in enumerate(rows):
            ids = input_ids[j, : lengths[j]]
            if r in self._ids:
                if not torch.equal(self._ids[r], ids):
                    raise ValueError(
                        f"row {r} is in the prefix cache with other tokens "
                        f"({self._ids[r].numel()} cached, {lengths[j]} now); row indices "
                        "must name the same example throughout"
                    )
            elif r not in todo:
                todo[r] = j
        if todo:
            pending = sorted(todo.items(), key=lambda t: lengths[t[1]])
            start = 0
            while start < len(pending):
                end = start + 1
                while end < len(pending):
                    longest = lengths[pending[end][1]]
                    if max_tokens and (end - start + 1) * longest > max_tokens:
                        break
                    end += 1
                part = pending[start:end]
                pos = [j for _, j in part]
                t = max(lengths[j] for j in pos)
                h = self.compute(input_ids[pos, :t], attention_mask[pos, :t])
                for i, (r, j) in enumerate(part):
                    # clone: a view would keep the whole chunk's tensor alive
                    self._states[r] = h[i, : lengths[j]].clone()
                    self._ids[r] = input_ids[j, : lengths[j]].clone()
                start = end

        first = self._states[rows[0]]
        out = torch.zeros(bsz, seq, first.shape[-1], dtype=first.dtype, device=first.device)
        for j, r in enumerate(rows):
            out[j, : lengths[j]] = self._states[r]
        return out
