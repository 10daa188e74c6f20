"""Frozen-prefix cache: adapters on decoder layers k.. only, the layers below run
once per example; norms, losses, training and pipeline scores equal the
uncached run with the same layers_from."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_engine import make_batch
from test_ensemble import collate

from gradfilter import LoRAEnsemble
from gradfilter.io.models import tiny_gpt2, tiny_llama, tiny_tokenizer
from gradfilter.method.prefix import PrefixCache, decoder_layers, run_from_layer
from gradfilter.method.schedule import member_schedule
from gradfilter.run.score import ScoreConfig, score

KINDS = ["gpt2", "llama"]


def base(kind, dtype=torch.float64, layers=3, seed=0):
    if kind == "gpt2":
        return tiny_gpt2(seed=seed, dtype=dtype, n_layer=layers, n_positions=128)
    return tiny_llama(seed=seed, dtype=dtype, num_hidden_layers=layers, max_position_embeddings=128)


def pair(kind, k=1, **kw):
    """Two ensembles on identical bases, adapters on layers k..: cache off, cache on."""
    kw = {"members": 3, "r": 2, "alpha": 4, **kw}
    off = LoRAEnsemble(base(kind), layers_from=k, **kw)
    on = LoRAEnsemble(base(kind), layers_from=k, prefix_cache=True, **kw)
    return off, on


def randomise(*ensembles, seed=1):
    """Non-zero B factors (B starts at zero), the same in every ensemble."""
    gen = torch.Generator().manual_seed(seed)
    params = [list(e.adapters.parameters()) for e in ensembles]
    with torch.no_grad():
        for group in zip(*params, strict=False):
            v = torch.randn(group[0].shape, generator=gen, dtype=group[0].dtype) * 0.3
            for p in group:
                p.copy_(v)


def rows_dataset(n=16, seq=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, seq + 1, (1,), generator=gen))
        ids = torch.randint(3, 97, (length,), generator=gen)
        labels = ids.clone()
        labels[:2] = -100
        rows.append((ids, labels))
    return rows


def assert_equal_tight(got, want, rtol=1e-10):
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    ok = ~got.isnan()
    scale = want[ok].abs().max().clamp(min=1e-30)
    assert float((got[ok] - want[ok]).abs().max() / scale) <= rtol, (got, want)


# -- the cache itself ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cached_states_are_the_input_of_block_k(kind):
    model = base(kind, layers=4).requires_grad_(False)
    ids, _, mask = make_batch([7, 3, 5], 7, seed=3)
    seen = []
    _, _, _, layers = decoder_layers(model)
    h = layers[2].register_forward_pre_hook(
        lambda mod, args, kw: seen.append(args[0]), with_kwargs=True
    )
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    h.remove()
    cache = PrefixCache(model, 2)
    states = cache.states(ids, mask, rows=[10, 11, 12])
    for i, n in enumerate(mask.sum(-1).tolist()):
        assert torch.allclose(states[i, :n], seen[0][i, :n], rtol=0, atol=1e-12)
        assert cache._states[10 + i].shape == (n, states.shape[-1])  # stored unpadded
        assert not bool(states[i, n:].any())  # zeros at padding
    assert cache._states[10].dtype == torch.float64
    # Starting at block 2 from these states gives the full model's logits on real tokens.
    with torch.no_grad():
        got = run_from_layer(model, 2, states, mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], want[real], rtol=0, atol=1e-10)
    # GPT-2 adds position embeddings before block 0: a second add would show here.
    assert float((got[real] - want[real]).abs().max()) < 1e-10


def test_cache_computes_each_row_once_and_checks_tokens():
    model = base("llama").requires_grad_(False)
    cache = PrefixCache(model, 1)
    ids, _, mask = make_batch([5, 4], 5)
    cache.states(ids, mask, rows=[0, 1])
    cache.states(ids, mask, rows=[0, 1])
    ids2, _, mask2 = make_batch([4, 5, 3], 5, seed=7)
    ids2[1] = ids[0]
    mask2[1] = mask[0]
    cache.states(ids2, mask2, rows=[2, 0, 3])
    assert cache.computed_rows == 4 and len(cache) == 4
    assert cache.nbytes == sum(int(n) for n in (5, 4, 4, 3)) * 32 * 8
    with pytest.raises(ValueError, match="row 1 is in the prefix cache with other tokens"):
        cache.states(ids2[:1], mask2[:1], rows=[1])
    with pytest.raises(ValueError, match="right padding"):
        cache.states(*make_batch([3, 5], 5, side="left")[::2], rows=[7, 8])
    with pytest.raises(ValueError, match="2 row indices for a batch of 3"):
        cache.states(ids2, mask2, rows=[0, 1])


# -- ensemble: norms, losses, training ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_norms_equal_uncached(kind):
    off, on = pair(kind, k=1)
    randomise(off, on)
    ids, labels, mask = make_batch([9, 5, 7, 2], 9, empty=(3,), seed=2)
    want = off.per_example_grad_norms(ids, labels, mask)
    assert want.shape == (3, 4) and bool(want[:, :3].gt(0).all()) and bool(want[:, 3].isnan().all())
    rows = [4, 8, 15, 16]
    for _ in range(2):  # computed, then from the cache
        assert_equal_tight(on.per_example_grad_norms(ids, labels, mask, rows=rows), want)
    assert on.prefix_cache.computed_rows == 4
    assert_equal_tight(on.per_example_grad_norms(ids, labels, mask), want)  # uncached batch
    per = on.per_example_grad_norms(ids, labels, mask, rows=rows, per_param=True, reduction="sum")
    per_off = off.per_example_grad_norms(ids, labels, mask, per_param=True, reduction="sum")
    assert per.keys() == per_off.keys()
    for key in per:
        assert_equal_tight(per[key], per_off[key])


@pytest.mark.parametrize("kind", KINDS)
def test_cached_pass_skips_the_prefix_and_uses_the_cache(kind):
    off, on = pair(kind, k=2)
    randomise(off, on)
    ids, labels, mask = make_batch([6, 4, 5], 6, seed=4)
    on.per_example_grad_norms(ids, labels, mask, rows=[0, 1, 2])
    calls = []
    _, _, _, layers = decoder_layers(on.base)
    emb = on.base.get_input_embeddings()
    handles = [
        m.register_forward_hook(lambda mod, a, o, i=i: calls.append(i))
        for i, m in [(0, layers[0]), (1, layers[1]), ("emb", emb), (2, layers[2])]
    ]
    want = on.per_example_grad_norms(ids, labels, mask, rows=[0, 1, 2])
    for h in handles:
        h.remove()
    assert calls == [2]  # only blocks from k run, once for the folded batch
    # The states really come from the cache: changing one changes that row only.
    state = on.prefix_cache._states[1]
    state += torch.linspace(-1, 1, state.numel(), dtype=state.dtype).reshape(state.shape)
    got = on.per_example_grad_norms(ids, labels, mask, rows=[0, 1, 2])
    assert torch.equal(got[:, [0, 2]], want[:, [0, 2]])
    assert not torch.allclose(got[:, 1], want[:, 1])


@pytest.mark.parametrize("kind", KINDS)
def test_member_losses_equal_uncached(kind):
    off, on = pair(kind, k=1)
    randomise(off, on)
    ids, labels, mask = make_batch([8, 3, 6], 8, seed=5)
    fids, flabels, fmask = (off.fold(t) for t in (ids, labels, mask))
    with torch.no_grad():
        want, count = off.member_ce_sums(fids, flabels, fmask)
        states = on.fold(on.prefix_states(ids, mask, rows=[0, 1, 2]))
        got, count_on = on.member_ce_sums(fids, flabels, fmask, prefix_states=states)
    assert torch.equal(count, count_on)
    assert_equal_tight(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_tokens", [None, 40])
def test_training_equals_uncached(kind, max_tokens):
    off, on = pair(kind, k=1, dropout=0.2, r=3)
    rows = rows_dataset()
    lengths = [r[0].shape[0] for r in rows]
    opts = [e.make_optimizer(lr=1e-2) for e in (off, on)]
    for epoch in range(2):
        for step in member_schedule(lengths, 3, epoch, off.member_seeds, 0):
            batches = [collate(rows, idx) for idx in step]
            want = off.train_step(batches, opts[0], max_tokens=max_tokens)
            got = on.train_step(batches, opts[1], max_tokens=max_tokens, member_rows=step)
            assert_equal_tight(got, want)
    assert on.prefix_cache.computed_rows == len(rows)  # each example's prefix ran once
    moved = 0.0
    for (name, p_off), (_, p_on) in zip(
        off.adapters.named_parameters(), on.adapters.named_parameters(), strict=False
    ):
        assert_equal_tight(p_on.detach(), p_off.detach())
        moved += float(p_off.detach().abs().sum()) if "lora_B" in name else 0.0
    assert moved > 0  # training did change the adapters
    ids, labels, mask = collate(rows, [0, 3, 5, 9])
    assert_equal_tight(
        on.per_example_grad_norms(ids, labels, mask, rows=[0, 3, 5, 9]),
        off.per_example_grad_norms(ids, labels, mask),
    )


def test_adapters_keep_their_init_and_only_sit_from_layer_k():
    full = LoRAEnsemble(base("llama", layers=4), members=2, r=2)
    part = LoRAEnsemble(base("llama", layers=4), members=2, r=2, layers_from=3)
    assert sorted(part._targets) == [f"model.layers.3.self_attn.{p}_proj" for p in "koqv"]
    for key, ad in part.adapters.items():
        assert torch.equal(ad.lora_A.weight, full.adapters[key].lora_A.weight)
    assert all(part._layer_index[n] == full._layer_index[n] for n in part._targets)


# -- errors -----------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(ValueError, match=r"layers_from must be in \[0, 3\).*got 3"):
        LoRAEnsemble(base("gpt2"), members=2, layers_from=3)
    with pytest.raises(ValueError, match=r"layers_from must be in \[0, 3\).*got -1"):
        LoRAEnsemble(base("gpt2"), members=2, layers_from=-1)
    with pytest.raises(ValueError, match="layers_from must be an int"):
        LoRAEnsemble(base("gpt2"), members=2, layers_from=1.5)
    with pytest.raises(ValueError, match="no layer matching .* lies in decoder layers 1"):
        LoRAEnsemble(
            base("llama"),
            members=2,
            layers_from=1,
            target_modules=["model.layers.0.self_attn.q_proj"],
        )
    with pytest.raises(ValueError, match="prefix_cache needs layers_from > 0"):
        LoRAEnsemble(base("llama"), members=2, prefix_cache=True)
    plain = LoRAEnsemble(base("llama"), members=2, layers_from=1)
    ids, labels, mask = make_batch([4, 3], 4)
    with pytest.raises(ValueError, match="row indices key the prefix cache"):
        plain.per_example_grad_norms(ids, labels, mask, rows=[0, 1])
    on = LoRAEnsemble(base("llama"), members=2, layers_from=1, prefix_cache=True)
    with pytest.raises(ValueError, match="right padding"):
        on.per_example_grad_norms(*make_batch([4, 3], 4, side="left"), rows=[0, 1])
    with pytest.raises(ValueError, match="3 row lists for 2 members"):
        on.train_step([(ids, labels, mask)] * 2, on.make_optimizer(), member_rows=[[0, 1]] * 3)
    with pytest.raises(ValueError, match=r"a prefix cache needs 0 < layers_from < 3"):
        PrefixCache(base("gpt2").requires_grad_(False), 0)
    model = base("gpt2").requires_grad_(False)
    model.transformer.h[0].attn.c_attn.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="below decoder layer 1 is trainable"):
        PrefixCache(model, 1)
    with pytest.raises(ValueError, match="prefix_cache needs lora_layers_from > 0"):
        ScoreConfig(prefix_cache=True).validate()
    with pytest.raises(ValueError, match="lora_layers_from must be an int >= 0"):
        ScoreConfig(lora_layers_from=-2).validate()


# -- pipeline ---------------------------------------------------------------------------------

TEXTS = [
    ("Add two and three.", "Two plus three is five."),
    ("Name a colour.", "Blue."),
    ("Spell cat backwards.", "tac"),
    ("Say hello.", "Hello!"),
    ("Count to four.", "1, 2, 3, 4"),
    ("Opposite of hot?", "Cold."),
    ("Capital of France?", "Paris."),
    ("Is ice cold?", "Yes, ice is cold."),
    ("What is 2*3?", "6"),
]


def read(outdir):
    with open(os.path.join(outdir, "scores.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_scores_equal_uncached(tmp_path, kind):
    data = [{"instruction": i, "input": "", "output": o} for i, o in TEXTS]
    cfg = {
        "members": 3,
        "rank": 2,
        "alpha": 4,
        "epochs": 2,
        "batch_size": 3,
        "max_length": 96,
        "lr": 5e-3,
        "dropout": 0.1,
        "lora_layers_from": 1,
        "token_budget": 300,
    }
    results = {}
    for cached in (False, True):
        out = tmp_path / f"out-{cached}"
        score(
            data,
            str(out),
            ScoreConfig(**cfg, prefix_cache=cached),
            progress=False,
            model_and_tokenizer=(base(kind), tiny_tokenizer()),
        )
        results[cached] = read(out)
        run = json.loads((out / "run.json").read_text())
        assert run["config"]["lora_layers_from"] == 1 and run["config"]["prefix_cache"] is cached
        assert ("prefix_cache" in run) is cached
    assert run["prefix_cache"]["rows_computed"] == len(TEXTS)
    off, on = results[False], results[True]
    assert [r["rank"] for r in on] == [r["rank"] for r in off]
    for a, b in zip(on, off, strict=False):
        for key in ("early_sq", "late_sq"):
            assert_equal_tight(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-9)
        assert a["gsnr"] == pytest.approx(b["gsnr"], rel=1e-7)


def test_layers_from_is_part_of_the_resume_identity(tmp_path):
    data = [{"instruction": i, "input": "", "output": o} for i, o in TEXTS]
    cfg = {"members": 2, "rank": 2, "epochs": 2, "batch_size": 3, "max_length": 96}
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        score(
            data,
            out,
            ScoreConfig(**cfg, lora_layers_from=1),
            progress=False,
            stop_after=1,
            model_and_tokenizer=(base("gpt2"), tiny_tokenizer()),
        )
    with pytest.raises(ValueError, match="different run"):
        score(
            data,
            out,
            ScoreConfig(**cfg, lora_layers_from=2),
            progress=False,
            model_and_tokenizer=(base("gpt2"), tiny_tokenizer()),
        )
    # The cache does not change the run: resuming with it on finishes the same run.
    res = score(
        data,
        out,
        ScoreConfig(**cfg, lora_layers_from=1, prefix_cache=True),
        progress=False,
        model_and_tokenizer=(base("gpt2"), tiny_tokenizer()),
    )
    assert sum(r["status"] == "ok" for r in res.records) == len(TEXTS)


def test_cli_options(monkeypatch):
    from gradfilter import cli

    seen = {}

    def fake_score(data, outdir, config, **kw):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr("gradfilter.run.score.score", fake_score)
    assert cli.main(["score", "x.json", "--lora-layers-from", "15", "--prefix-cache"]) == 2
    assert seen["config"].lora_layers_from == 15 and seen["config"].prefix_cache is True
    assert cli.main(["score", "x.json"]) == 2
    assert seen["config"].lora_layers_from == 0 and seen["config"].prefix_cache is False
