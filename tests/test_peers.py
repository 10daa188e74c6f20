"""gradfilter, Opacus GradSampleModule and torch.func vmap(grad) agree on the same models."""

from __future__ import annotations

import pytest
import torch
from test_engine import GPT2_ATTN, LLAMA_ALL, assert_close, lorafy, make_batch, make_model

from gradfilter import per_example_grad_norms
from gradfilter.norms.oracles import (
    functorch_per_example_grad_norms,
    opacus_ghost_norms,
    opacus_per_example_grad_norms,
)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_three_way_agreement_on_peft(kind, side, reduction):
    targets = GPT2_ATTN + ["c_fc"] if kind == "gpt2" else LLAMA_ALL
    model = lorafy(
        make_model(kind),
        r=4,
        lora_alpha=8,
        target_modules=targets,
        bias="lora_only" if kind == "gpt2" else "none",
    )
    ids, labels, mask = make_batch([12, 5, 9], 12, side=side, seed=7)
    ours = per_example_grad_norms(model, ids, labels, mask, reduction=reduction)
    func = functorch_per_example_grad_norms(model, ids, labels, mask, reduction=reduction)
    opac = opacus_per_example_grad_norms(model, ids, labels, mask, reduction=reduction)
    assert_close(ours, func, 1e-5)
    assert_close(ours, opac, 1e-5)
    assert_close(func, opac, 1e-9)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_per_parameter_agreement_with_opacus_ghost_and_func(kind):
    model = lorafy(
        make_model(kind),
        r=2,
        lora_alpha=4,
        target_modules=GPT2_ATTN if kind == "gpt2" else LLAMA_ALL,
    )
    ids, labels, mask = make_batch([10, 10, 4, 7], 10, seed=8)
    ours = per_example_grad_norms(model, ids, labels, mask, per_param=True)
    func = functorch_per_example_grad_norms(model, ids, labels, mask, per_param=True)
    assert set(ours) == set(func)
    for name in func:
        assert_close(ours[name], func[name], 1e-5)
    ghost = opacus_ghost_norms(model, ids, labels, mask)
    total = torch.stack(list(ours.values())).sum(0).sqrt()
    assert_close(total, ghost, 1e-5)


def test_full_gpt2_with_tied_embedding_matches_func():
    model = make_model("gpt2")
    for p in model.parameters():
        p.requires_grad_(True)
    ids, labels, mask = make_batch([8, 3, 6], 8, seed=9)
    assert_close(
        per_example_grad_norms(model, ids, labels, mask),
        functorch_per_example_grad_norms(model, ids, labels, mask),
        1e-5,
    )
