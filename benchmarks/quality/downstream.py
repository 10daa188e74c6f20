"""The downstream guard of ``docs/quality-criterion.md``: train one LoRA adapter on
each candidate's top 10% of a finished corruption-benchmark run, and on random
10% subsets, and compare their held-out losses.

    python benchmarks/quality/downstream.py RUN_DIR [RUN_DIR ...] -o OUT

Each RUN_DIR is a ``gradfilter quality-bench`` output (a ``seed-*`` folder or a
folder of them) whose G-SNR run stored every epoch's norms (``--snapshots
all``).  The pool and held-out rows are rebuilt from the run's settings
(``results.json``) and checked row for row against its ``labels.jsonl``; the
candidates' subsets come from the stored norms alone, so nothing is scored
again.  Per run, ``OUT/<pool>-<seed>.json`` holds every subset, its corrupted
share and its held-out loss (a finished run is not trained again, so an
interrupted study resumes); ``OUT/downstream.md`` / ``downstream.json`` hold the
table over runs and the guard's verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

from gradfilter.bench.quality import corrupt, corrupted_mask
from gradfilter.bench.quality_bench import (
    QualityConfig,
    _downstream,
    _encode_all,
    _sample,
)
from gradfilter.method.gsnr import GSNRConfig, gsnr_components, select_top
from gradfilter.run.config import ScoreConfig
from gradfilter.run.score import read_norms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from analyze import early_epoch, finished_runs, lengths_of  # noqa: E402

#: (formula, S) pairs whose top 10% is trained on; see the criterion page.
CANDIDATES = [("length_level", s) for s in (0, 50, 100)]
#: The next candidates by mean AUROC (five runs), for when the first fail the guard.
NEXT = [("snr_cv", 50), ("snr_cv", 0), ("log_cv", 0), ("rank", 0), ("paper", 50), ("paper", 0)]
REFERENCE = "low loss"  # the proxy's own loss, low kept: reported, not a candidate


def _settings(run: str) -> tuple[QualityConfig, ScoreConfig]:
    with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
        res = json.load(f)
    names = {f.name for f in dataclasses.fields(QualityConfig)}
    qcfg = QualityConfig(**{k: v for k, v in res["config"].items() if k in names})
    with open(os.path.join(run, "gsnr", "run.json"), encoding="utf-8") as f:
        conf = json.load(f)["config"]
    names = {f.name for f in dataclasses.fields(ScoreConfig)}
    return qcfg, ScoreConfig(**{k: v for k, v in conf.items() if k in names})


def _pool(run: str, qcfg: QualityConfig, data: str, foreign: str | None):
    """The run's pool and held-out rows, rebuilt and checked against labels.jsonl."""
    with open(data, encoding="utf-8") as f:
        rows = json.load(f)
    foreign_rows = None
    if foreign:
        with open(foreign, encoding="utf-8") as f:
            foreign_rows = json.load(f)
    pool, heldout = _sample(rows, qcfg.pool, qcfg.heldout, qcfg.seed)
    pool, labels = corrupt(pool, qcfg.fraction, qcfg.seed, foreign_rows=foreign_rows)
    with open(os.path.join(run, "labels.jsonl"), encoding="utf-8") as f:
        stored = [json.loads(line) for line in f]
    if len(stored) != len(labels):
        raise SystemExit(f"{run}: {len(stored)} labels stored, {len(labels)} rebuilt")
    for i, (a, b) in enumerate(zip(stored, labels, strict=True)):
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise SystemExit(f"{run}: row {i} rebuilt differently ({b} vs stored {a})")
    return pool, heldout, corrupted_mask(labels)


def subsets_of(
    run: str, k: int, candidates: list[tuple[str, int]] | None = None, reference: bool = True
) -> dict[str, list[int]]:
    """Top-k row indices of every candidate and of the low-loss reference."""
    norms = read_norms(os.path.join(run, "gsnr"))
    with open(os.path.join(run, "gsnr", "run.json"), encoding="utf-8") as f:
        spe = json.load(f)["plan"]["schedule"]["steps_per_epoch"]
    epochs = norms["epoch"].tolist()
    ok = norms["scored"]
    n = norms["sq"].shape[0]
    lengths = lengths_of(run, norms)[ok]
    out: dict[str, list[int]] = {}
    for formula, s in CANDIDATES if candidates is None else candidates:
        e = early_epoch(s, spe)
        if e + 1 not in epochs:
            continue
        es = norms["sq"][ok][:, :, epochs.index(e)]
        ls = norms["sq"][ok][:, :, epochs.index(e + 1)]
        full = np.full(n, np.nan)
        full[ok] = gsnr_components(es, ls, GSNRConfig(formula=formula), lengths)["gsnr"]
        out[f"{formula}@S={s}"] = select_top(full, top_k=k).tolist()
    loss_file = os.path.join(run, "loss", "scores.jsonl")
    if reference and os.path.exists(loss_file):
        with open(loss_file, encoding="utf-8") as f:
            loss = np.array(
                [np.nan if (v := json.loads(line)["score"]) is None else v for line in f]
            )
        out[REFERENCE] = select_top(-loss, top_k=k).tolist()
    return out


