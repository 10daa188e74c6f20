"""Host memory of a real scoring run against the number of rows, with the rows
held in memory and streamed into a row store (``--stream``); not a timed test.

    python benchmarks/bench_stream.py [--rows 5000,20000] [--members 3]
        [--out benchmarks/results/cpu-2core-stream.json]

For each row count it writes a JSON Lines file of short Alpaca rows (a sum and
its answer, with a sentence of padding text), and scores it in a fresh process
twice: whole, then ``stream=True``, on the tiny GPT-2 proxy
(:func:`gradfilter.io.models.tiny_gpt2`) so that the rows, not the model,
dominate, and with records written 2,048 at a time (as rows are read), so that
what grows with the corpus shows above the chunks' fixed cost from a few
thousand rows on.  Each run reports the growth of its peak resident set (``VmHWM``)
over the process after loading the proxy, its wall time, and a hash of its
``scores.jsonl``; the two modes must write the same file.  The result is the
peak growth per row of each mode (the slope between the row counts, so
fixed costs cancel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap

import torch

CHILD = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
    from gradfilter.run import records, store
    from gradfilter.run.score import ScoreConfig, score

    records.Records.CHUNK = store.CHUNK_ROWS = 2048  # chunked costs: constant from here on

    path, out, stream, members = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
    proxy = (tiny_gpt2(seed=0, n_positions=128), tiny_tokenizer())

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = hwm()
    t = time.perf_counter()
    cfg = ScoreConfig(members=members, rank=4, alpha=8, batch_size=16, max_length=96,
                      norms="inflight", token_budget=4096, checkpoint_seconds=600)
    score(path, out, cfg, progress=False, model_and_tokenizer=proxy, stream=stream,
          log=lambda s: None)
    wall = time.perf_counter() - t
    with open(os.path.join(out, "scores.jsonl"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    print(json.dumps({"grew": hwm() - before, "wall_s": wall, "scores_sha": digest}))
    """
)


def write_rows(path: str, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            row = {
                "instruction": f"Add {i} and {i % 97}. Explain the steps briefly.",
                "input": "",
                "output": f"First take {i}, then add {i % 97}: the sum is {i + i % 97}.",
            }
            f.write(json.dumps(row) + "\n")


def run(path: str, out: str, stream: bool, members: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, path, out, "1" if stream else "0", str(members)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="5000,20000")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/cpu-2core-stream.json")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.rows.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = os.path.join(tmp, f"rows-{n}.jsonl")
            write_rows(path, n)
            entry = {"rows": n, "file_bytes": os.path.getsize(path)}
            for mode, stream in (("whole", False), ("stream", True)):
                got = run(path, os.path.join(tmp, f"out-{mode}-{n}"), stream, args.members)
                entry[mode] = got
                print(n, mode, got, flush=True)
            entry["same_scores"] = entry["whole"]["scores_sha"] == entry["stream"]["scores_sha"]
            results.append(entry)
    slopes = {}
    if len(results) >= 2:
        a, b = results[0], results[-1]
        for mode in ("whole", "stream"):
            slopes[mode] = (b[mode]["grew"] - a[mode]["grew"]) / (b["rows"] - a["rows"])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "members": args.members,
        "results": results,
        "peak_bytes_per_row": {k: round(v, 1) for k, v in slopes.items()},
        "git": _git(),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


def _git() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
