"""Choose the G-SNR default from multi-seed corruption-benchmark runs, and study
the regime of the per-example norms, both from the stored trajectories alone.

    python benchmarks/quality/analyze.py RUN_DIR [RUN_DIR ...] -o OUT

Each RUN_DIR is a ``gradfilter quality-bench --seeds ...`` output folder whose
G-SNR runs recorded every epoch (``--snapshots all``).  Writes to OUT:

* ``candidates.md`` / ``candidates.json``: the mean AUROC (and spread over runs)
  of every (formula, S) candidate of ``docs/quality-criterion.md``, where the
  early point is the first epoch that starts at least S optimizer steps into
  training and the late point is the next epoch;
* ``regime.md`` / ``regime.json`` / ``regime.png``: quartiles of the per-example
  squared LoRA norm against the optimizer step of the visit, split by LoRA
  factor (A, B) and by clean / corrupted rows.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from gradfilter.bench.quality import auroc, corrupted_share_in_top
from gradfilter.method.gsnr import FORMULAS, GSNRConfig, gsnr_components
from gradfilter.run.score import read_norms

STEPS = (0, 50, 100, 200)


def seed_runs(root: str) -> list[str]:
    """The seed folders of a quality-bench output (or the folder itself)."""
    found = sorted(glob.glob(os.path.join(root, "seed-*")))
    return found or [root]


def finished_runs(roots: list[str]) -> list[str]:
    """The seed folders under ``roots`` whose G-SNR run stored its norms."""
    return [
        r
        for root in roots
        for r in seed_runs(root)
        if os.path.exists(os.path.join(r, "gsnr", "norms.npz"))
    ]


def kinds_of(run: str) -> list[str | None]:
    with open(os.path.join(run, "labels.jsonl"), encoding="utf-8") as f:
        return [json.loads(line).get("kind") for line in f]


def lengths_of(run: str, norms: dict) -> np.ndarray:
    """Every row's response tokens: from ``norms.npz`` (``rows``) or, for a norms file
    written before the rows' fields were stored in it, from ``gsnr/scores.jsonl``."""
    if "rows" in norms:
        rows = json.loads(str(norms["rows"]))
    else:
        with open(os.path.join(run, "gsnr", "scores.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    return np.array([r["n_response_tokens"] or 0 for r in rows], dtype=np.float64)


def load(run: str) -> tuple[dict, np.ndarray, int]:
    norms = read_norms(os.path.join(run, "gsnr"))
    norms["lengths"] = lengths_of(run, norms)
    with open(os.path.join(run, "labels.jsonl"), encoding="utf-8") as f:
        corrupted = np.array([json.loads(line)["corrupted"] for line in f], dtype=bool)
    with open(os.path.join(run, "gsnr", "run.json"), encoding="utf-8") as f:
        spe = json.load(f)["plan"]["schedule"]["steps_per_epoch"]
    return norms, corrupted, spe


def early_epoch(min_steps: int, steps_per_epoch: int, warmup: int = 0) -> int:
    """The first epoch (1-based) whose first step is at least ``min_steps``."""
    e = 1
    while warmup + (e - 1) * steps_per_epoch < min_steps:
        e += 1
    return e


#: Parts scored by the same rule, for comparison (higher = keep).
PARTS = {
    "low late norm": lambda es, ls: -ls.mean(1),
    "low early norm": lambda es, ls: -es.mean(1),
    "low late CV": lambda es, ls: -ls.std(1) / ls.mean(1),
}


def _per_kind(full: np.ndarray, corrupted: np.ndarray, kinds: list[str | None]) -> dict:
    """AUROC of clean rows against each corruption kind alone."""
    out = {}
    for k in sorted({x for x in kinds if x}):
        sel = np.array([x == k for x in kinds]) | ~corrupted
        out[k] = auroc(full[sel], corrupted[sel])
    return out


def candidates(runs: list[str]) -> dict:
    out: dict = {}
    for run in runs:
        norms, corrupted, spe = load(run)
        kinds = kinds_of(run)
        epochs = norms["epoch"].tolist()
        ok = norms["scored"]
        for s in STEPS:
            e = early_epoch(s, spe)
            if e + 1 not in epochs:
                continue
            es = norms["sq"][ok][:, :, epochs.index(e)]
            ls = norms["sq"][ok][:, :, epochs.index(e + 1)]
            n = norms["lengths"][ok]
            scores = {
                f: gsnr_components(es, ls, GSNRConfig(formula=f), n)["gsnr"] for f in FORMULAS
            }
            scores.update({name: fn(es, ls) for name, fn in PARTS.items()})
            for f, values in scores.items():
                full = np.full(len(corrupted), np.nan)
                full[ok] = values
                key = f"{f}@S={s}"
                rec = out.setdefault(key, {"formula": f, "S": s, "runs": []})
                rec["runs"].append(
                    {
                        "run": run,
                        "pool": len(corrupted),
                        "early": e,
                        "auroc": auroc(full, corrupted),
                        "by_kind": _per_kind(full, corrupted, kinds),
                        "top10": corrupted_share_in_top(full, corrupted, [0.1])[0.1],
                        "base": float(corrupted.mean()),
                    }
                )
    for rec in out.values():
        a = np.array([r["auroc"] for r in rec["runs"]])
        rec["auroc_mean"] = float(a.mean())
        rec["auroc_sd"] = float(a.std(ddof=1)) if a.size > 1 else 0.0
        rec["n"] = int(a.size)
        rec["top10_vs_base_mean"] = float(np.mean([r["top10"] / r["base"] for r in rec["runs"]]))
        kinds = sorted({k for r in rec["runs"] for k in r["by_kind"]})
        rec["by_kind_mean"] = {
            k: float(np.mean([r["by_kind"][k] for r in rec["runs"] if k in r["by_kind"]]))
            for k in kinds
        }
    return out


def growth(runs: list[str]) -> dict:
    """Per epoch: the median over rows of the members' mean squared norm divided by
    the row's own epoch-1 value (so row length and content cancel), clean and
    corrupted, and the median share of the lora_A factor in the squared norm."""
    out: dict = {}
    for run in runs:
        norms, corrupted, spe = load(run)
        ok = norms["scored"]
        sq = norms["sq"][ok]
        cor = corrupted[ok]
        mean = sq.mean(1)  # [rows, checkpoints]
        ratio = mean / mean[:, :1]
        share = np.nanmedian(
            (norms["sq_a"][ok] / sq).reshape(len(ok), -1, sq.shape[2]), axis=(0, 1)
        )
        rows = []
        for c, e in enumerate(norms["epoch"].tolist()):
            rows.append(
                {
                    "epoch": e,
                    "steps": f"{(e - 1) * spe}-{e * spe}",
                    "clean": float(np.nanmedian(ratio[~cor, c])),
                    "corrupted": float(np.nanmedian(ratio[cor, c])),
                    "clean_q": [float(x) for x in np.nanquantile(ratio[~cor, c], [0.25, 0.75])],
                    "a_share": float(share[c]),
                }
            )
        out[run] = {"pool": len(corrupted), "steps_per_epoch": spe, "epochs": rows}
    return out


def regime(runs: list[str], bins: int = 12) -> dict:
    """Quartiles of the squared norm (total, A share, B share) by step bin, clean vs
    corrupted, pooled over the runs of one pool size."""
    rows = []
    for run in runs:
        norms, corrupted, _ = load(run)
        ok = norms["scored"]
        vs = norms["visit_step"][ok]
        for part in ("sq", "sq_a", "sq_b"):
            x = norms[part][ok]
            for group, mask in (("clean", ~corrupted[ok]), ("corrupted", corrupted[ok])):
                rows.append((run, part, group, vs[mask].ravel(), x[mask].ravel()))
    top = max(int(r[3].max()) for r in rows) + 1
    edges = np.linspace(0, top, bins + 1).astype(int)
    out: dict = {"edges": edges.tolist(), "series": {}}
    for part in ("sq", "sq_a", "sq_b"):
        for group in ("clean", "corrupted"):
            steps = np.concatenate([r[3] for r in rows if r[1] == part and r[2] == group])
            vals = np.concatenate([r[4] for r in rows if r[1] == part and r[2] == group])
            series = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=False):
                v = vals[(steps >= lo) & (steps < hi) & np.isfinite(vals)]
                if v.size:
                    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
                    series.append(
                        {
                            "from": int(lo),
                            "to": int(hi),
                            "n": int(v.size),
                            "q1": float(q1),
                            "median": float(med),
                            "q3": float(q3),
                        }
                    )
            out["series"][f"{part}/{group}"] = series
    return out


def plot_regime(reg: dict, path: str, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"sq": "-", "sq_a": "--", "sq_b": ":"}
    colors = {"clean": "tab:blue", "corrupted": "tab:red"}
    for key, series in reg["series"].items():
        part, group = key.split("/")
        x = [(s["from"] + s["to"]) / 2 for s in series]
        ax.plot(
            x,
            [s["median"] for s in series],
            styles[part],
            color=colors[group],
            label=f"{ {'sq': 'total', 'sq_a': 'A', 'sq_b': 'B'}[part] } ({group})",
        )
        if part == "sq":
            ax.fill_between(
                x,
                [s["q1"] for s in series],
                [s["q3"] for s in series],
                color=colors[group],
                alpha=0.12,
            )
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step of the visit")
    ax.set_ylabel("per-example squared LoRA gradient norm")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("roots", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    runs = finished_runs(args.roots)
    if not runs:
        print("no finished G-SNR run with stored norms found", file=sys.stderr)
        return 2
    cand = candidates(runs)
    with open(os.path.join(args.output, "candidates.json"), "w", encoding="utf-8") as f:
        json.dump(cand, f, indent=2)
    lines = [
        "| formula | S (steps before the early point) | mean AUROC ± sd | runs | "
        "top-10% corrupted share / pool share | per run (pool: AUROC, early epoch) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for key in sorted(cand, key=lambda k: -cand[k]["auroc_mean"]):
        c = cand[key]
        per = "; ".join(f"{r['pool']}: {r['auroc']:.3f} (e{r['early']})" for r in c["runs"])
        lines.append(
            f"| {c['formula']} | {c['S']} | {c['auroc_mean']:.3f} ± {c['auroc_sd']:.3f} | "
            f"{c['n']} | {c['top10_vs_base_mean']:.2f} | {per} |"
        )
    kinds = sorted({k for c in cand.values() for k in c["by_kind_mean"]})
    lines += [
        "",
        "AUROC of clean rows against each corruption kind alone (mean over runs):",
        "",
        "| candidate | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for key in sorted(cand, key=lambda k: -cand[k]["auroc_mean"]):
        lines.append(
            f"| {key} | "
            + " | ".join(f"{cand[key]['by_kind_mean'].get(k, float('nan')):.2f}" for k in kinds)
            + " |"
        )
    with open(os.path.join(args.output, "candidates.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    by_pool: dict[int, list[str]] = {}
    for r in runs:
        by_pool.setdefault(len(load(r)[1]), []).append(r)
    regimes = {}
    for pool, rs in sorted(by_pool.items()):
        reg = regime(rs)
        regimes[pool] = reg
        plot_regime(
            reg,
            os.path.join(args.output, f"regime-{pool}.png"),
            f"{pool} rows, {len(rs)} seed(s): median and quartiles by step",
        )
    with open(os.path.join(args.output, "regime.json"), "w", encoding="utf-8") as f:
        json.dump(regimes, f, indent=2)
    grow = growth(runs)
    with open(os.path.join(args.output, "growth.json"), "w", encoding="utf-8") as f:
        json.dump(grow, f, indent=2)
    md = [
        "Growth of each row's squared norm (members' mean) relative to its own epoch-1 value, "
        "median over rows [quartiles for clean rows], and the median share of lora_A:",
        "",
    ]
    for run, g in grow.items():
        md += [
            f"#### {run} ({g['pool']} rows, {g['steps_per_epoch']} steps per epoch)",
            "",
            "| epoch | steps | clean | corrupted | lora_A share |",
            "|---|---|---|---|---|",
        ]
        for r in g["epochs"]:
            md.append(
                f"| {r['epoch']} | {r['steps']} | {r['clean']:.2f} [{r['clean_q'][0]:.2f}, "
                f"{r['clean_q'][1]:.2f}] | {r['corrupted']:.2f} | {r['a_share']:.3f} |"
            )
        md.append("")
    md += [
        "Quartiles of the squared norm by the optimizer step of the visit (rows of similar "
        "length train together, so neighbouring bins differ in length as well as in time):",
        "",
    ]
    for pool, reg in regimes.items():
        md += [
            f"### {pool} rows",
            "",
            "| steps | total clean | total corrupted | A clean | B clean |",
            "|---|---|---|---|---|",
        ]
        ser = reg["series"]
        for i, s in enumerate(ser["sq/clean"]):

            def q(key, i=i, ser=ser):
                v = ser[key][i] if i < len(ser[key]) else None
                return "n/a" if v is None else f"{v['median']:.3g} [{v['q1']:.3g}, {v['q3']:.3g}]"

            md.append(
                f"| {s['from']}-{s['to']} | {q('sq/clean')} | {q('sq/corrupted')} | "
                f"{q('sq_a/clean')} | {q('sq_b/clean')} |"
            )
        md.append("")
    with open(os.path.join(args.output, "regime.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
