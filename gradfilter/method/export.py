"""A member of a :class:`LoRAEnsemble` as a standard peft LoRA adapter."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

from gradfilter.method.lora import adapter_key, is_conv1d

if TYPE_CHECKING:
    from gradfilter.method.ensemble import LoRAEnsemble


def member_state(ens: LoRAEnsemble, m: int) -> dict[str, torch.Tensor]:
    """Member m's factors under peft's key names (``<layer>.lora_A.weight``)."""
    out = {}
    for name in ens.targets:
        ad = ens.adapters[adapter_key(name)]
        out[f"base_model.model.{name}.lora_A.weight"] = ad.lora_A.weight[m].detach().clone()
        out[f"base_model.model.{name}.lora_B.weight"] = ad.lora_B.weight[m].detach().clone()
    return out


def export_member(ens: LoRAEnsemble, m: int, path: str) -> str:
    """Write member m as a standard peft LoRA adapter (``PeftModel.from_pretrained``)."""
    from safetensors.torch import save_file

    if not 0 <= m < ens.members:
        raise IndexError(f"member {m} out of range [0, {ens.members})")
    os.makedirs(path, exist_ok=True)
    conv1d = any(is_conv1d(mod) for mod in ens.targets.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(
            getattr(ens.base, "config", None), "_name_or_path", None
        ),
        "r": ens.r,
        "lora_alpha": ens.alpha,
        "lora_dropout": ens.dropout,
        "use_rslora": ens.use_rslora,
        "target_modules": sorted(ens.targets),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    state = {k: v.contiguous() for k, v in member_state(ens, m).items()}
    save_file(state, os.path.join(path, "adapter_model.safetensors"))
    return path
