"""Triton kernels for per-example outer-product gradient norms over packed rows.

Without CUDA the kernels run in the Triton interpreter on the CPU, so every case
is kept tiny.  The oracle is :mod:`gradfilter.norms.reference` in float64 on the
examples unpacked to a zero-padded ``[B, W, .]`` batch.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

_SET_INTERPRET = "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available()
if _SET_INTERPRET:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import triton

from gradfilter.kernels import lora_norms as K
from gradfilter.norms import ops, routes
from gradfilter.norms import reference as ref

if _SET_INTERPRET:
    # Triton fixed the interpreter mode when the kernels were decorated.  The
    # interpreter still needs the variable while kernels run, so the fixture
    # below sets it for this module's tests only; other test modules keep their
    # usual backend.
    os.environ.pop("TRITON_INTERPRET", None)

if not K.interpreted() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if K.interpreted() else "cuda"
ROUTES = ["direct", "ghost"]


@pytest.fixture(scope="module", autouse=True)
def _interpreter_env():
    if not _SET_INTERPRET:
        yield
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def launch(route: str, *args, **kwargs) -> torch.Tensor:
    fn = K.outer_sq_norms_direct if route == "direct" else K.outer_sq_norms_gram
    return fn(*args, **kwargs)


def unpack(rows: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Packed rows ``[N, d]`` -> zero-padded ``[B, W, d]`` in float64 (W = longest example)."""
    bounds = cu.tolist()
    lengths = [e - s for s, e in itertools.pairwise(bounds)]
    width = max(lengths, default=0)
    out = torch.zeros(len(lengths), width, rows.shape[1], dtype=torch.float64)
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        out[i, : e - s] = rows[s:e].double().cpu()
    return out


def outer_sq_norms_packed_ref(
    left: torch.Tensor, right: torch.Tensor, cu: torch.Tensor
) -> torch.Tensor:
    """float64 ``||sum_{t in i} left[t] (x) right[t]||^2`` per example, via the padded reference."""
    return ref.outer_sq_norms_direct_ref(unpack(left, cu.cpu()), unpack(right, cu.cpu()))


