"""Per-example gradient norms: gradfilter against the tools people would use instead.

Providers side by side in one run, each case a small spec (shape, dtype,
provider).  Layer level (one LoRA factor pair of a GPT-2-small-shaped layer,
d = 768): gradfilter's routes on the layer inputs and output gradients,
Opacus's ghost norm sampler for ``nn.Linear`` (the Gram route it always
takes), and materialise-then-norm.  Model level: gradfilter, Opacus
``GradSampleModule`` (hooks), Opacus ghost clipping (norms only),
``torch.func`` ``vmap(grad)``, the per-example loop (small sizes), and a plain
LoRA forward + backward with no norms (the reference for overhead and memory).
Ensemble: all members folded into one pass against one pass per member.

Model-level cases:

* default: a 4-layer GPT-2-small-shaped model (B=4 T=128, B=2 T=512) and the
  real SmolLM2-135M-Instruct (LoRA r=8 on q/k/v/o; B=1 T=512, B=8 T=128;
  skipped when its GGUF package is not installed);
* ``GRADFILTER_BENCH_FULL=1``: the 12-layer GPT-2-small-shaped model at
  B=2, T=512 and T=1024.  B is 2, not 8, so that the whole grid fits in
  about half an hour on a 2-core CPU shared with other work: at B=8, T=1024
  one call takes minutes for Opacus's hooks and ``torch.func``, and eager
  attention alone needs several GB resident;
* on CUDA, also the sizes the targets name: the 12-layer model at B=8,
  T=512 and T=1024, and the layer at B=8, T=1024.

``GRADFILTER_BENCH_DTYPE=bfloat16`` (or ``float16``) runs the layer and model
cases in that dtype instead of float32 (on CUDA; the CPU lane stays float32).

Each timed round of a model-level norms provider is paired with a plain step
run just before it (``paired_ratio_median`` in ``extra_info``): on a shared
machine the load drifts between tests, and the paired ratio is the robust
measure of overhead over the plain step.

Peak memory (model-level cases): one extra, untimed call per case after the
timed rounds.  On CUDA it is ``max_memory_allocated`` minus the allocation
before the call.  On CPU it is the peak resident set size over the call
minus the resident set size before it (Linux: writing ``5`` to
``/proc/self/clear_refs`` resets ``VmHWM``; ``VmRSS`` before and ``VmHWM``
after come from ``/proc/self/status``).  Stored as ``peak_delta_mib`` in
``extra_info``, with ``param_mib`` (the model's parameters and buffers) so the
ratio can also be read with the weights included.

Run (CPU sizes by default; ``GRADFILTER_BENCH_FULL=1`` adds the long cases)::

    python -m pytest benchmarks/bench_norms.py --benchmark-json benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json   # the README table

On a CPU shared with other work, set ``OMP_NUM_THREADS`` to the number of
free cores: more threads than free cores makes every provider several times
slower and the timings erratic.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter import LoRAEnsemble, per_example_grad_norms
from gradfilter.norms import ops
from gradfilter.norms import reference as ref
from gradfilter.norms.layers import Factor
from gradfilter.norms.oracles import (
    functorch_per_example_grad_norms,
    loop_per_example_grad_norms,
    opacus_ghost_norms,
    opacus_per_example_grad_norms,
)

FULL = os.environ.get("GRADFILTER_BENCH_FULL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
    os.environ.get("GRADFILTER_BENCH_DTYPE", "float32")
]
#: Appended to group names, so that float32 and half-precision cases never share a table row.
DTYPE_TAG = "" if DTYPE == torch.float32 else f" {str(DTYPE).removeprefix('torch.')}"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _common_info() -> dict:
    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": DEVICE,
        "dtype": str(DTYPE).removeprefix("torch."),
    }


# -- peak memory ----------------------------------------------------------------------


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(m.group(1)) / 1024


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that the
    resident set before a call holds no free memory the call could reuse."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak(fn) -> dict:
    """Run ``fn()`` once and return its peak memory above what was in use before it.

    ``{"peak_delta_mib": ..., "before_mib": ..., "peak_mib": ...}``; empty when the
    platform offers no way to measure it.
    """
    _release_free_memory()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            before = _proc_status_mib("VmRSS")
        except OSError:
            return {}
        fn()
        peak = _proc_status_mib("VmHWM")
    return {"peak_delta_mib": peak - before, "before_mib": before, "peak_mib": peak}


# -- layer level --------------------------------------------------------------------

LAYER_CASES = [(b, t, r) for b in (1, 8) for t in (128, 512) for r in (8, 64)]
if DEVICE == "cuda":
    LAYER_CASES += [(8, 1024, r) for r in (8, 64)]
if FULL:
    LAYER_CASES += [(b, 2048, r) for b in (1, 8) for r in (8, 64)]


def _layer_tensors(bsz: int, seq: int, r: int, d: int = 768):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bsz, seq, d, generator=gen).to(DEVICE, DTYPE)  # LoRA A input
    z = torch.randn(bsz, seq, r, generator=gen).to(DEVICE, DTYPE)  # gradient at A's output
    h = torch.randn(bsz, seq, r, generator=gen).to(DEVICE, DTYPE)  # LoRA B input
    g = torch.randn(bsz, seq, d, generator=gen).to(DEVICE, DTYPE)  # gradient at B's output
    return x, z, h, g


def _gradfilter_layer(x, z, h, g):
    """Through the backend seam (C++ on CPU, Triton on CUDA, by GRADFILTER_BACKEND)."""
    valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    window = (0, x.shape[1])
    return ops.factor_sq_norms([Factor("outer", z, x)], valid, window) + ops.factor_sq_norms(
        [Factor("outer", g, h)], valid, window
    )


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
    if DTYPE == torch.float32:
        want, rtol = _materialise_layer(x, z, h, g).double(), 1e-3
    else:  # the exact norms of the rounded inputs; half-precision providers round their output
        want, rtol = _materialise_layer(*(t.double() for t in (x, z, h, g))), 2e-2
    got = fn(x, z, h, g).double()
    assert torch.allclose(got, want, rtol=rtol), (provider, got, want)
    benchmark.group = f"layer d=768 r={r} B={bsz} T={seq}{DTYPE_TAG}"
    benchmark.extra_info.update(
        level="layer",
        provider=provider,
        B=bsz,
        T=seq,
        r=r,
        backend=ops.backend(DEVICE),
        **_common_info(),
    )

    def run():
        fn(x, z, h, g)
        _sync()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)


# -- model level --------------------------------------------------------------------


def gpt2_small_lora(n_layer: int = 12, r: int = 8):
    """A GPT-2-small-shaped model (random weights) with LoRA on attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=768,
        n_head=12,
        vocab_size=50257,
        n_positions=2048,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    return model.to(DEVICE, DTYPE).eval()


