"""LoRAEnsemble: one folded pass for all members, exact per-member norms, training
equal to training each member alone, peft export."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_engine import assert_close, make_batch

from gradfilter import LoRAEnsemble, per_example_grad_norms
from gradfilter.io.models import tiny_gpt2, tiny_llama
from gradfilter.method.schedule import member_schedule
from gradfilter.norms.oracles import loop_per_example_grad_norms


def base(kind, dtype=torch.float32):
    return tiny_gpt2(dtype=dtype) if kind == "gpt2" else tiny_llama(dtype=dtype)


def dataset(n=24, seq=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _i in range(n):
        length = int(torch.randint(4, seq + 1, (1,), generator=gen))
        ids = torch.randint(0, 97, (length,), generator=gen)
        labels = ids.clone()
        labels[:2] = -100
        rows.append((ids, labels))
    return rows


def collate(rows, idx):
    seq = max(rows[i][0].shape[0] for i in idx)
    ids = torch.zeros(len(idx), seq, dtype=torch.long)
    labels = torch.full((len(idx), seq), -100)
    mask = torch.zeros(len(idx), seq, dtype=torch.long)
    for j, i in enumerate(idx):
        n = rows[i][0].shape[0]
        ids[j, :n], labels[j, :n], mask[j, :n] = rows[i][0], rows[i][1], 1
    return ids, labels, mask


def train(ens, rows, epochs=2, batch_size=4, lr=1e-2, data_seed=0, max_tokens=None):
    opt = ens.make_optimizer(lr=lr)
    lengths = [r[0].shape[0] for r in rows]
    for epoch in range(epochs):
        for step in member_schedule(lengths, batch_size, epoch, ens.member_seeds, data_seed):
            ens.train_step([collate(rows, idx) for idx in step], opt, max_tokens=max_tokens)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_base_runs_once_per_batch(kind):
    ens = LoRAEnsemble(base(kind), members=4, r=2, alpha=4)
    calls = []
    # The model body: the loss takes the LM head in chunks on its hidden states.
    ens.base.base_model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    ids, labels, mask = make_batch([6, 4, 5], 6)
    norms = ens.per_example_grad_norms(ids, labels, mask)
    assert norms.shape == (4, 3)
    assert calls == [torch.Size([12, 6])]  # one call, M * B rows
    calls.clear()
    ens.train_step([(ids, labels, mask)] * 4, ens.make_optimizer())
    assert calls == [torch.Size([12, 6])]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_member_norms_match_per_member_loop(kind):
    ens = LoRAEnsemble(base(kind, torch.float64), members=3, r=4, alpha=8, dropout=0.1)
    train(ens, dataset(12), epochs=1)
    ids, labels, mask = make_batch([9, 5, 7, 2], 9, empty=(3,), seed=2)
    got = ens.per_example_grad_norms(ids, labels, mask)
    for m in range(3):
        single = LoRAEnsemble(base(kind, torch.float64), members=1, r=4, alpha=8).eval()
        with torch.no_grad():
            for (_n1, p1), (_, p3) in zip(
                single.adapters.named_parameters(), ens.adapters.named_parameters(), strict=False
            ):
                p1.copy_(p3[m : m + 1])
        want = loop_per_example_grad_norms(single, ids, labels, mask)
        assert_close(got[m], want, 1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_together_equals_training_alone(kind):
    rows = dataset(20)
    together = LoRAEnsemble(base(kind), members=3, r=4, alpha=8, dropout=0.2, seed=10)
    train(together, rows)
    moved = sum(
        (p - 0).abs().sum() for n, p in together.adapters.named_parameters() if "lora_B" in n
    )
    assert moved > 0
    for m, s in enumerate(together.member_seeds):
        alone = LoRAEnsemble(base(kind), members=1, r=4, alpha=8, dropout=0.2, member_seeds=[s])
        train(alone, rows)
        for (name, pa), (_, pt) in zip(
            alone.adapters.named_parameters(), together.adapters.named_parameters(), strict=False
        ):
            torch.testing.assert_close(pa[0], pt[m], rtol=1e-4, atol=1e-5, msg=f"member {m} {name}")
    # Different seeds give different members.
    a = together.adapters[next(iter(together.adapters.keys()))].lora_A.weight
    assert not torch.allclose(a[0], a[1])


def test_chunked_steps_equal_whole_steps():
    rows = dataset(16)
    whole = LoRAEnsemble(base("llama"), members=2, r=2, alpha=4, dropout=0.3)
    chunked = LoRAEnsemble(base("llama"), members=2, r=2, alpha=4, dropout=0.3)
    train(whole, rows, epochs=1)
    train(chunked, rows, epochs=1, max_tokens=30)  # one or two rows per chunk
    for (name, a), (_, b) in zip(
        whole.adapters.named_parameters(), chunked.adapters.named_parameters(), strict=False
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert whole.step == chunked.step == 4


def test_export_member_loads_in_peft(tmp_path):
    ens = LoRAEnsemble(base("gpt2", torch.float64), members=2, r=3, alpha=6)
    train(ens, dataset(8), epochs=1)
    ids, labels, mask = make_batch([8, 3, 6], 8, seed=5)
    norms = ens.per_example_grad_norms(ids, labels, mask)
    for m in range(2):
        path = ens.export_member(m, str(tmp_path / f"member{m}"))
        peft_model = PeftModel.from_pretrained(base("gpt2", torch.float64), path, is_trainable=True)
        assert_close(per_example_grad_norms(peft_model, ids, labels, mask), norms[m], 1e-6)


def test_schedule_properties():
    lengths = [5, 9, 3, 7, 7, 2, 8, 4, 6, 1, 9, 3]
    steps = member_schedule(lengths, 2, 0, [0, 1, 2], data_seed=3, level_batches=2)
    assert all(len(step) == 3 for step in steps)
    for m in range(3):
        seen = sorted(i for step in steps for i in step[m])
        assert seen == list(range(12))  # every row once per epoch
        assert all(len(step[m]) == len(step[0]) for step in steps)
    orders = [[i for step in steps for i in step[m]] for m in range(3)]
    assert orders[0] != orders[1]  # members see different orders
    again = member_schedule(lengths, 2, 0, [1], data_seed=3, level_batches=2)
    assert [s[0] for s in again] == [
        s[1] for s in steps
    ]  # member 1 alone = member 1 in the ensemble


def test_bad_arguments():
    with pytest.raises(ValueError, match="members must be at least 1"):
        LoRAEnsemble(base("gpt2"), members=0)
    with pytest.raises(ValueError, match="no Linear or Conv1D layer"):
        LoRAEnsemble(base("gpt2"), target_modules=["nonexistent"])
    ens = LoRAEnsemble(base("gpt2"), members=2, r=1, alpha=1)
    with pytest.raises(ValueError, match="multiple of 2 members"):
        ens(torch.zeros(3, 4, dtype=torch.long))


def test_half_precision_base_keeps_float32_adapters():
    ids, labels, mask = make_batch([9, 6, 8], 9, seed=11)
    ref = LoRAEnsemble(base("llama"), members=2, r=4, alpha=8)
    half = LoRAEnsemble(base("llama", torch.bfloat16), members=2, r=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in half.adapters.parameters())
    rows = dataset(8)
    train(ref, rows, epochs=1)
    train(half, rows, epochs=1)
    a = ref.per_example_grad_norms(ids, labels, mask)
    b = half.per_example_grad_norms(ids, labels, mask)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert ((a - b).abs() / a).max() < 0.1  # bf16 activations: about 1e-2 relative


def test_norm_pass_in_chunks_equals_one_pass():
    from gradfilter.io.models import tiny_llama

    base = tiny_llama(dtype=torch.float64)
    ens = LoRAEnsemble(base, members=3, r=4, alpha=8, seed=1)
    with torch.no_grad():
        for ad in ens.adapters.values():
            ad.lora_B.weight.normal_(std=0.05)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 90, (5, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    labels[2, 6:] = -100
    whole = ens.per_example_grad_norms(ids, labels, mask, max_tokens=0)
    for budget in (1, 3 * 9 * 2, 10_000, None):  # 1 row, 2 rows, everything, the default
        got = ens.per_example_grad_norms(ids, labels, mask, max_tokens=budget)
        assert got.shape == (3, 5)
        assert torch.allclose(got, whole, rtol=1e-6)
    per = ens.per_example_grad_norms(ids, labels, mask, per_param=True, max_tokens=1)
    per_whole = ens.per_example_grad_norms(ids, labels, mask, per_param=True, max_tokens=0)
    assert per.keys() == per_whole.keys()
    for k in per:
        assert torch.allclose(per[k], per_whole[k], rtol=1e-6)
    with pytest.raises(ValueError, match="row indices"):
        ens.per_example_grad_norms(ids, labels, mask, rows=[0, 1])


@pytest.mark.parametrize("record", [False, True])
def test_the_parts_of_a_step_add_up_to_the_whole_step(record):
    """Data-parallel arithmetic in one process: a step cut into row parts (each with
    the whole batches' token counts, its rows' places and the whole padded
    lengths) gives gradients that sum to the whole step's, the same summed loss,
    and (recorded in flight) the same per-row norms; dropout is on, so a wrong
    row offset would draw other masks."""
    rows = dataset(n=24, seed=3)
    ens = LoRAEnsemble(base("llama"), members=3, r=2, alpha=4, dropout=0.3)
    opt = ens.make_optimizer(lr=0.0)  # the parameters stay where they are
    step = [[0, 5, 9, 2, 7], [1, 3, 11, 4, 8], [6, 10, 12, 13, 14]]
    whole = [collate(rows, idx) for idx in step]
    counts = [int((b[1][:, 1:] != -100).sum()) for b in whole]
    widths = [b[0].shape[1] for b in whole]
    pad_to = max(widths)
    params = list(ens.adapters.parameters())

    def run(batches, **kw):
        got = {}

        def capture(total):
            got["grads"] = [None if p.grad is None else p.grad.clone() for p in params]
            got["total"] = total.clone()
            return total

        ens.step = 7
        out = ens.train_step(
            batches, opt, record_norms=record, grad_sync=capture, pad_to=pad_to, **kw
        )
        return got, out

    full, out_full = run(whole)
    pieces = [(0, 2), (2, 3), (3, 5)]
    parts = [
        run(
            [collate(rows, idx[a:b]) for idx in step],
            part_of=(counts, a, widths),
        )
        for a, b in pieces
    ]
    for k, g in enumerate(full["grads"]):
        torch.testing.assert_close(sum(p[0]["grads"][k] for p in parts), g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(p[0]["total"] for p in parts), full["total"], rtol=1e-6, atol=0)
    if record:
        sq = torch.cat([p[1][1] for p in parts], dim=1)
        torch.testing.assert_close(sq, out_full[1], rtol=1e-5, atol=0)
    # an empty part (a process without rows in a short step) adds nothing
    none = (torch.zeros(0, 0, dtype=torch.long),) * 2 + (torch.zeros(0, 0, dtype=torch.long),)
    empty, _ = run([none] * 3, part_of=(counts, 5, widths))
    assert all(g is None for g in empty["grads"])
    assert not empty["total"].any()
