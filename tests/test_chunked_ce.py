"""The chunked LM head + cross-entropy: equal to the full cross-entropy and its
hidden-state gradient (float64), inside the ensemble's loss, and a run's norms
unchanged by the chunk size."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gradfilter import LoRAEnsemble
from gradfilter.io.models import tiny_gpt2, tiny_llama, tiny_tokenizer
from gradfilter.method import linear_ce
from gradfilter.method.ensemble import plain_head
from gradfilter.method.linear_ce import linear_cross_entropy
from gradfilter.run.score import ScoreConfig, score


def problem(n=13, d=7, vocab=29, ignored=(2, 5, 6), bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, d, generator=gen, dtype=torch.float64)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[list(ignored)] = -100
    return hidden, weight, b, target


def full(hidden, weight, bias, target, reduction):
    return F.cross_entropy(
        F.linear(hidden, weight, bias), target, ignore_index=-100, reduction=reduction
    )


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 100])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_full_cross_entropy_and_gradient(chunk, reduction, bias):
    hidden, weight, b, target = problem(bias=bias)
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    got = linear_cross_entropy(h1, weight, target, b, reduction=reduction, chunk=chunk)
    want = full(h2, weight, b, target, reduction)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # A non-uniform incoming gradient checks the per-row scaling of the backward.
    g = torch.linspace(-1.5, 2.0, want.numel(), dtype=torch.float64).reshape(want.shape)
    (gh1,) = torch.autograd.grad(got, h1, g)
    (gh2,) = torch.autograd.grad(want, h2, g)
    torch.testing.assert_close(gh1, gh2, rtol=1e-10, atol=1e-10)
    assert gh1[[2, 5, 6]].abs().max() == 0  # ignored rows get no gradient


def test_all_ignored_and_empty():
    hidden, weight, b, target = problem(n=4, ignored=(0, 1, 2, 3))
    h = hidden.clone().requires_grad_(True)
    losses = linear_cross_entropy(h, weight, target, b, reduction="none", chunk=3)
    assert torch.equal(losses, torch.zeros(4, dtype=torch.float64))
    (g,) = torch.autograd.grad(losses.sum(), h)
    assert torch.equal(g, torch.zeros_like(g))
    mean = linear_cross_entropy(hidden, weight, target, b, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(full(hidden, weight, b, target, "mean"))
    empty = linear_cross_entropy(hidden[:0], weight, target[:0], b, reduction="sum")
    assert empty.item() == 0.0


def test_low_precision_matches_float32_reference():
    hidden, weight, b, target = problem(n=40, d=16, vocab=50)
    h = hidden.to(torch.bfloat16).requires_grad_(True)
    w = weight.to(torch.bfloat16)
    got = linear_cross_entropy(h, w, target, reduction="none", chunk=7)
    assert got.dtype == torch.float32
    (gh,) = torch.autograd.grad(got.sum(), h)
    assert gh.dtype == torch.bfloat16
    ref_h = h.detach().double().requires_grad_(True)
    want = full(ref_h, w.double(), None, target, "none")
    (gref,) = torch.autograd.grad(want.sum(), ref_h)
    # bf16 logits: errors of a few bf16 ulps of the logits.
    torch.testing.assert_close(got.double(), want, rtol=0, atol=0.1)
    torch.testing.assert_close(gh.double(), gref, rtol=0.02, atol=0.02)


def test_bad_input_is_refused():
    hidden, weight, b, target = problem()
    with pytest.raises(ValueError, match="frozen LM head"):
        linear_cross_entropy(hidden, weight.clone().requires_grad_(True), target)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, target, reduction="max")
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(hidden, weight, target, chunk=0)
    with pytest.raises(ValueError, match="share d"):
        linear_cross_entropy(hidden[:, :3], weight, target)
    with pytest.raises(ValueError, match="target"):
        linear_cross_entropy(hidden, weight, target[:3])


def folded_batch(members, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 8]
    ids = torch.zeros(members * 3, 9, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r in range(members * 3):
        n = lengths[r % 3]
        ids[r, :n] = torch.randint(0, 97, (n,), generator=gen)
        mask[r, :n] = 1
        labels[r, 3:n] = ids[r, 3:n]  # a prompt of 3 tokens, then the response
    labels[members * 3 - 1] = -100  # the last row of the last member: no label
    return ids, labels, mask


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ensemble_loss_and_gradient_equal_full_head(kind):
    make = tiny_gpt2 if kind == "gpt2" else tiny_llama
    ens = LoRAEnsemble(make(dtype=torch.float64), members=3, r=2, alpha=4, seed=1)
    assert plain_head(ens.base)[0] is not None
    with torch.no_grad():  # B away from zero, so that every factor has a gradient
        for name, p in ens.adapters.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, labels, mask = folded_batch(3)
    results = []
    for chunked in (True, False):
        ens.zero_grad(set_to_none=True)
        if chunked:
            sums, count = ens.member_ce_sums(ids, labels, mask, chunk=4)
        else:
            sums, count = ens._member_ce_sums_full(ids, labels, mask, None, None)
        (sums * torch.tensor([1.0, -2.0, 0.5], dtype=sums.dtype)).sum().backward()
        grads = [p.grad.clone() for p in ens.trainable_parameters()]
        results.append((sums.detach(), count, grads))
    (s1, c1, g1), (s2, c2, g2) = results
    assert torch.equal(c1, c2) and c1.tolist() == [14, 14, 9]
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_ensemble_loss_from_prefix_states():
    ens = LoRAEnsemble(
        tiny_llama(dtype=torch.float64), members=2, r=2, layers_from=1, prefix_cache=True
    )
    ids, labels, mask = folded_batch(2, seed=3)
    prefix = ens.prefix_states(ids, mask)
    want, _ = ens._member_ce_sums_full(ids, labels, mask, None, None)
    got, _ = ens.member_ce_sums(ids, labels, mask, prefix_states=prefix, chunk=5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_model_with_a_transformed_head_keeps_its_own_head():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert plain_head(model) == (None, None)
    ens = LoRAEnsemble(model, members=2, r=2)
    ids, labels, mask = folded_batch(2)
    sums, count = ens.member_ce_sums(ids, labels, mask)
    assert torch.isfinite(sums).all() and count.tolist() == [14, 9]
    with pytest.raises(ValueError, match="plain linear LM head"):
        ens(ids, mask, hidden_states_only=True)


ROWS = [
    {"instruction": f"Question {i}: what is {i} plus {i + 1}?", "input": "", "output": a}
    for i, a in enumerate(
        ["Three.", "Five, of course.", "It is seven.", "9", "Eleven!", "13, I think.", "15"]
    )
]


@pytest.mark.parametrize("norms", ["snapshot", "inflight"])
def test_run_norms_unchanged_by_chunk_size(tmp_path, monkeypatch, norms):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS), encoding="utf-8")
    cfg = dict(members=2, rank=4, alpha=8, epochs=2, batch_size=3, max_length=64, lr=5e-3)
    out = {}
    for chunk in (1, 3, 10_000):
        monkeypatch.setattr(linear_ce, "CHUNK_TOKENS", chunk)
        res = score(
            str(data),
            None,
            ScoreConfig(**cfg, norms=norms),
            progress=False,
            model_and_tokenizer=(tiny_gpt2(n_positions=128), tiny_tokenizer()),
        )
        out[chunk] = [(r["early_sq"], r["late_sq"], r["gsnr"]) for r in res.records]
    # float32 model: the chunks change how the head's matmul is blocked, so the
    # results agree to float32 rounding, not bitwise (seen: at most 6e-7 relative).
    for chunk in (1, 3):
        for a, b in zip(out[chunk], out[10_000], strict=True):
            torch.testing.assert_close(
                torch.tensor(a[0] + a[1]), torch.tensor(b[0] + b[1]), rtol=1e-5, atol=1e-12
            )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_norm_pass_equals_full_head(reduction):
    ens = LoRAEnsemble(tiny_llama(dtype=torch.float64), members=2, r=2, alpha=4, seed=2)
    with torch.no_grad():
        for name, p in ens.adapters.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    ids, labels, mask = folded_batch(1, seed=4)
    labels[0] = -100  # rows without labels (also the last): NaN either way
    assert ens.has_hidden_state_loss
    got = ens.per_example_grad_norms(ids, labels, mask, reduction=reduction)
    plain = ens._plain
    ens._plain = (None, None)  # the model's own head and full logits
    try:
        assert not ens.has_hidden_state_loss
        want = ens.per_example_grad_norms(ids, labels, mask, reduction=reduction)
    finally:
        ens._plain = plain
    assert torch.isnan(got[:, [0, 2]]).all() and torch.isnan(want[:, [0, 2]]).all()
    keep = [1]
    assert (got[:, keep] > 0).all()
    torch.testing.assert_close(got[:, keep], want[:, keep], rtol=1e-10, atol=0)


def test_adapters_save_their_shared_input_once():
    """q, k and v read the same bfloat16 input: the backward keeps that input
    itself, not a float32 copy per adapter; the gradients are unchanged."""
    from gradfilter.norms.fused import StackedLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 8, generator=gen).to(torch.bfloat16).requires_grad_(True)
    layers = [StackedLinear(torch.randn(2, 3, 8, generator=gen)) for _ in range(3)]
    saved = []

    def pack(t):
        saved.append((t.dtype, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sum(lin(x) for lin in layers)
    inputs = {s for s in saved if s[0] != torch.float32 or s[1] == x.untyped_storage().data_ptr()}
    assert inputs == {(torch.bfloat16, x.untyped_storage().data_ptr())}
    assert len(saved) == 6  # x and a weight per layer
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    gx, *gw = torch.autograd.grad(y, [x] + [lin.weight for lin in layers], g)
    xf = x.detach().float().requires_grad_(True)
    ref = sum(torch.einsum("mnd,mod->mno", xf.reshape(2, -1, 8), lin.weight) for lin in layers)
    rx, *rw = torch.autograd.grad(ref.reshape(y.shape), [xf] + [lin.weight for lin in layers], g)
    assert gx.dtype == torch.bfloat16
    # bf16 input gradients summed over three layers: bf16 rounding of each term.
    torch.testing.assert_close(gx.float(), rx, rtol=0.02, atol=0.02)
    for a, b in zip(gw, rw, strict=True):
        torch.testing.assert_close(a, b)
