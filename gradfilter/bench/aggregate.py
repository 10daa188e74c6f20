"""Multi-seed runs of the selection-quality benchmark and their aggregate.

:func:`run_seeds` runs :func:`gradfilter.bench.quality_bench.run` once per seed
in ``OUTDIR/seed-<s>``; :func:`aggregate` reduces the per-seed results to the
mean, standard deviation and range of each method's numbers, and
:func:`aggregate_markdown` renders them as a table.  The names are re-exported
by :mod:`gradfilter.bench.quality_bench`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gradfilter.bench.quality_bench import QualityConfig

__all__ = ["aggregate", "aggregate_markdown", "run_seeds"]


def run_seeds(
    cfg: QualityConfig, score_cfg: Any, outdir: str, seeds: Sequence[int], **kwargs: Any
) -> dict[str, Any]:
    """:func:`run` once per seed (pool, corruption, ensemble and downstream seeds all
    follow it) in ``OUTDIR/seed-<s>``; a seed whose ``results.json`` exists is read,
    not run again.  Writes and returns the aggregate over seeds."""
    from gradfilter.bench.quality_bench import run

    say = kwargs.get("log") or (lambda s: print(s, file=sys.stderr))
    per_seed: dict[int, dict[str, Any]] = {}
    for s in seeds:
        folder = os.path.join(outdir, f"seed-{s}")
        path = os.path.join(folder, "results.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                per_seed[s] = json.load(f)
            say(f"seed {s}: results found in {folder}")
            continue
        say(f"seed {s}: running in {folder}")
        per_seed[s] = run(
            dataclasses.replace(cfg, seed=s),
            dataclasses.replace(score_cfg, seed=s),
            folder,
            **kwargs,
        )
    agg = aggregate(per_seed)
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "aggregate.json"), "w", encoding="utf-8") as f:
        json.dump(agg, f, indent=2)
    with open(os.path.join(outdir, "aggregate.md"), "w", encoding="utf-8") as f:
        f.write(aggregate_markdown(agg))
    return agg


def _stats(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if a.size == 0:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "mean": float(a.mean()),
        "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over seeds of each method's AUROC,
    corrupted shares of the top 5 / 10 / 15 % and (when run) final held-out loss.
    ``base_rate`` is the pool's corrupted share; ``top10_vs_base`` its ratio."""
    methods: list[str] = []
    for res in per_seed.values():
        for row in res["detection"]:
            if row["method"] not in methods:
                methods.append(row["method"])
    out: dict[str, Any] = {"seeds": sorted(per_seed), "methods": {}}
    base = [r["corrupted_rows"] / r["config"]["pool"] for r in per_seed.values()]
    out["base_rate"] = _stats(base)
    for m in methods:
        rows = [
            next((r for r in res["detection"] if r["method"] == m), None)
            for res in per_seed.values()
        ]
        entry = {
            k: _stats([r[k] if r else math.nan for r in rows])
            for k in ("auroc", "top5", "top10", "top15")
        }
        entry["top10_vs_base"] = _stats(
            [(r["top10"] / b) if r else math.nan for r, b in zip(rows, base, strict=False)]
        )
        finals = [res.get("downstream", {}).get("final", {}).get(m) for res in per_seed.values()]
        if any(f is not None for f in finals):
            entry["heldout_loss"] = _stats([math.nan if f is None else f for f in finals])
        out["methods"][m] = entry
    randoms = [
        v
        for res in per_seed.values()
        for n, v in res.get("downstream", {}).get("final", {}).items()
        if n.startswith("random-")
    ]
    if randoms:
        out["random_subsets_heldout_loss"] = _stats(randoms)
    return out


def aggregate_markdown(agg: dict[str, Any]) -> str:
    def ms(st: dict[str, float], pct: bool = False) -> str:
        if not st or st["n"] == 0:
            return "n/a"
        f = 100.0 if pct else 1.0
        unit = "%" if pct else ""
        d = 1 if pct else 3
        return (
            f"{f * st['mean']:.{d}f}{unit} ± {f * st['sd']:.{d}f} "
            f"[{f * st['min']:.{d}f}, {f * st['max']:.{d}f}]"
        )

    lines = [
        f"Seeds: {agg['seeds']}; pool corrupted share {ms(agg['base_rate'], True)} "
        "(mean ± sd [min, max] over seeds).",
        "",
        "| method | AUROC | corrupted in top 10% | top-10% share / pool share | held-out loss |",
        "|---|---|---|---|---|",
    ]
    order = sorted(agg["methods"], key=lambda m: -agg["methods"][m]["auroc"]["mean"])
    for m in order:
        e = agg["methods"][m]
        lines.append(
            f"| {m} | {ms(e['auroc'])} | {ms(e['top10'], True)} | "
            f"{ms(e['top10_vs_base'])} | {ms(e.get('heldout_loss', {}))} |"
        )
    if "random_subsets_heldout_loss" in agg:
        lines += [
            "",
            "Held-out loss of the random subsets (all seeds): "
            + ms(agg["random_subsets_heldout_loss"]),
        ]
    return "\n".join(lines) + "\n"
