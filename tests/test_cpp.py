"""C++ CPU op ``torch.ops.gradfilter_cpp.outer_sq_norms`` (csrc/outer_sq_norms.cpp).

The extension is built just in time by :func:`gradfilter.norms._ext.load_cpp_ext`
(about a minute the first time, cached afterwards); without a compiler the
module is skipped.  The oracle is :mod:`gradfilter.norms.reference` in float64 on the
examples unpacked to a zero-padded ``[B, W, .]`` batch.
"""

from __future__ import annotations

import itertools
import os
import statistics
import subprocess
import sys
import time
import warnings

import pytest
import torch

from gradfilter.norms import _ext
from gradfilter.norms import reference as ref

if _ext.load_cpp_ext() is None:
    pytest.skip(
        "the gradfilter C++ extension could not be built here (no C++ compiler with OpenMP, "
        "or no ninja); gradfilter uses the plain-PyTorch reference instead",
        allow_module_level=True,
    )

op = torch.ops.gradfilter_cpp.outer_sq_norms
ROUTES = ["direct", "ghost"]


def unpack(rows: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Packed rows ``[N, d]`` -> zero-padded ``[B, W, d]`` in float64 (W = longest example)."""
    bounds = cu.tolist()
    lengths = [e - s for s, e in itertools.pairwise(bounds)]
    out = torch.zeros(len(lengths), max(lengths, default=0), rows.shape[1], dtype=torch.float64)
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        out[i, : e - s] = rows[s:e].double()
    return out


def packed_ref(left: torch.Tensor, right: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """float64 ``||sum_{t in i} left[t] (x) right[t]||^2`` per example (inputs as given)."""
    return ref.outer_sq_norms_direct_ref(unpack(left, cu), unpack(right, cu))


def cu_from(lengths: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


def rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want| / |want|``; zero norms are measured against 1e-3 x the largest."""
    if not want.numel():
        return 0.0
    got = got.double()
    scale = want.abs().max().clamp_min(1e-30)
    return float(((got - want).abs() / want.abs().clamp_min(1e-3 * scale)).max())


RAGGED = [0, 1, 2, 15, 16, 17, 0, 63, 64, 65, 130, 1]
# name: (lengths, a, b).  The widths cover both tile layouts of the direct
# route (thin tiles read in place, wide ones staged), partial register blocks
# and tiles, and a > b (the op swaps the factors).
CASES = {
    **{f"a{a}_b{b}": (RAGGED, a, b) for a in (1, 7, 63) for b in (5, 33, 100, 600)},
    "T1": ([1] * 9, 7, 33),
    "r1_wide": ([3, 0, 70, 1], 1, 2048),
    "lora_A": ([5, 0, 40, 130], 8, 768),
    "lora_B": ([5, 0, 40, 130], 768, 8),
    "r16_pow2_stride": ([33, 1, 80], 16, 1024),
    "staged_fp32": ([33, 0, 80], 20, 150),
    "multi_tile_both": ([70, 3], 130, 70),
    "many_examples": ([(7 * i) % 5 for i in range(300)], 7, 33),
    "long_example": ([700], 5, 9),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(route, case):
    lengths, a, b = CASES[case]
    cu = cu_from(lengths)
    left, right = rows(int(cu[-1]), a, 1), rows(int(cu[-1]), b, 2)
    got = op(left, right, cu, route)
    assert got.dtype == torch.float32 and got.shape == (len(lengths),)
    assert rel_err(got, packed_ref(left, right, cu)) < 1e-5
    assert bool((got[torch.tensor(lengths) == 0] == 0).all())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "case",
    ["a1_b600", "a7_b33", "a63_b100", "lora_B", "staged_fp32", "multi_tile_both", "many_examples"],
)
def test_fp64_matches_reference(route, case):
    lengths, a, b = CASES[case]
    cu = cu_from(lengths)
    left, right = rows(int(cu[-1]), a, 3, torch.float64), rows(int(cu[-1]), b, 4, torch.float64)
    got = op(left, right, cu, route)
    assert got.dtype == torch.float64
    assert rel_err(got, packed_ref(left, right, cu)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ["a1_b600", "a7_b33", "a63_b5", "lora_A", "multi_tile_both"])
def test_half_matches_reference_on_rounded_inputs(dtype, route, case):
    lengths, a, b = CASES[case]
    cu = cu_from(lengths)
    left, right = rows(int(cu[-1]), a, 5, dtype), rows(int(cu[-1]), b, 6, dtype)
    got = op(left, right, cu, route)
    assert got.dtype == torch.float32
    # The rounding is in the inputs only: they are widened exactly to float32,
    # and packed_ref widens the same rounded values to float64.
    assert rel_err(got, packed_ref(left, right, cu)) < 1e-4


@pytest.mark.parametrize("route", ["direct", "ghost", "gram"])
def test_int32_offsets_and_route_alias(route):
    lengths, a, b = CASES["a7_b33"]
    left, right = rows(sum(lengths), a, 7), rows(sum(lengths), b, 8)
    want = op(left, right, cu_from(lengths), "ghost" if route == "gram" else route)
    assert torch.equal(op(left, right, cu_from(lengths, torch.int32), route), want)


def test_routes_agree():
    lengths, a, b = CASES["lora_A"]
    left, right = rows(sum(lengths), a, 9), rows(sum(lengths), b, 10)
    cu = cu_from(lengths)
    assert rel_err(op(left, right, cu, "direct"), op(left, right, cu, "ghost").double()) < 1e-5


@pytest.mark.parametrize("route", ROUTES)
def test_empty_inputs(route):
    # no examples
    got = op(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(1, dtype=torch.int64), route)
    assert got.shape == (0,) and got.dtype == torch.float32
    # examples without rows
    got = op(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(4, dtype=torch.int64), route)
    assert torch.equal(got, torch.zeros(3))
    # zero-width factor: the gradient is empty
    cu = cu_from([2, 3])
    got = op(torch.zeros(5, 0, dtype=torch.float64), rows(5, 4, 0, torch.float64), cu, route)
    assert torch.equal(got, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("route", ROUTES)
def test_deterministic_and_thread_count_invariant(route):
    lengths, a, b = [50, 0, 200, 130, 7] * 4, 24, 300
    left, right = rows(sum(lengths), a, 11), rows(sum(lengths), b, 12)
    cu = cu_from(lengths)
    first = op(left, right, cu, route)
    assert torch.equal(op(left, right, cu, route), first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op(left, right, cu, route)
    finally:
        torch.set_num_threads(threads)
    # Each work item is computed whole by one thread and the partial sums are
    # added in a fixed order, so the thread count cannot change a bit.
    assert torch.equal(single, first)


def _inputs():
    return rows(5, 3, 0), rows(5, 4, 1), cu_from([2, 3])


BAD_INPUTS = {
    "unknown route": (lambda L, R, cu: (L, R, cu, "fast"), ValueError, "unknown route 'fast'"),
    "3-D left": (lambda L, R, cu: (L[None], R, cu, "direct"), ValueError, "packed rows"),
    "row mismatch": (lambda L, R, cu: (L[:4], R, cu, "direct"), ValueError, "same number of rows"),
    "2-D cu_seqlens": (lambda L, R, cu: (L, R, cu[None], "direct"), ValueError, "1-D tensor"),
    "empty cu_seqlens": (lambda L, R, cu: (L, R, cu[:0], "direct"), ValueError, "1-D tensor"),
    "float cu_seqlens": (
        lambda L, R, cu: (L, R, cu.float(), "direct"),
        TypeError,
        "int64 or int32",
    ),
    "int rows": (lambda L, R, cu: (L.int(), R.int(), cu, "direct"), TypeError, "float32, float64"),
    "mixed dtypes": (lambda L, R, cu: (L, R.double(), cu, "ghost"), TypeError, "same dtype"),
    "non-contiguous": (
        lambda L, R, cu: (torch.randn(3, 5).t(), R, cu, "direct"),
        RuntimeError,
        "contiguous",
    ),
    "cu not from 0": (
        lambda L, R, cu: (L, R, torch.tensor([1, 2, 5]), "direct"),
        ValueError,
        "start at 0",
    ),
    "cu decreasing": (
        lambda L, R, cu: (L, R, torch.tensor([0, 3, 2, 5]), "direct"),
        ValueError,
        "non-decreasing",
    ),
    "cu short of N": (
        lambda L, R, cu: (L, R, torch.tensor([0, 2, 4]), "ghost"),
        ValueError,
        "end at the number",
    ),
    "cu past N": (
        lambda L, R, cu: (L, R, torch.tensor([0, 2, 6]), "direct"),
        ValueError,
        "end at the number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs(case):
    make, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        op(*make(*_inputs()))


def test_non_cpu_tensors():
    left, right, cu = _inputs()
    with pytest.raises(RuntimeError, match="needs CPU tensors, got left on meta"):
        _ext.outer_sq_norms_cpp(left.to("meta"), right, cu, "direct")
    # The raw op has no kernel for other backends; the dispatcher refuses it.
    with pytest.raises(NotImplementedError):
        op(left.to("meta"), right.to("meta"), cu.to("meta"), "direct")


def test_python_wrapper_and_cache():
    assert _ext.cpp_available()
    assert _ext.load_cpp_ext() is _ext.load_cpp_ext()
    left, right, cu = _inputs()
    assert torch.equal(
        _ext.outer_sq_norms_cpp(left, right, cu, "direct"), op(left, right, cu, "direct")
    )


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'gradfilter_cpp'\nmore lines")

    monkeypatch.setattr(_ext, "_load", broken)
    monkeypatch.setattr(_ext, "_tried", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ext.load_cpp_ext() is None
        assert _ext.load_cpp_ext() is None
        assert not _ext.cpp_available()
    assert len(caught) == 1
    assert "falls back to the plain-PyTorch reference" in str(caught[0].message)
    assert "Error building extension" in str(caught[0].message)
    with pytest.raises(RuntimeError, match="not available"):
        _ext.outer_sq_norms_cpp(*_inputs(), "direct")


def test_build_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADFILTER_CACHE", str(tmp_path / "ext"))
    assert _ext.build_directory() == tmp_path / "ext" and (tmp_path / "ext").is_dir()
    monkeypatch.delenv("GRADFILTER_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _ext.build_directory()
    assert path.parent == tmp_path / "home" / ".cache" / "gradfilter"
    assert path.name.startswith(f"ext-{torch.__version__}-")
    assert path == _ext.build_directory()  # the hash is stable


def test_import_does_not_build():
    code = (
        "import sys, gradfilter, gradfilter.norms.ops\n"
        "assert 'gradfilter.norms._ext' not in sys.modules, 'gradfilter.norms._ext imported'\n"
        "assert 'gradfilter_cpp' not in sys.modules, 'extension loaded'\n"
    )
    env = {**os.environ, "GRADFILTER_CACHE": "/nonexistent/should-not-be-created"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def _median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@pytest.mark.parametrize(("a", "b"), [(8, 768), (768, 8)])
def test_timing_direct_vs_reference(a, b):
    """Prints timings only; asserts nothing about speed (shared CI machines are noisy)."""
    bsz, width = 8, 512
    left, right = rows(bsz * width, a, 13), rows(bsz * width, b, 14)
    cu = torch.arange(0, bsz * width + 1, width)
    lp, rp = left.view(bsz, width, a), right.view(bsz, width, b)
    got = op(left, right, cu, "direct")
    assert rel_err(got, ref.outer_sq_norms_direct_ref(lp.double(), rp.double())) < 1e-5
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        try:
            cpp = _median_ms(lambda: op(left, right, cu, "direct"))
            padded = _median_ms(lambda: ref.outer_sq_norms_direct_ref(lp, rp))
        finally:
            torch.set_num_threads(threads)
        print(
            f"\n[timing] N={bsz}x{width} a={a} b={b} fp32, {n_threads} thread(s), load {load:.1f}: "
            f"C++ direct {cpp:.2f} ms, reference direct (padded bmm) {padded:.2f} ms "
            f"-> C++ {padded / cpp:.2f}x faster"
        )


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_public_api_cpp_backend_matches_reference(monkeypatch, kind):
    from peft import LoraConfig, get_peft_model

    from gradfilter import per_example_grad_norms
    from gradfilter.io.models import tiny_gpt2, tiny_llama
    from gradfilter.norms import ops
    from gradfilter.norms.oracles import loop_per_example_grad_norms

    base = tiny_gpt2(dtype=torch.float64) if kind == "gpt2" else tiny_llama(dtype=torch.float64)
    targets = ["c_attn", "c_proj"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    labels = torch.where(mask.bool(), ids, -100)
    out = {}
    for b in ("reference", "cpp"):
        monkeypatch.setenv("GRADFILTER_BACKEND", b)
        assert ops.backend() == b
        out[b] = per_example_grad_norms(model, ids, labels, mask)
    torch.testing.assert_close(out["cpp"], out["reference"], rtol=1e-6, atol=0)
    want = loop_per_example_grad_norms(model, ids, labels, mask)
    torch.testing.assert_close(out["cpp"].double(), want.double(), rtol=1e-5, atol=0)
