"""Tests of gradfilter.bench.quality: seeded corruption of instruction rows and
separation metrics."""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradfilter.bench.quality import (
    ALL_KINDS,
    auroc,
    content_words,
    corrupt,
    corrupted_mask,
    corrupted_share_in_top,
    markdown_table,
    summary,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_VOCAB_TEXT = (
    "river stone light garden window paper orange silver market engine quiet rapid "
    "forest cloud signal number bridge yellow summer winter planet ocean button simple "
    "careful bright letter travel morning evening castle violin pencil ladder marble"
)
_VOCAB = _VOCAB_TEXT.split()


def make_pool(n: int = 80, seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic pool: unique instructions without shared content words, varied responses.

    Every 8th row has a response of fewer than 4 words.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 8 == 7:
            out = " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(1, 3))) + "."
        else:
            words = [rng.choice(_VOCAB) for _ in range(rng.randint(6, 24))]
            words.append(f"tag{i}")
            rng.shuffle(words)
            out = " ".join(words).capitalize() + "."
        rows.append(
            {
                "instruction": f"What is alpha{i} and beta{i}?",
                "input": "" if i % 3 else f"context{i}",
                "output": out,
                "id": i,
            }
        )
    return rows


def foreign_pool(n: int = 20) -> list[dict[str, Any]]:
    return [
        {
            "instruction": f"Pregunta {i}",
            "input": "",
            "output": f"Respuesta numero {i} en otro idioma distinto.",
        }
        for i in range(n)
    ]


def victims(labels: list[dict[str, Any]], kind: str) -> list[int]:
    return [i for i, lab in enumerate(labels) if lab["kind"] == kind]


# --------------------------------------------------------------------------- corrupt: general


def test_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    pool = make_pool()
    a = corrupt(pool, 0.3, seed=7)
    b = corrupt(pool, 0.3, seed=7)
    c = corrupt(pool, 0.3, seed=8)
    assert a == b
    assert a[1] != c[1] or a[0] != c[0]
    assert [lab["corrupted"] for lab in a[1]] != [lab["corrupted"] for lab in c[1]]


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.25, 0.5, 0.6])
def test_exact_corrupted_count_spread_evenly(fraction: float) -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, fraction, seed=1)
    assert len(new_rows) == len(labels) == len(pool)
    expected = round(fraction * len(pool))
    assert sum(lab["corrupted"] for lab in labels) == expected
    per_kind = Counter(lab["kind"] for lab in labels if lab["corrupted"])
    counts = [per_kind.get(k, 0) for k in ALL_KINDS]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == expected
    # the first kinds in the given order receive the remainder
    assert counts == sorted(counts, reverse=True)


def test_labels_are_consistent_and_clean_rows_are_unchanged_copies() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.5, seed=3)
    for i, (row, lab) in enumerate(zip(new_rows, labels, strict=False)):
        assert set(lab) == {"corrupted", "kind", "source"}
        if lab["corrupted"]:
            assert lab["kind"] in ALL_KINDS
            assert isinstance(lab["source"], int)
            assert row != pool[i]
        else:
            assert lab["kind"] is None and lab["source"] is None
            assert row == pool[i]
            assert row is not pool[i]
    assert corrupted_mask(labels).tolist() == [lab["corrupted"] for lab in labels]


def test_input_list_is_not_mutated() -> None:
    pool = make_pool()
    snapshot = copy.deepcopy(pool)
    new_rows, _ = corrupt(pool, 0.6, seed=0)
    assert pool == snapshot
    for row in new_rows:
        row["output"] = "changed"
        row["extra"] = 1
    assert pool == snapshot


def test_kind_subset_uses_only_those_kinds() -> None:
    pool = make_pool()
    _, labels = corrupt(pool, 0.25, seed=2, kinds=("swap", "duplicate"))
    assert {lab["kind"] for lab in labels if lab["corrupted"]} == {"swap", "duplicate"}
    assert Counter(lab["kind"] for lab in labels if lab["corrupted"]) == {
        "swap": 10,
        "duplicate": 10,
    }


def test_empty_pool() -> None:
    assert corrupt([], 0.5, seed=0) == ([], [])


# --------------------------------------------------------------------------- corrupt: each kind


def test_swap_takes_another_rows_response() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.3, seed=4, kinds=("swap",))
    idx = victims(labels, "swap")
    assert len(idx) == 24
    for i in idx:
        j = labels[i]["source"]
        assert j != i
        assert new_rows[i]["output"] == pool[j]["output"] != pool[i]["output"]
        assert {k: v for k, v in new_rows[i].items() if k != "output"} == {
            k: v for k, v in pool[i].items() if k != "output"
        }


