"""Peak memory of a scoring run per phase, against token budget, members and
sequence length, next to the written model of what must be held
(:mod:`gradfilter.run.budget`).

    python benchmarks/bench_memory.py [--proxy smollm2] [--dtype bfloat16] [--rows 48]
        [--budgets 512,2048,4096] [--members 1,5] [--max-lengths 256] [--steps 2]
        [--out benchmarks/results/cpu-2core-memory.json]

Each setting runs in a fresh subprocess, so that peaks do not mix.  Inside it
the phases run in order, and before each the peak resident set (``VmHWM``) is
reset (``/proc/self/clear_refs``), so each phase reports its own peak:

* ``load``: the proxy, as a run loads it (``score``'s loader);
* ``train``: ``--steps`` training steps of the ensemble (the steps of epoch 1
  with the longest rows), each on the rows of one folded pass of the token
  budget (a run's step takes several such passes one after the other, with the
  same peak);
* ``norms``: a snapshot norm pass over the rows of one folded pass of the
  longest snapshot batches;
* ``write``: the outputs of a run over these rows (scores, run.json, plots).

On CUDA, ``torch.cuda.max_memory_allocated`` is reported per phase as well.  The
``model`` column is :func:`gradfilter.run.budget.memory_model` at the largest
folded pass the phase ran; ``ratio`` = measured / model, where measured is the
phase's peak minus the resident set before the proxy was loaded (Python, torch
and the libraries).  ``saved_per_token``: the bytes autograd saved for the
backward, per folded token, in the largest training chunk (unique storages,
counted with ``torch.autograd.graph.saved_tensors_hooks``).  ``--remodel FILE``
recomputes the model and ratio columns of a results file from the current
memory model, without measuring.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """Peak host RSS (and CUDA allocation) of a block of work."""

    def __init__(self, name: str, out: dict, cuda: bool) -> None:
        self.name, self.out, self.cuda = name, out, cuda

    def __enter__(self) -> Phase:
        import torch

        self.reset = _reset_peak()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        rec = {
            "peak_rss": _status_kib("VmHWM") * 1024,
            "rss_after": _status_kib("VmRSS") * 1024,
            "peak_is_phase_own": self.reset,
            "seconds": time.perf_counter() - self.t0,
        }
        if self.cuda:
            torch.cuda.synchronize()
            rec["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            rec["cuda_allocated_after"] = torch.cuda.memory_allocated()
        self.out[self.name] = {**self.out.get(self.name, {}), **rec}


def _saved_bytes_per_token(ens, batch, tokens: int) -> float:
    """Bytes autograd keeps for the backward of one folded loss, per folded token."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in ens.parameters()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sums, _ = ens.member_ce_sums(*batch)
    del sums
    return sum(v for k, v in seen.items() if k not in params) / max(1, tokens)


