"""What a run writes and reads back: one record per input row (``scores.jsonl``),
the run summary (``run.json``), the norm trajectory (``norms.npz``) and plots.

Every file is written atomically (a temporary file, fsync, rename), so a kill
never leaves a half-written output.
"""

from __future__ import annotations

import io
import json
import os
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
    meta: list[dict[str, Any]],
    ok: list[int],
    config: ScoreConfig,
    sq: np.ndarray,
    norm_epochs: list[int],
) -> list[dict[str, Any]]:
    """The records of an ensemble method from the ``[ok rows, M, checkpoints]`` norms:
    the early and late points are the columns of epochs ``config.early`` / ``late``."""
    grand = config.method == "grand"
    for e in (config.early,) if grand else (config.early, config.late):
        if e not in norm_epochs:
            raise ValueError(f"epoch {e} has no recorded norms; recorded epochs: {norm_epochs}")
    early_sq = sq[:, :, norm_epochs.index(config.early)]
    late_sq = None if grand else sq[:, :, norm_epochs.index(config.late)]
    return build_records(meta, ok, config, early_sq=early_sq, late_sq=late_sq)


def build_records(
    meta: list[dict[str, Any]],
    ok: list[int],
    config: ScoreConfig,
    *,
    early_sq: np.ndarray | None = None,
    late_sq: np.ndarray | None = None,
    values: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """One record per input row; ``score`` is the method's score, ``rank`` its rank.

    ``early_sq`` / ``late_sq``: ``[ok rows, M]`` squared norms (ensemble methods);
    ``values``: per-ok-row arrays of a forward method, keyed by name."""
    from gradfilter.method.gsnr import ablation_scores, gsnr_components, rank_scores
    from gradfilter.method.registry import METHODS

    n = len(meta)
    values = dict(values or {})
    comp: dict[str, np.ndarray] = {}
    if early_sq is not None and late_sq is not None:
        lengths = [meta[i]["n_response_tokens"] or 0 for i in ok]
        comp = gsnr_components(early_sq, late_sq, config.gsnr_config(), lengths)
        values.update({f"ablation.{k}": v for k, v in ablation_scores(comp).items()})
    elif early_sq is not None:
        values["early_mean"] = np.mean(early_sq, axis=1)
    method = METHODS[config.method]
    method_score = {**values, **comp}[method.source]
    if method.discard_at is not None:
        method_score = np.where(method_score < method.discard_at, method_score, np.nan)
    full = np.full(n, np.nan)
    full[ok] = method_score
    ranks = rank_scores(full, higher_is_better=method.higher_is_better)
    records = []
    cols = _Columns(n, ok)
    score_col = cols.full(full)
    named = {k: cols.of(comp.get(k)) for k in ("gsnr", "drop", "late_var", "late_mean")}
    named["early_mean"] = cols.of(comp.get("early_mean", values.get("early_mean")))
    early_rows, late_rows = cols.rows(early_sq), cols.rows(late_sq)
    ablations = {
        k.split(".", 1)[1]: cols.of(v) for k, v in values.items() if k.startswith("ablation.")
    }
    others = {
        k: cols.of(v) for k, v in values.items() if not k.startswith("ablation.") and k not in named
    }
    discarded = None
    if method.discard_at is not None:
        discarded = cols.of(np.where(values[method.source] < method.discard_at, 0.0, 1.0))
    rank_list = ranks.tolist()
    for i, info in enumerate(meta):
        rec = {
            "index": info["index"],
            "id": info["id"],
            "status": info["status"],
            "method": method.name,
            "score": score_col[i],
            "gsnr": named["gsnr"][i],
            "drop": named["drop"][i],
            "late_var": named["late_var"][i],
            "early_mean": named["early_mean"][i],
            "late_mean": named["late_mean"][i],
            "early_sq": early_rows[i],
            "late_sq": late_rows[i],
            "n_tokens": info["n_tokens"],
            "n_response_tokens": info["n_response_tokens"],
            "truncated": info["truncated"],
            "rank": rank_list[i],
        }
        if cols.scored(i):
            if ablations:
                rec["ablation"] = {k: v[i] for k, v in ablations.items()}
        for name, col in others.items():
            rec[name] = col[i]
        if discarded is not None and cols.scored(i):
            rec["discarded"] = discarded[i] == 1.0
        records.append(rec)
    return records


class _Columns:
    """Per-row Python values of per-scored-row arrays: a float, or None for a row
    that was not scored or a value that is not finite (JSON has no NaN)."""

    def __init__(self, n: int, ok: list[int]) -> None:
        self.n = n
        self.ok = np.asarray(ok, dtype=np.int64)
        self._scored = np.zeros(n, dtype=bool)
        self._scored[self.ok] = True

    def scored(self, i: int) -> bool:
        return bool(self._scored[i])

    def full(self, arr: np.ndarray) -> list[float | None]:
        """A length-n array (already one entry per row)."""
        a = np.asarray(arr, dtype=np.float64)
        return [None if x != x else x for x in np.where(np.isfinite(a), a, np.nan).tolist()]

    def of(self, arr: np.ndarray | None) -> list[float | None]:
        """A per-scored-row array spread over the n rows."""
        if arr is None:
            return [None] * self.n
        out = np.full(self.n, np.nan)
        out[self.ok] = arr
        return self.full(out)

    def rows(self, arr: np.ndarray | None) -> list[list[float | None] | None]:
        """``[ok rows, M]`` -> per row a list of M values, None for unscored rows."""
        out: list[list[float | None] | None] = [None] * self.n
        if arr is None:
            return out
        a = np.asarray(arr, dtype=np.float64)
        a = np.where(np.isfinite(a), a, np.nan).tolist()
        for j, i in enumerate(self.ok.tolist()):
            out[i] = [None if x != x else x for x in a[j]]
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
        rows=np.asarray(json.dumps(meta, ensure_ascii=False)),
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


def write_outputs(outdir: str, records: list[dict], run: dict, plots: bool = True) -> None:
    """``scores.jsonl``, ``run.json`` and, for G-SNR runs, the two plots."""
    from gradfilter.run.plots import plot_drop_vs_variance, plot_gsnr_distribution

    os.makedirs(outdir, exist_ok=True)
    # json.dumps(r, ensure_ascii=False) for each record; one encoder for all of them.
    # U+0085, U+2028 and U+2029 are escaped too: JSON allows them raw inside strings,
    # but line splitters such as str.splitlines() would cut a record there.
    encode = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode
    lines = "".join([encode(r) + "\n" for r in records]).translate(_LINE_BREAKS)
    atomic_write(os.path.join(outdir, SCORES_FILE), lines.encode("utf-8"))
    atomic_write(os.path.join(outdir, RUN_FILE), json.dumps(run, indent=2).encode("utf-8"))
    if not plots or not any(r["drop"] is not None for r in records):
        return

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if r[key] is None else r[key] for r in records])

    g = column("gsnr")
    top = np.array(
        [r["rank"] <= max(1, len(records) // 10) and r["score"] is not None for r in records]
    )
    threshold = float(np.nanmin(np.where(top, g, np.nan))) if top.any() else None
    plot_gsnr_distribution(g, os.path.join(outdir, "gsnr_distribution.png"), threshold)
    plot_drop_vs_variance(
        column("drop"), column("late_var"), os.path.join(outdir, "drop_vs_variance.png"), top
    )


def rows_fingerprint(rows: list[Any]) -> str:
    """A hash of every row's position, id and content (what ``select`` checks
    before writing a subset of the file that was scored)."""
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        content = [r.index, r.id, r.kind, r.instruction, r.input, r.output, r.messages]
        h.update(json.dumps(content, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\x1e")
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