def test_truncate_keeps_a_short_strict_word_prefix() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.5, seed=5, kinds=("truncate",))
    idx = victims(labels, "truncate")
    assert len(idx) == 40
    for i in idx:
        old = pool[i]["output"].split()
        new = new_rows[i]["output"].split()
        assert len(old) >= 4
        assert 1 <= len(new) < len(old)
        assert new == old[: len(new)]
        assert pool[i]["output"].startswith(new_rows[i]["output"])
        assert len(new) <= max(1, math.ceil(0.1 * len(old)), math.floor(0.3 * len(old)))
        assert len(new) >= max(1, math.ceil(0.1 * len(old) - 1e-9))
        assert labels[i]["source"] == i


def test_shuffle_permutes_words() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.5, seed=6, kinds=("shuffle",))
    idx = victims(labels, "shuffle")
    assert len(idx) == 40
    for i in idx:
        old = pool[i]["output"].split()
        new = new_rows[i]["output"].split()
        assert len(old) >= 4
        assert Counter(new) == Counter(old)
        assert new != old
        assert new_rows[i]["instruction"] == pool[i]["instruction"]


def test_short_responses_are_never_truncated_or_shuffled() -> None:
    pool = make_pool()
    long_rows = sum(len(r["output"].split()) >= 4 for r in pool)
    _, labels = corrupt(pool, long_rows / len(pool), seed=0, kinds=("truncate", "shuffle"))
    assert all(
        lab["corrupted"] == (len(r["output"].split()) >= 4)
        for r, lab in zip(pool, labels, strict=False)
    )


def test_foreign_from_foreign_rows() -> None:
    pool, foreign = make_pool(), foreign_pool()
    new_rows, labels = corrupt(pool, 0.25, seed=9, kinds=("foreign",), foreign_rows=foreign)
    idx = victims(labels, "foreign")
    assert len(idx) == 20
    for i in idx:
        assert new_rows[i]["output"] == foreign[labels[i]["source"]]["output"]
        assert new_rows[i]["instruction"] == pool[i]["instruction"]


def test_foreign_from_pool_picks_an_unrelated_instruction() -> None:
    pool = make_pool()
    # Rows 0..9 share the content word "poem"; the others do not.
    for i in range(10):
        pool[i]["instruction"] = f"Write a poem number{i}"
    new_rows, labels = corrupt(pool, 0.5, seed=10, kinds=("foreign",))
    for i in victims(labels, "foreign"):
        j = labels[i]["source"]
        assert j != i
        assert new_rows[i]["output"] == pool[j]["output"] != pool[i]["output"]
        assert not content_words(pool[i]["instruction"]) & content_words(pool[j]["instruction"])
        if i < 10:
            assert j >= 10


def test_content_words() -> None:
    assert content_words("Write a poem about the Sea, and 2 cats!") == {
        "write",
        "poem",
        "sea",
        "cats",
    }
    assert content_words("What is it?") == frozenset()


def test_duplicate_copies_a_clean_source_exactly() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.3, seed=11, kinds=("duplicate",))
    idx = victims(labels, "duplicate")
    assert len(idx) == 24
    for i in idx:
        j = labels[i]["source"]
        assert j != i
        assert new_rows[i] == pool[j]
        assert new_rows[i] != pool[i]
        assert not labels[j]["corrupted"]
        assert new_rows[j] == new_rows[i]  # the returned pool holds the row twice


def test_near_duplicate_is_a_small_edit_of_its_source() -> None:
    pool = make_pool()
    new_rows, labels = corrupt(pool, 0.4, seed=12, kinds=("near_duplicate",))
    idx = victims(labels, "near_duplicate")
    assert len(idx) == 32
    for i in idx:
        j = labels[i]["source"]
        assert j != i and not labels[j]["corrupted"]
        src, dup = pool[j], new_rows[i]
        assert {k: v for k, v in dup.items() if k != "output"} == {
            k: v for k, v in src.items() if k != "output"
        }
        assert dup["output"] != src["output"]
        a, b = src["output"].split(), dup["output"].split()
        assert abs(len(a) - len(b)) <= 1
        assert len(Counter(a) - Counter(b)) <= 1 and len(Counter(b) - Counter(a)) <= 1
        if len(a) >= 8:
            assert difflib.SequenceMatcher(a=a, b=b).ratio() >= 0.85


def test_all_kinds_together_each_row_once() -> None:
    pool, foreign = make_pool(120), foreign_pool()
    _, labels = corrupt(pool, 0.5, seed=13, foreign_rows=foreign)
    assert Counter(lab["kind"] for lab in labels if lab["corrupted"]) == {k: 10 for k in ALL_KINDS}
    for kind in ("duplicate", "near_duplicate"):
        for i in victims(labels, kind):
            assert not labels[labels[i]["source"]]["corrupted"]


