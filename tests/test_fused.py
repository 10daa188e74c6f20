"""The training backward with per-example norms on the side: the fused kernel,
its reference twin, the stacked matmul's autograd and vmap rules, and
``LoRAEnsemble.train_step(record_norms=True)``."""

from __future__ import annotations

import pytest
import torch

from gradfilter import LoRAEnsemble
from gradfilter.io.models import tiny_gpt2, tiny_llama
from gradfilter.norms import ops, routes
from gradfilter.norms import reference as ref
from gradfilter.norms.fused import NormRecorder, StackedMatmul


def loop_grad_sq(left, right, cu, groups):
    """The oracle: every example's gradient formed explicitly."""
    tiles = [
        left[cu[i] : cu[i + 1]].double().T @ right[cu[i] : cu[i + 1]].double()
        for i in range(len(cu) - 1)
    ]
    sq = torch.stack([t.square().sum() for t in tiles]) if tiles else torch.zeros(0)
    a, b = left.shape[1], right.shape[1]
    grad = torch.stack(
        [
            sum(tiles[groups[g] : groups[g + 1]], torch.zeros(a, b, dtype=torch.float64))
            for g in range(len(groups) - 1)
        ]
    )
    return grad, sq


def packed(lengths, a, b, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    left = torch.randn(n, a, generator=gen).to(device, dtype)
    right = torch.randn(n, b, generator=gen).to(device, dtype)
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist())
    return left, right, cu.to(device)


