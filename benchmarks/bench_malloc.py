"""What glibc's handling of freed memory costs a scoring run: time against peak
host memory, ``--host-memory lean`` against ``fast`` (not a timed test).

    python benchmarks/bench_malloc.py [--rows 24] [--dtype bfloat16] [--budget 2048]
        [--out benchmarks/results/cpu-2core-malloc.json]

A lean run sets glibc's mmap threshold to 1 MiB (``gradfilter.run.budget.
set_host_memory``): every tensor of 1 MiB or more is mapped on its own and
unmapped when freed, so memory freed by one pass is not kept resident by the
next; but each new large tensor then costs page faults (the kernel zeroes its
pages) where a reused heap block costs none.  A fast run leaves glibc's own
behaviour.  This benchmark runs the default scoring run (SmolLM2-135M, 5
members, 2 epochs, snapshot norms, max length 256, token budget ``--budget``)
on ``--rows`` Alpaca rows in a fresh process for each setting and reports
wall time, peak resident set (``VmHWM``), system CPU time (page faults are spent
there) and a hash of ``scores.jsonl`` (the same in both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import hashlib, json, os, resource, sys, tempfile, time
    import torch
    from gradfilter.io.models import load_proxy
    from gradfilter.run.score import ScoreConfig, score

    data, n, dtype, budget, mode = sys.argv[1:6]
    n, budget = int(n), int(budget)
    with open(data, encoding="utf-8") as f:
        rows = json.load(f)[:n]
    proxy = load_proxy(None, dtype=getattr(torch, dtype))
    cfg = ScoreConfig(dtype=dtype, max_length=256, token_budget=budget, host_memory=mode)
    with tempfile.TemporaryDirectory() as out:
        t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        res = score(rows, out, cfg, progress=False, log=lambda s: None,
                    model_and_tokenizer=proxy)
        wall, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        with open(os.path.join(out, "scores.jsonl"), "rb") as f:
            sha = hashlib.sha256(f.read()).hexdigest()[:16]
    with open("/proc/self/status") as f:
        hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
    print(json.dumps({
        "wall_s": round(wall, 2),
        "user_s": round(r1.ru_utime - r0.ru_utime, 2),
        "system_s": round(r1.ru_stime - r0.ru_stime, 2),
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
        "peak_rss_gib": round(hwm / 2**30, 3),
        "tokens_per_second": round(res.run["tokens_per_second"], 1),
        "scores_sha": sha,
    }))
    """
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=24)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "alpaca_9k.json"))
    p.add_argument("--out", default="benchmarks/results/cpu-2core-malloc.json")
    args = p.parse_args(argv)
    results = {}
    for mode in ("lean", "fast"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("GRADFILTER_MALLOC_TUNING", None)
        cmd = [sys.executable, "-c", CHILD, args.data, str(args.rows), args.dtype]
        done = subprocess.run(
            [*cmd, str(args.budget), mode],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-4000:])
        results[mode] = got = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, got, flush=True)
    t, g = results["lean"], results["fast"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": vars(args),
        "results": results,
        "fast_speedup": round(t["wall_s"] / g["wall_s"], 3),
        "fast_peak_ratio": round(g["peak_rss_gib"] / t["peak_rss_gib"], 3),
        "same_scores": t["scores_sha"] == g["scores_sha"],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
