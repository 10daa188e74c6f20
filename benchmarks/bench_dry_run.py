"""A dry run over a large synthetic corpus: rows, tokens and planned work, with the
peak resident set of the process (not a timed test).

    python benchmarks/bench_dry_run.py [--rows 5000000] [--out results.json]

Writes (once) a JSON Lines file of short Alpaca rows, then runs
``gradfilter score FILE --dry-run`` in a fresh process on the default proxy in
bfloat16 and records its wall time, its peak resident set (``ru_maxrss`` of the
child) and the plan it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def write_rows(path: str, n: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 9973, i % 97
            f.write(
                json.dumps(
                    {
                        "instruction": f"Add {a} and {b}, then say whether the sum is even.",
                        "input": "" if i % 3 else f"Row {i}.",
                        "output": f"{a} + {b} = {a + b}, which is "
                        + ("even." if (a + b) % 2 == 0 else "odd."),
                    }
                )
                + "\n"
            )
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--data", default=None, help="the corpus file (default: in /tmp)")
    p.add_argument("--out", default="benchmarks/results/cpu-2core-dry-run.json")
    args = p.parse_args(argv)
    data = args.data or f"/tmp/gradfilter-dry-run-{args.rows}.jsonl"
    if not os.path.exists(data):
        t = time.perf_counter()
        write_rows(data, args.rows)
        print(f"wrote {args.rows} rows to {data} in {time.perf_counter() - t:.0f} s")
    cmd = [sys.executable, "-m", "gradfilter", "score", data, "--dry-run", "--dtype", "bfloat16"]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if out.returncode != 0:
        print(out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    plan = json.loads(out.stdout[out.stdout.index("{") :])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": args.rows,
        "file_bytes": os.path.getsize(data),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "plan": plan,
        "command": " ".join(cmd[1:]),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "plan"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
