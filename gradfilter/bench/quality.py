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
The separation metrics of selector scores against these labels (AUROC, the
corrupted share of the top-scored rows, and their summary table) are defined
and implemented in :mod:`gradfilter.bench.metrics`; they are re-exported here.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradfilter.bench.metrics import auroc, corrupted_share_in_top, markdown_table, summary

__all__ = [
    "ALL_KINDS",
    "Label",
    "auroc",
    "content_words",
    "corrupt",
    "corrupted_mask",
    "corrupted_share_in_top",
    "markdown_table",
    "summary",
]

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


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple (a single kind may be a string), validated."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise ValueError("kinds is empty")
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kind(s) {unknown}; known: {list(ALL_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds contains repeats: {list(kinds)}")
    return kinds


class _Pool:
    """The pool being corrupted, with the random generator and the lookups the kinds use."""

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        rng: random.Random,
        foreign_rows: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        self.rows = rows
        self.rng = rng
        self.foreign_rows = foreign_rows
        self.outputs = [row["output"] for row in rows]
        self.stripped = [o.strip() for o in self.outputs]
        self.all_idx = list(range(len(rows)))
        self.f_idx = list(range(len(foreign_rows))) if foreign_rows is not None else []
        self._instr_words: list[frozenset[str]] | None = None

    @property
    def instr_words(self) -> list[frozenset[str]]:
        """Content words of every row's instruction (computed on first use)."""
        if self._instr_words is None:
            self._instr_words = [content_words(_text(row, "instruction")) for row in self.rows]
        return self._instr_words


def _swap_source(pool: _Pool, i: int) -> tuple[str, int] | None:
    """Response and source of a ``"swap"`` of row ``i``: another row's different response."""
    stripped = pool.stripped
    j = _pick(
        pool.rng,
        pool.all_idx,
        lambda j: j != i and stripped[j] != "" and stripped[j] != stripped[i],
    )
    return None if j is None else (pool.outputs[j], j)


def _foreign_source(pool: _Pool, i: int) -> tuple[str, int] | None:
    """Response and source of a ``"foreign"`` corruption of row ``i``."""
    stripped = pool.stripped
    foreign_rows = pool.foreign_rows
    if foreign_rows is not None:
        j = _pick(
            pool.rng,
            pool.f_idx,
            lambda j: foreign_rows[j]["output"].strip() not in ("", stripped[i]),
        )
        return None if j is None else (foreign_rows[j]["output"], j)
    instr_words = pool.instr_words
    mine = instr_words[i]
    j = _pick(
        pool.rng,
        pool.all_idx,
        lambda j: j != i and stripped[j] not in ("", stripped[i]) and not (mine & instr_words[j]),
    )
    return None if j is None else (pool.outputs[j], j)


def _new_response(pool: _Pool, kind: str, i: int) -> tuple[str, int] | None:
    """New response and source for victim ``i``, or None if ``i`` does not fit ``kind``."""
    if kind == "truncate":
        text = _truncate(pool.outputs[i], pool.rng)
        return None if text is None else (text, i)
    if kind == "shuffle":
        text = _shuffle(pool.outputs[i], pool.rng)
        return None if text is None else (text, i)
    if kind == "swap":
        return _swap_source(pool, i)
    return _foreign_source(pool, i)


def _corrupt_responses(
    pool: _Pool,
    counts: Mapping[str, int],
    new_rows: list[dict[str, Any]],
    labels: list[Label],
    used: set[int],
) -> None:
    """Apply the kinds that replace a response, in :data:`_PROCESS_ORDER`, in place."""
    n = len(pool.rows)
    for kind in _PROCESS_ORDER:
        need = counts.get(kind, 0)
        if need == 0 or kind in ("duplicate", "near_duplicate"):
            continue
        got = 0
        for i in pool.rng.sample(pool.all_idx, n):
            if got == need:
                break
            if i in used:
                continue
            made = _new_response(pool, kind, i)
            if made is None:
                continue
            text, source = made
            new_rows[i]["output"] = text
            labels[i] = {"corrupted": True, "kind": kind, "source": source}
            used.add(i)
            got += 1
        if got < need:
            raise ValueError(f"only {got} rows fit corruption kind {kind!r}, {need} needed")


def _corrupt_duplicates(
    pool: _Pool,
    counts: Mapping[str, int],
    new_rows: list[dict[str, Any]],
    labels: list[Label],
    used: set[int],
) -> None:
    """Apply ``"duplicate"`` and ``"near_duplicate"`` to rows still unused, in place."""
    dup_need = {k: counts.get(k, 0) for k in ("duplicate", "near_duplicate")}
    if not sum(dup_need.values()):
        return
    rng, rows, all_idx = pool.rng, pool.rows, pool.all_idx
    free = [i for i in rng.sample(all_idx, len(rows)) if i not in used]
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
    kinds = _check_kinds(kinds)
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    _check_rows(rows, "rows")
    if foreign_rows is not None:
        _check_rows(foreign_rows, "foreign_rows")

    n = len(rows)
    counts = _kind_counts(round(fraction * n), kinds)
    pool = _Pool(rows, random.Random(seed), foreign_rows)
    new_rows = [copy.deepcopy(dict(row)) for row in rows]
    labels: list[Label] = [{"corrupted": False, "kind": None, "source": None} for _ in range(n)]
    used: set[int] = set()
    _corrupt_responses(pool, counts, new_rows, labels, used)
    _corrupt_duplicates(pool, counts, new_rows, labels, used)
    return new_rows, labels
