"""Norm trajectories (norms.npz), rescoring from them, the warm-up schedule and the
scale-free G-SNR formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_inflight import ROWS, proxy

from gradfilter.bench.quality_bench import aggregate, aggregate_markdown
from gradfilter.method.gsnr import CV_FLOOR, FORMULAS, GSNRConfig, gsnr_components
from gradfilter.run.score import ScoreConfig, read_norms, rescore, score

BASE = dict(members=3, rank=4, alpha=8, batch_size=4, max_length=96, lr=5e-3)


def run(out, **kw):
    cfg = ScoreConfig(**{**BASE, **kw})
    return score(
        ROWS, str(out), cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy()
    )


# ------------------------------------------------------------------ trajectories


@pytest.mark.parametrize("norms", ["inflight", "snapshot"])
def test_trajectory_shapes_steps_and_columns(tmp_path, norms):
    res = run(tmp_path, epochs=4, early=2, late=3, snapshots=[1, 2, 3, 4], norms=norms)
    z = read_norms(str(tmp_path))
    n, m, c = len(ROWS), 3, 4
    assert z["sq"].shape == z["sq_a"].shape == z["sq_b"].shape == z["visit_step"].shape == (n, m, c)
    assert z["sq"].dtype == np.float64
    spe = res.run["plan"]["schedule"]["steps_per_epoch"]
    assert spe == 3  # 11 rows, batch 4
    assert z["epoch"].tolist() == [1, 2, 3, 4]
    assert z["step"].tolist() == [spe, 2 * spe, 3 * spe, 4 * spe]
    assert np.isfinite(z["sq"]).all() and (z["sq"] > 0).all()
    vs = z["visit_step"]
    if norms == "inflight":
        # every visit of epoch e happens during that epoch's steps
        for k in range(c):
            assert ((vs[:, :, k] >= k * spe) & (vs[:, :, k] < (k + 1) * spe)).all()
        # the lora_A and lora_B shares add up to the total
        np.testing.assert_allclose(z["sq_a"] + z["sq_b"], z["sq"], rtol=1e-10)
        # B starts at zero, so early in training A's gradient is the smaller share
        assert np.median(z["sq_a"][:, :, 0] / z["sq"][:, :, 0]) < 0.5
    else:
        assert np.isnan(z["sq_a"]).all()
        for k in range(c):
            assert (vs[:, :, k] == (k + 1) * spe).all()
    # the records' early / late lists are the trajectory's columns 2 and 3 (epochs 2, 3)
    early = np.array([r["early_sq"] for r in res.records])
    late = np.array([r["late_sq"] for r in res.records])
    np.testing.assert_array_equal(early, z["sq"][:, :, 1])
    np.testing.assert_array_equal(late, z["sq"][:, :, 2])


def test_unscored_rows_are_nan_in_the_trajectory(tmp_path):
    rows = ROWS[:5] + [{"instruction": "no output"}] + ROWS[5:]
    cfg = ScoreConfig(**BASE, norms="inflight")
    score(rows, str(tmp_path), cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy())
    z = read_norms(str(tmp_path))
    assert z["sq"].shape[0] == len(rows)
    assert np.isnan(z["sq"][5]).all() and (z["visit_step"][5] == -1).all()
    assert 5 not in z["scored"].tolist() and len(z["scored"]) == len(ROWS)
    assert np.isfinite(np.delete(z["sq"], 5, axis=0)).all()


def test_snapshots_must_include_early_and_late():
    with pytest.raises(ValueError, match="must include the early and late"):
        ScoreConfig(epochs=3, snapshots=[1, 3], early=1, late=2).validate()
    with pytest.raises(ValueError, match="snapshots must be epochs in 1..3"):
        ScoreConfig(epochs=3, snapshots=[1, 2, 4]).validate()
    with pytest.raises(ValueError, match="warmup_steps"):
        ScoreConfig(warmup_steps=-1).validate()


# ------------------------------------------------------------------ warm-up


def test_warmup_puts_the_early_point_past_the_configured_steps(tmp_path):
    """12 rows at batch 4 give 3 steps an epoch; 10 warm-up steps put the first
    recorded visit at step 10 or later."""
    rows = ROWS + [{"instruction": "Extra", "input": "", "output": "one more"}]
    cfg = ScoreConfig(**BASE, norms="inflight", warmup_steps=10)
    res = score(
        rows, str(tmp_path), cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy()
    )
    z = read_norms(str(tmp_path))
    sched = res.run["plan"]["schedule"]
    assert sched["warmup_steps"] == 10 and sched["early_starts_at_step"] == 10
    assert res.run["plan"]["training_steps"] == 10 + 2 * 3
    assert z["visit_step"][:, :, 0].min() == 10
    assert z["step"].tolist() == [13, 16]
    assert len(res.run["final_losses"]) == 3


def test_warmup_resumes_to_identical_scores(tmp_path):
    full = run(tmp_path / "a", norms="inflight", warmup_steps=5)
    with pytest.raises(KeyboardInterrupt):
        score(
            ROWS,
            str(tmp_path / "b"),
            ScoreConfig(**BASE, norms="inflight", warmup_steps=5),
            progress=False,
            log=lambda s: None,
            model_and_tokenizer=proxy(),
            stop_after=3,
        )
    resumed = run(tmp_path / "b", norms="inflight", warmup_steps=5)
    assert [r["gsnr"] for r in resumed.records] == [r["gsnr"] for r in full.records]
    a, b = read_norms(str(tmp_path / "a")), read_norms(str(tmp_path / "b"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


# ------------------------------------------------------------------ rescore


def test_rescore_reproduces_score_bytes(tmp_path):
    run(tmp_path / "a", epochs=3, snapshots=[1, 2, 3], norms="inflight", formula="log_cv")
    rescore(str(tmp_path / "a"), output=str(tmp_path / "b"))
    assert (tmp_path / "a" / "scores.jsonl").read_bytes() == (
        tmp_path / "b" / "scores.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("formula", FORMULAS)
def test_rescore_with_other_settings_equals_a_run_with_them(tmp_path, formula):
    """A run that recorded epochs 1-3, rescored with early 2 / late 3 and a formula,
    equals a run made with those settings (same training, same norms)."""
    run(tmp_path / "a", epochs=3, snapshots=[1, 2, 3], norms="inflight")
    run(
        tmp_path / "b",
        epochs=3,
        early=2,
        late=3,
        snapshots=[1, 2, 3],
        norms="inflight",
        formula=formula,
    )
    rescore(str(tmp_path / "a"), formula=formula, early=2, late=3, output=str(tmp_path / "c"))
    assert (tmp_path / "b" / "scores.jsonl").read_bytes() == (
        tmp_path / "c" / "scores.jsonl"
    ).read_bytes()
    run_c = json.loads((tmp_path / "c" / "run.json").read_text())
    assert run_c["config"]["formula"] == formula and run_c["config"]["early"] == 2


def test_paper_formula_is_the_previous_score(tmp_path):
    """formula="paper" is D / (V + eps) with the drop / spread options, exactly."""
    res = run(tmp_path, norms="inflight", formula="paper")
    early = np.array([r["early_sq"] for r in res.records])
    late = np.array([r["late_sq"] for r in res.records])
    g_s, g_t = early.mean(1), late.mean(1)
    want = ((g_s - g_t) / (g_s + 1e-8)) / (late.var(1) + 1e-8)
    assert [r["gsnr"] for r in res.records] == want.tolist()


def test_rescore_errors(tmp_path):
    run(tmp_path, norms="inflight", epochs=3)  # records epochs 1 and 2 only
    with pytest.raises(ValueError, match="epoch 3 has no recorded norms"):
        rescore(str(tmp_path), late=3, output=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="1 <= early < late"):
        rescore(str(tmp_path), early=2, late=1, output=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="run.json not found"):
        rescore(str(tmp_path / "missing"))


def test_rescore_cli(tmp_path):
    from gradfilter.cli import main

    run(tmp_path / "a", epochs=3, snapshots=[1, 2, 3], norms="inflight")
    assert (
        main(
            [
                "rescore",
                str(tmp_path / "a"),
                "--formula",
                "rank",
                "--early",
                "2",
                "--late",
                "3",
                "-o",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    recs = [json.loads(x) for x in (tmp_path / "b" / "scores.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["gsnr"] <= 1.0 for r in recs)
    assert main(["rescore", str(tmp_path / "a"), "--late", "9"]) == 2


# ------------------------------------------------------------------ formulas


E = np.array([[4.0, 4.0, 4.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [9.0, 1.0, 5.0]])
L = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 3.0, 2.0], [3.0, 3.0, 3.0]])


def test_scale_free_formulas_by_hand():
    g_s, g_t = E.mean(1), L.mean(1)  # [4, 2, 2, 5], [1, 2, 2, 3]
    ld = np.log(g_s + 1e-8) - np.log(g_t + 1e-8)
    ell = ld - np.median(ld)
    cv = L.std(1) / (g_t + 1e-8)  # [0, 0, sqrt(2/3)/2, 0]
    c = gsnr_components(E, L, GSNRConfig(formula="log_cv"))
    np.testing.assert_allclose(c["late_cv"], cv, rtol=1e-12)
    np.testing.assert_allclose(c["gsnr"], ell - np.log(cv + CV_FLOOR), rtol=1e-12)
    c = gsnr_components(E, L, GSNRConfig(formula="snr_cv"))
    np.testing.assert_allclose(c["gsnr"], ell / (cv + CV_FLOOR), rtol=1e-12)
    c = gsnr_components(E, L, GSNRConfig(formula="rank"))
    # ell ranks (0 = smallest): row 0 largest (log 4), row 3 next (log 5/3), rows 1, 2 tie
    # (log 1): 0.5, 0.5 -> unit ranks [1, 1/6, 1/6, 2/3]; -cv: rows 0, 1, 3 tie at the top
    # (mean rank 2 of 0..3 -> 2/3), row 2 last (0).
    np.testing.assert_allclose(
        c["gsnr"], 0.5 * (np.array([1, 1 / 6, 1 / 6, 2 / 3]) + np.array([2 / 3, 2 / 3, 0, 2 / 3]))
    )


@pytest.mark.parametrize("formula", ["log_cv", "snr_cv", "rank"])
def test_scale_free_formulas_ignore_a_shared_growth_factor(formula):
    rng = np.random.default_rng(3)
    early, late = rng.random((20, 5)) + 0.1, rng.random((20, 5)) + 0.1
    cfg = GSNRConfig(formula=formula)
    base = gsnr_components(early, late, cfg)["gsnr"]
    # every norm grows 7x between the snapshots: all paper drops turn negative
    grown = gsnr_components(early, 7 * late, cfg)["gsnr"]
    # equal up to eps = 1e-8 inside the logarithm and the CV (norms here are ~0.1-1)
    np.testing.assert_allclose(base, grown, rtol=1e-6, atol=1e-9)
    assert (gsnr_components(early, 7 * late)["drop"] < 0).sum() >= 19


def test_formulas_all_negative_drops_zero_variance_one_member_and_nan():
    early = np.array([[1.0], [2.0], [np.nan], [4.0]])
    late = np.array([[2.0], [8.0], [1.0], [4.0]])  # every drop <= 0, one member
    for f in ("log_cv", "snr_cv", "rank"):
        g = gsnr_components(early, late, GSNRConfig(formula=f))["gsnr"]
        assert np.isnan(g[2]) and np.isfinite(g[[0, 1, 3]]).all()
        # with one member the spread is 0 for all, so the order is the log drop's:
        # row 3 (log 1) > row 0 (log 1/2) > row 1 (log 1/4)
        assert g[3] > g[0] > g[1]
    paper = gsnr_components(early, late)["gsnr"]
    assert paper[1] < paper[0] < 0 and paper[3] == 0.0


def test_unknown_formula_is_refused():
    with pytest.raises(ValueError, match="formula must be one of"):
        GSNRConfig(formula="magic")


# ------------------------------------------------------------------ seeds aggregation


def _seed_result(pool, corrupted, aurocs, finals=None):
    det = [
        {"method": m, "auroc": a, "top5": 0.0, "top10": t, "top15": 0.0}
        for m, (a, t) in aurocs.items()
    ]
    res = {"config": {"pool": pool}, "corrupted_rows": corrupted, "detection": det}
    if finals:
        res["downstream"] = {"final": finals}
    return res


def test_aggregate_over_seeds():
    per = {
        0: _seed_result(100, 20, {"a": (0.8, 0.05), "b": (0.5, 0.2)}, {"a": 2.0, "random-0": 2.2}),
        1: _seed_result(100, 20, {"a": (0.6, 0.10), "b": (0.7, 0.3)}, {"a": 2.2, "random-0": 2.4}),
        2: _seed_result(100, 20, {"a": (0.7, 0.15), "b": (0.6, 0.1)}, {"a": 2.1, "random-0": 2.0}),
    }
    agg = aggregate(per)
    a = agg["methods"]["a"]
    assert a["auroc"]["mean"] == pytest.approx(0.7)
    assert a["auroc"]["sd"] == pytest.approx(0.1)
    assert (a["auroc"]["min"], a["auroc"]["max"], a["auroc"]["n"]) == (0.6, 0.8, 3)
    assert a["top10_vs_base"]["mean"] == pytest.approx(0.5)
    assert a["heldout_loss"]["mean"] == pytest.approx(2.1)
    assert "heldout_loss" not in agg["methods"]["b"]
    assert agg["random_subsets_heldout_loss"]["mean"] == pytest.approx(2.2)
    md = aggregate_markdown(agg)
    assert md.index("| a |") < md.index("| b |")  # by mean AUROC
    assert "0.700 ± 0.100 [0.600, 0.800]" in md


def test_rescore_reads_an_older_norms_file_without_row_fields(tmp_path):
    run(tmp_path / "a", norms="inflight")
    path = tmp_path / "a" / "norms.npz"
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files if k != "rows"}
    np.savez_compressed(path, **kept)
    rescore(str(tmp_path / "a"), output=str(tmp_path / "b"))
    assert (tmp_path / "a" / "scores.jsonl").read_bytes() == (
        tmp_path / "b" / "scores.jsonl"
    ).read_bytes()


# ------------------------------------------------------------------ early_after


def test_resolve_schedule_moves_by_whole_epochs():
    cfg = ScoreConfig(epochs=2, early=1, late=2, early_after=50)
    # 10 steps per epoch: epoch 6 is the first to start at step >= 50
    got = cfg.resolve_schedule(10)
    assert (got.early, got.late, got.epochs) == (6, 7, 7)
    # large data: epoch 2 starts at step 60, already past 50
    got = cfg.resolve_schedule(60)
    assert (got.early, got.late, got.epochs) == (2, 3, 3)
    # warm-up steps count; enough of them leave the schedule as given
    assert ScoreConfig(early_after=50, warmup_steps=50).resolve_schedule(10).early == 1
    assert ScoreConfig(early_after=50, warmup_steps=30).resolve_schedule(10).early == 3
    # 0 (default) and no scorable row: unchanged
    assert ScoreConfig().resolve_schedule(10) == ScoreConfig()
    assert cfg.resolve_schedule(0) is cfg
    # extra epochs after the late one are kept; "every epoch" stays every epoch
    got = ScoreConfig(epochs=4, early=1, late=2, snapshots=[1, 2, 3, 4], early_after=20)
    got = got.resolve_schedule(10)
    assert (got.early, got.late, got.epochs, got.snapshots) == (3, 4, 6, [1, 2, 3, 4, 5, 6])
    got = ScoreConfig(epochs=3, snapshots=[1, 2], early_after=10).resolve_schedule(10)
    assert (got.early, got.late, got.epochs, got.snapshots) == (2, 3, 4, [1, 2, 3])
    with pytest.raises(ValueError, match="early_after"):
        ScoreConfig(early_after=-1).validate()


def test_early_after_run_records_its_schedule_and_finishes_again(tmp_path):
    # 11 rows, batch 4: 3 steps per epoch, so early_after=5 puts the early point at
    # epoch 3 (step 6) and the late one at epoch 4
    res = run(tmp_path, early_after=5, norms="inflight")
    sched = res.run["plan"]["schedule"]
    assert sched["early_after"] == 5 and sched["early_starts_at_step"] == 6
    assert (sched["early"], sched["late"], sched["epochs"]) == (3, 4, 4)
    c = res.run["config"]
    assert (c["early"], c["late"], c["epochs"], c["early_after"]) == (3, 4, 4, 5)
    z = read_norms(str(tmp_path))
    assert z["epoch"].tolist() == [3, 4]
    # the same call on the same folder is recognised as the same run
    again = run(tmp_path, early_after=5, norms="inflight")
    assert [r["score"] for r in again.records] == [r["score"] for r in res.records]
    # and equals the literal schedule it resolved to
    lit = run(tmp_path / "literal", epochs=4, early=3, late=4, norms="inflight")
    assert [r["score"] for r in lit.records] == [r["score"] for r in res.records]


def test_cli_epochs_given_by_hand_are_taken_literally():
    import argparse

    from gradfilter.cli import _add_score_parser, score_config_from_args

    parser = argparse.ArgumentParser()
    _add_score_parser(parser.add_subparsers(dest="command"))

    def cfg(*extra):
        return score_config_from_args(parser.parse_args(["score", "-o", "out", *extra]))

    default = ScoreConfig()
    got = cfg()
    assert (got.early_after, got.epochs, got.early, got.late) == (
        default.early_after, default.epochs, default.early, default.late,
    )  # fmt: skip
    for flags in (["--epochs", "3"], ["--early", "1", "--late", "2"], ["--late", "2"]):
        assert cfg(*flags).early_after == 0
    assert cfg("--epochs", "3", "--early-after", "20").early_after == 20
    assert cfg("--early-after", "7").early_after == 7
    assert cfg("--epochs", "3", "--snapshots", "all").snapshots == [1, 2, 3]
    assert cfg("--snapshots", "all").snapshots == list(range(1, default.epochs + 1))