def run_one(
    run: str,
    out_dir: str,
    data: str,
    foreign: str | None,
    next_tier: bool = False,
    token_budget: int | None = None,
    only: list[tuple[str, int]] | None = None,
) -> dict:
    qcfg, scfg = _settings(run)
    name = f"{qcfg.pool}-seed{qcfg.seed}"
    path = os.path.join(out_dir, f"{name}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    pool, heldout, corrupted = _pool(run, qcfg, data, foreign)
    k = max(1, math.floor(qcfg.select_ratio * len(pool)))
    tier = NEXT if next_tier else CANDIDATES
    if only:
        tier = [c for c in tier if c in only]
    subsets = subsets_of(run, k, tier, reference=not next_tier and not only)
    for s in qcfg.random_seeds:
        subsets[f"random-{s}"] = np.random.default_rng(1000 + s).permutation(len(pool))[:k].tolist()
    from gradfilter.io.models import load_proxy

    model, tok = load_proxy(scfg.proxy, dtype=getattr(torch, scfg.dtype))
    pool_enc = _encode_all(pool, tok, scfg.max_length)
    held_enc = _encode_all(heldout, tok, scfg.max_length)
    # the final loss decides; before training every subset has the same loss
    cfg = dataclasses.replace(qcfg, eval_every=qcfg.train_steps, eval_at_start=False)
    if token_budget:  # smaller folded passes: less memory, the same steps
        scfg = dataclasses.replace(scfg, token_budget=token_budget)

    def say(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    say(f"{len(subsets)} subsets of {k} rows: {', '.join(subsets)}")
    res = _downstream(cfg, scfg, model, tok, subsets, pool_enc, held_enc, say)
    out = {
        "run": run,
        "pool": qcfg.pool,
        "seed": qcfg.seed,
        "k": k,
        "seconds": res["seconds"],
        "final": res["final"],
        "corrupted_share": {n: float(corrupted[idx].mean()) for n, idx in subsets.items()},
        "subsets": subsets,
    }
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)
    say(f"done in {res['seconds']:.0f} s")
    return out


def summarise(results: list[dict]) -> dict:
    names = sorted({n for r in results for n in r["final"] if not n.startswith("random-")})
    rand = [[v for n, v in r["final"].items() if n.startswith("random-")] for r in results]
    r_mean = [float(np.mean(v)) for v in rand]
    r_sd = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in rand]
    spread = float(np.mean(r_sd))
    table = {}
    for n in names:
        have = [(r, m) for r, m in zip(results, r_mean, strict=True) if n in r["final"]]
        loss = [r["final"][n] for r, _ in have]
        excess = [r["final"][n] - m for r, m in have]
        table[n] = {
            "runs": len(have),
            "heldout_loss_mean": float(np.mean(loss)),
            "excess_over_random_mean": float(np.mean(excess)),
            "corrupted_share_mean": float(np.mean([r["corrupted_share"][n] for r, _ in have])),
            "passes_guard": bool(np.mean(excess) <= spread),
            "per_run": {f"{r['pool']}-seed{r['seed']}": r["final"][n] for r, _ in have},
        }
    return {
        "runs": [f"{r['pool']}-seed{r['seed']}" for r in results],
        "random_mean": float(np.mean(r_mean)),
        "random_sd_mean": spread,
        "random_per_run": {
            f"{r['pool']}-seed{r['seed']}": [m, s]
            for r, m, s in zip(results, r_mean, r_sd, strict=True)
        },
        "subsets": table,
    }


def markdown(summary: dict) -> str:
    lines = [
        f"Runs: {', '.join(summary['runs'])}. Random 10% subsets: mean held-out loss "
        f"{summary['random_mean']:.4f}, mean spread (sd over 3 random seeds) "
        f"{summary['random_sd_mean']:.4f}.",
        "",
        "| subset (top 10%) | runs | held-out loss, mean | minus random, mean | "
        "corrupted share | guard | per run |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for n, t in sorted(summary["subsets"].items(), key=lambda kv: kv[1]["heldout_loss_mean"]):
        per = "; ".join(f"{k}: {v:.4f}" for k, v in t["per_run"].items())
        lines.append(
            f"| {n} | {t['runs']} | {t['heldout_loss_mean']:.4f} | "
            f"{t['excess_over_random_mean']:+.4f} | {100 * t['corrupted_share_mean']:.1f}% | "
            f"{'passes' if t['passes_guard'] else 'fails'} | {per} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("roots", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--data", default="../shared/data/alpaca_9k.json")
    p.add_argument("--foreign", default="../shared/data/dolly_3k.json")
    p.add_argument(
        "--next",
        action="store_true",
        help="train the next candidates by AUROC (NEXT) instead of the first (CANDIDATES)",
    )
    p.add_argument("--token-budget", type=int, default=None, help="padded tokens per folded pass")
    p.add_argument(
        "--only",
        default=None,
        help="train only these candidates of the tier, e.g. snr_cv@S=0,paper@S=0 (CPU time)",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="only tabulate the runs already trained in OUT (no training)",
    )
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    runs = finished_runs(args.roots)
    if not runs:
        print("no finished G-SNR run with stored norms found", file=sys.stderr)
        return 2
    if args.summary_only:
        results = []
        for name in sorted(os.listdir(args.output)):
            if name.endswith(".json") and name != "downstream.json":
                with open(os.path.join(args.output, name), encoding="utf-8") as f:
                    results.append(json.load(f))
        if not results:
            print(f"no trained run in {args.output}", file=sys.stderr)
            return 2
    else:
        only = None
        if args.only:
            only = []
            for item in args.only.split(","):
                formula, _, steps = item.strip().partition("@S=")
                if not steps.isdigit():
                    p.error(f"--only: {item!r} is not FORMULA@S=STEPS")
                only.append((formula, int(steps)))
        results = [
            run_one(r, args.output, args.data, args.foreign, args.next, args.token_budget, only)
            for r in runs
        ]
    summary = summarise(results)
    with open(os.path.join(args.output, "downstream.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    md = markdown(summary)
    with open(os.path.join(args.output, "downstream.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
