"""Render pytest-benchmark JSON results as the README's markdown tables.

    python benchmarks/report.py benchmarks/results/cpu.json [more.json ...]

Per group (one case), every provider's median time, its ratio to gradfilter
(> 1: gradfilter is faster) and, for model-level cases, gradfilter's overhead
over a plain LoRA forward + backward.  The machine and versions come from the
JSON itself.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict


def render(paths: list[str]) -> str:
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        mi = data.get("machine_info", {})
        cpu = mi.get("cpu", {}).get("brand_raw", mi.get("processor", "?"))
        out.append(f"Results from `{os.path.basename(path)}`: {cpu}, {mi.get('system', '')} "
                   f"{mi.get('release', '')}, Python {mi.get('python_version', '?')}, "
                   f"commit {data.get('commit_info', {}).get('id', '?')[:10]}, {data.get('datetime', '')}")
        groups: dict[str, dict[str, float]] = defaultdict(dict)
        for b in data["benchmarks"]:
            extra = b.get("extra_info", {})
            provider = extra.get("provider", b["name"])
            if provider == "gradfilter" and extra.get("backend", "reference") != "reference":
                provider = f"gradfilter-{extra['backend']}"
            groups[b["group"]][provider] = b["stats"]["median"]
        out.append("")
        out.append("| case | provider | median (ms) | time / gradfilter's | note |")
        out.append("|---|---|---|---|---|")
        for group, times in groups.items():
            base = times.get("gradfilter") or times.get("folded")
            plain = times.get("plain-step")
            for provider, t in sorted(times.items(), key=lambda kv: kv[1]):
                ratio = f"{t / base:.2f}x" if base else "-"
                note = ""
                if provider == "gradfilter" and plain:
                    note = f"overhead over the plain step: {100 * (t / plain - 1):+.1f}%"
                out.append(f"| {group} | {provider} | {1000 * t:.1f} | {ratio} | {note} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(render(sys.argv[1:]))