def cu_from(lengths: list[int], offset: int = 0, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    vals = [offset]
    for n in lengths:
        vals.append(vals[-1] + n)
    return torch.tensor(vals, dtype=dtype, device=DEVICE)


def rows(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen).to(dtype).to(DEVICE)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest ``|got - want| / |want|``; zero norms are measured against 1e-3 x the largest."""
    if not want.numel():
        return 0.0
    got = got.double().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    return float(((got - want).abs() / want.abs().clamp_min(1e-3 * scale)).max())


# (lengths, a, b, extra rows at the start / end that no example owns)
CASES = {
    "ragged_with_0_and_1": ([0, 1, 3, 17, 0, 64], 7, 33, 0, 0),
    "a1_b100": ([5, 1, 0, 12], 1, 100, 0, 0),
    "single_row": ([1], 63, 5, 0, 0),
    "lora_b_r1": ([10, 0, 31], 33, 1, 0, 0),
    "lora_a_r4_odd": ([9, 2, 20], 4, 63, 0, 0),
    "unowned_rows": ([4, 6, 3], 5, 7, 3, 4),
    # ensemble members folded into examples: M=4 members x B=6 examples
    "many_members": ([3, 0, 7, 1, 12, 5] * 4, 16, 20, 0, 0),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(route, case):
    lengths, a, b, head, tail = CASES[case]
    cu = cu_from(lengths, offset=head)
    n = head + sum(lengths) + tail
    left, right = rows(n, a, 1), rows(n, b, 2)
    got = launch(route, left, right, cu)
    assert got.dtype == torch.float32 and got.shape == (len(lengths),)
    want = outer_sq_norms_packed_ref(left, right, cu)
    assert rel_err(got, want) < 1e-4
    zero = torch.tensor(lengths) == 0
    assert bool((got.cpu()[zero] == 0).all())


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ["ragged_with_0_and_1", "a1_b100", "many_members"])
def test_fp16_matches_reference_on_rounded_inputs(route, case):
    lengths, a, b, head, tail = CASES[case]
    cu = cu_from(lengths, offset=head)
    n = head + sum(lengths) + tail
    left, right = rows(n, a, 3, torch.float16), rows(n, b, 4, torch.float16)
    got = launch(route, left, right, cu)
    # fp16 rounding is in the inputs only; products and sums are fp32.
    want = outer_sq_norms_packed_ref(left, right, cu)
    assert rel_err(got, want) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="bfloat16 is wrong in the Triton interpreter")
@pytest.mark.parametrize("route", ROUTES)
def test_bf16_on_gpu(route):
    lengths, a, b, _, _ = CASES["ragged_with_0_and_1"]
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 5, torch.bfloat16), rows(sum(lengths), b, 6, torch.bfloat16)
    want = outer_sq_norms_packed_ref(left, right, cu)
    assert rel_err(launch(route, left, right, cu), want) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("route", ROUTES)
def test_launch_on_the_tensors_own_device(route):
    """Tensors on cuda:1 while cuda:0 is current: the launch follows the tensors."""
    lengths, a, b, _, _ = CASES["ragged_with_0_and_1"]
    left, right = rows(sum(lengths), a, 21), rows(sum(lengths), b, 22)
    cu = cu_from(lengths)
    want = launch(route, left, right, cu)
    with torch.cuda.device(0):
        got = launch(route, left.to("cuda:1"), right.to("cuda:1"), cu.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=0)
    got = K.outer_grad_sq_norms(
        left.to("cuda:1"),
        right.to("cuda:1"),
        cu.to("cuda:1"),
        torch.tensor([0, 6], device="cuda:1"),
    )[1]
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=0)


def test_routes_agree_with_each_other():
    lengths, a, b = [2, 40, 0, 7], 9, 11
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 7), rows(sum(lengths), b, 8)
    torch.testing.assert_close(
        launch("direct", left, right, cu), launch("ghost", left, right, cu), rtol=1e-5, atol=0
    )


def test_direct_split_along_t_matches_whole_example():
    lengths, a, b = [64, 0, 37, 1, 50], 5, 9
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 9), rows(sum(lengths), b, 10)
    whole = K.outer_sq_norms_direct(left, right, cu)
    want = outer_sq_norms_packed_ref(left, right, cu)
    for rpp in (7, 16, 32):  # 10, 4 and 2 chunks of the longest example
        split = K.outer_sq_norms_direct(left, right, cu, rows_per_program=rpp)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=0)
        assert rel_err(split, want) < 1e-4


def test_direct_auto_split_when_grid_is_small(monkeypatch):
    # Pretend the device wants 64 programs: one 600-row example with one tile
    # is then cut into chunks of 256 rows (3 chunks, partial tiles summed).
    monkeypatch.setattr(K, "_target_programs", lambda device: 64)
    assert K._auto_rows_per_program(1, 4, 20, 600, torch.device(DEVICE)) == 256
    assert K._auto_rows_per_program(64, 4, 20, 600, torch.device(DEVICE)) == 600
    lengths, a, b = [600, 0, 3], 4, 20
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 19), rows(sum(lengths), b, 20)
    got = K.outer_sq_norms_direct(left, right, cu)
    assert rel_err(got, outer_sq_norms_packed_ref(left, right, cu)) < 1e-4


def test_gram_split_along_t_matches_one_block():
    lengths, a, b = [64, 0, 37, 1, 50], 5, 9
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 11), rows(sum(lengths), b, 12)
    one = K.outer_sq_norms_gram(
        left, right, cu, config=triton.Config({"BLOCK_T": 64, "BLOCK_K": 16})
    )
    # 16-row blocks: 4 x 4 block pairs per 64-row example, 10 programs with p <= q.
    many = K.outer_sq_norms_gram(
        left, right, cu, config=triton.Config({"BLOCK_T": 16, "BLOCK_K": 16})
    )
    torch.testing.assert_close(many, one, rtol=1e-5, atol=0)
    assert rel_err(many, outer_sq_norms_packed_ref(left, right, cu)) < 1e-4


def test_deterministic_and_index_dtypes():
    lengths, a, b = [5, 30, 0, 12], 6, 10
    left, right = rows(sum(lengths), a, 13), rows(sum(lengths), b, 14)
    for route in ROUTES:
        first = launch(route, left, right, cu_from(lengths, dtype=torch.int32))
        again = launch(route, left, right, cu_from(lengths, dtype=torch.int64))
        assert torch.equal(first, again)


def test_non_contiguous_inputs():
    lengths, a, b = [6, 11], 5, 8
    n = sum(lengths)
    left = rows(a, n, 15).t()  # [n, a] with stride (1, n)
    right = rows(n, 2 * b, 16)[:, ::2]
    cu = cu_from(lengths)
    want = outer_sq_norms_packed_ref(left, right, cu)
    for route in ROUTES:
        assert rel_err(launch(route, left, right, cu), want) < 1e-4


def padded_batch(lengths: list[int], first: list[int], seq: int, d: int, seed: int):
    """A zero-padded ``[B, T, d]`` batch whose example i holds ``lengths[i]`` random
    rows from position ``first[i]``, its spans, and the same rows packed."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), seq, d)
    for i, (n, s) in enumerate(zip(lengths, first, strict=True)):
        out[i, s : s + n] = torch.randn(n, d, generator=gen)
    starts = torch.tensor(first, dtype=torch.int64)
    ends = starts + torch.tensor(lengths, dtype=torch.int64)
    packed = torch.cat([out[i, s:e] for i, (s, e) in enumerate(zip(starts, ends, strict=True))])
    return out.to(DEVICE), (starts.to(DEVICE), ends.to(DEVICE)), packed.to(DEVICE)


SPAN_CASE = ([5, 0, 12, 1, 9], [0, 3, 0, 11, 3], 12)  # right, left and no padding, empty


@pytest.mark.parametrize("route", ROUTES)
def test_rows_in_place_equal_packed_rows_bit_for_bit(route):
    """Spans over a padded batch read the same rows in the same order as the packed
    form: identical bits, and no copy (any strides)."""
    lengths, first, seq = SPAN_CASE
    left, spans, lpacked = padded_batch(lengths, first, seq, 7, seed=1)
    right, _, rpacked = padded_batch(lengths, first, seq, 33, seed=2)
    cu = cu_from(lengths, dtype=torch.int64)
    want = launch(route, lpacked, rpacked, cu)
    assert torch.equal(launch(route, left, right, spans=spans), want)
    # a strided view of a wider buffer, features transposed in memory
    wide = torch.zeros(left.shape[0], seq, 2 * 7, device=DEVICE)
    wide[..., ::2] = left
    fortran = right.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(launch(route, wide[..., ::2], fortran, spans=spans), want)
    assert rel_err(want, outer_sq_norms_packed_ref(lpacked, rpacked, cu)) < 1e-4


def test_fused_rows_in_place_equal_packed_rows_bit_for_bit():
    lengths, first, seq = SPAN_CASE
    left, spans, lpacked = padded_batch(lengths, first, seq, 8, seed=3)
    right, _, rpacked = padded_batch(lengths, first, seq, 20, seed=4)
    groups = torch.tensor([0, 2, 5], device=DEVICE)
    cu = cu_from(lengths, dtype=torch.int64)
    want = K.outer_grad_sq_norms(lpacked, rpacked, cu, groups)
    got = K.outer_grad_sq_norms(left, right, None, groups, spans=spans, max_seqlen=12, max_group=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_hints_skip_every_host_read(monkeypatch):
    """With ``max_seqlen`` (and ``max_group``) and a route, a launch reads nothing
    back from the device: the two readers are made to fail."""

    def no_read(*args, **kwargs):
        raise AssertionError("read the device on the host")

    lengths, first, seq = SPAN_CASE
    left, spans, _ = padded_batch(lengths, first, seq, 4, seed=5)
    right, _, _ = padded_batch(lengths, first, seq, 6, seed=6)
    want = {r: K.outer_sq_norms(left, right, route=r, spans=spans) for r in ROUTES}
    monkeypatch.setattr(K, "_host_lengths", no_read)
    monkeypatch.setattr(K, "_largest_group", no_read)
    for route in ROUTES:
        got = K.outer_sq_norms(left, right, route=route, spans=spans, max_seqlen=12)
        assert torch.equal(got, want[route])
    groups = torch.tensor([0, 5], device=DEVICE)
    K.outer_grad_sq_norms(left, right, None, groups, spans=spans, max_seqlen=12, max_group=5)
    with pytest.raises(AssertionError, match="read the device"):
        K.outer_sq_norms(left, right, route="direct", spans=spans)


def test_bad_spans_raise_clear_errors():
    lengths, first, seq = SPAN_CASE
    left, (starts, ends), lpacked = padded_batch(lengths, first, seq, 4, seed=7)
    right, _, _ = padded_batch(lengths, first, seq, 6, seed=8)
    cu = cu_from(lengths)
    with pytest.raises(ValueError, match="either cu_seqlens .* or spans"):
        K.outer_sq_norms_direct(left, right, cu, spans=(starts, ends))
    with pytest.raises(ValueError, match="either cu_seqlens .* or spans"):
        K.outer_sq_norms_direct(left, right)
    with pytest.raises(ValueError, match=r"with spans, left and right must be \[B, T, a\]"):
        K.outer_sq_norms_direct(lpacked, lpacked, spans=(starts, ends))
    with pytest.raises(ValueError, match=r"two \[B\] = \[5\] tensors"):
        K.outer_sq_norms_gram(left, right, spans=(starts[:4], ends[:4]))
    with pytest.raises(TypeError, match="pair"):
        K.outer_sq_norms_direct(left, right, spans=starts)
    with pytest.raises(TypeError, match="int32 or int64"):
        K.outer_sq_norms_direct(left, right, spans=(starts.float(), ends))
    which = torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"example 2 are 0:13; .* <= 12"):
        K.outer_sq_norms_direct(left, right, spans=(starts, ends + (which == 2)))
    with pytest.raises(ValueError, match=r"example 0 are 0:-1"):
        K.outer_sq_norms_gram(left, right, spans=(starts, ends - (which == 0) * 6))


def _row_mask(holes: bool) -> torch.Tensor:
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[1, 7:] = False  # right padding
    valid[2, :3] = False  # left padding
    valid[3, :] = False  # no rows
    if holes:
        valid[0, 4] = False
    return valid


@pytest.mark.parametrize("holes", [False, True], ids=["runs", "holes"])
@pytest.mark.parametrize("n_factors", [1, 2])
def test_seam_matches_mask_packing_bit_for_bit(monkeypatch, holes, n_factors):
    """The seam reads rows in place (one run per example) or gathers them by the
    layout's index: the same bits as packing them with a boolean mask."""
    from gradfilter.norms.layers import Factor
    from gradfilter.norms.layout import RowLayout

    monkeypatch.setenv("GRADFILTER_BACKEND", "triton")
    valid = _row_mask(holes).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    factors = [
        Factor("outer", torch.randn(4, 10, 4, generator=gen), torch.randn(4, 10, 24, generator=gen))
        for _ in range(n_factors)
    ]
    factors = [Factor("outer", f.left.to(DEVICE), f.right.to(DEVICE)) for f in factors]
    got = ops.factor_sq_norms(factors, RowLayout.from_mask(valid))
    masks = valid.repeat(1, n_factors)
    left = torch.cat([f.left for f in factors], dim=1)[masks]
    right = torch.cat([f.right for f in factors], dim=1)[masks]
    want = K.outer_sq_norms(left, right, ops_cu(masks.sum(1)))
    assert torch.equal(got, want)


def ops_cu(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu


@pytest.mark.parametrize("holes", [False, True], ids=["runs", "holes"])
def test_training_seam_matches_mask_packing_bit_for_bit(monkeypatch, holes):
    monkeypatch.setenv("GRADFILTER_BACKEND", "triton")
    valid = _row_mask(holes).reshape(2, 2, 10).to(DEVICE)
    gen = torch.Generator().manual_seed(4)
    left = torch.randn(2, 2, 10, 8, generator=gen).to(DEVICE)
    right = torch.randn(2, 2, 10, 20, generator=gen).to(DEVICE)
    grad, sq = ops.grad_and_sq_norms(left, right, valid)
    flat = valid.reshape(4, 10)
    cu = ops_cu(flat.sum(1))
    want_grad, want_sq = K.outer_grad_sq_norms(
        left.reshape(4, 10, 8)[flat],
        right.reshape(4, 10, 20)[flat],
        cu,
        ops_cu(torch.full((2,), 2, device=DEVICE)),
    )
    assert torch.equal(grad, want_grad) and torch.equal(sq, want_sq.reshape(2, 2))


def test_auto_route_follows_cost_model():
    # equal lengths: same decision as the padded reference's choose_route
    for n, a, b in [(4, 64, 64), (60, 2, 3), (16, 16, 1), (1, 1, 1)]:
        assert routes.choose_packed_route(torch.full((3,), n), a, b) == routes.choose_route(n, a, b)
    lengths, a, b = [3, 0, 6, 2], 40, 50  # short examples, wide features -> ghost
    assert routes.choose_packed_route(torch.tensor(lengths), a, b) == "ghost"
    cu = cu_from(lengths)
    left, right = rows(sum(lengths), a, 17), rows(sum(lengths), b, 18)
    want = outer_sq_norms_packed_ref(left, right, cu)
    assert rel_err(K.outer_sq_norms(left, right, cu), want) < 1e-4
    assert rel_err(K.outer_sq_norms(left, right, cu, route="gram"), want) < 1e-4
    assert rel_err(K.outer_sq_norms(left, right, cu, route="direct"), want) < 1e-4


def test_empty_batches():
    for route in ROUTES:
        assert launch(route, rows(4, 3, 0), rows(4, 5, 0), cu_from([])).shape == (0,)
        out = launch(route, rows(0, 3, 0), rows(0, 5, 0), cu_from([0, 0]))
        assert torch.equal(out.cpu(), torch.zeros(2))
        out = launch(route, rows(3, 0, 0), rows(3, 5, 0), cu_from([3]))
        assert torch.equal(out.cpu(), torch.zeros(1))


def test_bad_inputs_raise_clear_errors():
    left, right, cu = rows(6, 3, 0), rows(6, 4, 1), cu_from([2, 4])
    with pytest.raises(ValueError, match=r"packed rows \[N, a\] and \[N, b\]"):
        K.outer_sq_norms_direct(left.unsqueeze(0), right, cu)
    with pytest.raises(ValueError, match="same number of rows, got 6 and 5"):
        K.outer_sq_norms_gram(left, right[:5], cu)
    with pytest.raises(ValueError, match=r"cu_seqlens must be a 1-D tensor \[B \+ 1\]"):
        K.outer_sq_norms_direct(left, right, cu.view(1, 3))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        K.outer_sq_norms_direct(left, right, cu.float())
    with pytest.raises(TypeError, match="same dtype"):
        K.outer_sq_norms_direct(left, right.half(), cu)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        K.outer_sq_norms_gram(left.double(), right.double(), cu)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        K.outer_sq_norms_direct(left.tolist(), right, cu)
    msg = r"non-decreasing; cu_seqlens\[2\] = 1 < cu_seqlens\[1\] = 2"
    with pytest.raises(ValueError, match=msg):
        K.outer_sq_norms_direct(left, right, cu_from([2, -1]))
    with pytest.raises(ValueError, match="ends at 7 but left and right have only 6 rows"):
        K.outer_sq_norms_gram(left, right, cu_from([3, 4]))
    with pytest.raises(ValueError, match="start at 0 or more"):
        K.outer_sq_norms_direct(left, right, cu_from([1], offset=-1))
    with pytest.raises(ValueError, match="unknown route 'fast'"):
        K.outer_sq_norms(left, right, cu, route="fast")
    with pytest.raises(ValueError, match="rows_per_program must be >= 1"):
        K.outer_sq_norms_direct(left, right, cu, rows_per_program=0)
    with pytest.raises(ValueError, match="BLOCK_T >= 16"):
        K.outer_sq_norms_gram(left, right, cu, config=triton.Config({"BLOCK_T": 8, "BLOCK_K": 16}))
    if K.interpreted():
        msg = "bfloat16 is not supported under the Triton interpreter"
        with pytest.raises(TypeError, match=msg):
            K.outer_sq_norms_direct(left.bfloat16(), right.bfloat16(), cu)
    else:
        with pytest.raises(ValueError, match="on one device"):
            K.outer_sq_norms_direct(left, right, cu.cpu())
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            K.outer_sq_norms_direct(left.cpu(), right.cpu(), cu.cpu())


def test_configs():
    meta = {"direct": ("BLOCK_A", "BLOCK_B", "BLOCK_T"), "ghost": ("BLOCK_T", "BLOCK_K")}
    for route, keys in meta.items():
        configs = K.autotune_configs(route)
        assert configs and all(isinstance(c, triton.Config) for c in configs)
        for c in configs:
            assert all(c.kwargs[k] >= 16 and c.kwargs[k] & (c.kwargs[k] - 1) == 0 for k in keys)
    fixed = K.fixed_config("direct", 1, 100, 7).kwargs
    assert fixed == {"BLOCK_A": 16, "BLOCK_B": 64, "BLOCK_T": 32}
    assert K.fixed_config("ghost", 4, 33, 5).kwargs == {"BLOCK_T": 16, "BLOCK_K": 64}
    # pruning keeps tiles no wider than the data (LoRA A with r = 16)
    kept = K.prune_direct(K.autotune_configs("direct"), {"a": 16, "b": 4096})
    assert kept and all(c.kwargs["BLOCK_A"] == 16 for c in kept)
    kept = K.prune_gram(K.autotune_configs("ghost"), {"a": 8, "b": 100, "max_len": 3})
    assert kept and {c.kwargs["BLOCK_T"] for c in kept} == {16}


def _config_key(cfg: triton.Config) -> tuple:
    return (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)


DTYPE_PRECISIONS = [
    (torch.float32, "ieee"),
    (torch.float32, "tf32"),
    (torch.float16, "ieee"),
    (torch.bfloat16, "ieee"),
]


def test_fixed_config_is_a_pure_function_of_shapes_dtype_and_precision(monkeypatch):
    """The default configuration depends on the (bucketed) shapes, the dtype and the
    precision only: not on the autotune switch, the device, or earlier calls."""
    from gradfilter.kernels import configs

    shapes = [(8, 768, 512), (768, 8, 512), (768, 2304, 1024), (4, 33, 5), (64, 64, 64)]
    kernels = ("direct", "fused", "ghost")
    first = {
        (k, s, d, p): _config_key(configs.fixed_config(k, *s, d, p))
        for k in kernels
        for s in shapes
        for d, p in DTYPE_PRECISIONS
    }
    monkeypatch.setenv("GRADFILTER_AUTOTUNE", "1")  # a switch the table must ignore
    for _ in range(2):
        for (k, s, d, p), want in first.items():
            assert _config_key(configs.fixed_config(k, *s, d, p)) == want
    # Shapes in one bucket share a configuration (next power of two, clamped to 16..64).
    for d, p in DTYPE_PRECISIONS:
        for k in ("direct", "fused"):  # BLOCK_A, BLOCK_B from a, b; the length plays no part
            want = _config_key(configs.fixed_config(k, 16, 4096, 7, d, p))
            assert _config_key(configs.fixed_config(k, 9, 700, 300, d, p)) == want
        want = _config_key(configs.fixed_config("ghost", 8, 4096, 64, d, p))
        for t in (33, 50, 64):  # BLOCK_T from the length, BLOCK_K from max(a, b)
            assert _config_key(configs.fixed_config("ghost", 3, 65, t, d, p)) == want
    # Every table entry is listed for the compile check.
    for k in kernels:
        for d, p in DTYPE_PRECISIONS:
            listed = {_config_key(c) for c in configs.table_configs(k, d, p)}
            for s in shapes:
                assert _config_key(configs.fixed_config(k, *s, d, p)) in listed
    with pytest.raises(TypeError, match="no kernel configuration for torch.float64"):
        configs.fixed_config("direct", 8, 8, 8, torch.float64)
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        configs.fixed_config("fast", 8, 8, 8)


def test_autotune_is_opt_in_and_keyed_by_precision(monkeypatch):
    from gradfilter.kernels import configs

    monkeypatch.delenv("GRADFILTER_AUTOTUNE", raising=False)
    assert not configs.autotune_requested()
    for on in ("1", "true", "on"):
        monkeypatch.setenv("GRADFILTER_AUTOTUNE", on)
        assert configs.autotune_requested()
    monkeypatch.setenv("GRADFILTER_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="GRADFILTER_AUTOTUNE='maybe'"):
        configs.autotune_requested()
    monkeypatch.setenv("GRADFILTER_AUTOTUNE", "0")
    assert not K._use_autotune(None)
    assert K._use_autotune(True) == (not K.interpreted())
    for keys in configs.AUTOTUNE_KEYS.values():
        assert "INPUT_PRECISION" in keys and {"a", "b", "len_bucket"} <= set(keys)


def test_launch_uses_the_table_config(monkeypatch):
    """Without autotuning a launch takes exactly ``fixed_config`` of its shapes, dtype
    and precision (the kernel is replaced by a recorder of its launch options)."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **options):
                launched.append(options)

            return launch

    was_interpreted = K.interpreted()
    monkeypatch.setattr(K, "interpreted", lambda: was_interpreted)
    monkeypatch.setattr(K, "_outer_sq_norm_direct_kernel", Recorder())
    monkeypatch.setattr(K, "_outer_grad_sq_norm_kernel", Recorder())
    monkeypatch.setattr(K, "_outer_sq_norm_gram_kernel", Recorder())
    monkeypatch.setenv("GRADFILTER_AUTOTUNE", "0")
    left, right, cu = rows(40, 8, 0), rows(40, 96, 1), cu_from([30, 10])
    K.outer_sq_norms_direct(left, right, cu)
    K.outer_sq_norms_gram(left, right, cu)
    K.outer_grad_sq_norms(left, right, cu, torch.tensor([0, 2], device=DEVICE))
    K.outer_sq_norms_direct(left, right, cu, allow_tf32=True)
    expected = [
        ("direct", "ieee"),
        ("ghost", "ieee"),
        ("fused", "ieee"),
        ("direct", "tf32"),
    ]
    assert len(launched) == len(expected)
    for options, (kernel, precision) in zip(launched, expected, strict=True):
        cfg = K.fixed_config(kernel, 8, 96, 30, torch.float32, precision)
        assert options["INPUT_PRECISION"] == precision
        assert {k: options[k] for k in cfg.kwargs} == cfg.kwargs
        assert (options["num_warps"], options["num_stages"]) == (cfg.num_warps, cfg.num_stages)


def test_triton_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.triton_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.triton_available() == torch.cuda.is_available()


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter only")
def test_interpreter_variable_unset_after_import(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is no longer set"):
        K.outer_sq_norms_direct(rows(3, 2, 0), rows(3, 2, 1), cu_from([3]))


def test_public_api_with_each_backend_forced():
    """per_example_grad_norms through GRADFILTER_BACKEND=triton equals the reference
    (a subprocess: on the CPU the interpreter is set before the kernels are
    defined; on a GPU the model is on CUDA and the kernels are compiled)."""
    import subprocess
    import sys

    code = """
import os, sys, torch
from peft import LoraConfig, get_peft_model
from gradfilter import per_example_grad_norms
from gradfilter.norms import ops
from gradfilter.io.models import tiny_llama
device, tol = sys.argv[1], float(sys.argv[2])
model = get_peft_model(
    tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
).to(device)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_()
ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids); mask[1, 6:] = 0; mask[2, :4] = 0
labels = torch.where(mask.bool(), ids, -100)
ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
out = {}
for b in ("reference", "triton"):
    os.environ["GRADFILTER_BACKEND"] = b
    assert ops.backend(device) == b
    out[b] = per_example_grad_norms(model, ids, labels, mask)
rel = ((out["triton"] - out["reference"]).abs() / out["reference"]).max().item()
assert rel < tol, (rel, out)
print("max rel", rel)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if DEVICE == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    tol = "1e-5" if DEVICE == "cpu" else "1e-4"  # CUDA: two runs of the model, other sum orders
    r = subprocess.run(
        [sys.executable, "-c", code, DEVICE, tol],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max rel" in r.stdout
