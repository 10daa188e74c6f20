"""Norms in the training pass: what recording per-example norms costs a step.

One optimiser step of a LoRA ensemble (members folded into the batch), three ways:

* ``step``: a plain training step (``LoRAEnsemble.train_step``);
* ``step+record``: the same step with ``record_norms=True``: the backward's
  weight-gradient op also returns every example's squared norm;
* ``step+pass``: a plain step followed by a separate norm pass over a folded
  batch of the same size (``LoRAEnsemble.per_example_grad_norms``, as the
  snapshot passes of ``gradfilter score`` run): what ``M x B`` norms cost
  without the fused backward.

On CUDA the cases at B=8, T=512 and T=1024 are added.

Run::

    python -m pytest benchmarks/bench_fused.py \
        --benchmark-json benchmarks/results/cpu-2core-fused.json
    python benchmarks/report.py benchmarks/results/cpu-2core-fused.json
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from gradfilter import LoRAEnsemble
from gradfilter.norms import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("GRADFILTER_BENCH_FULL") == "1"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _gpt2_shaped(n_layer: int, n_embd: int, n_head: int, vocab: int):
    from gradfilter.io.models import tiny_gpt2

    return tiny_gpt2(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=1024
    ).to(DEVICE)


MODELS = {
    # name: (n_layer, n_embd, n_head, vocab)
    "small (4 x 128)": (4, 128, 4, 512),
    "GPT-2-small-shaped (4 x 768)": (4, 768, 12, 50257),
}
CASES = [(5, 4, 128), (5, 2, 512)] + ([(5, 8, 512)] if FULL else [])
if DEVICE == "cuda":  # the sizes the targets name: B=8, T=512 and 1024
    CASES = CASES + [c for c in [(5, 8, 512), (5, 8, 1024)] if c not in CASES]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return request.param, _gpt2_shaped(*MODELS[request.param])


def _batches(members: int, bsz: int, seq: int, vocab: int):
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(members):
        ids = torch.randint(0, vocab, (bsz, seq), generator=gen).to(DEVICE)
        labels = ids.clone()
        labels[:, : seq // 4] = -100
        out.append((ids, labels, torch.ones_like(ids)))
    return out


@pytest.mark.parametrize("mode", ["step", "step+record", "step+pass"])
@pytest.mark.parametrize("members,bsz,seq", CASES)
def test_train_step(benchmark, model, mode, members, bsz, seq):
    name, base = model
    vocab = MODELS[name][3]
    ens = LoRAEnsemble(base, members=members, r=8, alpha=16, dropout=0.05)
    opt = ens.make_optimizer(lr=0.0)  # lr 0: every round times the same state
    batches = _batches(members, bsz, seq, vocab)
    benchmark.group = f"train step, {name}, M={members} B={bsz} T={seq}"
    benchmark.extra_info.update(
        level="train-step",
        provider=mode,
        model=name,
        M=members,
        B=bsz,
        T=seq,
        backend=ops.backend(DEVICE),
    )

    def run():
        if mode == "step+pass":
            ens.train_step(batches, opt)
            ens.per_example_grad_norms(*batches[0])
        else:
            ens.train_step(batches, opt, record_norms=(mode == "step+record"))
        _sync()

    try:
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    finally:
        ens.remove()
