"""Where the time of a scoring run goes, and how close it runs to the machine's
matrix-multiply rate (not a timed test).

    python benchmarks/profile_run.py [--rows 8] [--dtype bfloat16] [--norms snapshot]
        [--out benchmarks/results/cpu-2core-profile.json]

In one process, on the default proxy (SmolLM2-135M) and real Alpaca rows:

1. a scoring run with the default settings (5 members, 2 epochs, max length
   256) and ``--dtype``, timed without a profiler: its wall time (after loading);
2. the same run under ``torch.profiler`` (with FLOP counts), its time split by
   what each operator's own time (children excluded) works for: the norm kernels (inside
   ``gradfilter.norms.ops``), the chunked LM head and loss
   (``LinearCrossEntropy``), the optimizer (``Optimizer.step``), and, outside
   those, matrix multiplies (mm, addmm, bmm, ...), attention (scaled dot
   product, softmax) and other operators; what no operator covers is Python and
   framework overhead (profiler overhead included);
3. a GEMM of the model's own shapes (2048 x 576 x 1536, ``--dtype``) timed in a
   loop in the same process: the machine's rate.

The run's achieved rate is the FLOPs of its matrix multiplies (counted by the
profiler) over the unprofiled wall time, reported as a ratio to the GEMM rate.

The profiler keeps every operator event of the run in memory: at 16 rows it
grew past 8 GiB on the 2-core machine, and an 8-row run with an automatic budget
beside the test suite ran the 24 GiB machine out of memory.  Keep ``--rows``
small (8) and the budget fixed (``--budget``, 2048 by default), and profile with
``--host-memory lean``: under ``fast`` the profiler's small allocations among
the freed tensors kept glibc from reusing them, and an 8-row run grew past 24 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

GEMM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
ATTENTION_PREFIXES = ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax")
RANGES = {
    "gradfilter.norms": "norm kernels",
    "gradfilter.linear_ce": "LM head and loss",
    "Optimizer.step": "optimizer",
    "Optimizer.zero_grad": "optimizer",
}


def _ranged(fn, label):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(label):
            return fn(*a, **k)

    return wrapper


@contextlib.contextmanager
def labelled():
    """Wrap the norm ops and the chunked loss in named profiler ranges."""
    from gradfilter.method import linear_ce
    from gradfilter.norms import ops

    saved = []
    for owner, name, label in (
        (ops, "factor_sq_norms", "gradfilter.norms"),
        (ops, "grad_and_sq_norms", "gradfilter.norms"),
    ):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, _ranged(getattr(owner, name), label))
    fn = linear_ce.LinearCrossEntropy
    for name in ("forward", "backward"):
        saved.append((fn, name, fn.__dict__[name]))
        setattr(fn, name, staticmethod(_ranged(getattr(fn, name), "gradfilter.linear_ce")))
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def category(event) -> str:
    node = event
    while node is not None:
        for prefix, label in RANGES.items():
            if node.name.startswith(prefix):
                return label
        node = node.cpu_parent
    if event.name in GEMM:
        return "matrix multiplies"
    if event.name.startswith(ATTENTION_PREFIXES):
        return "attention"
    return "other operators"


def split(prof, wall_s: float) -> dict:
    # Every event's self time (its own time, children excluded) goes to the
    # category of its nearest labelled range, else of its own name.
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    by: dict[str, float] = {}
    others: dict[str, list] = {}
    flops = 0
    for e in events:
        c = category(e)
        by[c] = by.get(c, 0.0) + e.self_cpu_time_total / 1e6
        if c == "other operators":
            slot = others.setdefault(e.name, [0.0, 0])
            slot[0] += e.self_cpu_time_total / 1e6
            slot[1] += 1
    for e in prof.events():
        if e.name in GEMM and e.flops:
            flops += e.flops
    covered = sum(by.values())
    by["Python and framework (no operator)"] = max(0.0, wall_s - covered)
    top = sorted(others.items(), key=lambda kv: -kv[1][0])[:20]
    return {
        "seconds": by,
        "gemm_flops": flops,
        "top_other": {name: {"s": round(t, 3), "calls": n} for name, (t, n) in top},
    }


def gemm_rate(dtype: torch.dtype, seconds: float = 3.0) -> float:
    a = torch.randn(2048, 576, dtype=dtype)
    b = torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return 2 * 2048 * 576 * 1536 * n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--norms", default="snapshot", choices=["snapshot", "inflight"])
    p.add_argument("--budget", type=int, default=2048, help="token budget (0: automatic)")
    p.add_argument("--host-memory", default="lean", choices=["fast", "lean"])
    p.add_argument("--data", default=os.path.join("..", "shared", "data", "alpaca_9k.json"))
    p.add_argument("--out", default="benchmarks/results/cpu-2core-profile.json")
    args = p.parse_args(argv)
    from gradfilter.io.models import load_proxy
    from gradfilter.run.score import ScoreConfig, score

    with open(args.data, encoding="utf-8") as f:
        rows = json.load(f)[: args.rows]
    dtype = getattr(torch, args.dtype)
    proxy = load_proxy(None, dtype=dtype)
    cfg = ScoreConfig(
        dtype=args.dtype,
        max_length=256,
        norms=args.norms,
        token_budget=args.budget or None,
        host_memory=args.host_memory,
    )

    def run(outdir):
        t = time.perf_counter()
        res = score(
            rows, outdir, cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy
        )
        return time.perf_counter() - t, res.run

    with tempfile.TemporaryDirectory() as tmp:
        wall, info = run(os.path.join(tmp, "plain"))
        with labelled(), profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            wall_prof, _ = run(os.path.join(tmp, "profiled"))
    parts = split(prof, wall_prof)
    rate = gemm_rate(dtype)
    achieved = parts["gemm_flops"] / wall
    total = sum(parts["seconds"].values())
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "settings": {**dataclasses.asdict(cfg), "rows": args.rows},
        "tokens_processed": info.get("tokens_processed"),
        "padding_fraction": info.get("padding_fraction"),
        "wall_s": round(wall, 2),
        "wall_profiled_s": round(wall_prof, 2),
        "split_s": {k: round(v, 3) for k, v in parts["seconds"].items()},
        "split_share": {k: round(v / total, 4) for k, v in parts["seconds"].items()},
        "top_other_operators": parts["top_other"],
        "gemm_gflop": round(parts["gemm_flops"] / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 1),
        "gemm_rate_gflops": round(rate / 1e9, 1),
        "ratio_to_gemm": round(achieved / rate, 3),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
