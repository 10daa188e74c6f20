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
