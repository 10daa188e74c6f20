"""Processes against threads on one CPU machine (gloo): the same run as 1 process
x T threads and as ``torchrun`` N processes x T/N threads, member-parallel and
data-parallel (not a timed test).

    python benchmarks/bench_dist.py [--shape tiny|gpt2-small] [--procs 2] [--out FILE]

Each setting runs ``gradfilter score`` in a fresh process (or ``torchrun``) on a
randomly initialised proxy (``tiny``: the test GPT-2; ``gpt2-small``: GPT-2-small
shapes, 12 layers of width 768 and the 50,257-word LM head) and synthetic rows,
and records its wall time, the training time of ``run.json`` and the seconds
spent in collectives (``run.json`` ``communication``: the data-parallel group's
all-reduces and gathers, waiting for the slowest process included, and the
final gather of the norms).  The speed-up is the one-process time over the
N-process time, both measured here in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # rows, batch size, max length, members, dtype
    "tiny": dict(rows=256, batch=8, max_length=64, members=4, dtype="float32"),
    "gpt2-small": dict(rows=48, batch=8, max_length=128, members=4, dtype="bfloat16"),
}


def make_proxy(shape: str, folder: str) -> str:
    from gradfilter.io.models import tiny_gpt2, tiny_tokenizer

    path = os.path.join(folder, f"proxy-{shape}")
    if shape == "tiny":
        model = tiny_gpt2(seed=0)
    else:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_rows(n: int, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = i % 97, (7 * i) % 89
            words = " and then".join([" add"] * (1 + i % 5))
            f.write(
                json.dumps(
                    {
                        "instruction": f"Row {i}:{words} {a} to {b}.",
                        "output": f"{a} + {b} = {a + b}" + (". Done" * (i % 7)),
                    }
                )
                + "\n"
            )


def run_one(args: list[str], procs: int, threads: int, outdir: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    launch = [sys.executable, "-m"]
    if procs > 1:
        launch += ["torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m"]
    t0 = time.perf_counter()
    done = subprocess.run(
        [*launch, "gradfilter", *args, "-o", outdir], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    with open(os.path.join(outdir, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    with open(os.path.join(outdir, "scores.jsonl"), encoding="utf-8") as f:
        ranks = [json.loads(line)["rank"] for line in f]
    t = run["timings"]
    comm = run.get("communication", {})
    group = comm.get("group_collectives_s")
    return {
        "processes": procs,
        "threads_per_process": threads,
        "parallel": run["plan"].get("parallel", {}).get("mode", "single"),
        "wall_s": wall,
        "train_s": t.get("train_s"),
        "snapshot_s": t.get("snapshot_s"),
        "total_s": t.get("total_s"),
        "final_gather_s": comm.get("final_gather_s"),
        "group_collectives_s": group,
        "communication_share": (
            (sum(group) / len(group)) / (t["train_s"] + t["snapshot_s"]) if group else None
        ),
        "ranks": ranks,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="total threads (default: cores)")
    p.add_argument("--norms", default="inflight", choices=["inflight", "snapshot"])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    spec = SHAPES[a.shape]
    threads = a.threads or os.cpu_count() or 2
    if threads % a.procs:
        raise SystemExit(f"--threads {threads} must be a multiple of --procs {a.procs}")
    with tempfile.TemporaryDirectory() as tmp:
        proxy = make_proxy(a.shape, tmp)
        data = os.path.join(tmp, "rows.jsonl")
        make_rows(spec["rows"], data)
        args = [
            "score", data, "--proxy", proxy, "--members", str(spec["members"]),
            "--batch-size", str(spec["batch"]), "--max-length", str(spec["max_length"]),
            "--dtype", spec["dtype"], "--norms", a.norms, "--epochs", "2",
            "--token-budget", "4096", "--device", "cpu", "--no-progress", "--show", "0",
        ]  # fmt: skip
        results = [run_one(args, 1, threads, os.path.join(tmp, "one"))]
        for mode in ("member", "data"):
            out = os.path.join(tmp, mode)
            results.append(run_one([*args, "--parallel", mode], a.procs, threads // a.procs, out))
    base = results[0]
    ranks = [r.pop("ranks") for r in results]
    for r, rk in zip(results, ranks, strict=True):
        r["speedup_wall"] = base["wall_s"] / r["wall_s"]
        r["speedup_train"] = (base["train_s"] + base["snapshot_s"]) / (
            r["train_s"] + r["snapshot_s"]
        )
        r["same_ranks_as_one_process"] = rk == ranks[0]
    report = {
        "benchmark": "bench_dist",
        "shape": a.shape,
        "settings": {**spec, "norms": a.norms, "epochs": 2, "token_budget": 4096},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg(),
        },
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