def smollm2_lora(r: int = 8):
    """SmolLM2-135M-Instruct (real weights, float32) with LoRA on q/k/v/o."""
    from gradfilter.io.models import load_proxy, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2-135M not available: {e}")
    model, _ = load_proxy()
    model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(DEVICE, DTYPE).eval()


MODELS = {
    "gpt2-4": ("GPT-2-small-shaped (4 layers) LoRA r=8", lambda: gpt2_small_lora(n_layer=4)),
    "gpt2-12": ("GPT-2-small-shaped (12 layers) LoRA r=8", lambda: gpt2_small_lora(n_layer=12)),
    "smollm2": ("SmolLM2-135M LoRA r=8 q/k/v/o", smollm2_lora),
}


@functools.lru_cache(maxsize=1)  # one model resident at a time; cases are ordered by model
def _model(key: str):
    return MODELS[key][1]()


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
ROUNDS, WARMUP = 3, 1
MODEL_CASES = (
    [("gpt2-12", 2, 512), ("gpt2-12", 2, 1024)]
    if FULL
    else [("gpt2-4", 4, 128), ("gpt2-4", 2, 512), ("smollm2", 1, 512), ("smollm2", 8, 128)]
)
if DEVICE == "cuda":  # the sizes the targets name; first, so that cases stay ordered by model
    MODEL_CASES = [("gpt2-12", 8, 512), ("gpt2-12", 8, 1024)] + MODEL_CASES


