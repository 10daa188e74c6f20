"""Render pytest-benchmark JSON results as the README's markdown tables.

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...]
    python benchmarks/report.py --targets benchmarks/results/cpu*.json
    python benchmarks/report.py --stat min ...   # the fastest round instead of the median

Per group (one case), every provider's time, its ratio to gradfilter (> 1:
gradfilter is faster; for ensembles the ratio to the folded pass) and, for
model-level cases, the time over a plain LoRA forward + backward (from the
separate tests' times, and paired: the median over rounds of the provider's
time / a plain step run just before it) and the peak memory of one call
(``peak_delta_mib``: above what was in use before the call) with its ratio
to the plain step's.  ``--targets`` prints instead one row per performance
target with the measured value and whether it is met (model-level overheads
from the paired ratio where the JSON has it).
The machine and versions come from the JSON itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

TARGET_LAYER_OPACUS = (
    10.0  # gradfilter at least this much faster than Opacus ghost norm (T=512, r=8)
)
TARGET_LAYER_MATERIALISE = 1.5  # ... and than materialise-then-norm
TARGET_OVERHEAD_T512 = 0.05  # model-level time over the plain step at T=512
TARGET_PEAK = 1.1  # model-level peak memory / the plain step's
TARGET_ENSEMBLE_TINY = (
    1.3  # sequential / folded, ensemble of 5, where per-operation overhead dominates
)
BASELINES = ("opacus", "opacus-ghost", "torch.func")  # the per-example loop is shown, not a target


def _provider(b: dict) -> str:
    extra = b.get("extra_info", {})
    provider = extra.get("provider", b["name"])
    if provider == "gradfilter" and extra.get("backend", "reference") not in (
        "reference",
        "triton",
    ):
        provider = f"gradfilter-{extra['backend']}"
    return provider


def load(paths: list[str], stat: str = "median") -> list[tuple[str, dict, dict]]:
    """``[(path, json data, {group: {provider: {"t": seconds, **extra_info}}})]``."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        groups: dict[str, dict[str, dict]] = defaultdict(dict)
        for b in data["benchmarks"]:
            groups[b["group"]][_provider(b)] = {"t": b["stats"][stat], **b.get("extra_info", {})}
        out.append((path, data, groups))
    return out


def _header(path: str, data: dict) -> str:
    mi = data.get("machine_info", {})
    cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
    first = (data.get("benchmarks") or [{}])[0].get("extra_info", {})
    torch_v = f", torch {first['torch']}" if "torch" in first else ""
    threads = f", {first['threads']} thread(s)" if "threads" in first else ""
    return (
        f"Results from `{os.path.basename(path)}`: {cpu}, {mi.get('system', '')} "
        f"{mi.get('release', '')}, Python {mi.get('python_version', '?')}{torch_v}{threads}, "
        f"commit {data.get('commit_info', {}).get('id', '?')[:10]}, {data.get('datetime', '')}"
    )


