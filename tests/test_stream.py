"""Rows read as a stream (iter_rows) and the dry run over it (gradfilter.run.stream):
the same rows and plan as a whole read, in memory bounded by a chunk of rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_pipeline import CFG, proxy, write_jsonl

from gradfilter.io.rows import iter_rows, load_rows
from gradfilter.method.schedule import member_schedule, snapshot_batches
from gradfilter.run.score import (
    ScoreConfig,
    member_steps,
    plan,
    prepare,
    score,
    snapshot_batch_count,
)


def _same_rows(a, b):
    assert [(r.index, r.id, r.kind, r.status) for r in a] == [
        (r.index, r.id, r.kind, r.status) for r in b
    ]


def test_iter_rows_equals_load_rows_for_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = tmp_path / "d.jsonl"
    write_jsonl(jl)
    raw = jl.read_bytes()
    jl.write_bytes(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\n\n", 2))  # BOM, blank lines
    _same_rows(list(iter_rows(str(jl))), load_rows(str(jl))[0])
    records = [r.record for r in load_rows(str(jl))[0] if isinstance(r.record, dict)]
    records.append(["not", "an", "object"])
    js = tmp_path / "d.json"
    js.write_text(json.dumps(records), encoding="utf-8")
    _same_rows(list(iter_rows(str(js))), load_rows(str(js))[0])
    _same_rows(list(iter_rows(records)), load_rows(records)[0])
    good = [r for r in records if isinstance(r, dict) and isinstance(r.get("instruction"), str)]
    table = pa.Table.from_pylist(
        [{"instruction": r["instruction"], "output": r.get("output")} for r in good]
    )
    pqf = tmp_path / "d.parquet"
    pq.write_table(table, pqf, row_group_size=3)
    _same_rows(list(iter_rows(str(pqf), batch_rows=2)), load_rows(str(pqf))[0])
    renamed = [{"q": r["instruction"], "a": r.get("output")} for r in good]
    fields = {"instruction": "q", "output": "a"}
    _same_rows(list(iter_rows(renamed, fields=fields)), load_rows(renamed, fields=fields)[0])
    with pytest.raises(TypeError):
        list(iter_rows({"instruction": "a dict, not rows"}))
    with pytest.raises(FileNotFoundError):
        list(iter_rows(str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 32, 33, 100])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_counted_steps_and_batches_equal_the_built_ones(n, batch):
    lengths = np.random.default_rng(n).integers(3, 90, size=n).tolist()
    assert member_steps(n, batch) == len(member_schedule(lengths, batch, 0, [0], 0))
    for budget in (None, 60, 200):
        assert snapshot_batch_count(np.array(lengths), batch, budget) == len(
            snapshot_batches(lengths, batch, budget)
        )


@pytest.mark.parametrize(
    "extra", [{}, {"method": "loss"}, {"early_after": 5, "norms": "inflight"}, {"method": "grand"}]
)
def test_dry_run_plan_equals_the_plan_of_a_whole_read(tmp_path, extra):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**{**CFG, "token_budget": 300, **extra})
    model, tok = proxy()
    res = score(
        str(data), None, cfg, dry_run=True, progress=False, model_and_tokenizer=(model, tok)
    )
    prepared = prepare(str(data), cfg, tok)
    if extra.get("early_after"):
        cfg = cfg.resolve_schedule(member_steps(len(prepared.ok), cfg.batch_size))
    want = plan(cfg, prepared).summary
    got = dict(res.run["plan"])
    got.pop("token_budget")
    assert got == want
    assert res.records == [] and res.rows == []


def test_dry_run_too_long_rows_under_an_automatic_budget(tmp_path, monkeypatch):
    """A row that cannot fit the automatic budget is counted under the status a
    whole read gives it."""
    import dataclasses

    from gradfilter.run import budget as budget_mod

    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    real = budget_mod.auto_token_budget

    def small(*a, **k):
        return dataclasses.replace(real(*a, **k), token_budget=200)

    monkeypatch.setattr(budget_mod, "auto_token_budget", small)
    model, tok = proxy()
    cfg = ScoreConfig(**CFG)
    res = score(
        str(data), None, cfg, dry_run=True, progress=False, model_and_tokenizer=(model, tok)
    )
    prepared = prepare(str(data), cfg, tok)
    cfg2, _ = budget_mod.choose_token_budget(cfg, model, prepared)
    got = res.run["plan"]
    assert got["statuses"] == prepared.statuses()
    assert got["statuses"]["too long for the memory at hand"] >= 1
    assert got["scorable_rows"] == len(prepared.ok) and got == {
        **plan(cfg2, prepared).summary,
        "token_budget": got["token_budget"],
    }


@pytest.mark.slow
def test_dry_run_memory_does_not_grow_with_the_corpus(tmp_path):
    """200,000 short rows: the dry run's peak resident set grows by far less than
    the rows would take in memory (measured in a fresh process, VmHWM)."""
    rows = 200_000
    script = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_pipeline import proxy
        from gradfilter.run.score import ScoreConfig, score

        path = {str(tmp_path / "big.jsonl")!r}
        with open(path, "w") as f:
            for i in range({rows}):
                f.write(json.dumps({{"instruction": f"Add {{i}} and {{i % 7}}.",
                                     "output": f"The sum is {{i + i % 7}}."}}) + "\\n")
        model, tok = proxy()

        def hwm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = hwm()
        res = score(path, None, ScoreConfig(members=3, batch_size=8, max_length=64,
                    token_budget=1024), dry_run=True, progress=False,
                    model_and_tokenizer=(model, tok), log=lambda s: None)
        print(json.dumps({{"plan": res.run["plan"], "grew_kib": hwm() - before,
                           "file_kib": os.path.getsize(path) // 1024}}))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["plan"]["rows"] == got["plan"]["scorable_rows"] == rows
    assert got["plan"]["training_steps"] == 2 * member_steps(rows, 8)
    # Holding the rows would take several hundred MB (Row objects, encoded ids);
    # the stream keeps 8 bytes a row plus one chunk.
    assert got["grew_kib"] < 64 * 1024, got


# ----------------------------------------------------------------------------- scoring a stream


def _outputs(out):
    z = np.load(out / "norms.npz")
    return (out / "scores.jsonl").read_bytes(), {k: z[k] for k in z.files if k != "rows"}


@pytest.mark.parametrize("norms", ["snapshot", "inflight"])
def test_a_streamed_run_writes_the_scores_of_a_whole_read(tmp_path, monkeypatch, norms):
    """The rows read three at a time into a row store on disk give the same
    scores.jsonl (byte for byte), norms and plan as the rows held in memory."""
    from gradfilter.run import store

    monkeypatch.setattr(store, "CHUNK_ROWS", 3)
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**CFG, norms=norms, token_budget=400)
    whole = score(str(data), str(tmp_path / "whole"), cfg, progress=False,
                  model_and_tokenizer=proxy())  # fmt: skip
    streamed = score(str(data), str(tmp_path / "stream"), cfg, progress=False,
                     model_and_tokenizer=proxy(), stream=True)  # fmt: skip
    a, b = _outputs(tmp_path / "whole"), _outputs(tmp_path / "stream")
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])
    assert streamed.run["plan"] == whole.run["plan"]
    assert streamed.run["rows_fingerprint"] == whole.run["rows_fingerprint"]
    assert streamed.run["stream"]["rows"] == len(whole.records)
    assert list(streamed.records) == whole.records
    assert sorted(os.listdir(tmp_path / "stream" / "rows")) == [
        "ids.bin",
        "keys.bin",
        "labels.bin",
    ]
    # the rows a streamed run hands back: places, ids and statuses, no texts
    assert [(r.index, r.id, r.status) for r in streamed.rows] == [
        (r.index, r.id, r.status) for r in whole.rows
    ]


def test_a_streamed_run_without_a_folder_and_a_rescore(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**CFG, token_budget=400)
    whole = score(str(data), str(tmp_path / "w"), cfg, progress=False,
                  model_and_tokenizer=proxy())  # fmt: skip
    held = score(str(data), None, cfg, progress=False, model_and_tokenizer=proxy(), stream=True)
    assert held.records == whole.records  # the temporary store is gone; records are kept
    streamed = tmp_path / "s"
    score(str(data), str(streamed), cfg, progress=False, model_and_tokenizer=proxy(), stream=True)
    from gradfilter.run.score import rescore

    again = rescore(str(streamed), output=str(tmp_path / "again"), plots=False)
    assert (tmp_path / "again" / "scores.jsonl").read_bytes() == (
        streamed / "scores.jsonl"
    ).read_bytes()
    assert again.records == whole.records


def test_an_interrupted_streamed_run_resumes_to_the_same_scores(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**CFG, token_budget=400, checkpoint_seconds=0)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        score(str(data), str(out), cfg, progress=False, model_and_tokenizer=proxy(),
              stream=True, stop_after=4)  # fmt: skip
    logs = []
    score(str(data), str(out), cfg, progress=False, model_and_tokenizer=proxy(), stream=True,
          log=logs.append)  # fmt: skip
    assert any("resuming from" in s for s in logs)
    whole = tmp_path / "whole"
    score(str(data), str(whole), cfg, progress=False, model_and_tokenizer=proxy())
    assert (out / "scores.jsonl").read_bytes() == (whole / "scores.jsonl").read_bytes()


def test_the_row_store_reads_back_every_row(tmp_path):
    """Tokens, labels, counts, ids and statuses of every row, read back from disk,
    equal what prepare holds; a dropped row reads as None with its status."""
    from gradfilter.run.store import build_store

    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**CFG)
    _, tok = proxy()
    held = prepare(str(data), cfg, tok)
    st = build_store(str(data), str(tmp_path / "rows"), tok, cfg.max_length, chunk=4)
    assert len(st) == len(held.rows)
    for i, (row, enc) in enumerate(zip(held.rows, held.encoded, strict=True)):
        got = st.encoded[i]
        assert (st.rows[i].id, st.rows[i].status) == (row.id, row.status)
        if enc is None:
            assert got is None
            continue
        assert got.input_ids.tolist() == list(enc.input_ids)
        assert got.labels.tolist() == list(enc.labels)
        assert (got.truncated, got.n_tokens, got.n_response_tokens) == (
            enc.truncated,
            enc.n_tokens,
            enc.n_response_tokens,
        )
    # status counts in order of first appearance, as a held read gives them
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[3], *lines[:3], *lines[4:]]) + "\n")  # a bad row first
    from gradfilter.run.score import Prepared

    held2 = prepare(str(data), cfg, tok)
    st2 = build_store(str(data), str(tmp_path / "rows2"), tok, cfg.max_length, chunk=4)
    got = Prepared(st2.rows, None, st2.encoded, st2).statuses()
    assert list(got.items()) == list(held2.statuses().items())
    assert list(got)[0] != "ok"
    first = int(st.ok[0])
    st.drop(first, "too long for the memory at hand")
    assert st.encoded[first] is None and st.rows[first].status.startswith("too long")
    assert first not in st.ok.tolist()
    with pytest.raises(TypeError):
        st.encoded[first] = held.encoded[first]


def test_the_command_line_streams_and_shows_rows_by_id(tmp_path, capsys):
    from gradfilter.cli import main

    model, tok = proxy()
    model.save_pretrained(tmp_path / "proxy")
    tok.save_pretrained(tmp_path / "proxy")
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    args = ["score", str(data), "--proxy", str(tmp_path / "proxy"), "--members", "3",
            "--rank", "4", "--alpha", "8", "--batch-size", "4", "--max-length", "96",
            "--token-budget", "400", "--no-progress", "--show", "2"]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "s"), "--stream"]) == 0
    shown = capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "w")]) == 0
    held = capsys.readouterr().out
    assert (tmp_path / "s" / "scores.jsonl").read_bytes() == (
        tmp_path / "w" / "scores.jsonl"
    ).read_bytes()
    records = [json.loads(x) for x in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    top = min((r for r in records if r["rank"] == 1), key=lambda r: r["index"])
    assert f"row {top['index']:5d}  id {top['id']}" in shown
    bad = sum(r["status"] != "ok" for r in records)
    assert f"{bad} rows not scored:" in shown and f"{bad} rows not scored:" in held
    # the same lines as the held run's, with ids for texts
    assert len(shown.splitlines()) == len(held.splitlines())


def test_select_from_a_streamed_run_reads_the_input_as_a_stream(tmp_path):
    from gradfilter.run.score import select

    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    cfg = ScoreConfig(**CFG, token_budget=400)
    score(str(data), str(tmp_path / "w"), cfg, progress=False, model_and_tokenizer=proxy())
    score(str(data), str(tmp_path / "s"), cfg, progress=False, model_and_tokenizer=proxy(),
          stream=True)  # fmt: skip
    for order in ("rank", "input"):
        for kw in ({"ratio": 0.5}, {"top_k": 3}):
            a, ca = select(str(tmp_path / "w"), output=str(tmp_path / f"a-{order}.jsonl"),
                           order=order, **kw)  # fmt: skip
            b, cb = select(str(tmp_path / "s"), output=str(tmp_path / f"b-{order}.jsonl"),
                           order=order, **kw)  # fmt: skip
            assert ca == cb and len(cb) == (kw.get("top_k") or 8)
            assert open(a, "rb").read() == open(b, "rb").read()
    res = score(str(data), None, cfg, progress=False, model_and_tokenizer=proxy(), stream=True)
    with pytest.raises(ValueError, match="without an output folder"):
        res.select(top_k=2)
    res = score(str(data), str(tmp_path / "s2"), cfg, progress=False,
                model_and_tokenizer=proxy(), stream=True)  # fmt: skip
    path, chosen = res.select(top_k=3, output=str(tmp_path / "c.jsonl"))
    held_path, held_chosen = select(
        str(tmp_path / "w"), top_k=3, output=str(tmp_path / "held.jsonl")
    )
    assert chosen == held_chosen and len(chosen) == 3
    assert open(path, "rb").read() == open(held_path, "rb").read()
    lines = data.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="changed since it was scored"):
        select(str(tmp_path / "s"), top_k=2)
    data.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="re-run score"):
        select(str(tmp_path / "s"), top_k=2)


def test_stream_is_refused_where_it_cannot_stream(tmp_path):
    """Forward-only methods read every row at once, and rows already in memory
    need no stream: both are refused with a message, before any work."""
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    with pytest.raises(ValueError, match="--method loss reads every row at once"):
        score(str(data), str(tmp_path / "a"), ScoreConfig(**CFG, method="loss"),
              progress=False, model_and_tokenizer=proxy(), stream=True)  # fmt: skip
    with pytest.raises(ValueError, match="already in memory"):
        score([{"instruction": "a", "output": "b"}], None, ScoreConfig(**CFG),
              progress=False, model_and_tokenizer=proxy(), stream=True)  # fmt: skip
    assert not (tmp_path / "a" / "rows").exists()


def test_force_removes_the_row_store_of_a_streamed_run(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    out = tmp_path / "out"
    score(str(data), str(out), ScoreConfig(**CFG, token_budget=400), progress=False,
          model_and_tokenizer=proxy(), stream=True)  # fmt: skip
    assert (out / "rows" / "ids.bin").exists()
    score(str(data), str(out), ScoreConfig(**CFG, method="loss"), progress=False,
          model_and_tokenizer=proxy(), force=True)  # fmt: skip
    assert not (out / "rows").exists()
