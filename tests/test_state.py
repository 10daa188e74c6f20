"""The checkpoint: no code runs from it, and a resume notices a changed row,
a changed proxy or a damaged file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from test_inflight import ROWS

from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
from gradfilter.run.score import ScoreConfig, score

CFG = dict(members=2, rank=2, alpha=4, epochs=2, batch_size=4, max_length=96, lr=5e-3)


def proxy(seed=0):
    return tiny_gpt2(seed=seed, n_positions=128), tiny_tokenizer()


def killed(out, rows=ROWS, seed=0):
    with pytest.raises(KeyboardInterrupt):
        score(
            rows,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(seed),
            stop_after=2,
        )
    assert (out / "checkpoint.pt").exists()


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_planted_pickle_does_not_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "payload-ran"
    payload = _Payload()
    payload.target = str(marker)
    with open(out / "checkpoint.pt", "wb") as f:
        pickle.dump({"identity": payload}, f)
    with pytest.raises(ValueError, match="cannot be read as a gradfilter checkpoint"):
        score(
            ROWS,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )
    assert not marker.exists()
    # the same through torch.save's zip format
    torch.save({"identity": payload}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match="cannot be read"):
        score(
            ROWS,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )
    assert not marker.exists()


def test_changed_row_content_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    killed(out)
    changed = [dict(r) for r in ROWS]
    changed[3]["output"] = "Something else entirely."
    with pytest.raises(ValueError, match=r"different run \(other data"):
        score(
            changed,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )


def test_changed_proxy_is_not_resumed(tmp_path):
    out = tmp_path / "out"
    killed(out)
    with pytest.raises(ValueError, match=r"different run \(other proxy model\)"):
        score(
            ROWS,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(seed=1),
        )


def test_changed_settings_are_named(tmp_path):
    out = tmp_path / "out"
    killed(out)
    with pytest.raises(ValueError, match=r"different run \(other settings\)"):
        score(
            ROWS,
            str(out),
            ScoreConfig(**{**CFG, "lr": 1e-3}),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_says_what_to_do(tmp_path, damage):
    out = tmp_path / "out"
    killed(out)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="delete it to start the run again"):
        score(
            ROWS,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )


def test_resume_after_kill_is_identical(tmp_path):
    full = score(
        ROWS,
        str(tmp_path / "a"),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    killed(tmp_path / "b")
    resumed = score(
        ROWS,
        str(tmp_path / "b"),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    assert [r["gsnr"] for r in resumed.records] == [r["gsnr"] for r in full.records]
    assert (tmp_path / "a" / "scores.jsonl").read_bytes() == (
        tmp_path / "b" / "scores.jsonl"
    ).read_bytes()
