"""The reference per-example gradient-norm implementations agree with each other.

(``HF_HUB_OFFLINE=1`` is set in ``conftest.py`` before transformers is imported.)
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter.io.models import tiny_gpt2, tiny_llama
from gradfilter.norms.oracles import (
    functorch_per_example_grad_norms,
    loop_per_example_grad_norms,
    opacus_ghost_norms,
    opacus_per_example_grad_norms,
)

pytest.importorskip("opacus")

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}
BATCHED = {
    "functorch": functorch_per_example_grad_norms,
    "opacus": opacus_per_example_grad_norms,
    "opacus_ghost": opacus_ghost_norms,
}


def lora_model(kind: str, dtype: torch.dtype = torch.float64):
    base = tiny_gpt2(dtype=dtype) if kind == "gpt2" else tiny_llama(dtype=dtype)
    model = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=TARGETS[kind],
            lora_dropout=0.0,
            fan_in_fan_out=kind == "gpt2",  # GPT-2 uses Conv1D ([in, out]) weights
        ),
    )
    # peft initialises lora_B to zero; give it values so that every gradient is non-zero.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def make_batch(side: str, seq_len: int = 12, vocab: int = 97):
    """Three examples of lengths 7, 12, 5; the last has labels only on its prompt (none)."""
    lengths, prompts = [7, 12, 5], [3, 4, 5]
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((3, seq_len), vocab - 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (n, p) in enumerate(zip(lengths, prompts, strict=False)):
        pos = slice(0, n) if side == "right" else slice(seq_len - n, seq_len)
        tokens = torch.randint(0, vocab, (n,), generator=gen)
        ids[i, pos] = tokens
        mask[i, pos] = 1
        labels[i, pos] = torch.where(torch.arange(n) < p, -100, tokens)
    return ids, labels, mask


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs() / b.abs()).max().item()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return lora_model(request.param)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_implementations_agree_float64(model, side, reduction):
    ids, labels, mask = make_batch(side)
    want = loop_per_example_grad_norms(model, ids, labels, mask, reduction=reduction)
    assert want.dtype == torch.float64 and want.shape == (3,)
    assert torch.isfinite(want[:2]).all() and (want[:2] > 0).all()
    assert torch.isnan(want[2])
    for name, fn in BATCHED.items():
        got = fn(model, ids, labels, mask, reduction=reduction)
        assert got.dtype == torch.float64 and got.shape == (3,), name
        assert torch.isnan(got[2]), name
        assert max_rel(got[:2], want[:2]) < 1e-8, (name, got, want)


def test_padding_side_does_not_matter(model):
    right = loop_per_example_grad_norms(model, *make_batch("right"))
    left = functorch_per_example_grad_norms(model, *make_batch("left"))
    assert max_rel(left[:2], right[:2]) < 1e-8


def test_per_param_agree(model):
    ids, labels, mask = make_batch("left")
    want = loop_per_example_grad_norms(model, ids, labels, mask, per_param=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(want) == trainable
    total = torch.stack(list(want.values())).sum(0).sqrt()
    assert max_rel(total[:2], loop_per_example_grad_norms(model, ids, labels, mask)[:2]) < 1e-12
    for name, fn in BATCHED.items():
        got = fn(model, ids, labels, mask, per_param=True)
        assert list(got) == trainable, name
        for key in trainable:
            assert torch.isnan(got[key][2]), (name, key)
            assert torch.allclose(got[key][:2], want[key][:2], rtol=1e-8, atol=1e-20), (name, key)


def test_opacus_leaves_model_clean(model):
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [torch.full_like(p, 2.0) for p in trainable]
    for p, g in zip(trainable, before, strict=False):
        p.grad = g
    try:
        for fn in (opacus_per_example_grad_norms, opacus_ghost_norms):
            fn(model, *make_batch("right"))
        assert all(
            p.grad is g and bool((g == 2.0).all()) for p, g in zip(trainable, before, strict=False)
        )
    finally:
        for p in trainable:
            p.grad = None
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "_norm_sample", "_current_grad_sample"):
            assert not hasattr(p, attr), attr
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
        assert not hasattr(m, "activations") and not hasattr(m, "autograd_grad_sample_hooks")
        assert not m.training


def test_no_labels_give_nan_with_sum_reduction_too():
    model = lora_model("gpt2")
    ids, labels, mask = make_batch("right")
    labels[:] = -100
    for fn in (loop_per_example_grad_norms, *BATCHED.values()):
        assert torch.isnan(fn(model, ids, labels, mask, reduction="sum")).all()