def render(paths: list[str], stat: str = "median") -> str:
    out = []
    for path, data, groups in load(paths, stat):
        out.append(_header(path, data))
        out.append("")
        out.append(
            f"| case | provider | {stat} (ms) | time / gradfilter's | time over the plain step "
            "| paired: time over the plain step | peak memory (MiB above before the call) "
            "| peak / plain step's |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        for group, rows in groups.items():
            base = (rows.get("gradfilter") or rows.get("folded") or {}).get("t")
            plain = rows.get("plain-step", {})
            for provider, row in sorted(rows.items(), key=lambda kv: kv[1]["t"]):
                t = row["t"]
                ratio = f"{t / base:.2f}x" if base else "-"
                over = (
                    f"{100 * (t / plain['t'] - 1):+.1f}%"
                    if plain and provider != "plain-step"
                    else ""
                )
                peak = row.get("peak_delta_mib")
                peak_s = f"{peak:.0f}" if peak is not None else ""
                peak_r = (
                    f"{peak / plain['peak_delta_mib']:.2f}x"
                    if peak is not None and plain.get("peak_delta_mib")
                    else ""
                )
                paired = row.get("paired_ratio_median")
                paired_s = f"{100 * (paired - 1):+.1f}%" if paired is not None else ""
                out.append(
                    f"| {group} | {provider} | {1000 * t:.1f} | {ratio} | {over} | {paired_s} "
                    f"| {peak_s} | {peak_r} |"
                )
        out.append("")
    return "\n".join(out)


def _t_of(group: str) -> int | None:
    m = re.search(r"\bT=(\d+)", group)
    return int(m.group(1)) if m else None


def targets(paths: list[str], stat: str = "median") -> str:
    """One row per target and case: the measured value and met / missed."""
    rows = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    for path, _, groups in load(paths, stat):
        src = os.path.basename(path)
        for group, g in groups.items():
            level = next(iter(g.values())).get("level")
            gf = g.get("gradfilter")
            if level == "layer" and gf and " r=8 " in group + " " and _t_of(group) == 512:
                for other, goal in (
                    ("opacus-ghost", TARGET_LAYER_OPACUS),
                    ("materialise", TARGET_LAYER_MATERIALISE),
                ):
                    if other in g:
                        x = g[other]["t"] / gf["t"]
                        rows.append(
                            (
                                f"layer: faster than {other} by >= {goal:g}x",
                                group,
                                f"{x:.2f}x",
                                verdict(x >= goal),
                                src,
                            )
                        )
            elif level == "model" and gf and "plain-step" in g:
                plain = g["plain-step"]

                def overhead(row: dict, plain: dict = plain) -> float:
                    # the paired measure when there is one (robust to load drift between tests)
                    paired = row.get("paired_ratio_median")
                    return (paired if paired is not None else row["t"] / plain["t"]) - 1

                over = overhead(gf)
                seq = _t_of(group)
                if seq == 512:
                    rows.append(
                        (
                            f"model: time over the plain step <= {100 * TARGET_OVERHEAD_T512:g}%",
                            group,
                            f"{100 * over:+.1f}%",
                            verdict(over <= TARGET_OVERHEAD_T512),
                            src,
                        )
                    )
                others = {p: overhead(g[p]) for p in BASELINES if p in g}
                if others:
                    best = min(others, key=others.get)
                    at_target = bool(seq and seq >= 1024)
                    rows.append(
                        (
                            "model: less time over the plain step than every baseline"
                            + ("" if at_target else " (set at T=1024; shown for reference)"),
                            group,
                            f"{100 * over:+.1f}% vs {best} {100 * others[best]:+.1f}%",
                            verdict(over < others[best])
                            if at_target
                            else ("lower" if over < others[best] else "not lower"),
                            src,
                        )
                    )
                if gf.get("peak_delta_mib") is not None and plain.get("peak_delta_mib"):
                    pr = gf["peak_delta_mib"] / plain["peak_delta_mib"]
                    rows.append(
                        (
                            f"model: peak memory <= {TARGET_PEAK:g}x the plain step's",
                            group,
                            f"{pr:.2f}x ({gf['peak_delta_mib']:.0f} / "
                            f"{plain['peak_delta_mib']:.0f} MiB)",
                            verdict(pr <= TARGET_PEAK),
                            src,
                        )
                    )
            elif level == "ensemble" and "folded" in g and "sequential" in g:
                x = g["sequential"]["t"] / g["folded"]["t"]
                goal = (
                    TARGET_ENSEMBLE_TINY
                    if g["folded"].get("size") == "tiny" and g["folded"].get("M") == 5
                    else 1.0
                )
                rows.append(
                    (
                        f"ensemble: sequential / folded >= {goal:g}x",
                        group,
                        f"{x:.2f}x",
                        verdict(x >= goal),
                        src,
                    )
                )
    out = [f"| target | case | measured ({stat}) | verdict | file |", "|---|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", nargs="+")
    ap.add_argument(
        "--targets", action="store_true", help="the per-target summary instead of the tables"
    )
    ap.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    args = ap.parse_args()
    print(targets(args.paths, args.stat) if args.targets else render(args.paths, args.stat))
