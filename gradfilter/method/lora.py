"""The stacked LoRA factors of an ensemble: which layers get them, how each
member's factors are initialised, and each member's dropout masks.

Every quantity is a function of the member's seed (and, for dropout, of the
optimiser step, the layer and the row), so a member is the same whether it runs
alone or folded with others, and however a step is split into chunks.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import stack_module_state

from gradfilter.method.schedule import mix_seed
from gradfilter.norms.fused import StackedLinear

ATTENTION_TARGETS = {
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Adapter(nn.Module):
    """The stacked LoRA factors of one adapted layer: ``A: [M, r, d_in]``,
    ``B: [M, d_out, r]``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float) -> None:
        super().__init__()
        self.lora_A = StackedLinear(a, "A")
        self.lora_B = StackedLinear(b, "B")
        self.scaling = scaling
        self.dropout = dropout


def in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # GPT-2 Conv1D: weight [in, out]
    return w.shape[0], w.shape[1]


def is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def default_targets(model: nn.Module) -> list[str]:
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    if mtype in ATTENTION_TARGETS:
        return ATTENTION_TARGETS[mtype]
    return LLAMA_LIKE_TARGETS


def match_target(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def check_layers_from(model: nn.Module, layers_from: int) -> int:
    if isinstance(layers_from, bool) or not isinstance(layers_from, int):
        raise ValueError(f"layers_from must be an int, got {layers_from!r}")
    if layers_from == 0:
        return 0
    from gradfilter.method.prefix import decoder_layers

    n = len(decoder_layers(model)[3])
    if not 0 <= layers_from < n:
        raise ValueError(
            f"layers_from must be in [0, {n}) for a model with {n} decoder layers, "
            f"got {layers_from}"
        )
    return layers_from


def in_layers_from(blocks: str, name: str, layers_from: int) -> bool:
    """Whether module ``name`` lies inside decoder layer ``layers_from`` or above
    of the decoder layer list named ``blocks``."""
    prefix = blocks + "."
    if not name.startswith(prefix):
        return False
    return int(name[len(prefix) :].split(".", 1)[0]) >= layers_from


def match_targets(
    model: nn.Module, target_modules: Sequence[str] | str
) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every Linear / Conv1D layer of ``model`` but the LM
    head whose name matches ``target_modules`` (``"all-linear"``: every one), in
    ``named_modules`` order."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    matched: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or module is lm_head:
            continue
        if target_modules == "all-linear" or (
            not isinstance(target_modules, str) and match_target(name, target_modules)
        ):
            matched.append((name, module))
    if not matched:
        raise ValueError(
            f"no Linear or Conv1D layer of the model matches target_modules={target_modules!r}"
        )
    return matched


def resolve_targets(
    model: nn.Module, target_modules: Sequence[str] | str | None, layers_from: int
) -> tuple[Sequence[str] | str, int, dict[str, nn.Module], dict[str, int]]:
    """The adapted layers of ``model``: ``(target_modules, layers_from, targets,
    layer_index)`` with the defaults filled in and every setting checked (works on a
    ``meta``-device model too, so the settings can be checked before weights load).

    Raises:
        ValueError: no layer matches, or ``layers_from`` is out of range.
    """
    if target_modules is None:
        target_modules = default_targets(model)
    matched = match_targets(model, target_modules)
    layers_from = check_layers_from(model, layers_from)
    targets, layer_index = targets_from_layer(model, matched, layers_from, target_modules)
    return target_modules, layers_from, targets, layer_index


def targets_from_layer(
    model: nn.Module,
    matched: list[tuple[str, nn.Module]],
    layers_from: int,
    target_modules: Sequence[str] | str,
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """The matched layers inside decoder layers ``layers_from`` and above (all of
    them for 0), by name, and each one's layer index.

    A target's layer index (its dropout key) is its position among all matches,
    so it is the same whatever ``layers_from`` leaves out.
    """
    layer_index: dict[str, int] = {}
    targets: dict[str, nn.Module] = {}
    if layers_from:
        from gradfilter.method.prefix import decoder_layers

        blocks = decoder_layers(model)[0]
    for index, (name, module) in enumerate(matched):
        if layers_from and not in_layers_from(blocks, name, layers_from):
            continue
        targets[name] = module
        layer_index[name] = index
    if not targets:
        raise ValueError(
            f"no layer matching target_modules={target_modules!r} lies in decoder layers "
            f"{layers_from}..; lower layers_from or widen the targets"
        )
    return targets, layer_index


def adapter_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "__", name)


def init_factors(
    member_seeds: Sequence[int],
    r: int,
    layer: str,
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member init from the member's seed: A as nn.Linear's default
    (Kaiming-uniform), B zero, stacked with ``torch.func.stack_module_state``."""
    mods = []
    for s in member_seeds:
        gen = torch.Generator().manual_seed(mix_seed(s, zlib.crc32(layer.encode())))
        lin = nn.Linear(d_in, r, bias=False)
        bound = 1.0 / math.sqrt(d_in)
        with torch.no_grad():
            lin.weight.copy_(torch.rand(r, d_in, generator=gen) * 2 * bound - bound)
        mods.append(lin)
    params, _ = stack_module_state(mods)
    a = params["weight"].detach().to(device=device, dtype=dtype).clone()
    b = torch.zeros(len(member_seeds), d_out, r, dtype=dtype, device=device)
    return a, b


def make_adapters(
    targets: dict[str, nn.Module],
    member_seeds: Sequence[int],
    r: int,
    scaling: float,
    dropout: float,
    param: torch.Tensor,
) -> nn.ModuleDict:
    """One :class:`Adapter` per target layer, keyed by :func:`adapter_key`, on the
    device of the base parameter ``param``.

    Adapters (and so the optimiser state) stay in float32 over a half-precision
    base; a float64 base gets float64 adapters.
    """
    adapter_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
    adapters = nn.ModuleDict()
    for name, module in targets.items():
        d_in, d_out = in_out(module)
        a, b = init_factors(member_seeds, r, name, d_in, d_out, adapter_dtype, param.device)
        adapters[adapter_key(name)] = Adapter(a, b, scaling, dropout)
    return adapters


def member_dropout(
    x: torch.Tensor,
    p: float,
    layer: int,
    member_seeds: Sequence[int],
    step: int,
    lengths: Sequence[int] | None = None,
    first_row: int = 0,
) -> torch.Tensor:
    """Inverted dropout on member-major rows whose mask for a row is a function of
    (member seed, optimiser ``step``, ``layer``, row of the member's batch) alone,
    drawn over the member's own batch length (``lengths``; default: the padded one).
    ``first_row``: the position of the first row in the member's batch (chunks).

    For the backward only a boolean of the kept elements is saved, not the mask
    in ``x``'s dtype."""
    m = len(member_seeds)
    rows = x.shape[0] // m
    keys = [
        [
            mix_seed(member_seeds[i], ((step * 65537 + layer) * 1000003) + first_row + j)
            for j in range(rows)
        ]
        for i in range(m)
    ]
    return _KeyedDropout.apply(x, p, keys, list(lengths or [x.shape[1]] * m))


def _dropout_mask(
    shape: tuple[int, ...], p: float, keys: list[list[int]], lengths: list[int], like: torch.Tensor
) -> torch.Tensor:
    """The ``[M, B, T, ...]`` inverted-dropout mask of :func:`member_dropout`."""
    mask = torch.ones(shape, dtype=like.dtype, device=like.device)
    for i, row_keys in enumerate(keys):
        for j, key in enumerate(row_keys):
            gen = torch.Generator(device=like.device).manual_seed(key)
            keep = torch.rand((lengths[i], *shape[3:]), generator=gen, device=like.device) >= p
            mask[i, j, : lengths[i]] = keep.to(like.dtype) / (1.0 - p)
    return mask


class _KeyedDropout(torch.autograd.Function):
    """``x * mask``, keeping for the backward only which elements were kept (one
    byte each, not the mask in ``x``'s dtype): the mask is rebuilt from it with
    the very ops that made it, so the gradient is bitwise autograd's.  (Drawing
    the mask again from its keys would keep nothing, but costs as much as the
    forward's drawing, about a GEMM of the layer on a CPU.)"""

    @staticmethod
    def forward(ctx, x, p, keys, lengths):
        shape = (len(keys), x.shape[0] // len(keys), *x.shape[1:])
        mask = _dropout_mask(shape, p, keys, lengths, x)
        ctx.save_for_backward(mask != 0)
        ctx.args = (p, lengths)
        return (x.reshape(shape) * mask).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        (kept,) = ctx.saved_tensors
        p, lengths = ctx.args
        mask = torch.ones(kept.shape, dtype=grad.dtype, device=grad.device)
        for i, n in enumerate(lengths):
            mask[i, :, :n] = kept[i, :, :n].to(grad.dtype) / (1.0 - p)
        return (grad.reshape(kept.shape) * mask).reshape(grad.shape), None, None, None


def pad_right(t: torch.Tensor, seq: int, value: int) -> torch.Tensor:
    """Right-pad ``[B, T]`` to ``[B, seq]`` with ``value``."""
    if t.shape[1] == seq:
        return t
    pad = torch.full((t.shape[0], seq - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
