"""A dry run over a stream of rows: counts, token lengths and statuses, with host
memory bounded by a chunk of rows, whatever the size of the corpus.

``gradfilter score DATA --dry-run`` reads the rows one chunk at a time
(:func:`gradfilter.io.rows.iter_rows`: JSON Lines line by line, Parquet and saved
datasets in record batches), tokenises each chunk and keeps only each scorable
row's token count (8 bytes a row), so a corpus of millions of rows is planned in
a few hundred MB.  The plan equals the one a real run makes from the same rows.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from gradfilter.run.budget import row_fits, too_long_status
from gradfilter.run.config import ScoreConfig
from gradfilter.run.score import Counts, status_kind

__all__ = ["count_rows"]


def count_rows(
    data: Any,
    config: ScoreConfig,
    tokenizer: Any,
    *,
    members: int = 1,
    auto_budget: int | None = None,
    chunk: int = 2048,
    log: Callable[[str], None] | None = None,
    every: int = 200_000,
) -> Counts:
    """Read and tokenise ``data`` chunk by chunk; :class:`Counts` of its rows.

    ``auto_budget`` (an automatic token budget) gives each row that does not fit
    it, folded over ``members``, the status a run would give it.  ``log`` hears
    about progress every ``every`` rows."""
    from gradfilter.io.data import encode_rows
    from gradfilter.io.rows import iter_rows

    lengths = array("q")
    statuses: dict[str, int] = {}
    truncated = 0
    n = 0
    batch: list[Any] = []

    def flush() -> None:
        nonlocal truncated
        encoded, stats = encode_rows(batch, tokenizer, config.max_length, config.template)
        for enc, status in zip(encoded, stats, strict=True):
            if enc is not None and not row_fits(len(enc.input_ids), members, auto_budget):
                status = too_long_status(len(enc.input_ids), members, auto_budget or 0)
                enc = None
            key = status_kind(status)
            statuses[key] = statuses.get(key, 0) + 1
            if enc is not None:
                lengths.append(len(enc.input_ids))
                truncated += bool(enc.truncated)
        batch.clear()

    for row in iter_rows(data, fields=config.fields or None):
        batch.append(row)
        n += 1
        if len(batch) == chunk:
            flush()
        if log is not None and n % every == 0:
            log(f"dry run: {n} rows read, {len(lengths)} scorable")
    if batch:
        flush()
    return Counts(n, statuses, np.frombuffer(lengths, dtype=np.int64).copy(), truncated)
