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
    ``first_row``: the position of the first row in the member's batch (chunks)."""
    m = len(member_seeds)
    blocks = x.reshape(m, -1, *x.shape[1:])
    lengths = lengths or [x.shape[1]] * m
    mask = torch.ones_like(blocks)
    for i in range(m):
        for j in range(blocks.shape[1]):
            key = mix_seed(member_seeds[i], ((step * 65537 + layer) * 1000003) + first_row + j)
            gen = torch.Generator(device=x.device).manual_seed(key)
            keep = torch.rand((lengths[i], *x.shape[2:]), generator=gen, device=x.device) >= p
            mask[i, j, : lengths[i]] = keep.to(x.dtype) / (1.0 - p)
    return (blocks * mask).reshape(x.shape)


def pad_right(t: torch.Tensor, seq: int, value: int) -> torch.Tensor:
    """Right-pad ``[B, T]`` to ``[B, seq]`` with ``value``."""
    if t.shape[1] == seq:
        return t
    pad = torch.full((t.shape[0], seq - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)
