"""Frozen-prefix cache on the real proxy: a G-SNR scoring run, cache off vs on.

SmolLM2-135M-Instruct (30 decoder layers), adapters on layers 15..29
(``lora_layers_from=15``), the same rows and settings in both runs; the only
difference is ``prefix_cache``.  The runs alternate (off, on, off, on, ...) so
that a changing load on a shared machine hits both alike.  Writes JSON with
the timings, their ratios, the agreement of the two runs' squared norms, the
machine, the load average around each run, versions and the git revision.

    python benchmarks/bench_prefix.py --rows 16 -o benchmarks/results/prefix-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch


def _git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _squared_norms(records: list[dict]) -> np.ndarray:
    return np.array(
        [r["early_sq"] + r["late_sq"] for r in records if r["status"] == "ok"], dtype=float
    )


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=os.path.join(here, "..", "..", "shared", "data", "alpaca_9k.json")
    )
    p.add_argument("--rows", type=int, default=16, help="the first N rows of --data")
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--layers-from", type=int, default=15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2, help="off/on pairs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("-o", "--output", default=os.path.join(here, "results", "prefix-cpu.json"))
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from gradfilter.io.models import load_proxy
    from gradfilter.run.score import ScoreConfig, _versions, score

    with open(args.data, encoding="utf-8") as f:
        rows = json.load(f)[: args.rows]
    model, tok = load_proxy(None, dtype=getattr(torch, args.dtype))
    n_layers = model.config.num_hidden_layers

    def config_for(cached: bool) -> ScoreConfig:
        return ScoreConfig(
            members=args.members,
            batch_size=args.batch_size,
            max_length=args.max_length,
            epochs=args.epochs,
            dtype=args.dtype,
            lora_layers_from=args.layers_from,
            prefix_cache=cached,
        )

    # Untimed warm-up of both paths (first-call allocations and library set-up).
    for cached in (False, True):
        score(
            rows[:2],
            None,
            config_for(cached),
            progress=False,
            model_and_tokenizer=(model, tok),
            log=lambda s: None,
        )

    runs = []
    for rep in range(args.repeats):
        for cached in (False, True):
            config = config_for(cached)
            load_before = os.getloadavg()
            t0 = time.perf_counter()
            result = score(
                rows,
                None,
                config,
                progress=False,
                model_and_tokenizer=(model, tok),
                log=lambda s: None,
            )
            wall = time.perf_counter() - t0
            run = result.run
            entry = {
                "repeat": rep,
                "prefix_cache": cached,
                "wall_s": wall,
                "train_s": run["timings"]["train_s"],
                "snapshot_s": run["timings"]["snapshot_s"],
                "tokens_per_second": run["tokens_per_second"],
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "prefix_cache_info": run.get("prefix_cache"),
                "sq": _squared_norms(result.records),
            }
            runs.append(entry)
            print(
                f"repeat {rep} cache {'on ' if cached else 'off'}: wall {wall:.1f} s "
                f"(train {entry['train_s']:.1f} s, snapshots {entry['snapshot_s']:.1f} s), "
                f"load {load_before[0]:.1f} -> {entry['loadavg_after'][0]:.1f}",
                flush=True,
            )

    def total(cached: bool, key: str) -> float:
        return sum(r[key] for r in runs if r["prefix_cache"] is cached)

    ref = runs[0]["sq"]
    rel = max(float(np.max(np.abs(r["sq"] - ref) / np.maximum(np.abs(ref), 1e-30))) for r in runs)
    summary = {
        key: {
            "off": total(False, key),
            "on": total(True, key),
            "speedup": total(False, key) / max(total(True, key), 1e-9),
        }
        for key in ("wall_s", "train_s", "snapshot_s")
    }
    out = {
        "what": "G-SNR scoring run (train epochs + early/late norm snapshots), "
        "prefix cache off vs on",
        "model": "SmolLM2-135M-Instruct (offline GGUF)",
        "decoder_layers": n_layers,
        "settings": {
            "rows": len(rows),
            "members": args.members,
            "rank": 8,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "epochs": args.epochs,
            "dtype": args.dtype,
            "lora_layers_from": args.layers_from,
            "token_budget": 2048,
            "repeats": args.repeats,
            "warmup": "one untimed 2-row run per mode",
        },
        "summary": summary,
        "max_relative_difference_of_squared_norms": rel,
        "runs": [{k: v for k, v in r.items() if k != "sq"} for r in runs],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor(),
        },
        "versions": _versions(),
        "git_revision": _git_revision(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(
        f"max relative difference of the squared norms between runs: {rel:.2e}; wrote {args.output}"
    )


if __name__ == "__main__":
    main()