def rel(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


# -- the Triton kernel (interpreter on CPU, compiled on CUDA) -------------------------

triton = pytest.importorskip("triton")
from gradfilter.kernels import lora_norms as K  # noqa: E402


@pytest.fixture
def kdev():
    """Where the Triton kernels run: CPU tensors when they were loaded for the
    interpreter (the CPU lane, tests/conftest.py), else CUDA tensors."""
    return "cpu" if K.interpreted() else "cuda"


@pytest.fixture
def kdev_cuda(kdev):
    """The compiled kernels on CUDA only (bfloat16 is wrong in the interpreter)."""
    if kdev != "cuda":
        pytest.skip("needs the Triton kernels compiled for CUDA, not the interpreter")
    return kdev


KERNEL_CASES = [
    # lengths, groups, a, b
    ([5, 0, 17, 40, 1, 9], [0, 2, 2, 6], 8, 37),
    ([1, 1, 1, 1], [0, 2, 4], 1, 1),
    ([33, 2, 64], [0, 3], 70, 8),
    ([7], [0, 1], 16, 16),
    ([3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5, 6], 3, 130),
]


@pytest.mark.parametrize("lengths,groups,a,b", KERNEL_CASES)
@pytest.mark.parametrize("epp", [None, 1, 2])
def test_kernel_matches_loop_fp32(kdev, lengths, groups, a, b, epp):
    left, right, cu = packed(lengths, a, b, seed=len(lengths) + a, device=kdev)
    g = torch.tensor(groups, device=kdev)
    grad, sq = K.outer_grad_sq_norms(left, right, cu.to(torch.int32), g, examples_per_program=epp)
    want_grad, want_sq = loop_grad_sq(left.cpu(), right.cpu(), cu.cpu(), groups)
    assert grad.shape == want_grad.shape and sq.shape == want_sq.shape
    assert grad.dtype == sq.dtype == torch.float32
    assert grad.device.type == sq.device.type == kdev
    assert rel(grad, want_grad) < 1e-5
    assert torch.allclose(sq.double().cpu(), want_sq, rtol=1e-5, atol=1e-6)
    assert bool((sq.cpu()[torch.tensor(lengths) == 0] == 0).all())


def test_kernel_fp16_accumulates_in_fp32(kdev):
    left, right, cu = packed([20, 3, 41], 8, 48, seed=3, dtype=torch.float16, device=kdev)
    grad, sq = K.outer_grad_sq_norms(left, right, cu, torch.tensor([0, 1, 3], device=kdev))
    want_grad, want_sq = loop_grad_sq(left.cpu().float(), right.cpu().float(), cu.cpu(), [0, 1, 3])
    assert rel(grad, want_grad) < 1e-5
    assert rel(sq, want_sq) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("lengths,groups,a,b", KERNEL_CASES[:3])
def test_kernel_bf16_accumulates_in_fp32(kdev_cuda, lengths, groups, a, b):
    left, right, cu = packed(lengths, a, b, seed=30 + a, dtype=torch.bfloat16, device=kdev_cuda)
    g = torch.tensor(groups, device=kdev_cuda)
    grad, sq = K.outer_grad_sq_norms(left, right, cu, g)
    # bfloat16 rounding is in the inputs only: their products are exact in fp32, so
    # the error is fp32 summation, far below bfloat16's 4e-3.
    want_grad, want_sq = loop_grad_sq(left.cpu(), right.cpu(), cu.cpu(), groups)
    assert grad.dtype == sq.dtype == torch.float32
    assert rel(grad, want_grad) < 1e-4
    assert rel(sq, want_sq) < 1e-4


def test_kernel_is_deterministic_and_agrees_with_norm_only_kernel(kdev):
    left, right, cu = packed([30, 12, 0, 50], 8, 40, seed=4, device=kdev)
    g = torch.tensor([0, 4], device=kdev)
    one = K.outer_grad_sq_norms(left, right, cu, g)
    two = K.outer_grad_sq_norms(left, right, cu, g)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.allclose(one[1], K.outer_sq_norms(left, right, cu, "direct"), rtol=1e-6)


def test_kernel_bad_inputs(kdev):
    left, right, cu = packed([3, 4], 4, 5, seed=5, device=kdev)

    def groups(*vals):
        return torch.tensor(vals, device=kdev)

    with pytest.raises(ValueError, match="run from 0"):
        K.outer_grad_sq_norms(left, right, cu, groups(0, 1))
    with pytest.raises(ValueError, match="non-decreasing"):
        K.outer_grad_sq_norms(left, right, cu, groups(0, 2, 1, 2))
    with pytest.raises(TypeError, match="int32 or int64"):
        K.outer_grad_sq_norms(left, right, cu, groups(0.0, 2.0))
    with pytest.raises(ValueError, match="examples_per_program"):
        K.outer_grad_sq_norms(left, right, cu, groups(0, 2), examples_per_program=0)


def test_kernel_empty(kdev):
    left, right, cu = packed([0, 0], 4, 5, seed=6, device=kdev)
    grad, sq = K.outer_grad_sq_norms(left, right, cu, torch.tensor([0, 1, 2], device=kdev))
    assert grad.shape == (2, 4, 5) and bool((grad == 0).all()) and bool((sq == 0).all())


# -- the reference twin and the backend seam ------------------------------------------


def padded(groups, n, seq, a, b, seed, dtype=torch.float64, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(groups, n, seq, a, generator=gen, dtype=torch.float64)
    right = torch.randn(groups, n, seq, b, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, seq + 1, (groups, n), generator=gen)
    valid = torch.arange(seq) < lengths.unsqueeze(-1)
    return left.to(device, dtype), right.to(device, dtype), valid.to(device)


def padded_oracle(left, right, valid):
    left, right, valid = left.cpu(), right.cpu(), valid.cpu()
    lz = left * valid.unsqueeze(-1)
    tiles = torch.einsum("gnta,gntb->gnab", lz, right)
    return tiles.sum(1), tiles.square().sum((2, 3))


def test_reference_matches_oracle_with_blocking(monkeypatch):
    left, right, valid = padded(3, 5, 7, 6, 9, seed=7)
    want_grad, want_sq = padded_oracle(left, right, valid)
    lz = left * valid.unsqueeze(-1)
    for budget in (1 << 24, 20, 1):  # blocks of examples, of gradient rows, one row at a time
        monkeypatch.setattr(routes, "TEMP_BUDGET", budget)
        grad, sq = ref.outer_grad_sq_norms_ref(lz, right)
        assert torch.allclose(grad, want_grad, rtol=1e-12) and torch.allclose(
            sq, want_sq, rtol=1e-12
        )


def _cpp_or_skip():
    from gradfilter.norms import _ext

    if not _ext.cpp_available():
        pytest.skip("the C++ extension cannot be built here")
    return _ext


@pytest.mark.parametrize("backend", ["reference", "triton", "cpp"])
def test_seam_each_backend(monkeypatch, kdev, backend):
    if backend == "cpp":
        _cpp_or_skip()
    monkeypatch.setenv("GRADFILTER_BACKEND", backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = kdev if backend == "triton" else "cpu"
    left, right, valid = padded(2, 4, 11, 8, 20, seed=8, dtype=dtype, device=device)
    want_grad, want_sq = padded_oracle(left.double(), right.double(), valid)
    grad, sq = ops.grad_and_sq_norms(left, right, valid)
    assert grad.shape == (2, 8, 20) and sq.shape == (2, 4)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(grad, want_grad) < tol and rel(sq, want_sq) < tol
    all_grad, all_sq = ops.grad_and_sq_norms(left, right)  # no mask: every row counts
    want_all = padded_oracle(left.double(), right.double(), torch.ones_like(valid))
    assert rel(all_grad, want_all[0]) < tol and rel(all_sq, want_all[1]) < tol


@pytest.mark.gpu
def test_seam_triton_bf16(monkeypatch, kdev_cuda):
    """bfloat16 factors through the seam: float32 results from the rounded inputs."""
    monkeypatch.setenv("GRADFILTER_BACKEND", "triton")
    left, right, valid = padded(3, 4, 64, 8, 96, seed=14, dtype=torch.bfloat16, device=kdev_cuda)
    grad, sq = ops.grad_and_sq_norms(left, right, valid)
    assert grad.dtype == sq.dtype == torch.float32 and sq.device.type == "cuda"
    want_grad, want_sq = padded_oracle(left.double(), right.double(), valid)
    assert rel(grad, want_grad) < 1e-4 and rel(sq, want_sq) < 1e-4


@pytest.mark.parametrize("lengths,groups,a,b", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_op_matches_loop(lengths, groups, a, b, dtype):
    ext = _cpp_or_skip()
    left, right, cu = packed(lengths, a, b, seed=len(lengths) + a + 1, dtype=dtype)
    grad, sq = ext.outer_grad_sq_norms_cpp(left, right, cu, torch.tensor(groups))
    want_grad, want_sq = loop_grad_sq(left.double(), right.double(), cu, groups)
    assert grad.dtype == sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel(grad, want_grad) < tol
    assert torch.allclose(sq.double(), want_sq, rtol=tol, atol=1e-9)


def test_cpp_op_deterministic_across_thread_counts_and_checks_groups():
    ext = _cpp_or_skip()
    left, right, cu = packed([300, 2, 0, 513, 64], 8, 768, seed=21)
    g = torch.tensor([0, 2, 5], dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.outer_grad_sq_norms_cpp(left, right, cu, g)
        torch.set_num_threads(2)
        two = ext.outer_grad_sq_norms_cpp(left, right, cu, g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    with pytest.raises(ValueError, match="run from 0"):
        ext.outer_grad_sq_norms_cpp(left, right, cu, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        ext.outer_grad_sq_norms_cpp(left, right, cu, torch.tensor([0, 3, 2, 5]))
    with pytest.raises(TypeError, match="int64 or int32"):
        ext.outer_grad_sq_norms_cpp(left, right, cu, torch.tensor([0.0, 5.0]))


def test_seam_bad_shapes():
    with pytest.raises(ValueError, match=r"\[G, n, T, a\]"):
        ops.grad_and_sq_norms(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="valid must be"):
        ops.grad_and_sq_norms(
            torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
        )


# -- StackedMatmul: autograd, recording, vmap ------------------------------------------


def stacked_inputs(members=3, n=2, seq=5, d_in=6, d_out=4, seed=9):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(members * n, seq, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(members, d_out, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w


def test_stacked_matmul_forward_and_gradcheck():
    x, w = stacked_inputs()
    y = StackedMatmul.apply(x, w, None)
    want = torch.stack([x[m * 2 : (m + 1) * 2] @ w[m].T for m in range(3)]).reshape(6, 5, 4)
    assert torch.allclose(y, want)
    assert torch.autograd.gradcheck(lambda a, b: StackedMatmul.apply(a, b, None), (x, w))


def test_recording_gives_same_gradients_and_per_row_norms():
    x, w = stacked_inputs()
    gen = torch.Generator().manual_seed(10)
    target = torch.randn(6, 5, 4, generator=gen, dtype=torch.float64)
    valid = torch.ones(6, 5, dtype=torch.bool)
    valid[1, 3:] = False
    target[1, 3:] = 0  # rows outside the mask carry no gradient, as padding does

    def loss(y):
        return (y * target).sum()

    loss(StackedMatmul.apply(x, w, None)).backward()
    plain = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    rec = NormRecorder(3, 2, valid=valid)
    loss(StackedMatmul.apply(x, w, rec)).backward()
    assert torch.allclose(x.grad, plain[0]) and torch.allclose(w.grad, plain[1])
    # Oracle: each row's own gradient, by autograd on that row alone.
    want = torch.zeros(3, 2, dtype=torch.float64)
    for m in range(3):
        for i in range(2):
            row = m * 2 + i
            wm = w.detach()[m].clone().requires_grad_(True)
            (g,) = torch.autograd.grad((x.detach()[row] @ wm.T * target[row]).sum(), wm)
            want[m, i] = g.square().sum()
    assert rec.layers == 1
    assert torch.allclose(rec.sq, want, rtol=1e-12)


def test_recorder_checks():
    with pytest.raises(ValueError, match="positive"):
        NormRecorder(0, 2)
    with pytest.raises(ValueError, match="members \\* rows"):
        NormRecorder(2, 2, valid=torch.ones(3, 5, dtype=torch.bool))
    x, w = stacked_inputs()
    rec = NormRecorder(3, 5)  # wrong row count for this layer
    with pytest.raises(ValueError, match="recorder expects"):
        StackedMatmul.apply(x, w, rec).sum().backward()


def test_vmap_folds_into_member_blocks():
    x, w = stacked_inputs()
    gen = torch.Generator().manual_seed(11)
    xs = torch.randn(4, 6, 5, 6, generator=gen, dtype=torch.float64)
    got = torch.func.vmap(lambda a: StackedMatmul.apply(a, w, None))(xs)
    want = torch.stack([StackedMatmul.apply(a, w, None) for a in xs])
    assert torch.allclose(got, want)
    # in_dims other than 0
    got1 = torch.func.vmap(lambda a: StackedMatmul.apply(a, w, None), in_dims=1)(xs.transpose(0, 1))
    assert torch.allclose(got1, want)


def test_vmap_with_batched_weights():
    x, _ = stacked_inputs()
    gen = torch.Generator().manual_seed(12)
    ws = torch.randn(4, 3, 4, 6, generator=gen, dtype=torch.float64)
    got = torch.func.vmap(lambda b: StackedMatmul.apply(x.detach(), b, None))(ws)
    want = torch.stack([StackedMatmul.apply(x.detach(), b, None) for b in ws])
    assert torch.allclose(got, want)
    xs = torch.randn(4, 6, 5, 6, generator=gen, dtype=torch.float64)
    both = torch.func.vmap(lambda a, b: StackedMatmul.apply(a, b, None))(xs, ws)
    assert torch.allclose(
        both, torch.stack([StackedMatmul.apply(a, b, None) for a, b in zip(xs, ws, strict=False)])
    )


def test_per_example_gradients_through_vmap_of_grad():
    """torch.func's per-example gradient recipe reaches the op: vmap(grad(f))."""
    _, w = stacked_inputs()
    w = w.detach()
    gen = torch.Generator().manual_seed(13)
    xs = torch.randn(
        5, 3, 4, 6, generator=gen, dtype=torch.float64
    )  # 5 samples of 3 rows (1/member)

    def f(weight, a):
        return StackedMatmul.apply(a, weight, None).tanh().sum()

    got = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, xs)
    want = torch.stack([torch.func.grad(f)(w, a) for a in xs])
    loop = []
    for a in xs:
        wv = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(wv, a), wv)
        loop.append(g)
    assert torch.allclose(want, torch.stack(loop))
    assert torch.allclose(got, torch.stack(loop))


def test_recording_under_vmap_is_refused():
    x, w = stacked_inputs()
    rec = NormRecorder(3, 2)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda a: StackedMatmul.apply(a, w, rec))(x.detach().unsqueeze(0))


# -- LoRAEnsemble.train_step(record_norms=True) ------------------------------------------


SPREAD = 1


def member_batches(members, bsz, seed, vocab=96):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in range(members):
        seq = 7 + m * SPREAD  # members' batches differ in length
        ids = torch.randint(1, vocab, (bsz, seq), generator=gen)
        labels = ids.clone()
        labels[:, :2] = -100
        mask = torch.ones_like(ids)
        mask[0, seq - 3 :] = 0  # a right-padded row
        labels[0, seq - 3 :] = -100
        out.append((ids, labels, mask))
    return out


def make_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return tiny_gpt2(vocab_size=96, n_positions=32).double()
    return tiny_llama(vocab_size=96).double()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_recorded_norms_equal_engine_norms_without_dropout(kind):
    base = make_model(kind)
    ens = LoRAEnsemble(base, members=3, r=4, alpha=8, dropout=0.0, seed=3)
    with torch.no_grad():  # non-zero B so that every factor has a gradient
        for ad in ens.adapters.values():
            ad.lora_B.weight.normal_(std=0.05)
    batches = member_batches(3, 3, seed=1)
    want = (
        torch.stack(
            [
                ens.per_example_grad_norms(ids, labels, mask)[m]
                for m, (ids, labels, mask) in enumerate(batches)
            ]
        )
        .double()
        .square()
    )
    opt = ens.make_optimizer(lr=1e-3)
    losses, sq = ens.train_step(batches, opt, record_norms=True)
    assert sq.shape == (3, 3) and losses.shape == (3,)
    assert torch.allclose(sq, want, rtol=1e-6)  # the engine returns float32 norms


# Llama's RMSNorm computes in float32 even in a float64 model, so its per-row
# results depend on the batch shape at the 1e-7 level; GPT-2 is float64 throughout.
EXACT = {"gpt2": 1e-10, "llama": 1e-6}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_recorded_norms_with_dropout_and_chunks_match_per_row_autograd(kind):
    base = make_model(kind)
    ens = LoRAEnsemble(base, members=2, r=4, alpha=8, dropout=0.3, seed=5)
    with torch.no_grad():
        for ad in ens.adapters.values():
            ad.lora_B.weight.normal_(std=0.05)
    batches = member_batches(2, 4, seed=2)
    state = {k: v.clone() for k, v in ens.state_dict().items()}

    # Oracle: each row alone (a chunk of one row keys the same dropout masks),
    # the gradient of its own mean loss by plain autograd.
    seq = max(b[0].shape[1] for b in batches)
    lengths = [b[0].shape[1] for b in batches]
    pad = [
        torch.nn.functional.pad(t, (0, seq - t.shape[1]), value=v)
        for b in batches
        for t, v in zip(b, (0, -100, 0), strict=False)
    ]
    ids = torch.stack(pad[0::3])
    labels = torch.stack(pad[1::3])
    mask = torch.stack(pad[2::3])
    ens.train()
    ens.base.eval()
    want = torch.zeros(2, 4, dtype=torch.float64)
    for j in range(4):
        sums, count = ens.member_ce_sums(
            ids[:, j], labels[:, j], mask[:, j], step_context={"lengths": lengths, "first_row": j}
        )
        params = ens.trainable_parameters()
        grads = torch.autograd.grad((sums / count).sum(), params)
        for m in range(2):
            want[m, j] = sum(g[m].square().sum() for g in grads)
    ens.eval()

    opt = ens.make_optimizer(lr=1e-3)
    _, whole = ens.train_step(batches, opt, record_norms=True)
    assert torch.allclose(whole, want, rtol=EXACT[kind], atol=0)
    ens.load_state_dict(state)
    ens.step = 0
    opt = ens.make_optimizer(lr=1e-3)
    _, chunked = ens.train_step(batches, opt, max_tokens=2 * seq * 2, record_norms=True)
    assert torch.allclose(chunked, want, rtol=EXACT[kind], atol=0)


def test_recording_leaves_training_unchanged():
    base = make_model("gpt2")
    batches = member_batches(2, 3, seed=3)
    results = []
    for record in (False, True):
        ens = LoRAEnsemble(base, members=2, r=4, alpha=8, dropout=0.1, seed=7)
        opt = ens.make_optimizer(lr=1e-2)
        for _ in range(2):
            out = ens.train_step(batches, opt, record_norms=record)
        results.append(
            (out[0] if record else out, [p.detach().clone() for p in ens.trainable_parameters()])
        )
        ens.remove()
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-12)
    for a, b in zip(
        results[0][1], results[1][1], strict=False
    ):  # the same sum, added in another order
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_rows_without_response_get_nan():
    base = make_model("llama")
    ens = LoRAEnsemble(base, members=2, r=4, alpha=8, dropout=0.0, seed=1)
    batches = member_batches(2, 2, seed=4)
    batches[1][1][1] = -100  # member 1's second row has no supervised token
    _, sq = ens.train_step(batches, ens.make_optimizer(), record_norms=True)
    assert torch.isnan(sq[1, 1]) and bool(torch.isfinite(sq[0]).all()) and torch.isfinite(sq[1, 0])


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_recorded_norms_with_kernel_backends(monkeypatch, kdev, backend):
    """The same step through the fused Triton kernel (interpreter on CPU, compiled
    on CUDA) or the C++ op, float32."""
    if backend == "cpp":
        _cpp_or_skip()
    device = kdev if backend == "triton" else "cpu"
    torch.manual_seed(0)
    base = tiny_llama(vocab_size=96).to(device)
    ens = LoRAEnsemble(base, members=2, r=4, alpha=8, dropout=0.0, seed=2)
    with torch.no_grad():
        for ad in ens.adapters.values():
            ad.lora_B.weight.normal_(std=0.05)
    batches = [tuple(t.to(device) for t in batch) for batch in member_batches(2, 2, seed=5)]
    monkeypatch.setenv("GRADFILTER_BACKEND", "reference")
    want = (
        torch.stack(
            [
                ens.per_example_grad_norms(ids, labels, mask)[m]
                for m, (ids, labels, mask) in enumerate(batches)
            ]
        )
        .double()
        .square()
    )
    monkeypatch.setenv("GRADFILTER_BACKEND", backend)
    _, sq = ens.train_step(batches, ens.make_optimizer(), record_norms=True)
    assert torch.allclose(sq, want, rtol=1e-4)
