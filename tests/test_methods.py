"""Baseline selectors: formulas on hand-computed cases, and through the pipeline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_pipeline import CFG, GOOD, proxy, write_jsonl

from gradfilter.method.registry import METHODS
from gradfilter.method.selectors import (
    example_losses,
    ifd_from_losses,
    ifd_rank_scores,
    random_scores,
)
from gradfilter.run.score import ScoreConfig, score, select


def test_ifd_forms_hand_computed():
    cond = np.array([1.0, 2.0, 0.5, np.nan])
    alone = np.array([2.0, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(ifd_from_losses(cond, alone, "loss_ratio")[:3], [0.5, 2.0, 1.0])
    np.testing.assert_allclose(
        ifd_from_losses(cond, alone, "ppl_ratio")[:3], [math.exp(-1), math.exp(1), 1.0]
    )
    assert np.isnan(ifd_from_losses(cond, alone)[3])
    assert np.isnan(ifd_from_losses(np.array([1.0]), np.array([0.0]))[0])
    kept = ifd_rank_scores(np.array([0.5, 2.0, 1.0, 0.99]))
    assert kept[0] == 0.5 and kept[3] == 0.99 and np.isnan(kept[1]) and np.isnan(kept[2])
    with pytest.raises(ValueError, match="IFD form"):
        ifd_from_losses(cond, alone, "other")


def test_random_is_seeded():
    assert np.array_equal(random_scores(5, 3), random_scores(5, 3))
    assert not np.array_equal(random_scores(5, 3), random_scores(5, 4))


def test_example_losses_match_manual_cross_entropy():
    model, _ = proxy()
    ids = torch.tensor([[5, 9, 11, 4, 0], [7, 8, 9, 10, 12]])
    labels = torch.tensor([[-100, 9, 11, 4, -100], [-100, -100, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = example_losses(model, ids, labels, mask)
    logits = model(input_ids=ids[:1, :4]).logits[0]
    want = torch.nn.functional.cross_entropy(logits[:3], ids[0, 1:4])
    assert got[0].item() == pytest.approx(want.item(), rel=1e-5)
    assert math.isnan(got[1])


@pytest.mark.parametrize("method", [m for m in METHODS if m != "gsnr"])
def test_every_method_writes_the_same_schema(tmp_path, method):
    data = tmp_path / "d.jsonl"
    n = write_jsonl(data)
    out = tmp_path / method
    res = score(
        str(data),
        str(out),
        ScoreConfig(**{**CFG, "members": 2}, method=method),
        progress=False,
        model_and_tokenizer=proxy(),
    )
    recs = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == n and [r["index"] for r in recs] == list(range(n))
    base_keys = {
        "index",
        "id",
        "status",
        "method",
        "score",
        "gsnr",
        "drop",
        "late_var",
        "early_sq",
        "late_sq",
        "n_tokens",
        "truncated",
        "rank",
    }
    assert all(base_keys <= set(r) for r in recs)
    ok = [r for r in recs if r["status"] == "ok"]
    assert sorted(r["rank"] for r in recs) == list(range(1, n + 1))
    scored = [r for r in ok if r["score"] is not None]
    higher = method != "late_var"
    best_first = sorted(scored, key=lambda r: (-r["score"] if higher else r["score"], r["index"]))
    assert [r["rank"] for r in best_first] == list(range(1, len(scored) + 1))
    if method == "grand":
        assert all(r["late_sq"] is None and len(r["early_sq"]) == 2 for r in ok)
        assert all(r["score"] == pytest.approx(sum(r["early_sq"]) / 2) for r in ok)
    if method in ("ifd", "ifd_ppl"):
        for r in ok:
            assert r["discarded"] == (r[method] >= 1.0)
            assert (r["score"] is None) == r["discarded"]
        assert all(r["rank"] > len(scored) for r in ok if r["discarded"])
        assert all(
            r["ifd_ppl"] == pytest.approx(math.exp(r["cond_loss"] - r["alone_loss"])) for r in ok
        )
    if method == "loss":
        assert all(r["loss"] == r["score"] and r["loss"] > 0 for r in ok)
    _, chosen = select(str(out), top_k=3)
    assert chosen == [r["index"] for r in best_first[:3]]
    assert res.run["method"] == method


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        ScoreConfig(method="magic").validate()


def test_grand_trains_only_the_early_epochs(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, extra_bad=False)
    res = score(
        str(data),
        None,
        ScoreConfig(**CFG, method="grand"),
        dry_run=True,
        progress=False,
        model_and_tokenizer=proxy(),
    )
    assert res.run["plan"]["training_steps"] == 3  # 12 rows / batch 4, one epoch
    assert len(GOOD) == 12
