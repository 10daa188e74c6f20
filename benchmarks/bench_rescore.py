"""Time ``gradfilter rescore`` on a finished run of 100,000 rows x 5 members x 4
checkpoints (target: under 5 s).

    python benchmarks/bench_rescore.py [--rows 100000] [--members 5] [--checkpoints 4]

The run folder is synthetic (random squared norms in the layout that ``score``
writes: scores.jsonl, run.json, norms.npz); rescore itself is the real code.
Prints the seconds of each of three rescores and whether the bytes of a rescore
with the run's own settings equal the written scores.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

from gradfilter.run.config import ScoreConfig
from gradfilter.run.records import build_records, write_norms, write_outputs
from gradfilter.run.score import rescore


def make_run(outdir: str, rows: int, members: int, checkpoints: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    sq = rng.lognormal(0.0, 1.0, size=(rows, members, checkpoints))
    config = ScoreConfig(
        epochs=checkpoints,
        early=1,
        late=2,
        snapshots=list(range(1, checkpoints + 1)),
        norms="inflight",
    )
    meta = [
        {
            "index": i,
            "id": str(i),
            "status": "ok",
            "n_tokens": 100,
            "n_response_tokens": 40,
            "truncated": False,
        }
        for i in range(rows)
    ]
    ok = list(range(rows))
    records = build_records(meta, ok, config, early_sq=sq[:, :, 0], late_sq=sq[:, :, 1])
    run = {"config": dataclasses.asdict(config), "method": "gsnr", "source": {}}
    write_outputs(outdir, records, run)
    traj = {
        "sq": sq,
        "sq_a": sq / 2,
        "sq_b": sq / 2,
        "visit_step": np.zeros(sq.shape, dtype=np.int64),
    }
    write_norms(
        outdir,
        traj,
        ok,
        meta,
        list(range(1, checkpoints + 1)),
        [100 * e for e in range(1, checkpoints + 1)],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--checkpoints", type=int, default=4)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        t = time.perf_counter()
        make_run(run_dir, args.rows, args.members, args.checkpoints)
        print(f"built the run folder in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        times = {}
        for name, kw in (
            ("same settings", {}),
            ("formula log_cv, epochs 3/4", {"formula": "log_cv", "early": 3, "late": 4}),
            ("formula rank, epochs 2/3", {"formula": "rank", "early": 2, "late": 3}),
            ("formula log_cv, no plots", {"formula": "log_cv", "plots": False}),
        ):
            out = os.path.join(tmp, name.split(",")[0].replace(" ", "-"))
            t = time.perf_counter()
            rescore(run_dir, output=out, **kw)
            times[name] = time.perf_counter() - t
        with (
            open(os.path.join(run_dir, "scores.jsonl"), "rb") as a,
            open(os.path.join(tmp, "same-settings", "scores.jsonl"), "rb") as b,
        ):
            identical = a.read() == b.read()
    print(
        json.dumps(
            {
                "rows": args.rows,
                "members": args.members,
                "checkpoints": args.checkpoints,
                "seconds": times,
                "identical_bytes_with_same_settings": identical,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
