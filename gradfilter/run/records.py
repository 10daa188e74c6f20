"""What a run writes and reads back: one record per input row (``scores.jsonl``),
the run summary (``run.json``), the norm trajectory (``norms.npz``) and plots.

Every file is written atomically (a temporary file, fsync, rename), so a kill
never leaves a half-written output.
"""

from __future__ import annotations

import io
import json
import math
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


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


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
        comp = gsnr_components(early_sq, late_sq, config.gsnr_config())
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
    pos = {row_i: j for j, row_i in enumerate(ok)}
    records = []
    for i, info in enumerate(meta):
        j = pos.get(i)

        def at(arr, j=j):
            return None if j is None or arr is None else _num(arr[j])

        rec = {
            "index": info["index"],
            "id": info["id"],
            "status": info["status"],
            "method": method.name,
            "score": _num(full[i]),
            "gsnr": at(comp.get("gsnr")),
            "drop": at(comp.get("drop")),
            "late_var": at(comp.get("late_var")),
            "early_mean": at(comp.get("early_mean", values.get("early_mean"))),
            "late_mean": at(comp.get("late_mean")),
            "early_sq": None if j is None or early_sq is None else [_num(v) for v in early_sq[j]],
            "late_sq": None if j is None or late_sq is None else [_num(v) for v in late_sq[j]],
            "n_tokens": info["n_tokens"],
            "n_response_tokens": info["n_response_tokens"],
            "truncated": info["truncated"],
            "rank": int(ranks[i]),
        }
        for name, arr in values.items():
            if name.startswith("ablation."):
                if j is not None:
                    rec.setdefault("ablation", {})[name.split(".", 1)[1]] = _num(arr[j])
            elif name not in rec:
                rec[name] = at(arr)
        if method.discard_at is not None and j is not None:
            rec["discarded"] = not (values[method.source][j] < method.discard_at)
        records.append(rec)
    return records


def write_norms(
    outdir: str,
    traj: dict[str, np.ndarray],
    ok: list[int],
    n_rows: int,
    epochs: list[int],
    steps: list[int],
) -> None:
    """``OUTDIR/norms.npz``: the trajectory over every input row (NaN / -1 where a
    row was not scored), with the epoch and end-of-epoch optimizer step of each
    checkpoint.  float64, so that a rescore reproduces the scores exactly."""
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
    )
    atomic_write(os.path.join(outdir, NORMS_FILE), buf.getvalue())


def read_norms(outdir: str) -> dict[str, np.ndarray]:
    """The arrays of ``OUTDIR/norms.npz``: ``sq``, ``sq_a``, ``sq_b``
    ``[rows, members, checkpoints]`` float64, ``visit_step`` (int64), ``epoch`` and
    ``step`` ``[checkpoints]``, ``scored`` (the scored row positions)."""
    path = os.path.join(outdir, NORMS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: only an ensemble run (gsnr, drop, late_var, grand) records norms"
        )
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_outputs(outdir: str, records: list[dict], run: dict) -> None:
    """``scores.jsonl``, ``run.json`` and, for G-SNR runs, the two plots."""
    from gradfilter.run.plots import plot_drop_vs_variance, plot_gsnr_distribution

    os.makedirs(outdir, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(os.path.join(outdir, SCORES_FILE), lines.encode("utf-8"))
    atomic_write(os.path.join(outdir, RUN_FILE), json.dumps(run, indent=2).encode("utf-8"))
    if not any(r["drop"] is not None for r in records):
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
