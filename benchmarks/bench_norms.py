"""Per-example gradient norms: gradfilter against the tools people would use instead.

Providers side by side in one run, each case a small spec (shape, dtype,
provider).  Layer level (one LoRA factor pair of a GPT-2-small-shaped layer,
d = 768): gradfilter's routes on the layer inputs and output gradients,
Opacus's ghost norm sampler for ``nn.Linear`` (the Gram route it always
takes), and materialise-then-norm.  Model level: gradfilter, Opacus
``GradSampleModule`` (hooks), Opacus ghost clipping (norms only),
``torch.func`` ``vmap(grad)``, the per-example loop (small sizes), and a plain
LoRA forward + backward with no norms (the reference for overhead).

Run (CPU sizes by default; ``GRADFILTER_BENCH_FULL=1`` adds the long cases)::

    python -m pytest benchmarks/bench_norms.py --benchmark-json benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json   # the README table
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter import LoRAEnsemble, per_example_grad_norms
from gradfilter import ops
from gradfilter import reference as ref
from gradfilter.layers import Factor
from gradfilter.baselines import (
    functorch_per_example_grad_norms,
    loop_per_example_grad_norms,
    opacus_ghost_norms,
    opacus_per_example_grad_norms,
)

FULL = os.environ.get("GRADFILTER_BENCH_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# -- layer level --------------------------------------------------------------------

LAYER_CASES = [(b, t, r) for b in (1, 8) for t in (128, 512) for r in (8, 64)]
if FULL:
    LAYER_CASES += [(8, 2048, 8), (8, 2048, 64)]


def _layer_tensors(bsz: int, seq: int, r: int, d: int = 768):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, seq, d, generator=gen).to(DEVICE)  # LoRA A input
    z = torch.randn(bsz, seq, r, generator=gen).to(DEVICE)  # gradient at A's output
    h = torch.randn(bsz, seq, r, generator=gen).to(DEVICE)  # LoRA B input
    g = torch.randn(bsz, seq, d, generator=gen).to(DEVICE)  # gradient at B's output
    return x, z, h, g


def _gradfilter_layer(x, z, h, g):
    """Through the backend seam (C++ on CPU, Triton on CUDA, by GRADFILTER_BACKEND)."""
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    window = (0, x.shape[1])
    return (ops.factor_sq_norms([Factor("outer", z, x)], valid, window)
            + ops.factor_sq_norms([Factor("outer", g, h)], valid, window))


def _reference_layer(x, z, h, g):
    return ref.outer_sq_norms_ref(z, x) + ref.outer_sq_norms_ref(g, h)


def _materialise_layer(x, z, h, g):
    ga = torch.einsum("btr,btd->brd", z, x)
    gb = torch.einsum("btd,btr->bdr", g, h)
    return ga.square().sum((1, 2)) + gb.square().sum((1, 2))


def _opacus_ghost_layer(x, z, h, g):
    from opacus.grad_sample.linear import compute_linear_norm_sample

    a = torch.nn.Linear(x.shape[-1], z.shape[-1], bias=False).to(DEVICE)
    b = torch.nn.Linear(h.shape[-1], g.shape[-1], bias=False).to(DEVICE)
    na = compute_linear_norm_sample(a, [x], z)[a.weight]
    nb = compute_linear_norm_sample(b, [h], g)[b.weight]
    return na.square() + nb.square()


LAYER_PROVIDERS = {
    "gradfilter": _gradfilter_layer,
    "gradfilter-reference": _reference_layer,
    "opacus-ghost": _opacus_ghost_layer,
    "materialise": _materialise_layer,
}


@pytest.mark.parametrize("provider", list(LAYER_PROVIDERS))
@pytest.mark.parametrize("bsz,seq,r", LAYER_CASES)
def test_layer_norm(benchmark, provider, bsz, seq, r):
    x, z, h, g = _layer_tensors(bsz, seq, r)
    fn = LAYER_PROVIDERS[provider]
    want = _materialise_layer(x, z, h, g).double()
    got = fn(x, z, h, g).double()
    assert torch.allclose(got, want, rtol=1e-3), (provider, got, want)
    benchmark.group = f"layer d=768 r={r} B={bsz} T={seq}"
    benchmark.extra_info.update(level="layer", provider=provider, B=bsz, T=seq, r=r,
                                backend=ops.backend(DEVICE))

    def run():
        fn(x, z, h, g)
        _sync()

    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)


# -- model level --------------------------------------------------------------------


def gpt2_small_lora(n_layer: int = 12, r: int = 8):
    """A GPT-2-small-shaped model (random weights) with LoRA on attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"],
                                             fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    return model.to(DEVICE).eval()


def _plain_step(model, ids, labels):
    out = model(input_ids=ids, labels=labels, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


MODEL_PROVIDERS = {
    "plain-step": _plain_step,
    "gradfilter": per_example_grad_norms,
    "opacus": opacus_per_example_grad_norms,
    "opacus-ghost": opacus_ghost_norms,
    "torch.func": functorch_per_example_grad_norms,
    "loop": loop_per_example_grad_norms,
}
MODEL_CASES = [(4, 128)] + ([(8, 512), (8, 1024)] if FULL else [(2, 512)])


@pytest.fixture(scope="module")
def gpt2_small():
    return gpt2_small_lora(n_layer=12 if FULL else 4)


@pytest.mark.parametrize("provider", list(MODEL_PROVIDERS))
@pytest.mark.parametrize("bsz,seq", MODEL_CASES)
def test_model_norms(benchmark, gpt2_small, provider, bsz, seq):
    if provider == "loop" and bsz * seq > 1024:
        pytest.skip("the per-example loop is only timed at small sizes")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (bsz, seq), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    fn = MODEL_PROVIDERS[provider]
    benchmark.group = f"GPT-2-small-shaped LoRA r=8 B={bsz} T={seq}"
    benchmark.extra_info.update(level="model", provider=provider, B=bsz, T=seq,
                                backend=ops.backend(DEVICE))
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run():
        fn(gpt2_small, ids, labels)
        _sync()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20


# -- ensemble --------------------------------------------------------------------------


@pytest.mark.parametrize("members", [1, 2, 5, 8])
@pytest.mark.parametrize("mode", ["folded", "sequential"])
def test_ensemble(benchmark, members, mode):
    from gradfilter.models import tiny_gpt2

    base = tiny_gpt2(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=256).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 512, (8, 128), generator=gen).to(DEVICE)
    labels = ids.clone()
    ens = LoRAEnsemble(base, members=members, r=8, alpha=16)
    singles = [LoRAEnsemble(base, members=1, r=8, alpha=16, member_seeds=[s])
               for s in ens.member_seeds] if mode == "sequential" else []
    benchmark.group = f"ensemble of {members}, small GPT-2 (4 x 128), B=8 T=128"
    benchmark.extra_info.update(level="ensemble", provider=mode, M=members)

    def run():
        if mode == "folded":
            ens.per_example_grad_norms(ids, labels)
        else:
            for s in singles:
                s.per_example_grad_norms(ids, labels)
        _sync()

    # Several ensembles may share a base: each one's adapters act only inside its own forward.
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    for e in [ens, *singles]:
        e.remove()