def child(spec: dict) -> dict:
    import numpy as np
    import torch

    from gradfilter.io.data import pad_batch
    from gradfilter.method.ensemble import LoRAEnsemble
    from gradfilter.method.schedule import member_schedule, snapshot_batches
    from gradfilter.run.config import ScoreConfig
    from gradfilter.run.records import records_from_trajectory, row_meta, write_outputs
    from gradfilter.run.score import _load_proxy, prepare

    cuda = torch.cuda.is_available()
    try:  # as a --host-memory lean run does (GRADFILTER_MALLOC_TUNING=0 measures without)
        from gradfilter.run.budget import return_freed_memory

        spec["malloc_tuned"] = return_freed_memory()
    except ImportError:
        spec["malloc_tuned"] = False
    out: dict = {"spec": spec, "phases": {}, "baseline_rss": _status_kib("VmRSS") * 1024}
    phases = out["phases"]
    config = ScoreConfig(
        proxy=spec["proxy"],
        dtype=spec["dtype"],
        members=spec["members"],
        max_length=spec["max_length"],
        token_budget=spec["budget"],
        batch_size=spec["batch_size"],
    )
    with open(spec["data"], encoding="utf-8") as f:
        rows = json.load(f)[: spec["rows"]]
    with Phase("load", phases, cuda):
        model, tok = _load_proxy(config, None)
        if cuda:
            model = model.cuda()
    prepared = prepare(rows, config, tok)
    enc, ok, lengths = prepared.encoded, prepared.ok, prepared.lengths
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    torch.manual_seed(0)
    ens = LoRAEnsemble(model, members=config.members, r=config.rank, alpha=config.alpha)
    opt = ens.make_optimizer(lr=config.lr)

    def collate(idx):
        return pad_batch([enc[ok[j]] for j in idx], pad)

    def one_pass(idx: list[int], seq: int) -> list[int]:
        """The rows of ``idx`` that one folded pass of the budget takes: a step's
        chunks (and a norm batch's) are sequential and alike, so one chunk's rows
        show the peak of the whole step."""
        return idx[: max(1, min(len(idx), config.token_budget // (ens.members * seq)))]

    schedule = member_schedule(lengths, config.batch_size, 0, ens.member_seeds, 0)
    steps = sorted(schedule, key=lambda s: -max(lengths[j] for idx in s for j in idx))
    steps = steps[: spec["steps"]]
    folded = 0
    with Phase("train", phases, cuda):
        for step in steps:
            seq = max(lengths[j] for idx in step for j in idx)
            step = [one_pass(idx, seq) for idx in step]
            batches = [collate(idx) for idx in step]
            ens.train_step(batches, opt, max_tokens=config.token_budget)
            seq = max(b[0].shape[1] for b in batches)
            folded = max(folded, ens.members * len(step[0]) * seq)
    phases["train"]["folded_tokens"] = folded
    # Saved activations of one largest chunk (a separate forward, after the peak).
    step = steps[0]
    b = [collate(idx) for idx in step]
    seq = max(x[0].shape[1] for x in b)
    n = max(1, min(len(step[0]), config.token_budget // (ens.members * seq)))
    from gradfilter.method.lora import pad_right

    ids, labels, mask = (
        torch.cat([pad_right(x[k][:n], seq, v) for x in b]).to(next(model.parameters()).device)
        for k, v in ((0, 0), (1, -100), (2, 0))
    )
    ens.train()
    ens.base.eval()
    phases["train"]["saved_per_token"] = _saved_bytes_per_token(
        ens, (ids, labels, mask), ids.numel()
    )
    ens.eval()

    snaps = snapshot_batches(lengths, config.batch_size, config.token_budget // config.members)
    snaps = sorted(snaps, key=lambda s: -len(s) * max(lengths[j] for j in s))[: spec["steps"]]
    folded = 0
    with Phase("norms", phases, cuda):
        for idx in snaps:
            idx = one_pass(idx, max(lengths[j] for j in idx))
            ids, labels, mask = collate(idx)
            ens.per_example_grad_norms(ids, labels, mask, max_tokens=config.token_budget)
            folded = max(folded, ens.members * len(idx) * ids.shape[1])
    phases["norms"]["folded_tokens"] = folded
    ens.remove()

    rng = np.random.default_rng(0)
    sq = rng.lognormal(size=(len(ok), config.members, 2))
    with Phase("write", phases, cuda), tempfile.TemporaryDirectory() as tmp:
        meta = row_meta(prepared.rows, enc)
        records = records_from_trajectory(meta, ok, config, sq, [1, 2])
        write_outputs(tmp, records, {"config": dataclasses.asdict(config), "method": "gsnr"})
    add_model([out], model)
    return out


def add_model(results: list[dict], model) -> None:
    """Fill in each phase's ``model`` bytes and measured / model ``ratio`` from
    :func:`gradfilter.run.budget.memory_model` (measured: the phase's peak above
    the resident set before the proxy was loaded)."""
    from gradfilter.run.budget import memory_model
    from gradfilter.run.config import ScoreConfig

    for r in results:
        spec, phases = r["spec"], r["phases"]
        mm = memory_model(model, spec["members"], ScoreConfig().rank, None)
        r["memory_model"] = dataclasses.asdict(mm)
        phases["load"]["model"] = mm.weights
        phases["train"]["model"] = mm.training_bytes(phases["train"]["folded_tokens"])
        phases["norms"]["model"] = mm.norm_pass_bytes(phases["norms"]["folded_tokens"])
        phases["write"]["model"] = mm.weights + mm.adapters
        for rec in phases.values():
            rec["ratio"] = (rec["peak_rss"] - r["baseline_rss"]) / rec["model"]


def run_setting(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"setting {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine() -> dict:
    import torch

    import gradfilter

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        rev = ""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "device": dev or platform.machine(),
        "torch": torch.__version__,
        "gradfilter": gradfilter.__version__,
        "git": rev,
    }


def table(results: list[dict]) -> str:
    lines = [
        "| members | max len | budget | load | train step | norm pass | write "
        "| train model | ratio | saved/token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, p = r["spec"], r["phases"]
        lines.append(
            f"| {s['members']} | {s['max_length']} | {s['budget']} "
            f"| {p['load']['peak_rss'] / GiB:.2f} | {p['train']['peak_rss'] / GiB:.2f} "
            f"| {p['norms']['peak_rss'] / GiB:.2f} | {p['write']['peak_rss'] / GiB:.2f} "
            f"| {p['train']['model'] / GiB:.2f} | {p['train']['ratio']:.2f} "
            f"| {p['train']['saved_per_token'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--remodel",
        metavar="JSON",
        help="recompute the model and ratio columns of a results file (no measurement)",
    )
    ap.add_argument("--proxy", default=None, help="default: the offline SmolLM2-135M")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--data", default="/work/shared/data/alpaca_9k.json")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--budgets", default="512,2048,4096")
    ap.add_argument("--members", default="1,5")
    ap.add_argument("--max-lengths", default="256")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--settings", default=None, help="MEMBERS:MAX_LENGTH:BUDGET,... instead of the grid"
    )
    ap.add_argument("--out", default="benchmarks/results/cpu-2core-memory.json")
    args = ap.parse_args(argv)
    if args.remodel:
        from gradfilter.run.config import ScoreConfig
        from gradfilter.run.score import _load_proxy

        with open(args.remodel, encoding="utf-8") as f:
            data = json.load(f)
        spec = data["results"][0]["spec"]
        model, _ = _load_proxy(ScoreConfig(proxy=spec["proxy"], dtype=spec["dtype"]), None)
        add_model(data["results"], model)
        data["table"] = table(data["results"])
        with open(args.remodel, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        print(data["table"])
        return 0
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.settings:  # MEMBERS:MAX_LENGTH:BUDGET,...
        grid = [tuple(int(v) for v in item.split(":")) for item in args.settings.split(",")]
    else:
        grid = [
            (members, max_length, budget)
            for max_length in [int(x) for x in args.max_lengths.split(",")]
            for members in [int(x) for x in args.members.split(",")]
            for budget in [int(x) for x in args.budgets.split(",")]
        ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results = []
    for members, max_length, budget in grid:
        spec = {
            "proxy": args.proxy,
            "dtype": args.dtype,
            "data": args.data,
            "rows": args.rows,
            "budget": max(budget, max_length),
            "members": members,
            "max_length": max_length,
            "batch_size": args.batch_size,
            "steps": args.steps,
        }
        t0 = time.perf_counter()
        results.append(run_setting(spec))
        print(
            f"members {members} max length {max_length} budget {budget}: "
            f"{time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        text = table(results)
        with open(args.out, "w", encoding="utf-8") as f:  # after every setting
            json.dump({"machine": machine(), "results": results, "table": text}, f, indent=1)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