@pytest.mark.parametrize("provider", list(MODEL_PROVIDERS))
@pytest.mark.parametrize("model_key,bsz,seq", MODEL_CASES)
def test_model_norms(benchmark, provider, model_key, bsz, seq):
    if provider == "loop" and bsz * seq > 1024:
        pytest.skip("the per-example loop is only timed at small sizes")
    model = _model(model_key)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (bsz, seq), generator=gen).to(DEVICE)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    fn = MODEL_PROVIDERS[provider]
    benchmark.group = f"{MODELS[model_key][0]} B={bsz} T={seq}{DTYPE_TAG}"
    param_mib = (
        sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    )
    benchmark.extra_info.update(
        level="model",
        model=model_key,
        provider=provider,
        B=bsz,
        T=seq,
        backend=ops.backend(DEVICE),
        param_mib=param_mib,
        **_common_info(),
    )

    def run():
        fn(model, ids, labels)
        _sync()

    # Each timed round of a norms provider is preceded by an (untimed by pytest-benchmark)
    # plain step timed here: the paired ratio provider / plain step cancels the slow drift
    # of a machine shared with other work, which separate tests cannot.
    plain_s: list[float] = []
    own_s: list[float] = []
    calls = [0]

    def setup():
        calls[0] += 1
        if provider != "plain-step" and calls[0] > WARMUP:
            t0 = time.perf_counter()
            _plain_step(model, ids, labels)
            _sync()
            plain_s.append(time.perf_counter() - t0)

    def timed_run():
        t0 = time.perf_counter()
        run()
        own_s.append(time.perf_counter() - t0)

    benchmark.pedantic(timed_run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if plain_s:
        ratios = sorted(t / p for t, p in zip(own_s[WARMUP:], plain_s, strict=False))
        benchmark.extra_info.update(
            paired_plain_s=plain_s,
            paired_ratios=ratios,
            paired_ratio_median=ratios[len(ratios) // 2],
        )
    benchmark.extra_info.update(measure_peak(run))


# -- ensemble --------------------------------------------------------------------------

# (name, tiny_gpt2 kwargs, B, T, timed rounds).  "small" is where the matrix products
# dominate; "tiny" is where per-operation overhead does (kernel launches on a GPU,
# dispatcher and Python on a CPU), which folding the members into one pass removes.
ENSEMBLE_MODELS = {
    "small": (
        "small GPT-2 (4 x 128)",
        {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 512, "n_positions": 256},
        8,
        128,
        3,
    ),
    "tiny": (
        "tiny GPT-2 (2 x 64)",
        {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 64},
        4,
        32,
        20,
    ),
}


@pytest.mark.parametrize("mode", ["folded", "sequential"])
@pytest.mark.parametrize("members", [1, 2, 5, 8])
@pytest.mark.parametrize("size", list(ENSEMBLE_MODELS))
def test_ensemble(benchmark, size, members, mode):
    from gradfilter.io.models import tiny_gpt2

    label, kwargs, bsz, seq, rounds = ENSEMBLE_MODELS[size]
    base = tiny_gpt2(**kwargs).to(DEVICE)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, kwargs["vocab_size"], (bsz, seq), generator=gen).to(DEVICE)
    labels = ids.clone()
    ens = LoRAEnsemble(base, members=members, r=8, alpha=16)
    singles = (
        [LoRAEnsemble(base, members=1, r=8, alpha=16, member_seeds=[s]) for s in ens.member_seeds]
        if mode == "sequential"
        else []
    )
    benchmark.group = f"ensemble of {members}, {label}, B={bsz} T={seq}"
    benchmark.extra_info.update(
        level="ensemble", provider=mode, M=members, size=size, B=bsz, T=seq, **_common_info()
    )

    def run():
        if mode == "folded":
            ens.per_example_grad_norms(ids, labels)
        else:
            for s in singles:
                s.per_example_grad_norms(ids, labels)
        _sync()

    # Several ensembles may share a base: each one's adapters act only inside its own forward.
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    for e in [ens, *singles]:
        e.remove()