# --------------------------------------------------------------------------- corrupt: errors


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        corrupt(make_pool(), fraction, seed=0)


@pytest.mark.parametrize("kinds", [(), ("swap", "bogus"), ("swap", "swap")])
def test_bad_kinds(kinds: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="kind"):
        corrupt(make_pool(), 0.1, seed=0, kinds=kinds)


def test_too_few_eligible_rows() -> None:
    short = [{"instruction": f"q{i}", "input": "", "output": "Yes."} for i in range(10)]
    with pytest.raises(ValueError, match="truncate"):
        corrupt(short, 0.2, seed=0, kinds=("truncate",))
    with pytest.raises(ValueError, match="swap"):
        corrupt(short, 0.2, seed=0, kinds=("swap",))


def test_duplicates_need_clean_sources() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        corrupt(make_pool(10), 1.0, seed=0, kinds=("duplicate",))


def test_rows_must_have_string_output() -> None:
    with pytest.raises(TypeError, match="output"):
        corrupt([{"instruction": "x", "output": None}], 0.0, seed=0)
    with pytest.raises(TypeError, match="mapping"):
        corrupt(["not a row"], 0.0, seed=0)  # type: ignore[list-item]


# --------------------------------------------------------------------------- metrics


def _pairwise_auroc(scores: list[float], corrupted: list[bool]) -> float:
    def key(x: float) -> float:
        return -math.inf if math.isnan(x) else x

    def beats(x: float, y: float) -> float:
        if math.isnan(x) and math.isnan(y):
            return 0.5
        if math.isnan(x):
            return 0.0
        if math.isnan(y):
            return 1.0
        return 1.0 if key(x) > key(y) else 0.5 if x == y else 0.0

    pos = [s for s, c in zip(scores, corrupted, strict=False) if not c]
    neg = [s for s, c in zip(scores, corrupted, strict=False) if c]
    return sum(beats(p, q) for p, q in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auroc_extremes_and_ties() -> None:
    corrupted = [False, False, True, True, True]
    assert auroc([5, 4, 3, 2, 1], corrupted) == 1.0
    assert auroc([1, 2, 3, 4, 5], corrupted) == 0.0
    assert auroc([2, 2, 2, 2, 2], corrupted) == 0.5
    assert auroc(np.array([1.0, 0.0]), np.array([0, 1])) == 1.0


def test_auroc_worked_example_with_midranks() -> None:
    # ranks: 1 -> 1, the three 2s -> 3 each, 3 -> 5; clean rows hold ranks 5 and 3,
    # U = 8 - 2*3/2 = 5 of 2*3 = 6 pairs.
    scores = [3, 2, 2, 1, 2]
    corrupted = [False, True, False, True, True]
    assert auroc(scores, corrupted) == pytest.approx(5 / 6, abs=1e-15)


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        scores = rng.integers(0, 4, size=n).astype(float)
        scores[rng.random(n) < 0.2] = np.nan
        scores[rng.random(n) < 0.1] = -np.inf
        corrupted = rng.random(n) < 0.4
        corrupted[0], corrupted[1] = True, False
        expected = _pairwise_auroc(scores.tolist(), corrupted.tolist())
        assert auroc(scores, corrupted) == pytest.approx(expected, abs=1e-12)


def test_auroc_nan_is_lowest() -> None:
    assert auroc([np.nan, 1.0, 0.0], [True, False, False]) == 1.0
    assert auroc([np.nan, 1.0], [False, True]) == 0.0
    assert auroc([np.nan, np.nan], [False, True]) == 0.5
    assert auroc([-np.inf, np.nan], [False, True]) == 1.0


def test_auroc_errors() -> None:
    with pytest.raises(ValueError, match="clean"):
        auroc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="corrupted"):
        auroc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="entries"):
        auroc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="1-D"):
        auroc([[1.0, 2.0]], [[True, False]])
    with pytest.raises(ValueError, match="boolean"):
        auroc([1.0, 2.0], [0, 2])


