"""Offline selection-quality benchmark: controlled corruption and separation metrics.

Definitions
-----------
A *pool* is a list of Alpaca-style rows ``{"instruction": str, "input": str,
"output": str, ...}``; the *response* of a row is its ``"output"`` and its
*words* are the whitespace-separated tokens of the response (``str.split``).

:func:`corrupt` replaces the content of exactly ``round(fraction * N)`` rows of
a pool of ``N`` rows (Python's ``round``, halves to even) by a known defect and
returns the new pool with one label per row::

    {"corrupted": bool, "kind": str | None, "source": int | None}

The kinds of defect (:data:`ALL_KINDS`):

``"swap"``
    the response is replaced by the response of another pool row whose
    response differs; ``source`` is that row's index.
``"truncate"``
    the response is cut after its first ``k`` words, keeping the original text
    up to the end of word ``k``, with ``k`` drawn uniformly from
    ``[max(1, ceil(N_w / 10)), max(that, floor(3 N_w / 10))]`` for a response
    of ``N_w >= 4`` words, so ``1 <= k < N_w``; ``source`` is the row itself.
``"shuffle"``
    the words of the response are permuted into a different order and joined
    by single spaces; only responses of at least 4 words with at least two
    distinct words are chosen; ``source`` is the row itself.
``"foreign"``
    the response is replaced by one from another language or task: a response
    of ``foreign_rows`` when given (``source`` indexes ``foreign_rows``), else
    the response of a pool row whose instruction shares no content word with
    this row's instruction (``source`` indexes the pool).  *Content words* of
    a text are its lower-cased alphanumeric tokens of at least 3 characters
    that are not English function words.
``"duplicate"``
    the whole row (every key) is replaced by a copy of another, uncorrupted
    pool row whose ``(instruction, input, output)`` differs from it;
    ``source`` is that row's index, so ``new_rows[i] == rows[source]`` and the
    returned pool holds the same row twice.
``"near_duplicate"``
    as ``"duplicate"``, then one small edit of the copied response: one word
    dropped (responses of at least 3 words), two adjacent different words
    swapped, or the final punctuation mark removed (or a full stop added when
    there is none).  The response differs from the source's, yet every word of
    either response but at most one also appears in the other.

Duplicates replace their victim row, so ``len(new_rows) == len(rows)``.
Uncorrupted rows are deep copies of the input rows with label
``{"corrupted": False, "kind": None, "source": None}``.

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

import copy
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

ALL_KINDS: tuple[str, ...] = (
    "swap",
    "truncate",
    "shuffle",
    "foreign",
    "duplicate",
    "near_duplicate",
)

# Kinds whose victims are restricted come first, so that less demanding kinds
# do not use up the rows they need; the duplicate kinds come last because
# their sources must be rows that stay uncorrupted.
_PROCESS_ORDER: tuple[str, ...] = (
    "truncate",
    "shuffle",
    "swap",
    "foreign",
    "duplicate",
    "near_duplicate",
)

_MIN_WORDS = 4
_RANDOM_PROBES = 64

_WORD = re.compile(r"\S+")
_TOKEN = re.compile(r"[a-z0-9]+")
_END_PUNCT = ".!?;:,"

_FUNCTION_WORDS_TEXT = """
    a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either else ever every
    few for from further had has have having he her here hers herself him himself his how however
    i if in into is it its itself just let may me might more most much must my myself neither no
    nor not now of off on once one only or other ought our ours ourselves out over own per please
    same shall she should so some such than that the their theirs them themselves then there these
    they this those through thus to too under until up upon us very was we were what when where
    whether which while who whom whose why will with within without would yet you your yours
    yourself yourselves
"""
_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS_TEXT.split())

Label = dict[str, Any]


def content_words(text: str) -> frozenset[str]:
    """Content words of ``text``: lower-cased ``[a-z0-9]+`` tokens of at least
    3 characters that are not English function words."""
    return frozenset(
        t for t in _TOKEN.findall(text.lower()) if len(t) >= 3 and t not in _FUNCTION_WORDS
    )


def corrupted_mask(labels: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Boolean array, True where ``labels[i]["corrupted"]`` (labels of :func:`corrupt`)."""
    return np.array([bool(lab["corrupted"]) for lab in labels], dtype=bool)


