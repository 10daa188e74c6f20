"""The selection-quality benchmark end to end on a tiny model (smoke version)."""

from __future__ import annotations

import json

import numpy as np
from test_pipeline import proxy

from gradfilter.bench.quality_bench import QualityConfig, run
from gradfilter.run.score import ScoreConfig

WORDS = "red green blue cat dog sun moon tree rock fish bird star rain snow wind leaf".split()


def synthetic_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.choice(WORDS, 3, replace=False)
        rows.append(
            {
                "instruction": f"Name {a} {i}",
                "input": "",
                "output": f"the {a} and {b} like {c} today",
            }
        )
    return rows


def test_quality_benchmark_smoke(tmp_path):
    data = tmp_path / "pool.json"
    data.write_text(json.dumps(synthetic_rows(60, 0)))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(
            [{"instruction": "x", "input": "", "output": f"ein Satz {i}"} for i in range(10)]
        )
    )
    qcfg = QualityConfig(
        data=str(data),
        foreign=str(foreign),
        pool=30,
        heldout=8,
        fraction=0.3,
        seed=1,
        methods=["gsnr", "drop", "grand", "loss", "ifd", "random"],
        train_steps=4,
        eval_every=2,
        random_seeds=(0, 1),
        select_ratio=0.2,
    )
    scfg = ScoreConfig(members=2, rank=2, alpha=4, epochs=2, batch_size=4, max_length=96, lr=5e-3)
    out = tmp_path / "bench"
    res = run(qcfg, scfg, str(out), model_and_tokenizer=proxy(), progress=False, log=lambda s: None)
    assert res["corrupted_rows"] == 9
    formulas = {f"gsnr:{f}" for f in qcfg.formulas}
    parts = {"late_cv", "late_norm", "late_var"}
    assert {r["method"] for r in res["detection"]} == (
        {"gsnr", "drop", "grand", "loss", "ifd", "random"} | formulas | parts
    )
    # drop and grand come from the G-SNR run's own scores.
    recs = [json.loads(line) for line in (out / "gsnr" / "scores.jsonl").read_text().splitlines()]
    assert res["timing"]["drop"]["shared_run"] == "gsnr" and not (out / "drop").exists()
    k = len(res["downstream"]["subsets"]["gsnr"])
    by_early = sorted(range(len(recs)), key=lambda i: (-recs[i]["early_mean"], i))
    by_drop = sorted(range(len(recs)), key=lambda i: (-recs[i]["drop"], i))
    assert res["downstream"]["subsets"]["grand"] == by_early[:k]
    assert res["downstream"]["subsets"]["drop"] == by_drop[:k]
    assert all(0.0 <= r["auroc"] <= 1.0 for r in res["detection"])
    curves = res["downstream"]["curves"]
    assert set(curves) == (
        {"gsnr", "drop", "grand", "loss", "ifd", "random-0", "random-1"} | formulas | parts
    )
    # the run's own formula (the default) gives the same subset as gsnr
    own = f"gsnr:{scfg.formula}"
    assert res["downstream"]["subsets"][own] == res["downstream"]["subsets"]["gsnr"]
    assert all([s for s, _ in c] == [0, 2, 4] for c in curves.values())
    # Same init for every adapter: at step 0 all held-out losses agree.
    first = [c[0][1] for c in curves.values()]
    assert max(first) - min(first) < 1e-6
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert sum(lab["corrupted"] for lab in labels) == 9
    assert (out / "results.md").read_text().count("|") > 10
    assert (out / "heldout_loss.png").stat().st_size > 1000


def test_quality_benchmark_seeds_resume_and_aggregate(tmp_path):
    """Two seeds, no downstream; a second call reads the finished seeds instead of
    scoring again, and the aggregate covers both."""
    from gradfilter.bench.quality_bench import run_seeds

    data = tmp_path / "pool.json"
    data.write_text(json.dumps(synthetic_rows(50, 0)))
    foreign = tmp_path / "foreign.json"
    foreign.write_text(
        json.dumps(
            [{"instruction": "x", "input": "", "output": f"ein Satz {i}"} for i in range(10)]
        )
    )
    qcfg = QualityConfig(
        data=str(data),
        foreign=str(foreign),
        pool=20,
        heldout=4,
        fraction=0.3,
        methods=["gsnr", "random"],
        formulas=("paper", "log_cv"),
    )
    scfg = ScoreConfig(
        members=2, rank=2, alpha=4, epochs=2, batch_size=4, max_length=96, lr=5e-3, norms="inflight"
    )
    out = tmp_path / "bench"
    said = []
    agg = run_seeds(
        qcfg,
        scfg,
        str(out),
        [0, 1],
        downstream=False,
        model_and_tokenizer=proxy(),
        progress=False,
        log=said.append,
    )
    assert agg["seeds"] == [0, 1]
    assert agg["methods"]["gsnr:log_cv"]["auroc"]["n"] == 2
    pools = [(out / f"seed-{s}" / "pool.jsonl").read_text() for s in (0, 1)]
    assert pools[0] != pools[1]
    assert (out / "aggregate.md").read_text().count("gsnr:log_cv") == 1
    said.clear()
    again = run_seeds(
        qcfg,
        scfg,
        str(out),
        [0, 1],
        downstream=False,
        model_and_tokenizer=proxy(),
        progress=False,
        log=said.append,
    )
    assert again == json.loads((out / "aggregate.json").read_text())
    assert said == [f"seed {s}: results found in {out}/seed-{s}" for s in (0, 1)]
