"""The top rows of a finished run, written in the input's own format."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from gradfilter.run.records import read_scores, rows_fingerprint


def select_from(
    records: list[dict],
    rows: list[Any],
    source: Any,
    ratio: float | None,
    top_k: int | None,
    output: str | None,
    order: str,
):
    """Select from in-memory records and rows; see :func:`select`."""
    from gradfilter.io.rows import write_subset
    from gradfilter.method.gsnr import select_top
    from gradfilter.method.registry import METHODS

    method = records[0].get("method", "gsnr") if records else "gsnr"
    key = "score" if records and "score" in records[0] else "gsnr"
    g = np.array([np.nan if r[key] is None else r[key] for r in records])
    chosen = select_top(
        g,
        ratio=ratio,
        top_k=top_k,
        n_rows=len(records),
        higher_is_better=METHODS[method].higher_is_better,
    ).tolist()
    return write_subset(rows, source, chosen, output, order=order), chosen


def select(
    outdir: str,
    ratio: float | None = None,
    top_k: int | None = None,
    output: str | None = None,
    order: str = "rank",
):
    """Write the top rows of a finished run in the input's own format.

    k = floor(ratio * input rows) (or ``top_k``), never more than the rows that
    scored.  Returns ``(what write_subset returned, selected indices)``.
    """
    from gradfilter.io.rows import load_rows
    from gradfilter.run.records import read_run

    run = read_run(outdir)
    src = run.get("source", {})
    if not src.get("path"):
        raise ValueError(f"{outdir} was scored from in-memory rows; select from the ScoreResult")
    if run.get("stream") and src.get("kind") == "jsonl":
        return _select_streamed(outdir, run, ratio, top_k, output, order)
    records, run = read_scores(outdir)
    rows, source = load_rows(src["path"], fields=run["config"].get("fields") or None)
    want = run.get("rows_fingerprint")
    if want is not None and len(rows) == len(records) and rows_fingerprint(rows) != want:
        raise ValueError(
            f"{src['path']} has changed since it was scored (same row count, other content or "
            "order); re-run score"
        )
    if len(rows) != len(records):
        raise ValueError(
            f"{src['path']} now has {len(rows)} rows but was scored with {len(records)}; "
            "re-run score"
        )
    if output is None:
        ext = {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}.get(source.kind, "")
        output = os.path.join(outdir, "selected" + ext)
    return select_from(records, rows, source, ratio, top_k, output, order)


def _select_streamed(
    outdir: str, run: dict, ratio: float | None, top_k: int | None, output: str | None, order: str
):
    """:func:`select` for a streamed run (``--stream``) of a JSON Lines file, in
    memory bounded by the selection: the scores are read a line at a time (8
    bytes a row kept), the input twice, once for its fingerprint and once for the
    chosen lines, which are written byte for byte."""
    import hashlib
    import json
    from array import array

    from gradfilter.io.rows import Source, _ordered_indices, _prepare_out, iter_rows, jsonl_lines
    from gradfilter.method.gsnr import select_top
    from gradfilter.method.registry import METHODS
    from gradfilter.run.records import SCORES_FILE
    from gradfilter.run.store import content_hash_update

    path = run["source"]["path"]
    scores, method = array("d"), "gsnr"
    with open(os.path.join(outdir, SCORES_FILE), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                method = r.get("method", method)
                scores.append(np.nan if r.get("score") is None else r["score"])
    n = len(scores)
    h, rows = hashlib.sha256(), 0
    for row in iter_rows(path, fields=run["config"].get("fields") or None):
        content_hash_update(h, row)
        rows += 1
    if rows != n:
        raise ValueError(f"{path} now has {rows} rows but was scored with {n}; re-run score")
    want = run.get("rows_fingerprint")
    if want is not None and h.hexdigest()[:16] != want:
        raise ValueError(
            f"{path} has changed since it was scored (same row count, other content or "
            "order); re-run score"
        )
    chosen = select_top(
        np.frombuffer(scores, dtype=np.float64),
        ratio=ratio,
        top_k=top_k,
        n_rows=n,
        higher_is_better=METHODS[method].higher_is_better,
    ).tolist()
    wanted = set(chosen)
    lines = {i: raw for i, _, raw in jsonl_lines(path) if i in wanted}
    out = _prepare_out(output or os.path.join(outdir, "selected.jsonl"), Source("jsonl", path, {}))
    with open(out, "wb") as f:
        for i in _ordered_indices(chosen, n, order):
            f.write(lines[i])
            f.write(b"\n")
    return str(out), chosen