def test_corrupted_share_in_top_with_ties_and_nan() -> None:
    scores = [5, 5, 5, 1, np.nan, 4, 4, 0, 0, 0]
    corrupted = [False, True, True, False, True, True, False, True, True, True]
    # order: 0 1 2 (tied 5s by position), 5 6 (4s), 3, 7 8 9, then 4 (NaN)
    shares = corrupted_share_in_top(
        scores, corrupted, fractions=(0.1, 0.2, 0.3, 0.5, 0.6, 0.05, 0.9, 1.0)
    )
    assert shares[0.1] == 0.0
    assert shares[0.2] == 0.5
    assert shares[0.3] == pytest.approx(2 / 3)
    assert shares[0.5] == pytest.approx(3 / 5)
    assert shares[0.6] == pytest.approx(3 / 6)
    assert math.isnan(shares[0.05])
    assert shares[0.9] == pytest.approx(6 / 9)  # the NaN-scored corrupted row is left out
    assert shares[1.0] == pytest.approx(7 / 10)


def test_corrupted_share_defaults_and_float_floor() -> None:
    n = 100
    scores = -np.arange(n, dtype=float)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[:7] = True
    shares = corrupted_share_in_top(scores, corrupted)
    assert list(shares) == [0.05, 0.10, 0.15]
    assert shares[0.05] == 1.0
    assert shares[0.10] == pytest.approx(7 / 10)
    assert shares[0.15] == pytest.approx(7 / 15)
    # 0.29 * 100 is 28.999999999999996 in floating point; still 29 rows
    corrupted[:] = False
    corrupted[28] = True
    assert corrupted_share_in_top(scores, corrupted, (0.29,))[0.29] == pytest.approx(1 / 29)
    with pytest.raises(ValueError, match="fractions"):
        corrupted_share_in_top(scores, corrupted, (1.5,))


def test_summary_and_markdown_table() -> None:
    corrupted = np.array([False] * 15 + [True] * 5)
    oracle = np.where(corrupted, 0.0, 1.0)
    reverse = -oracle
    worked = np.r_[np.arange(15, 0, -1, dtype=float), np.full(5, np.nan)]
    worked[0] = np.nan  # one clean row unscored: ties with the five corrupted rows
    rows = summary({"reverse": reverse, "oracle": oracle, "worked": worked}, corrupted)
    assert [r["method"] for r in rows] == ["oracle", "worked", "reverse"]
    assert set(rows[0]) == {"method", "auroc", "top5", "top10", "top15"}
    assert rows[0]["auroc"] == 1.0 and rows[2]["auroc"] == 0.0
    assert rows[1]["auroc"] == pytest.approx((14 * 5 + 0.5 * 5) / 75)
    assert rows[0]["top5"] == 0.0 and rows[2]["top15"] == 1.0

    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("| method | AUROC |")
    assert lines[2] == "| oracle | 1.000 | 0.0% | 0.0% | 0.0% |"
    assert lines[3] == "| worked | 0.967 | 0.0% | 0.0% | 0.0% |"
    assert lines[4] == "| reverse | 0.000 | 100.0% | 100.0% | 100.0% |"
    nan_row = [
        {"method": "a|b", "auroc": 0.12345, "top5": float("nan"), "top10": 1 / 3, "top15": 0.0}
    ]
    assert markdown_table(nan_row).splitlines()[2] == "| a\\|b | 0.123 | n/a | 33.3% | 0.0% |"


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} absent")
def test_smoke_real_alpaca_with_dolly_foreign_rows() -> None:
    alpaca = json.loads((SHARED_DATA / "alpaca_9k.json").read_text(encoding="utf-8"))[:300]
    dolly = json.loads((SHARED_DATA / "dolly_3k.json").read_text(encoding="utf-8"))
    snapshot = copy.deepcopy(alpaca)
    new_rows, labels = corrupt(alpaca, 0.2, seed=0, foreign_rows=dolly)
    assert alpaca == snapshot
    assert len(new_rows) == 300
    assert Counter(lab["kind"] for lab in labels if lab["corrupted"]) == {k: 10 for k in ALL_KINDS}
    for i, lab in enumerate(labels):
        kind, j = lab["kind"], lab["source"]
        if kind == "foreign":
            assert new_rows[i]["output"] == dolly[j]["output"]
        elif kind == "duplicate":
            assert new_rows[i] == alpaca[j]
        elif kind == "swap":
            assert new_rows[i]["output"] == alpaca[j]["output"]
        elif kind in ("truncate", "shuffle"):
            assert len(alpaca[i]["output"].split()) >= 4
    assert corrupt(alpaca, 0.2, seed=0, foreign_rows=dolly) == (new_rows, labels)

    mask = corrupted_mask(labels)
    length = np.array([len(r["output"].split()) for r in new_rows], dtype=float)
    rows = summary({"oracle": (~mask).astype(float), "length": length}, mask)
    assert rows[0]["method"] == "oracle" and rows[0]["auroc"] == 1.0
    assert 0.0 <= rows[1]["auroc"] <= 1.0
    assert "| oracle | 1.000 |" in markdown_table(rows)
