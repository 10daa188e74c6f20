"""What a run writes and reads back: one record per input row (``scores.jsonl``),
the run summary (``run.json``), the norm trajectory (``norms.npz``) and plots.

Every file is written atomically (a temporary file, fsync, rename), so a kill
never leaves a half-written output.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from gradfilter.run.config import ScoreConfig

SCORES_FILE = "scores.jsonl"
RUN_FILE = "run.json"
NORMS_FILE = "norms.npz"

#: What a record says about its row besides scores.
ROW_FIELDS = ("index", "id", "status", "n_tokens", "n_response_tokens", "truncated")

#: ``gsnr_components`` key -> record field.
RECORD_FIELDS = {
    "gsnr": "gsnr",
    "drop": "drop",
    "late_var": "late_var",
    "early_mean": "early_mean",
    "late_mean": "late_mean",
}


def atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def row_meta(rows: list[Any], encoded: list[Any]) -> list[dict[str, Any]]:
    """The :data:`ROW_FIELDS` of each row (also read back from scores.jsonl)."""
    return [
        {
            "index": row.index,
            "id": row.id,
            "status": row.status,
            "n_tokens": None if enc is None else enc.n_tokens,
            "n_response_tokens": None if enc is None else enc.n_response_tokens,
            "truncated": None if enc is None else enc.truncated,
        }
        for row, enc in zip(rows, encoded, strict=True)
    ]


def records_from_trajectory(
    meta: Any,
    ok: Any,
    config: ScoreConfig,
    sq: np.ndarray,
    norm_epochs: list[int],
    table: bool = False,
) -> Any:
    """The records of an ensemble method from the ``[ok rows, M, checkpoints]`` norms:
    the early and late points are the columns of epochs ``config.early`` / ``late``.
    ``table``: as :class:`Records` (made as they are read), not a list."""
    grand = config.method == "grand"
    for e in (config.early,) if grand else (config.early, config.late):
        if e not in norm_epochs:
            raise ValueError(f"epoch {e} has no recorded norms; recorded epochs: {norm_epochs}")
    early_sq = sq[:, :, norm_epochs.index(config.early)]
    late_sq = None if grand else sq[:, :, norm_epochs.index(config.late)]
    make = record_table if table else build_records
    return make(meta, ok, config, early_sq=early_sq, late_sq=late_sq)


def build_records(meta: Any, ok: Any, config: ScoreConfig, **inputs: Any) -> list[dict[str, Any]]:
    """One record per input row, as a list (:func:`record_table`'s arguments)."""
    return list(record_table(meta, ok, config, **inputs))


def record_table(
    meta: Any,
    ok: Any,
    config: ScoreConfig,
    *,
    early_sq: np.ndarray | None = None,
    late_sq: np.ndarray | None = None,
    values: dict[str, np.ndarray] | None = None,
) -> Records:
    """One record per input row; ``score`` is the method's score, ``rank`` its rank.
    As :class:`Records`: the columns as arrays, each row's record made when it is
    read (a run over a stored corpus never holds them all).

    ``early_sq`` / ``late_sq``: ``[ok rows, M]`` squared norms (ensemble methods);
    ``values``: per-ok-row arrays of a forward method, keyed by name.
    ``meta``: a sequence of :data:`ROW_FIELDS` dicts, or anything with ``n``,
    ``n_response`` and ``meta(start, stop)`` (a :class:`gradfilter.run.store.RowStore`)."""
    from gradfilter.method.gsnr import ablation_scores, gsnr_components, rank_scores
    from gradfilter.method.registry import METHODS

    stored = _stored(meta)
    n = len(meta)
    ok = np.asarray(ok, dtype=np.int64)
    values = dict(values or {})
    comp: dict[str, np.ndarray] = {}
    if early_sq is not None and late_sq is not None:
        if stored:
            lengths = meta.n_response[ok].tolist()
        else:
            lengths = [meta[i]["n_response_tokens"] or 0 for i in ok.tolist()]
        comp = gsnr_components(early_sq, late_sq, config.gsnr_config(), lengths)
        values.update({f"ablation.{k}": v for k, v in ablation_scores(comp).items()})
    elif early_sq is not None:
        values["early_mean"] = np.mean(early_sq, axis=1)
    method = METHODS[config.method]
    method_score = {**values, **comp}[method.source]
    if method.discard_at is not None:
        method_score = np.where(method_score < method.discard_at, method_score, np.nan)

    def spread(arr: np.ndarray | None) -> np.ndarray | None:
        if arr is None:
            return None
        out = np.full((n,) + np.shape(arr)[1:], np.nan)
        out[ok] = arr
        return out

    full = spread(method_score)
    table = Records(meta, n, method.name, ok)
    table.ranks = rank_scores(full, higher_is_better=method.higher_is_better)
    table.columns["score"] = full
    for k in ("gsnr", "drop", "late_var", "late_mean"):
        table.columns[k] = spread(comp.get(k))
    table.columns["early_mean"] = spread(comp.get("early_mean", values.get("early_mean")))
    table.early_sq, table.late_sq = spread(early_sq), spread(late_sq)
    table.ablations = {
        k.split(".", 1)[1]: spread(v) for k, v in values.items() if k.startswith("ablation.")
    }
    table.others = {
        k: spread(v)
        for k, v in values.items()
        if not k.startswith("ablation.") and k not in table.columns
    }
    if method.discard_at is not None:
        table.discarded = spread(np.where(values[method.source] < method.discard_at, 0.0, 1.0))
    return table


def _stored(meta: Any) -> bool:
    """Whether ``meta`` is a row store (its fields read from disk), not a list."""
    return hasattr(meta, "n_response")


def _floats(a: np.ndarray | None, n: int) -> list:
    """Python floats of ``a``, None where not finite or absent (JSON has no NaN)."""
    if a is None:
        return [None] * n
    a = np.asarray(a, dtype=np.float64)
    return [None if x != x else x for x in np.where(np.isfinite(a), a, np.nan).tolist()]


class Records:
    """The records of a run (:func:`record_table`): iterating makes them
    ``chunk`` rows at a time; ``column`` gives one field as an array."""

    CHUNK = 65536

    def __init__(self, meta: Any, n: int, method: str, ok: np.ndarray) -> None:
        self.meta, self.n, self.method = meta, n, method
        self.stored = _stored(meta)
        self.scored = np.zeros(n, dtype=bool)
        self.scored[ok] = True
        self.ranks = np.zeros(n, dtype=np.int64)
        self.columns: dict[str, np.ndarray | None] = {}
        self.early_sq: np.ndarray | None = None
        self.late_sq: np.ndarray | None = None
        self.ablations: dict[str, np.ndarray] = {}
        self.others: dict[str, np.ndarray] = {}
        self.discarded: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def column(self, key: str) -> np.ndarray:
        """``score``, ``gsnr``, ``drop``, ... of every row (NaN where none)."""
        a = self.columns.get(key)
        return np.full(self.n, np.nan) if a is None else np.where(np.isfinite(a), a, np.nan)

    def record(self, i: int) -> dict[str, Any]:
        """Row ``i``'s record."""
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        return self._chunk(i, i + 1)[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.record(i if i >= 0 else self.n + i)

    def _meta(self, start: int, stop: int) -> list[dict[str, Any]]:
        if self.stored:
            return self.meta.meta(start, stop)
        return [self.meta[i] for i in range(start, stop)]

    def chunks(self) -> Iterator[list[dict[str, Any]]]:
        """The records, :data:`CHUNK` rows at a time."""
        for start in range(0, self.n, self.CHUNK):
            yield self._chunk(start, min(self.n, start + self.CHUNK))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chunk in self.chunks():
            yield from chunk

    def _chunk(self, start: int, stop: int) -> list[dict[str, Any]]:
        k = stop - start
        sl = slice(start, stop)

        def cut(a: np.ndarray | None) -> list:
            return _floats(None if a is None else a[sl], k)

        cols = {name: cut(a) for name, a in self.columns.items()}
        scored = self.scored[sl].tolist()

        def per_row(a: np.ndarray | None) -> list:
            if a is None:
                return [None] * k
            m = a.shape[1]
            flat = _floats(a[sl].reshape(-1), k * m)
            return [flat[j * m : (j + 1) * m] if s else None for j, s in enumerate(scored)]

        early, late = per_row(self.early_sq), per_row(self.late_sq)
        ablations = {name: cut(a) for name, a in self.ablations.items()}
        others = {name: cut(a) for name, a in self.others.items()}
        discarded = cut(self.discarded) if self.discarded is not None else None
        ranks = self.ranks[sl].tolist()
        out = []
        for j, info in enumerate(self._meta(start, stop)):
            rec = {
                "index": info["index"],
                "id": info["id"],
                "status": info["status"],
                "method": self.method,
                "score": cols["score"][j],
                "gsnr": cols["gsnr"][j],
                "drop": cols["drop"][j],
                "late_var": cols["late_var"][j],
                "early_mean": cols["early_mean"][j],
                "late_mean": cols["late_mean"][j],
                "early_sq": early[j],
                "late_sq": late[j],
                "n_tokens": info["n_tokens"],
                "n_response_tokens": info["n_response_tokens"],
                "truncated": info["truncated"],
                "rank": ranks[j],
            }
            if scored[j] and ablations:
                rec["ablation"] = {name: v[j] for name, v in ablations.items()}
            for name, v in others.items():
                rec[name] = v[j]
            if discarded is not None and scored[j]:
                rec["discarded"] = discarded[j] == 1.0
            out.append(rec)
        return out


def write_norms(
    outdir: str,
    traj: dict[str, np.ndarray],
    ok: list[int],
    meta: list[dict[str, Any]],
    epochs: list[int],
    steps: list[int],
) -> None:
    """``OUTDIR/norms.npz``: the trajectory over every input row (NaN / -1 where a
    row was not scored), with the epoch and end-of-epoch optimizer step of each
    checkpoint, and the rows' :data:`ROW_FIELDS` (one JSON text).  float64, so
    that a rescore reproduces the scores exactly."""
    n_rows = len(meta)
    # a streamed run's rows stay in its row store; scores.jsonl has their fields
    rows = {}
    if isinstance(meta, list):
        rows["rows"] = np.asarray(json.dumps(meta, ensure_ascii=False))
    arrays: dict[str, np.ndarray] = {}
    for name, arr in traj.items():
        full = np.full(
            (n_rows,) + arr.shape[1:], -1 if arr.dtype.kind == "i" else np.nan, dtype=arr.dtype
        )
        full[ok] = arr
        arrays[name] = full
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        **arrays,
        epoch=np.asarray(epochs, dtype=np.int64),
        step=np.asarray(steps, dtype=np.int64),
        scored=np.asarray(ok, dtype=np.int64),
        **rows,
    )
    atomic_write(os.path.join(outdir, NORMS_FILE), buf.getvalue())


def read_norms(outdir: str, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``OUTDIR/norms.npz``: ``sq``, ``sq_a``, ``sq_b``
    ``[rows, members, checkpoints]`` float64, ``visit_step`` (int64), ``epoch`` and
    ``step`` ``[checkpoints]``, ``scored`` (the scored row positions) and ``rows``
    (the rows' :data:`ROW_FIELDS`, a JSON text).  ``keys``: read only these."""
    path = os.path.join(outdir, NORMS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: only an ensemble run (gsnr, drop, late_var, grand) records norms"
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if keys is None or k in keys}


#: Characters that some readers take as line breaks, written as JSON escapes.
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def write_outputs(outdir: str, records: Any, run: dict, plots: bool = True) -> None:
    """``scores.jsonl``, ``run.json`` and, for G-SNR runs, the two plots.
    ``records``: a list of records or :class:`Records` (written a chunk at a time)."""
    from gradfilter.run.plots import plot_drop_vs_variance, plot_gsnr_distribution

    os.makedirs(outdir, exist_ok=True)
    # json.dumps(r, ensure_ascii=False) for each record; one encoder for all of them.
    # U+0085, U+2028 and U+2029 are escaped too: JSON allows them raw inside strings,
    # but line splitters such as str.splitlines() would cut a record there.
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
    path = os.path.join(outdir, SCORES_FILE)
    chunks = (
        (records[i : i + Records.CHUNK] for i in range(0, len(records), Records.CHUNK))
        if isinstance(records, list)
        else records.chunks()
    )
    with open(path + ".tmp", "wb") as f:
        for chunk in chunks:
            lines = "".join([encode(r) + "\n" for r in chunk]).translate(_LINE_BREAKS)
            f.write(lines.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    atomic_write(os.path.join(outdir, RUN_FILE), json.dumps(run, indent=2).encode("utf-8"))
    if isinstance(records, Records):
        column, n = records.column, len(records)
        rank = records.ranks
    else:
        n = len(records)

        def column(key: str) -> np.ndarray:
            return np.array([np.nan if r[key] is None else r[key] for r in records], dtype=float)

        rank = np.array([r["rank"] for r in records], dtype=np.int64)
    drop = column("drop")
    if not plots or not np.isfinite(drop).any():
        return
    g = column("gsnr")
    top = (rank <= max(1, n // 10)) & np.isfinite(column("score"))
    threshold = float(np.nanmin(np.where(top, g, np.nan))) if top.any() else None
    plot_gsnr_distribution(g, os.path.join(outdir, "gsnr_distribution.png"), threshold)
    plot_drop_vs_variance(
        drop, column("late_var"), os.path.join(outdir, "drop_vs_variance.png"), top
    )


def rows_fingerprint(rows: list[Any]) -> str:
    """A hash of every row's position, id and content (what ``select`` checks
    before writing a subset of the file that was scored)."""
    import hashlib

    from gradfilter.run.store import content_hash_update

    h = hashlib.sha256()
    for r in rows:
        content_hash_update(h, r)
    return h.hexdigest()[:16]


def read_run(outdir: str) -> dict[str, Any]:
    """The run summary (``run.json``) of a finished run in ``outdir``."""
    path = os.path.join(outdir, RUN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `gradfilter score DATA -o {outdir}` first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_scores(outdir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records and run summary of a finished run in ``outdir``."""
    path = os.path.join(outdir, SCORES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `gradfilter score DATA -o {outdir}` first")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(outdir, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    return records, run