# --------------------------------------------------------------------------- corruption


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key, "")
    return value if isinstance(value, str) else ""


def _triple(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return (_text(row, "instruction"), _text(row, "input"), _text(row, "output"))


def _pick(rng: random.Random, candidates: Sequence[int], ok: Callable[[int], bool]) -> int | None:
    """A random element of ``candidates`` satisfying ``ok``, or None if there is none."""
    if not candidates:
        return None
    for _ in range(_RANDOM_PROBES):
        j = candidates[rng.randrange(len(candidates))]
        if ok(j):
            return j
    for j in rng.sample(list(candidates), len(candidates)):
        if ok(j):
            return j
    return None


def _truncate(text: str, rng: random.Random) -> str | None:
    words = list(_WORD.finditer(text))
    n = len(words)
    if n < _MIN_WORDS:
        return None
    lo = max(1, -(-n // 10))
    hi = max(lo, (3 * n) // 10)
    k = rng.randint(lo, hi)
    return text[: words[k - 1].end()]


def _shuffle(text: str, rng: random.Random) -> str | None:
    words = text.split()
    if len(words) < _MIN_WORDS or len(set(words)) < 2:
        return None
    perm = list(words)
    for _ in range(100):
        rng.shuffle(perm)
        if perm != words:
            return " ".join(perm)
    # A rotation by one changes any sequence holding two distinct words.
    return " ".join(words[1:] + words[:1])


def _near_edit(text: str, rng: random.Random) -> str:
    """One small edit of ``text`` (see the module docstring); always differs from it."""
    words = list(_WORD.finditer(text))
    n = len(words)
    swappable = [k for k in range(n - 1) if words[k].group() != words[k + 1].group()]
    ops = ["punct"]
    if n >= 3:
        ops.append("drop")
    if swappable:
        ops.append("swap")
    op = ops[rng.randrange(len(ops))]
    if op == "drop":
        k = rng.randrange(n)
        if k == n - 1:
            start, end = words[k - 1].end(), words[k].end()
        else:
            start, end = words[k].start(), words[k + 1].start()
        edited = text[:start] + text[end:]
    elif op == "swap":
        k = swappable[rng.randrange(len(swappable))]
        a, b = words[k], words[k + 1]
        edited = (
            text[: a.start()] + b.group() + text[a.end() : b.start()] + a.group() + text[b.end() :]
        )
    else:
        body = text.rstrip()
        tail = text[len(body) :]
        edited = (body[:-1] if body and body[-1] in _END_PUNCT else body + ".") + tail
    return edited if edited != text else text + "."


def _check_rows(rows: Sequence[Mapping[str, Any]], name: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{name}[{i}] is {type(row).__name__}, expected a mapping")
        if not isinstance(row.get("output"), str):
            raise TypeError(f"{name}[{i}] has no string 'output' field")


def _kind_counts(n_corrupt: int, kinds: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(n_corrupt, len(kinds))
    return {kind: base + (1 if r < extra else 0) for r, kind in enumerate(kinds)}


def corrupt(
    rows: Sequence[Mapping[str, Any]],
    fraction: float,
    seed: int,
    kinds: Iterable[str] = ALL_KINDS,
    foreign_rows: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[Label]]:
    """Corrupt ``round(fraction * len(rows))`` rows of a pool, seeded.

    The corrupted rows are split evenly over ``kinds`` (the first
    ``n_corrupt % len(kinds)`` kinds, in the order given, get one row more);
    each row is corrupted at most once.  The kinds and labels are defined in
    the module docstring.

    Args:
        rows: the pool; every row needs a string ``"output"``.  Not modified.
        fraction: share of rows to corrupt, in ``[0, 1]``.
        seed: seed of the random choices; the same arguments give the same result.
        kinds: kinds of defect to use, a non-empty subset of :data:`ALL_KINDS`
            (a single kind may be given as a string).
        foreign_rows: rows whose responses the ``"foreign"`` kind uses (for
            example rows of another data set); None takes them from pool rows
            of an unrelated task.

    Returns:
        ``(new_rows, labels)``: deep copies of the rows with the corrupted ones
        replaced, and one label dict per row.

    Raises:
        ValueError: bad ``fraction`` or ``kinds``, or too few rows fit a kind.
        TypeError: a row is not a mapping with a string ``"output"``.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise ValueError("kinds is empty")
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kind(s) {unknown}; known: {list(ALL_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds contains repeats: {list(kinds)}")
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    _check_rows(rows, "rows")
    if foreign_rows is not None:
        _check_rows(foreign_rows, "foreign_rows")

    n = len(rows)
    n_corrupt = round(fraction * n)
    counts = _kind_counts(n_corrupt, kinds)
    rng = random.Random(seed)

    new_rows = [copy.deepcopy(dict(row)) for row in rows]
    labels: list[Label] = [{"corrupted": False, "kind": None, "source": None} for _ in range(n)]
    used: set[int] = set()
    outputs = [row["output"] for row in rows]
    stripped = [o.strip() for o in outputs]
    all_idx = list(range(n))
    instr_words: list[frozenset[str]] | None = None
    f_idx = list(range(len(foreign_rows))) if foreign_rows is not None else []

    def make(kind: str, i: int) -> tuple[str, int] | None:
        """New response and source for victim ``i``, or None if ``i`` does not fit ``kind``."""
        nonlocal instr_words
        if kind == "truncate":
            text = _truncate(outputs[i], rng)
            return None if text is None else (text, i)
        if kind == "shuffle":
            text = _shuffle(outputs[i], rng)
            return None if text is None else (text, i)
        if kind == "swap":
            j = _pick(
                rng, all_idx, lambda j: j != i and stripped[j] != "" and stripped[j] != stripped[i]
            )
            return None if j is None else (outputs[j], j)
        # foreign
        if foreign_rows is not None:
            j = _pick(
                rng,
                f_idx,
                lambda j: foreign_rows[j]["output"].strip() not in ("", stripped[i]),
            )
            return None if j is None else (foreign_rows[j]["output"], j)
        if instr_words is None:
            instr_words = [content_words(_text(row, "instruction")) for row in rows]
        mine = instr_words[i]
        j = _pick(
            rng,
            all_idx,
            lambda j: (
                j != i and stripped[j] not in ("", stripped[i]) and not (mine & instr_words[j])
            ),
        )
        return None if j is None else (outputs[j], j)

    for kind in _PROCESS_ORDER:
        need = counts.get(kind, 0)
        if need == 0 or kind in ("duplicate", "near_duplicate"):
            continue
        got = 0
        for i in rng.sample(all_idx, n):
            if got == need:
                break
            if i in used:
                continue
            made = make(kind, i)
            if made is None:
                continue
            text, source = made
            new_rows[i]["output"] = text
            labels[i] = {"corrupted": True, "kind": kind, "source": source}
            used.add(i)
            got += 1
        if got < need:
            raise ValueError(f"only {got} rows fit corruption kind {kind!r}, {need} needed")

    dup_need = {k: counts.get(k, 0) for k in ("duplicate", "near_duplicate")}
    if sum(dup_need.values()):
        free = [i for i in rng.sample(all_idx, n) if i not in used]
        victims: dict[str, list[int]] = {}
        for kind in ("duplicate", "near_duplicate"):
            victims[kind], free = free[: dup_need[kind]], free[dup_need[kind] :]
            used.update(victims[kind])
        clean = [i for i in all_idx if i not in used]
        triples = [_triple(row) for row in rows]
        for kind in ("duplicate", "near_duplicate"):
            for i in victims[kind]:
                j = _pick(rng, clean, lambda j, i=i: triples[j] != triples[i])
                if j is None:
                    raise ValueError(
                        f"corruption kind {kind!r}: no uncorrupted row differs from row {i} "
                        "to copy from (lower fraction or use fewer duplicate kinds)"
                    )
                dup = copy.deepcopy(dict(rows[j]))
                if kind == "near_duplicate":
                    dup["output"] = _near_edit(dup["output"], rng)
                new_rows[i] = dup
                labels[i] = {"corrupted": True, "kind": kind, "source": j}

    return new_rows, labels


# --------------------------------------------------------------------------- metrics


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
