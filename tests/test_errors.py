"""Bad input gets a clear error that names the problem (and the row)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter import per_example_grad_norms
from gradfilter.io.models import tiny_gpt2


@pytest.fixture(scope="module")
def model():
    return get_peft_model(
        tiny_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"])
    ).eval()


def batch(bsz=2, seq=5):
    ids = torch.randint(0, 97, (bsz, seq), generator=torch.Generator().manual_seed(0))
    return ids, ids.clone()


def test_mismatched_shapes(model):
    ids, labels = batch()
    with pytest.raises(
        ValueError, match=r"labels must have the shape of input_ids \(2, 5\), got \(2, 4\)"
    ):
        per_example_grad_norms(model, ids, labels[:, :4])
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        per_example_grad_norms(model, ids, labels, torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, tokens\] tensor"):
        per_example_grad_norms(model, ids[0], labels[0])


def test_wrong_dtypes_and_values(model):
    ids, labels = batch()
    with pytest.raises(ValueError, match="integer token ids"):
        per_example_grad_norms(model, ids.float(), labels)
    with pytest.raises(ValueError, match="labels must hold integer ids"):
        per_example_grad_norms(model, ids, labels.float())
    bad = ids.clone()
    bad[1, 2] = 500
    with pytest.raises(ValueError, match=r"input_ids row 1 holds token id 500 outside .*\[0, 97\)"):
        per_example_grad_norms(model, bad, labels)
    bad = labels.clone()
    bad[0, 3] = -7
    with pytest.raises(ValueError, match=r"labels row 0 holds -7"):
        per_example_grad_norms(model, ids, bad)
    mask = torch.ones_like(ids)
    mask[1, 0] = 2
    with pytest.raises(ValueError, match="attention_mask row 1 holds values other than 0 and 1"):
        per_example_grad_norms(model, ids, labels, mask)
    with pytest.raises(ValueError, match="reduction must be one of"):
        per_example_grad_norms(model, ids, labels, reduction="max")


def test_model_without_lm_head():
    base = tiny_gpt2().transformer  # GPT2Model: hidden states, no logits
    for p in base.parameters():
        p.requires_grad_(True)
    ids, labels = batch()
    with pytest.raises(ValueError, match="causal LM head"):
        per_example_grad_norms(base, ids, labels)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())


def test_model_without_trainable_parameters():
    model = tiny_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    ids, labels = batch()
    with pytest.raises(ValueError, match="no trainable parameter"):
        per_example_grad_norms(model, ids, labels)


def test_gradient_checkpointing_is_refused():
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    ids, labels = batch()
    with pytest.raises(ValueError, match="checkpointing"):
        per_example_grad_norms(model, ids, labels)


def test_import_is_lean():
    code = (
        "import sys, torch, gradfilter\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert callable(gradfilter.per_example_grad_norms)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_max_length_past_the_proxys_positions_is_refused(tmp_path):
    """GPT-2 has learned positions: a longer --max-length would fail deep in the
    model with an IndexError; it gets a clear message first."""
    from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
    from gradfilter.run.score import ScoreConfig, score

    rows = [{"instruction": "Say hi", "output": "hi"}] * 4
    model, tok = tiny_gpt2(n_positions=32), tiny_tokenizer()
    with pytest.raises(ValueError, match="longer than the proxy's 32 learned positions"):
        score(rows, None, ScoreConfig(max_length=64), model_and_tokenizer=(model, tok))
