"""The lean frozen blocks (gradfilter.method.lean): the model's own outputs, the
same input gradients, less kept for the backward, and undone by remove()."""

from __future__ import annotations

import pytest
import torch

from gradfilter import LoRAEnsemble
from gradfilter.io.models import tiny_llama
from gradfilter.method.lean import FrozenRMSNorm, SwiGLU, lean_activations


def _blocks(model):
    mlp = next(m for m in model.modules() if type(m).__name__ == "LlamaMLP")
    norm = next(m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm")
    return mlp, norm


def test_the_functions_have_the_exact_gradients_in_float64():
    gen = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x: FrozenRMSNorm.apply(x, w, 1e-5), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_blocks_give_the_models_outputs_and_input_gradients(dtype):
    model = tiny_llama(seed=0, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    mlp, norm = _blocks(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a norm weight that is not all ones
        norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen).to(dtype))
    x = torch.randn(2, 6, model.config.hidden_size, generator=gen).to(dtype)
    g = torch.randn(2, 6, model.config.hidden_size, generator=gen).to(dtype)

    def run(module):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (gx,) = torch.autograd.grad(y, xi, g)
        return y, gx

    ref = [run(mlp), run(norm)]
    restore = lean_activations(model)
    assert "forward" in vars(mlp) and "forward" in vars(norm)
    got = [run(mlp), run(norm)]
    restore()
    assert "forward" not in vars(mlp) and "forward" not in vars(norm)
    for (y0, _), (y1, _) in zip(ref, got, strict=True):
        assert torch.equal(y0, y1)  # the same ops in the forward
    # the same ops in the backward too, in autograd's order: bitwise the same
    assert torch.equal(ref[0][1], got[0][1])
    assert torch.equal(ref[1][1], got[1][1])


def test_a_trainable_block_is_left_alone():
    model = tiny_llama(seed=0)
    mlp, norm = _blocks(model)  # all parameters trainable
    lean_activations(model)
    assert "forward" not in vars(mlp) and "forward" not in vars(norm)


def test_an_ensemble_scores_the_same_with_lean_blocks_and_keeps_less():
    rows = 3
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 90, (rows, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)

    def run(lean):
        ens = LoRAEnsemble(tiny_llama(seed=0), members=2, r=2, alpha=4, dropout=0.1, lean=lean)
        norms = ens.per_example_grad_norms(ids, labels, mask)
        opt = ens.make_optimizer(lr=1e-2)
        losses = ens.train_step([(ids, labels, mask)] * 2, opt)
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        ens.train()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ens.member_ce_sums(ens.fold(ids), ens.fold(labels), ens.fold(mask))
        base = ens.remove()
        assert not any("forward" in vars(m) for m in base.modules())
        state = {k: v.clone() for k, v in ens.adapters.state_dict().items()}
        return norms, losses, state, sum(saved)

    n0, l0, s0, saved0 = run(False)
    n1, l1, s1, saved1 = run(True)
    torch.testing.assert_close(n1, n0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-7)
    assert saved1 < saved0


def test_keyed_dropout_keeps_a_boolean_and_its_gradient_is_the_masks():
    from gradfilter.method.lora import _dropout_mask, member_dropout

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 4, generator=gen, requires_grad=True)  # 2 members x 3 rows
    g = torch.randn(6, 5, 4, generator=gen)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = member_dropout(x, 0.3, layer=2, member_seeds=[7, 8], step=4, lengths=[5, 3])
    # only which elements were kept, one byte each (no mask in x's dtype, no input)
    assert [t.dtype for t in saved] == [torch.bool]
    (gx,) = torch.autograd.grad(y, x, g)
    # the mask, recovered from the forward itself
    mask = torch.where(x != 0, y / x, torch.zeros_like(x)).detach()
    torch.testing.assert_close(gx, g * mask, rtol=1e-6, atol=1e-7)
    inside = mask.reshape(2, 3, 5, 4)[:, :, :3]
    assert ((inside == 0) | ((inside - 1 / 0.7).abs() < 1e-6)).all() and (inside == 0).any()
    assert (mask.reshape(2, 3, 5, 4)[1, :, 3:] == 1).all()  # past member 1's length 3: kept
    # the keys alone decide: the same call draws the same mask
    y2 = member_dropout(x, 0.3, layer=2, member_seeds=[7, 8], step=4, lengths=[5, 3])
    assert torch.equal(y, y2)
    assert _dropout_mask((2, 3, 5, 4), 0.3, [[1, 2, 3], [4, 5, 6]], [5, 5], x).shape == (2, 3, 5, 4)
