"""Engine against the per-example loop, torch.func and Opacus on a small LoRA model.

A quick side-by-side on CPU; run with
``python -m pytest benchmarks/bench_engine.py --benchmark-only``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter import per_example_grad_norms
from gradfilter.baselines import (
    functorch_per_example_grad_norms,
    loop_per_example_grad_norms,
    opacus_ghost_norms,
    opacus_per_example_grad_norms,
)
from gradfilter.models import tiny_gpt2

PROVIDERS = {
    "gradfilter": per_example_grad_norms,
    "loop": loop_per_example_grad_norms,
    "torch.func": functorch_per_example_grad_norms,
    "opacus": opacus_per_example_grad_norms,
    "opacus-ghost": opacus_ghost_norms,
}


@pytest.fixture(scope="module")
def case():
    model = tiny_gpt2(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=512)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True)).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1024, (8, 256), generator=gen)
    labels = ids.clone()
    labels[:, :32] = -100
    return model, ids, labels


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_norms(benchmark, case, provider):
    model, ids, labels = case
    benchmark.group = "GPT-2-shaped (4 x 256) LoRA r=8, B=8, T=256"
    out = benchmark.pedantic(PROVIDERS[provider], args=(model, ids, labels), rounds=3, iterations=1)
    assert out.shape == (8,)
