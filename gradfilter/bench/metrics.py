"""Separation metrics of selector scores against corruption labels.

The labels are those of :func:`gradfilter.bench.quality.corrupt` (clean or
corrupted rows); :mod:`gradfilter.bench.quality` re-exports these functions.

Scores and metrics
------------------
A selector assigns each row a *score*, higher = more worth keeping; NaN means
unscored and ranks below every number (``-inf`` included).  Clean rows are
the positive class.

* :func:`auroc` is the probability that a random clean row outscores a random
  corrupted row, ties counting 1/2, i.e. the Mann-Whitney
  ``U / (n_clean * n_corrupted)`` with midranks (NaN scores tie one another).
* :func:`corrupted_share_in_top` is, for each fraction ``f``, the share of
  corrupted rows among the ``floor(f * N)`` best-scored rows (ties broken by
  input position, NaN last); NaN when that set is empty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["auroc", "corrupted_share_in_top", "markdown_table", "summary"]


def _inputs(scores: ArrayLike, corrupted: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(corrupted)
    if s.ndim != 1 or c.ndim != 1:
        raise ValueError(f"scores and corrupted must be 1-D, got shapes {s.shape} and {c.shape}")
    if s.shape != c.shape:
        raise ValueError(f"scores has {s.shape[0]} entries but corrupted has {c.shape[0]}")
    if c.dtype != np.bool_:
        if c.size and not np.isin(c, (0, 1)).all():
            raise ValueError("corrupted must be boolean (or 0/1)")
        c = c.astype(bool)
    return s, c


def _midranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` in increasing order, NaN lowest, tied values sharing
    their mean rank."""
    nan = np.isnan(s)
    v = np.where(nan, 0.0, s)
    order = np.lexsort((v, ~nan))
    sv, sn = v[order], nan[order]
    n = s.size
    starts = np.flatnonzero(np.r_[True, (sv[1:] != sv[:-1]) | (sn[1:] != sn[:-1])])
    ends = np.r_[starts[1:], n]
    group_rank = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc(scores: ArrayLike, corrupted: ArrayLike) -> float:
    """AUROC of clean (positive) against corrupted (negative) rows by score.

    ``P(score(clean) > score(corrupted)) + P(tie) / 2`` over all clean/corrupted
    pairs, computed as the Mann-Whitney U of the clean rows with midranks,
    divided by ``n_clean * n_corrupted``.  NaN scores rank below every number
    and tie with one another.

    Raises:
        ValueError: mismatched or non-1-D inputs, or no clean or no corrupted row.
    """
    s, c = _inputs(scores, corrupted)
    n_neg = int(c.sum())
    n_pos = int(c.size - n_neg)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "auroc needs at least one clean and one corrupted row, "
            f"got {n_pos} clean and {n_neg} corrupted"
        )
    ranks = _midranks(s)
    u = ranks[~c].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _top_order(s: np.ndarray) -> np.ndarray:
    """Row indices by decreasing score, ties by input position, NaN last."""
    nan = np.isnan(s)
    neg = np.where(nan, 0.0, -s)
    return np.lexsort((np.arange(s.size), neg, nan))


def corrupted_share_in_top(
    scores: ArrayLike,
    corrupted: ArrayLike,
    fractions: Sequence[float] = (0.05, 0.10, 0.15),
) -> dict[float, float]:
    """Share of corrupted rows among the ``floor(f * N)`` best-scored rows, for each ``f``.

    Rows are ordered by decreasing score, ties by input position, NaN scores
    last; ``floor`` forgives float error below ``1e-9`` (``0.29 * 100`` gives 29).
    A fraction whose top set is empty maps to NaN.

    Raises:
        ValueError: mismatched or non-1-D inputs, or a fraction outside ``[0, 1]``.
    """
    s, c = _inputs(scores, corrupted)
    order = _top_order(s)
    n = s.size
    out: dict[float, float] = {}
    for f in fractions:
        f_val = float(f)
        if not 0.0 <= f_val <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {f}")
        k = min(n, math.floor(f_val * n + 1e-9))
        out[f] = float(c[order[:k]].mean()) if k > 0 else float("nan")
    return out


_SUMMARY_FRACTIONS: tuple[tuple[str, float], ...] = (
    ("top5", 0.05),
    ("top10", 0.10),
    ("top15", 0.15),
)


def summary(method_scores: Mapping[str, ArrayLike], corrupted: ArrayLike) -> list[dict[str, Any]]:
    """One dict per method: ``method``, ``auroc`` and ``top5``/``top10``/``top15``
    (corrupted shares of the top 5/10/15 %, as fractions), by decreasing AUROC
    (methods with equal AUROC keep their input order)."""
    rows: list[dict[str, Any]] = []
    for method, scores in method_scores.items():
        shares = corrupted_share_in_top(scores, corrupted, [f for _, f in _SUMMARY_FRACTIONS])
        row: dict[str, Any] = {"method": method, "auroc": auroc(scores, corrupted)}
        for key, f in _SUMMARY_FRACTIONS:
            row[key] = shares[f]
        rows.append(row)
    return sorted(rows, key=lambda r: -r["auroc"])


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100.0 * x:.1f}%"


def markdown_table(summary_rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`summary` rows: AUROC with 3 decimals, shares as
    percentages with 1 decimal (``n/a`` for NaN), rows in the given order."""
    lines = [
        "| method | AUROC | corrupted in top 5% | corrupted in top 10% | corrupted in top 15% |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in summary_rows:
        a = r["auroc"]
        a_txt = "n/a" if a is None or math.isnan(a) else f"{a:.3f}"
        name = str(r["method"]).replace("|", "\\|")
        lines.append(
            f"| {name} | {a_txt} | {_pct(r['top5'])} | {_pct(r['top10'])} | {_pct(r['top15'])} |"
        )
    return "\n".join(lines) + "\n"
