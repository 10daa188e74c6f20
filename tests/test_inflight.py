"""``ScoreConfig(norms="inflight")``: G-SNR norms recorded by the training
steps themselves, with no snapshot pass."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
from gradfilter.run.score import ScoreConfig, score

ROWS = [
    {
        "instruction": f"Question {i}: what is {i} plus {i}?",
        "input": "",
        "output": f"It is {2 * i}." * (1 + i % 3),
    }
    for i in range(11)
]


def proxy():
    return tiny_gpt2(seed=0, n_positions=128), tiny_tokenizer()


def run(**kw):
    cfg = ScoreConfig(
        **{**dict(members=3, rank=4, alpha=8, epochs=2, batch_size=4, max_length=96), **kw}
    )
    return score(ROWS, None, cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy())


def sq(res, key):
    return np.array([r[key] for r in res.records], dtype=float)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_inflight_equals_snapshot_when_nothing_moves(reduction):
    """lr = 0 and no dropout: the parameters a training step sees are the ones a
    snapshot pass sees, so the recorded norms must equal the snapshot norms."""
    kw = dict(lr=0.0, dropout=0.0, reduction=reduction)
    snap, flight = run(**kw), run(norms="inflight", **kw)
    for key in ("early_sq", "late_sq"):
        a, b = sq(snap, key), sq(flight, key)
        assert a.shape == (len(ROWS), 3) and np.isfinite(b).all()
        np.testing.assert_allclose(b, a, rtol=2e-4)
    assert flight.run["plan"]["snapshot_batches"] == 0
    assert snap.run["plan"]["snapshot_batches"] > 0


def test_inflight_scores_every_row_and_records_the_epochs_apart():
    res = run(norms="inflight", lr=5e-3)
    early, late = sq(res, "early_sq"), sq(res, "late_sq")
    assert np.isfinite(early).all() and np.isfinite(late).all()
    assert not np.allclose(early, late)  # training moved the adapters between the epochs
    assert all(r["status"] == "ok" and r["gsnr"] is not None for r in res.records)
    assert sorted(r["rank"] for r in res.records) == list(range(1, len(ROWS) + 1))


def test_inflight_resumes_to_the_same_scores(tmp_path):
    cfg = dict(
        members=2, rank=4, alpha=8, epochs=2, batch_size=4, max_length=96, lr=5e-3, norms="inflight"
    )
    whole = score(
        ROWS,
        str(tmp_path / "a"),
        ScoreConfig(**cfg),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    with pytest.raises(KeyboardInterrupt):
        score(
            ROWS,
            str(tmp_path / "b"),
            ScoreConfig(**cfg),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
            stop_after=4,
        )
    resumed = score(
        ROWS,
        str(tmp_path / "b"),
        ScoreConfig(**cfg),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    np.testing.assert_allclose(sq(resumed, "early_sq"), sq(whole, "early_sq"), rtol=1e-6)
    np.testing.assert_allclose(sq(resumed, "late_sq"), sq(whole, "late_sq"), rtol=1e-6)
    assert json.load(open(tmp_path / "b" / "run.json"))["config"]["norms"] == "inflight"


def test_bad_norms_option():
    with pytest.raises(ValueError, match="norms must be"):
        ScoreConfig(norms="during").validate()
