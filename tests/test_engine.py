"""per_example_grad_norms against the per-example autograd loop (the oracle)."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter import per_example_grad_norms
from gradfilter.io.models import tiny_gpt2, tiny_llama
from gradfilter.norms.oracles import loop_per_example_grad_norms

GPT2_ATTN = ["c_attn", "c_proj"]
LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_ALL = LLAMA_ATTN + ["gate_proj", "up_proj", "down_proj"]


def make_model(kind: str, dtype=torch.float64, seed: int = 0):
    return (
        tiny_gpt2(seed=seed, dtype=dtype) if kind == "gpt2" else tiny_llama(seed=seed, dtype=dtype)
    )


def lorafy(model, seed: int = 1, **cfg):
    """Wrap with peft LoRA and give B non-zero values, so A's gradient is non-zero."""
    pm = get_peft_model(model, LoraConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return pm.eval()


def make_batch(lengths, seq_len, side="right", prompt=2, vocab=97, seed=0, empty=()):
    """Variable-length batch; labels -100 on the first `prompt` real tokens and padding."""
    gen = torch.Generator().manual_seed(seed)
    bsz = len(lengths)
    ids = torch.randint(0, vocab, (bsz, seq_len), generator=gen)
    mask = torch.zeros(bsz, seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq_len - n :] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    for i in range(bsz):
        real = mask[i].nonzero().flatten()
        labels[i, real[:prompt]] = -100
        if i in empty:
            labels[i] = -100
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    return ids, labels, mask


def assert_close(got, want, rtol):
    got = got.double()
    want = want.double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    ok = ~want.isnan()
    rel = (
        ((got[ok] - want[ok]).abs() / want[ok].abs().clamp_min(1e-30)).max().item()
        if ok.any()
        else 0.0
    )
    assert rel <= rtol, f"max relative error {rel:.3e} > {rtol:.0e}\n got {got}\nwant {want}"


PEFT_CONFIGS = {
    "attn-r8": lambda kind: dict(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=GPT2_ATTN if kind == "gpt2" else LLAMA_ATTN,
    ),
    "all-r1-bias-all": lambda kind: dict(
        r=1,
        lora_alpha=2,
        bias="all",
        target_modules=GPT2_ATTN + ["c_fc"] if kind == "gpt2" else LLAMA_ALL,
    ),
    "rslora-lora-only-bias-save-head": lambda kind: dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        bias="lora_only",
        modules_to_save=["lm_head"],
        target_modules=["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"],
    ),
    "embedding-lora": lambda kind: dict(
        r=2,
        lora_alpha=4,
        target_modules=["wte", "c_attn"] if kind == "gpt2" else ["embed_tokens", "v_proj"],
    ),
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("cfg", list(PEFT_CONFIGS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_peft_matches_loop_float64(kind, cfg, side):
    model = lorafy(make_model(kind), **PEFT_CONFIGS[cfg](kind))
    ids, labels, mask = make_batch([11, 7, 3, 9, 5], 11, side=side, empty=(3,))
    got = per_example_grad_norms(model, ids, labels, mask)
    want = loop_per_example_grad_norms(model, ids, labels, mask)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert math.isnan(got[3])
    assert_close(got, want, 1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_peft_matches_loop_float32(kind):
    model = lorafy(
        make_model(kind, torch.float32),
        r=8,
        lora_alpha=16,
        target_modules=GPT2_ATTN if kind == "gpt2" else LLAMA_ALL,
    )
    ids, labels, mask = make_batch([13, 4, 9], 13, side="right", seed=3)
    assert_close(
        per_example_grad_norms(model, ids, labels, mask),
        loop_per_example_grad_norms(model, ids, labels, mask),
        1e-4,
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_full_model_trainable(kind):
    """Every parameter trainable: Conv1D/Linear, biases, LayerNorm/RMSNorm, embeddings,
    and GPT-2's lm_head tied to its token embedding."""
    model = make_model(kind)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, labels, mask = make_batch([6, 9, 2], 9, side="right", seed=4)
    assert_close(
        per_example_grad_norms(model, ids, labels, mask),
        loop_per_example_grad_norms(model, ids, labels, mask),
        1e-5,
    )
    got = per_example_grad_norms(model, ids, labels, mask, per_param=True)
    want = loop_per_example_grad_norms(model, ids, labels, mask, per_param=True)
    assert set(got) == set(want) == {n for n, p in model.named_parameters()}
    for name in want:
        assert_close(got[name], want[name], 1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sum_reduction_and_uniform_batch(kind):
    model = lorafy(
        make_model(kind),
        r=2,
        lora_alpha=4,
        target_modules=GPT2_ATTN if kind == "gpt2" else LLAMA_ATTN,
    )
    ids, labels, mask = make_batch([8, 8], 8, seed=5)
    got = per_example_grad_norms(model, ids, labels, mask, reduction="sum")
    assert_close(got, loop_per_example_grad_norms(model, ids, labels, mask, reduction="sum"), 1e-5)
    # No attention mask at all means "no padding".
    assert_close(per_example_grad_norms(model, ids, labels, reduction="sum"), got, 1e-9)


@pytest.mark.parametrize(
    "lengths,seq_len,empty",
    [([1], 1, ()), ([5], 5, ()), ([7, 1, 60], 60, ()), ([3, 6], 6, (0, 1)), ([2, 2, 2], 2, ())],
)
def test_odd_shapes(lengths, seq_len, empty):
    model = lorafy(
        make_model("gpt2", dtype=torch.float64), r=3, lora_alpha=5, target_modules=GPT2_ATTN
    )
    ids, labels, mask = make_batch(lengths, seq_len, prompt=1, empty=empty)
    got = per_example_grad_norms(model, ids, labels, mask)
    assert_close(got, loop_per_example_grad_norms(model, ids, labels, mask), 1e-5)
    for i, n in enumerate(lengths):
        # One real token, or only the prompt, means no supervised position: NaN.
        if n <= 1 or i in empty:
            assert math.isnan(got[i])


def test_call_leaves_model_as_found():
    model = lorafy(make_model("gpt2"), r=4, lora_alpha=8, target_modules=GPT2_ATTN)
    model.train()
    hooks_before = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    }
    ids, labels, mask = make_batch([5, 3], 5)
    per_example_grad_norms(model, ids, labels, mask)
    assert model.training
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    hooks_after = {
        n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    }
    assert hooks_after == hooks_before
    model.eval()
    per_example_grad_norms(model, ids, labels, mask)
    assert not any(m.training for m in model.modules())


def test_existing_grad_untouched_and_no_grad_context():
    model = lorafy(make_model("llama"), r=4, lora_alpha=8, target_modules=LLAMA_ATTN)
    ids, labels, mask = make_batch([5, 3], 5)
    p = next(p for p in model.parameters() if p.requires_grad)
    p.grad = torch.full_like(p, 7.0)
    with torch.no_grad():
        got = per_example_grad_norms(model, ids, labels, mask)
    assert torch.all(p.grad == 7.0)
    assert torch.isfinite(got).all() and (got > 0).all()


def test_train_mode_applies_dropout():
    model = lorafy(
        make_model("gpt2"), r=4, lora_alpha=8, lora_dropout=0.5, target_modules=GPT2_ATTN
    )
    ids, labels, mask = make_batch([9, 9], 9)
    a = per_example_grad_norms(model, ids, labels, mask)
    b = per_example_grad_norms(model, ids, labels, mask)
    assert torch.equal(a, b)  # eval mode by default: deterministic
    torch.manual_seed(0)
    c = per_example_grad_norms(model, ids, labels, mask, train=True)
    assert not torch.allclose(a, c)
    assert not model.training


def test_empty_batch():
    model = lorafy(make_model("gpt2"), r=4, lora_alpha=8, target_modules=GPT2_ATTN)
    ids = torch.zeros(0, 4, dtype=torch.long)
    got = per_example_grad_norms(model, ids, ids.clone())
    assert got.shape == (0,) and got.dtype == torch.float32


# -- on a GPU: the Triton backend against the reference backend ---------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_triton_backend_matches_reference_on_cuda(monkeypatch, kind, dtype):
    """The public API on a tiny CUDA model: the compiled Triton kernels give the
    reference backend's norms; float32 also matches the per-example loop."""
    pytest.importorskip("triton")
    from gradfilter.norms import ops

    monkeypatch.delenv("GRADFILTER_BACKEND", raising=False)
    assert ops.backend("cuda") == "triton"  # the default on CUDA
    model = lorafy(
        make_model(kind, torch.float32),
        r=8,
        lora_alpha=16,
        target_modules=GPT2_ATTN if kind == "gpt2" else LLAMA_ALL,
    ).to("cuda", dtype)
    batch = make_batch([13, 4, 9, 1, 11], 13, side="left" if kind == "llama" else "right", seed=6)
    ids, labels, mask = (t.cuda() for t in batch)
    got = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("GRADFILTER_BACKEND", backend)
        got[backend] = per_example_grad_norms(model, ids, labels, mask)
        assert got[backend].device.type == "cuda" and got[backend].dtype == torch.float32
    assert math.isnan(got["triton"][3])  # one real token: no supervised position
    # Both backends reduce the same factors in float32: only the summation order differs.
    assert_close(got["triton"], got["reference"], 1e-4 if dtype == torch.float32 else 1e-3)
    if dtype == torch.float32:
        assert_close(got["triton"], loop_per_example_grad_norms(model, ids, labels, mask), 1e-4)
