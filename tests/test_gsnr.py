"""G-SNR formulas, ranking and selection against hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gradfilter.method.gsnr import (
    SCORE_SOURCES,
    SCORES,
    GSNRConfig,
    ablation_scores,
    gsnr_components,
    rank_scores,
    score_direction,
    select_top,
)

# 3 examples, 2 members.
#   early_sq: G^s = mean of rows = [6, 1, 4]
#   late_sq : G^t = [5, 1, 2]
#   late row 0 = [1, 9]: var 16, std 4, ddof=1 var 32; norms [1, 3]: var 1, ddof=1 var 2
#   late row 1 = [1, 1]: every spread 0
#   late row 2 = [4, 0]: var 4, std 2, ddof=1 var 8;   norms [2, 0]: var 1, ddof=1 var 2
EARLY = np.array([[8.0, 4.0], [1.0, 1.0], [8.0, 0.0]])
LATE = np.array([[1.0, 9.0], [1.0, 1.0], [4.0, 0.0]])


def _close(actual: np.ndarray, expected: list[float]) -> None:
    np.testing.assert_allclose(actual, np.array(expected), rtol=1e-14, atol=0.0)


def test_means_are_member_means() -> None:
    c = gsnr_components(EARLY, LATE)
    assert set(c) == {"early_mean", "late_mean", "drop", "late_var", "late_cv", "gsnr"}
    _close(c["early_mean"], [6.0, 1.0, 4.0])
    _close(c["late_mean"], [5.0, 1.0, 2.0])
    for v in c.values():
        assert v.shape == (3,)
        assert v.dtype == np.float64


def test_default_config_eps_1e8() -> None:
    eps = 1e-8
    c = gsnr_components(EARLY, LATE)
    d0, d2 = 1.0 / (6.0 + eps), 2.0 / (4.0 + eps)
    _close(c["drop"], [d0, 0.0, d2])
    _close(c["late_var"], [16.0, 0.0, 4.0])
    _close(c["gsnr"], [d0 / (16.0 + eps), 0.0, d2 / (4.0 + eps)])
    # the same, written out: 1/6/16 = 0.0104166..., 0.5/4 = 0.125
    assert c["gsnr"][0] == pytest.approx(1.0 / 96.0, rel=1e-8)
    assert c["gsnr"][2] == pytest.approx(0.125, rel=1e-8)


def test_normalized_drop_eps_1() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(eps=1.0))
    # D = (G^s - G^t) / (G^s + 1) = [1/7, 0/2, 2/5]
    _close(c["drop"], [1.0 / 7.0, 0.0, 0.4])
    # V = [16, 0, 4]; G-SNR = D / (V + 1) = [1/119, 0, 0.08]
    _close(c["late_var"], [16.0, 0.0, 4.0])
    _close(c["gsnr"], [1.0 / 119.0, 0.0, 0.08])


def test_log_ratio_drop() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(drop="log_ratio", eps=1.0))
    # D = log((G^s + 1) / (G^t + 1)) = [log(7/6), log(2/2), log(5/3)]
    _close(c["drop"], [math.log(7.0 / 6.0), 0.0, math.log(5.0 / 3.0)])
    _close(c["gsnr"], [math.log(7.0 / 6.0) / 17.0, 0.0, math.log(5.0 / 3.0) / 5.0])


def test_unnormalized_drop() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(drop="unnormalized", eps=1.0))
    _close(c["drop"], [1.0, 0.0, 2.0])
    _close(c["gsnr"], [1.0 / 17.0, 0.0, 2.0 / 5.0])


def test_std_spread() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(spread="std", eps=1.0))
    _close(c["late_var"], [4.0, 0.0, 2.0])
    _close(c["gsnr"], [1.0 / 35.0, 0.0, 0.4 / 3.0])


def test_spread_of_norms() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(of="norm", eps=1.0))
    # norms [1, 3], [1, 1], [2, 0] -> population variances [1, 0, 1]
    _close(c["late_var"], [1.0, 0.0, 1.0])
    _close(c["gsnr"], [1.0 / 14.0, 0.0, 0.2])
    # the means stay means of the squared norms
    _close(c["late_mean"], [5.0, 1.0, 2.0])


def test_ddof_1() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(ddof=1, eps=1.0))
    _close(c["late_var"], [32.0, 0.0, 8.0])
    _close(c["gsnr"], [1.0 / (7.0 * 33.0), 0.0, 0.4 / 9.0])


def test_norm_std_ddof_1_combined() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(of="norm", spread="std", ddof=1, eps=1.0))
    r2 = math.sqrt(2.0)
    _close(c["late_var"], [r2, 0.0, r2])
    _close(c["gsnr"], [1.0 / 7.0 / (1.0 + r2), 0.0, 0.4 / (1.0 + r2)])


def test_zero_early_norm_uses_eps() -> None:
    c = gsnr_components(np.array([[0.0, 0.0]]), np.array([[2.0, 2.0]]))
    # D = (0 - 2) / 1e-8 = -2e8, V = 0, G-SNR = -2e8 / 1e-8 = -2e16
    _close(c["drop"], [-2e8])
    _close(c["gsnr"], [-2e16])


def test_single_member_population_variance_is_zero() -> None:
    c = gsnr_components(np.array([[4.0], [2.0]]), np.array([[1.0], [3.0]]), GSNRConfig(eps=1.0))
    _close(c["late_var"], [0.0, 0.0])
    # D = [3/5, -1/3], G-SNR = D / 1
    _close(c["gsnr"], [0.6, -1.0 / 3.0])


def test_empty_input() -> None:
    c = gsnr_components(np.zeros((0, 3)), np.zeros((0, 3)))
    for v in c.values():
        assert v.shape == (0,)


def test_accepts_lists() -> None:
    c = gsnr_components(EARLY.tolist(), LATE.tolist(), GSNRConfig(eps=1.0))
    _close(c["gsnr"], [1.0 / 119.0, 0.0, 0.08])


# ---------------------------------------------------------------- NaN rows


def test_nan_rows_propagate_without_warnings() -> None:
    early = np.array([[8.0, 4.0], [np.nan, np.nan], [8.0, 0.0], [1.0, np.nan]])
    late = np.array([[1.0, 9.0], [1.0, 1.0], [np.nan, np.nan], [1.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cfg in (
            GSNRConfig(),
            GSNRConfig(drop="log_ratio"),
            GSNRConfig(of="norm", spread="std", ddof=1),
        ):
            c = gsnr_components(early, late, cfg)
            assert np.isfinite(c["gsnr"][0])
            assert np.isnan(c["gsnr"][1:]).all()
            assert np.isnan(c["drop"][1:]).all()
    c = gsnr_components(early, late, GSNRConfig(eps=1.0))
    # early NaN: early mean NaN; late quantities still defined
    assert np.isnan(c["early_mean"][1]) and np.isnan(c["early_mean"][3])
    _close(c["late_mean"][[0, 1, 3]], [5.0, 1.0, 1.0])
    _close(c["late_var"][[0, 1, 3]], [16.0, 0.0, 0.0])
    # late NaN: late mean and spread NaN; early mean defined
    assert np.isnan(c["late_mean"][2]) and np.isnan(c["late_var"][2])
    _close(c["early_mean"][[0, 2]], [6.0, 4.0])
    _close(c["gsnr"][[0]], [1.0 / 119.0])


def test_all_nan() -> None:
    nan = np.full((3, 2), np.nan)
    c = gsnr_components(nan, nan)
    for v in c.values():
        assert np.isnan(v).all()


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("early", "late", "match"),
    [
        (np.ones((3, 2)), np.ones((3, 3)), "same shape"),
        (np.ones((3, 2)), np.ones((2, 2)), "same shape"),
        (np.ones(3), np.ones(3), r"\[N, M\]"),
        (np.ones((3, 2, 1)), np.ones((3, 2, 1)), r"\[N, M\]"),
        (np.ones((3, 0)), np.ones((3, 0)), "M >= 1"),
        (np.array([[1.0, -1.0]]), np.ones((1, 2)), ">= 0"),
        (np.ones((1, 2)), np.array([[np.inf, 1.0]]), "infinite"),
        (np.array([["a", "b"]]), np.ones((1, 2)), "real-valued"),
    ],
)
def test_bad_inputs(early: np.ndarray, late: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gsnr_components(early, late)


def test_ddof_1_with_one_member() -> None:
    with pytest.raises(ValueError, match=r"ddof=1 needs at least 2 ensemble members; got M=1"):
        gsnr_components(np.ones((3, 1)), np.ones((3, 1)), GSNRConfig(ddof=1))


def test_config_type_checked() -> None:
    with pytest.raises(TypeError, match="GSNRConfig"):
        gsnr_components(EARLY, LATE, {"drop": "normalized"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (
            {"drop": "ratio"},
            ValueError,
            "drop must be one of 'normalized', 'log_ratio', 'unnormalized'; got 'ratio'",
        ),
        ({"spread": "mad"}, ValueError, "spread must be one of 'var', 'std'; got 'mad'"),
        ({"of": "sq"}, ValueError, "of must be one of 'squared', 'norm'; got 'sq'"),
        ({"drop": None}, ValueError, "drop must be one of"),
        ({"ddof": -1}, ValueError, "ddof must be a non-negative integer"),
        ({"ddof": 1.0}, TypeError, "ddof must be a non-negative integer"),
        ({"ddof": True}, TypeError, "ddof must be a non-negative integer"),
        ({"eps": 0.0}, ValueError, "eps must be a positive finite number"),
        ({"eps": -1e-8}, ValueError, "eps must be a positive finite number"),
        ({"eps": float("nan")}, ValueError, "eps must be a positive finite number"),
        ({"eps": float("inf")}, ValueError, "eps must be a positive finite number"),
        ({"eps": "1e-8"}, TypeError, "eps must be a positive finite number"),
    ],
)
def test_config_validation(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        GSNRConfig(**kwargs)


def test_config_normalises_and_is_frozen() -> None:
    cfg = GSNRConfig(ddof=np.int64(1), eps=1)
    assert type(cfg.ddof) is int and cfg.ddof == 1
    assert type(cfg.eps) is float and cfg.eps == 1.0
    with pytest.raises(AttributeError):
        cfg.drop = "bogus"  # type: ignore[misc]


# ---------------------------------------------------------------- score table


def test_scores_directions() -> None:
    assert SCORES == {
        "gsnr": 1,
        "drop": 1,
        "late_var": -1,
        "late_cv": -1,
        "late_norm": -1,
        "early_norm": 1,
    }
    assert [score_direction(n) for n in SCORES] == [True, True, False, False, False, True]
    with pytest.raises(ValueError, match="unknown score 'grand'"):
        score_direction("grand")


def test_ablation_scores_map_to_components() -> None:
    c = gsnr_components(EARLY, LATE, GSNRConfig(eps=1.0))
    s = ablation_scores(c)
    assert set(s) == set(SCORES) == set(SCORE_SOURCES)
    _close(s["late_norm"], [5.0, 1.0, 2.0])
    _close(s["early_norm"], [6.0, 1.0, 4.0])
    _close(s["late_var"], [16.0, 0.0, 4.0])
    _close(s["gsnr"], [1.0 / 119.0, 0.0, 0.08])
    # GraNd-like: highest early norm first; late_var: lowest first
    assert select_top(
        s["early_norm"], top_k=3, higher_is_better=score_direction("early_norm")
    ).tolist() == [0, 2, 1]
    assert select_top(
        s["late_var"], top_k=3, higher_is_better=score_direction("late_var")
    ).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="gsnr_components"):
        ablation_scores({"gsnr": c["gsnr"]})


# ---------------------------------------------------------------- ranking

SC = np.array([0.5, 2.0, np.nan, 2.0, -1.0, np.nan, 0.5])


def test_rank_higher_is_better_ties_and_nan() -> None:
    r = rank_scores(SC)
    # order: 2.0 (1), 2.0 (3), 0.5 (0), 0.5 (6), -1 (4), then NaN rows 2, 5
    assert r.tolist() == [3, 1, 6, 2, 5, 7, 4]
    assert r.dtype == np.int64


def test_rank_lower_is_better() -> None:
    r = rank_scores(SC, higher_is_better=False)
    # order: -1 (4), 0.5 (0), 0.5 (6), 2.0 (1), 2.0 (3), then NaN rows 2, 5
    assert r.tolist() == [2, 4, 6, 5, 1, 7, 3]


def test_rank_many_ties_keep_input_order() -> None:
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, 500).astype(float)
    s[::7] = np.nan
    for hib, levels in ((True, (2.0, 1.0, 0.0)), (False, (0.0, 1.0, 2.0))):
        expected = np.concatenate(
            [np.flatnonzero(s == v) for v in levels] + [np.flatnonzero(np.isnan(s))]
        )
        ranks = rank_scores(s, higher_is_better=hib)
        assert np.array_equal(np.argsort(ranks), expected)
        assert np.array_equal(select_top(s, ratio=1.0, higher_is_better=hib), expected[:428])


def test_rank_infinite_is_unscored_and_signed_zero_ties() -> None:
    assert rank_scores([np.inf, 1.0, -np.inf]).tolist() == [2, 1, 3]
    assert rank_scores([np.inf, 1.0, -np.inf], higher_is_better=False).tolist() == [2, 1, 3]
    assert rank_scores([0.0, -0.0]).tolist() == [1, 2]
    assert rank_scores([-0.0, 0.0], higher_is_better=False).tolist() == [1, 2]


def test_rank_edge_cases() -> None:
    assert rank_scores(np.array([])).tolist() == []
    assert rank_scores([np.nan, np.nan]).tolist() == [1, 2]
    assert rank_scores([3, 1, 2], higher_is_better=np.bool_(True)).tolist() == [1, 3, 2]


def test_rank_bad_arguments() -> None:
    with pytest.raises(TypeError, match="higher_is_better must be a bool"):
        rank_scores(SC, higher_is_better=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        rank_scores(np.ones((2, 2)))


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"ratio": 0.5}, [1, 3, 0]),  # floor(0.5 * 7) = 3
        ({"ratio": 0.4}, [1, 3]),  # floor(2.8) = 2
        ({"ratio": 1.0}, [1, 3, 0, 6, 4]),  # floor(7) = 7, capped at the 5 scored rows
        ({"ratio": 0.1}, []),  # floor(0.7) = 0
        ({"top_k": 2}, [1, 3]),
        ({"top_k": 0}, []),
        ({"top_k": 5}, [1, 3, 0, 6, 4]),
        ({"top_k": 10}, [1, 3, 0, 6, 4]),  # more than scored: capped
        ({"ratio": 0.25, "n_rows": 12}, [1, 3, 0]),  # floor(3.0) = 3
        ({"ratio": 0.25, "n_rows": 20}, [1, 3, 0, 6, 4]),  # 5 = the scored rows
        ({"ratio": 0.25, "n_rows": 23}, [1, 3, 0, 6, 4]),  # floor(5.75) = 5
        ({"top_k": 3, "higher_is_better": False}, [4, 0, 6]),
        ({"ratio": 1.0, "higher_is_better": False}, [4, 0, 6, 1, 3]),
    ],
)
def test_select_counts(kwargs: dict, expected: list[int]) -> None:
    out = select_top(SC, **kwargs)
    assert out.tolist() == expected
    assert out.dtype == np.int64


def test_select_matches_rank_order() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 50).astype(float)
    s[rng.choice(50, 7, replace=False)] = np.nan
    for hib in (True, False):
        ranks = rank_scores(s, higher_is_better=hib)
        sel = select_top(s, ratio=0.3, higher_is_better=hib)
        assert sel.size == 15
        assert ranks[sel].tolist() == list(range(1, 16))


def test_select_ratio_read_as_decimal() -> None:
    # 0.29 * 100 == 28.999999999999996 in binary floating point
    assert select_top(np.arange(100.0), ratio=0.29).size == 29
    assert select_top(np.arange(100.0), ratio=0.57).size == 57
    assert select_top(np.arange(10.0), ratio=np.float64(0.3)).tolist() == [9, 8, 7]


def test_select_never_picks_unscored() -> None:
    assert select_top([np.nan, np.nan], ratio=1.0).tolist() == []
    assert select_top([np.nan, 1.0, np.inf], top_k=3).tolist() == [1]
    assert select_top(np.array([]), ratio=1.0).tolist() == []


def test_select_end_to_end_with_unscored_row() -> None:
    early = np.vstack([EARLY, [[np.nan, np.nan]]])
    late = np.vstack([LATE, [[1.0, 1.0]]])
    c = gsnr_components(early, late, GSNRConfig(eps=1.0))
    # G-SNR = [1/119, 0, 0.08, NaN]
    assert select_top(c["gsnr"], ratio=1.0).tolist() == [2, 0, 1]
    assert select_top(c["gsnr"], ratio=0.5).tolist() == [2, 0]  # floor(0.5 * 4) = 2
    assert rank_scores(c["gsnr"]).tolist() == [2, 3, 1, 4]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({}, ValueError, "exactly one of ratio and top_k"),
        ({"ratio": 0.5, "top_k": 2}, ValueError, "exactly one of ratio and top_k"),
        ({"ratio": 0.0}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": -0.1}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": float("nan")}, ValueError, r"ratio must be in \(0, 1\]"),
        ({"ratio": True}, TypeError, "ratio must be a number"),
        ({"ratio": "0.5"}, TypeError, "ratio must be a number"),
        ({"top_k": -1}, ValueError, "top_k must be a non-negative integer"),
        ({"top_k": 2.0}, TypeError, "top_k must be a non-negative integer"),
        ({"top_k": True}, TypeError, "top_k must be a non-negative integer"),
        ({"ratio": 0.5, "n_rows": 3}, ValueError, "n_rows=3 is smaller than the number of"),
        ({"ratio": 0.5, "n_rows": 7.0}, TypeError, "n_rows must be an integer"),
    ],
)
def test_select_bad_arguments(kwargs: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        select_top(SC, **kwargs)


def test_select_bad_direction_and_shape() -> None:
    with pytest.raises(TypeError, match="higher_is_better must be a bool"):
        select_top(SC, top_k=1, higher_is_better=SCORES["late_var"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        select_top(np.ones((2, 2)), top_k=1)


def test_length_level_by_hand() -> None:
    """Fewer than 40 rows: one bin, the score is the median level minus the row's."""
    late = np.array([[1.0, 4.0], [2.0, 2.0], [8.0, 8.0]])
    early = np.ones_like(late)
    lengths = np.array([5, 50, 500])
    comp = gsnr_components(early, late, GSNRConfig(formula="length_level", eps=1e-300), lengths)
    level = np.log(late).mean(axis=1)  # log 2, log 2, log 8
    np.testing.assert_allclose(comp["gsnr"], np.median(level) - level)
    assert comp["gsnr"][2] < comp["gsnr"][0] == comp["gsnr"][1] == 0.0


