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


# ------------------------------------------------------------------ output folder


def run_cli(*argv):
    from gradfilter.cli import main

    return main(list(argv))


def test_output_folder_is_a_file_or_not_writable(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        score(ROWS, str(target), ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(ValueError, match="cannot write to the output folder"):
            score(ROWS, str(ro), ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy())
    finally:
        ro.chmod(0o700)


def test_one_run_per_folder_unless_forced(tmp_path):
    out = tmp_path / "out"
    first = score(
        ROWS,
        str(out),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    # the same settings again: finished again, same scores
    again = score(
        ROWS,
        str(out),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    assert [r["gsnr"] for r in again.records] == [r["gsnr"] for r in first.records]
    other = ScoreConfig(**{**CFG, "method": "loss"})
    with pytest.raises(ValueError, match="holds the outputs of another run"):
        score(
            ROWS, str(out), other, progress=False, log=lambda s: None, model_and_tokenizer=proxy()
        )
    res = score(
        ROWS,
        str(out),
        other,
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
        force=True,
    )
    assert res.run["method"] == "loss"
    assert not (out / "norms.npz").exists() and not (out / "drop_vs_variance.png").exists()
    assert not (out / "checkpoint.pt").exists()


def test_no_scorable_row_still_writes_every_status(tmp_path):
    rows = [{"instruction": "no output"}, {"instruction": "x", "output": "  "}, "junk"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no row can be scored.*status of every row"):
        score(
            rows,
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )
    import json

    recs = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert all(r["status"] != "ok" and r["score"] is None for r in recs)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_bad_lr_is_refused_before_loading(lr):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        score(
            ROWS, None, ScoreConfig(**{**CFG, "lr": lr}), progress=False, model_and_tokenizer=None
        )


def test_diverged_training_is_an_error_with_every_status_written(tmp_path):
    import json

    with pytest.raises(ValueError, match="no row can be scored"):
        score(
            ROWS,
            str(tmp_path / "out"),
            ScoreConfig(**{**CFG, "lr": 1e30, "alpha": 1e30}),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
        )
    recs = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(recs) == len(ROWS)
    assert all(r["status"].startswith("not scored: training diverged") for r in recs)


def test_select_refuses_a_reordered_file(tmp_path):
    import json

    from gradfilter.run.select import select

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    score(
        str(data),
        str(out),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    select(str(out), top_k=3)
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(ROWS)))
    with pytest.raises(ValueError, match="has changed since it was scored"):
        select(str(out), top_k=3)


def test_one_member_warns(tmp_path):
    said = []
    score(
        ROWS,
        None,
        ScoreConfig(**{**CFG, "members": 1}),
        progress=False,
        log=said.append,
        model_and_tokenizer=proxy(),
    )
    assert any("one member" in s for s in said)


def test_template_without_instruction_is_refused_before_loading():
    with pytest.raises(ValueError, match="template must contain the placeholder"):
        score(
            ROWS,
            None,
            ScoreConfig(**{**CFG, "template": "nothing"}),
            progress=False,
            model_and_tokenizer=None,
        )


def test_rows_with_non_finite_norms_say_so(tmp_path, monkeypatch):
    """A row whose recorded norm is not finite keeps no score and gets a status."""
    import numpy as np

    from gradfilter.run import loop

    real = loop.EnsembleRun.run

    def run_then_break_row_2(self, stop_after=None):
        state = real(self, stop_after)
        state.trajectory["sq"][2, 0, :] = np.inf
        return state

    monkeypatch.setattr(loop.EnsembleRun, "run", run_then_break_row_2)
    res = score(
        ROWS,
        None,
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    rec = res.records[2]
    assert rec["score"] is None and rec["status"].startswith("gradient norm not finite")
    assert all(r["status"] == "ok" for i, r in enumerate(res.records) if i != 2)


def test_scores_jsonl_has_one_line_per_row_whatever_the_ids(tmp_path):
    """Ids holding characters that some readers treat as line breaks (found by the
    fuzz suite) stay inside their record."""
    import json

    rows = [dict(r, id=f"row\x85{i}\u2028x\u2029") for i, r in enumerate(ROWS)]
    score(
        rows,
        str(tmp_path / "out"),
        ScoreConfig(**CFG),
        progress=False,
        log=lambda s: None,
        model_and_tokenizer=proxy(),
    )
    text = (tmp_path / "out" / "scores.jsonl").read_text("utf-8")
    recs = [json.loads(x) for x in text.splitlines()]
    assert [r["id"] for r in recs] == [r["id"] for r in rows]


@pytest.mark.parametrize("targets", [[], ["", "q"], "q_proj"])
def test_malformed_targets_are_refused_before_loading(targets):
    with pytest.raises(ValueError, match="targets must be 'all-linear' or a non-empty list"):
        score(ROWS, None, ScoreConfig(**{**CFG, "targets": targets}), progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"targets": ["no_such_proj"]}, "no Linear or Conv1D layer of the model matches"),
        ({"lora_layers_from": 7}, r"layers_from must be in \[0, 2\)"),
    ],
)
def test_targets_are_checked_on_the_architecture_before_the_weights_load(tmp_path, change, message):
    """The proxy folder holds its configuration but no weights: the setting is
    refused from the configuration alone, so the weights are never read."""
    model, tok = proxy()
    folder = tmp_path / "proxy"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".bin")):
            os.remove(folder / name)
    config = ScoreConfig(**{**CFG, "proxy": str(folder), **change})
    with pytest.raises(ValueError, match=message):
        score(ROWS, str(tmp_path / "out"), config, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_proxy_fingerprint_sees_a_change_of_any_weight():
    from gradfilter.run.state import model_fingerprint

    model, tok = tiny_gpt2(seed=0, n_embd=64), tiny_tokenizer()
    before = model_fingerprint(model, tok)
    with torch.no_grad():
        w = next(p for p in model.parameters() if p.numel() > 10_000).view(-1)
        w[w.numel() // 2] += 1e-3  # one value in the middle of a large tensor
    assert model_fingerprint(model, tok) != before


def test_checkpoint_identity_holds_the_package_version():
    from gradfilter import __version__
    from gradfilter.run.score import prepare
    from gradfilter.run.state import run_identity

    model, tok = proxy()
    prepared = prepare(ROWS, ScoreConfig(**CFG), tok)
    ident = run_identity(ScoreConfig(**CFG), prepared.rows, prepared.encoded, model, tok)
    assert ident["version"] == __version__