def test_length_level_compares_rows_within_their_length_bin() -> None:
    """40 rows, two bins by length: a shared level per bin (norms that grow with
    length) is removed, so only the within-bin difference ranks the rows."""
    n = 40
    lengths = np.r_[np.full(20, 10.0), np.full(20, 200.0)]
    base = np.where(lengths < 100, 1.0, 100.0)  # long rows: a 100x larger norm
    own = np.tile(np.r_[np.full(10, 1.0), np.full(10, 3.0)], 2)  # half of each bin 3x
    late = (base * own)[:, None] * np.ones((n, 3))
    comp = gsnr_components(np.ones_like(late), late, GSNRConfig(formula="length_level"), lengths)
    g = comp["gsnr"]
    low, high = own == 1.0, own == 3.0
    assert np.allclose(g[low], g[low][0]) and np.allclose(g[high], g[high][0])
    assert g[low][0] > g[high][0]  # lower norm for its length ranks first, in both bins
    # The raw level would rank every short row above every long one instead.
    assert comp["late_mean"][lengths < 100].max() < comp["late_mean"][lengths > 100].min()


def test_length_level_is_scale_free_and_skips_nan_rows() -> None:
    rng = np.random.default_rng(0)
    late = rng.uniform(0.5, 2.0, size=(60, 4))
    late[7] = np.nan
    lengths = rng.integers(5, 300, size=60)
    cfg = GSNRConfig(formula="length_level", eps=1e-300)
    a = gsnr_components(np.ones_like(late), late, cfg, lengths)["gsnr"]
    b = gsnr_components(np.ones_like(late), late * 37.0, cfg, lengths)["gsnr"]
    assert np.isnan(a[7]) and np.isnan(b[7])
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_length_level_needs_lengths() -> None:
    late = np.ones((3, 2))
    with pytest.raises(ValueError, match="needs the rows' lengths"):
        gsnr_components(late, late, GSNRConfig(formula="length_level"))
    with pytest.raises(ValueError, match="one entry per row"):
        gsnr_components(late, late, GSNRConfig(formula="length_level"), [1, 2])
