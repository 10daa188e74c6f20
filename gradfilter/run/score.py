"""GradFiltering end to end: rows -> tokens -> LoRA ensemble -> G-SNR -> ranking.

``score`` trains an ensemble of M LoRA members on the proxy for ``epochs``
epochs (all members in one folded forward/backward per step), takes each
example's per-member squared gradient norms in two snapshot passes (after epoch
``early`` and epoch ``late``; eval mode, norms only, no optimiser step), turns
them into G-SNR and its parts, and writes ``OUTDIR/scores.jsonl`` (one row per
input row, in input order), ``OUTDIR/run.json`` and two plots.

The run checkpoints to ``OUTDIR/checkpoint.pt`` as it goes (training state,
dropout generators, finished snapshot batches), so the same command after a
kill resumes where it stopped and ends with the same scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

SCORES_FILE = "scores.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
NORMS_FILE = "norms.npz"
#: Salt of the data order of warm-up epochs (``member_schedule``'s epoch argument).
WARMUP_EPOCH_SALT = 1 << 20


@dataclass
class ScoreConfig:
    """Everything that determines a scoring run (and so its checkpoint)."""

    method: str = "gsnr"  # see gradfilter.method.selectors.METHODS
    proxy: str | None = None  # hub id, local folder, .gguf file; None = offline SmolLM2-135M
    dtype: str = "float32"  # proxy weights; "bfloat16" is ~2x faster on CPUs with bf16 units
    members: int = 5
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | str | None = None  # None = attention projections; "all-linear"
    # Adapters only on decoder layers lora_layers_from..L-1; with prefix_cache the
    # frozen layers below run once per example (an execution choice: not in identity).
    lora_layers_from: int = 0
    prefix_cache: bool = False
    epochs: int = 2
    early: int = 1
    late: int = 2
    # Epochs whose norms are kept in OUTDIR/norms.npz (a trajectory); None = early and
    # late only.  Must include early and late; "all" (CLI) = every epoch.
    snapshots: list[int] | None = None
    # Optimizer steps trained before epoch 1 (data drawn in extra shuffled epochs,
    # nothing recorded), so that the early point lies past the growth of the LoRA
    # norms at any data size.
    warmup_steps: int = 0
    # "snapshot": norms from eval-mode passes after epochs early and late;
    # "inflight": recorded by the training steps of epochs early and late themselves
    # (same backward as the weight gradient; no extra pass, dropout active).
    norms: str = "snapshot"
    lr: float = 2e-4
    batch_size: int = 8
    # Padded tokens in one folded forward/backward (all members together); bounds
    # memory: SmolLM2-135M in float32 peaks near 9 GB at 2048 and 17 GB at 4096.
    token_budget: int | None = 2048
    max_length: int = 512
    seed: int = 0
    template: str | None = None
    reduction: str = "mean"
    drop: str = "normalized"
    spread: str = "var"
    of: str = "squared"
    ddof: int = 0
    eps: float = 1e-8
    formula: str = "paper"  # see gradfilter.method.gsnr.FORMULAS
    fields: dict[str, str] = field(default_factory=dict)
    checkpoint_seconds: float = 60.0

    def validate(self) -> None:
        from gradfilter.method.selectors import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")
        if not 1 <= self.early < self.late <= self.epochs:
            raise ValueError(
                f"need 1 <= early < late <= epochs, got early={self.early}, late={self.late}, "
                f"epochs={self.epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.token_budget is not None and self.token_budget < self.max_length:
            # One row per member is the floor of a folded pass, whatever the budget.
            raise ValueError(
                f"token_budget ({self.token_budget}) must be at least max_length ({self.max_length})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}")
        if isinstance(self.lora_layers_from, bool) or not isinstance(self.lora_layers_from, int) \
                or self.lora_layers_from < 0:
            raise ValueError(f"lora_layers_from must be an int >= 0, got {self.lora_layers_from!r}")
        if self.prefix_cache and self.lora_layers_from == 0:
            raise ValueError(
                "prefix_cache needs lora_layers_from > 0: with adapters from layer 0 there is "
                "no frozen prefix to cache"
            )
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        if self.norms not in ("snapshot", "inflight"):
            raise ValueError(f"norms must be 'snapshot' or 'inflight', got {self.norms!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.snapshots is not None:
            snaps = list(self.snapshots)
            bad = [e for e in snaps if isinstance(e, bool) or not isinstance(e, int)
                   or not 1 <= e <= self.epochs]
            if bad or not snaps:
                raise ValueError(f"snapshots must be epochs in 1..{self.epochs}, got {self.snapshots!r}")
            missing = [e for e in (self.early, self.late) if e not in snaps]
            if missing:
                raise ValueError(f"snapshots {snaps} must include the early and late epochs "
                                 f"({self.early}, {self.late})")
        self.gsnr_config()  # validates the G-SNR options

    def norm_epochs(self) -> list[int]:
        """The epochs whose per-example norms the run records, ascending."""
        return sorted(set(self.snapshots or ()) | {self.early, self.late})

    def gsnr_config(self):
        from gradfilter.method.gsnr import GSNRConfig

        return GSNRConfig(drop=self.drop, spread=self.spread, of=self.of, ddof=self.ddof, eps=self.eps,
                          formula=self.formula)

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        d = dataclasses.asdict(self)
        d.pop("checkpoint_seconds")
        d.pop("prefix_cache")  # same scores (to rounding) with or without
        for k in ("formula", "drop", "spread", "of", "ddof", "eps"):
            d.pop(k)  # scoring only, applied to the stored norms at the end
        return d


@dataclass
class ScoreResult:
    """What ``score`` returns: the per-row records and the run summary."""

    records: list[dict[str, Any]]
    run: dict[str, Any]
    outdir: str | None
    rows: list[Any] = field(repr=False, default_factory=list)
    source: Any = field(repr=False, default=None)

    def select(self, ratio: float | None = None, top_k: int | None = None,
               output: str | None = None, order: str = "rank"):
        """The top rows, written in the input's own format (see :func:`select`)."""
        return _select_from(self.records, self.rows, self.source, ratio, top_k, output, order)


# -- helpers -------------------------------------------------------------------------------


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(rows: list[Any]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.index}\x1f{r.id}\x1f{r.status}\x1e".encode())
    return h.hexdigest()[:16]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _collate(encoded: list[Any], idx: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    from gradfilter.io.data import pad_batch

    return pad_batch([encoded[i] for i in idx], pad_id)


def snapshot_batches(lengths: list[int], batch_size: int, token_budget: int | None) -> list[list[int]]:
    """Snapshot batches over rows sorted by length (little padding): at most
    ``batch_size`` rows and, with a token budget, at most ``token_budget`` padded
    tokens (per member)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max([lengths[j] for j in cur] + [lengths[i]])
        too_many = len(cur) >= batch_size or bool(token_budget and (len(cur) + 1) * longest > token_budget)
        if cur and too_many:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from gradfilter import __version__

    return {
        "gradfilter": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


# -- scoring --------------------------------------------------------------------------------


def prepare(data: Any, config: ScoreConfig, tokenizer: Any):
    """Load and tokenise the rows: ``(rows, source, encoded)``; encoded[i] is None
    for rows that cannot be scored (their status says why)."""
    from gradfilter.io.data import encode_row
    from gradfilter.io.rows import load_rows

    rows, source = load_rows(data, fields=config.fields or None)
    encoded: list[Any] = []
    for row in rows:
        if row.status != "ok":
            encoded.append(None)
            continue
        try:
            enc = encode_row(row, tokenizer, config.max_length, config.template)
        except ValueError as e:
            row.status = f"cannot tokenise: {e}"
            encoded.append(None)
            continue
        if enc.n_response_tokens == 0:
            row.status = (f"no response token within max_length={config.max_length} "
                          f"(the row has {enc.n_tokens} tokens)")
            encoded.append(None)
            continue
        encoded.append(enc)
    return rows, source, encoded


def score(
    data: Any,
    outdir: str | None = None,
    config: ScoreConfig | None = None,
    *,
    progress: bool = True,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    stop_after: int | None = None,
) -> ScoreResult:
    """Score every row of ``data`` by ``config.method`` (G-SNR by default).

    Args:
        data: a path (Alpaca JSON/JSONL, chat ``messages`` JSONL, Parquet, a saved
            Hugging Face dataset), a list of dicts, or a ``datasets.Dataset``.
        outdir: where scores, run summary, plots and the checkpoint go; None keeps
            everything in memory (no resume).
        config: the run's settings (:class:`ScoreConfig`).
        dry_run: report rows, tokens and the planned work, then stop.
        model_and_tokenizer: use this proxy instead of loading ``config.proxy``.
        stop_after: stop (as if killed) after this many training steps; for tests.
    """
    config = config or ScoreConfig()
    config.validate()
    say = log or (lambda s: print(s, file=sys.stderr))
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    if model_and_tokenizer is None:
        from gradfilter.io.models import load_proxy

        model, tok = load_proxy(config.proxy, dtype=getattr(torch, config.dtype))
    else:
        model, tok = model_and_tokenizer
    if getattr(model.config, "_attn_implementation", None) == "eager":
        # sdpa keeps the attention matrices out of the saved activations.
        model.config._attn_implementation = "sdpa"
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows, source, encoded = prepare(data, config, tok)
    timings["tokenize_s"] = time.perf_counter() - t0
    ok = [i for i, e in enumerate(encoded) if e is not None]
    lengths = [len(encoded[i].input_ids) for i in ok]
    statuses: dict[str, int] = {}
    for r in rows:
        key = r.status.split(" (")[0].split(":")[0]
        statuses[key] = statuses.get(key, 0) + 1

    from gradfilter.method.ensemble import member_schedule
    from gradfilter.method.selectors import ENSEMBLE_METHODS

    ensemble = config.method in ENSEMBLE_METHODS
    n_epochs = (config.early if config.method == "grand" else config.epochs) if ensemble else 0
    norm_epochs = [e for e in config.norm_epochs() if e <= n_epochs] if ensemble else []
    n_snaps = len(norm_epochs) if config.norms == "snapshot" else 0
    steps_per_epoch = len(member_schedule(lengths, config.batch_size, 0, [0], config.seed)) if ok else 0
    warmup = config.warmup_steps if ensemble else 0
    # Snapshot passes fold all members into one batch; forward-only methods do not.
    per_pass = config.members if ensemble else 1
    snaps = snapshot_batches(lengths, config.batch_size,
                             config.token_budget // per_pass if config.token_budget else None)
    plan = {
        "rows": len(rows),
        "scorable_rows": len(ok),
        "statuses": statuses,
        "tokens": int(sum(lengths)),
        "truncated_rows": sum(1 for e in encoded if e is not None and e.truncated),
        "method": config.method,
        "training_steps": steps_per_epoch * n_epochs + warmup,
        "snapshot_batches": n_snaps * len(snaps),
        "member_sequences_processed": (len(ok) * config.members * (n_epochs + n_snaps)
                                       + warmup * config.batch_size * config.members),
    }
    if ensemble:
        plan["schedule"] = {"warmup_steps": warmup, "steps_per_epoch": steps_per_epoch,
                            "epochs": n_epochs, "early": config.early, "late": config.late,
                            "norm_epochs": norm_epochs, "norms": config.norms,
                            "early_starts_at_step": warmup + (config.early - 1) * steps_per_epoch}
    work = (f"{warmup} warm-up steps, {n_epochs} epochs x {steps_per_epoch} steps and {n_snaps} "
            f"snapshot passes x {len(snaps)} batches, {config.members} members in each folded pass"
            if ensemble else f"forward passes over {len(snaps)} batches ({config.method})")
    if ensemble and config.norms == "inflight":
        work += f"; norms recorded in flight during epochs {norm_epochs}"
    say(f"{plan['rows']} rows ({plan['scorable_rows']} scorable; {statuses}), "
        f"{plan['tokens']} tokens, {plan['truncated_rows']} truncated; plan: {work}")
    if dry_run:
        return ScoreResult([], {"plan": plan, "config": dataclasses.asdict(config)}, outdir, rows, source)
    if not ok:
        raise ValueError("no row can be scored: " + json.dumps(statuses))
    if not ensemble:
        t0 = time.perf_counter()
        values, counted = _forward_method(config, model, tok, rows, encoded, ok, snaps, pad_id_of(tok))
        timings["scoring_s"] = time.perf_counter() - t0
        records = _records(row_meta(rows, encoded), ok, config, values=values)
        timings["total_s"] = time.perf_counter() - t_start
        run = _run_summary(config, source, plan, timings, counted, model)
        if outdir:
            _write_outputs(outdir, records, run)
        return ScoreResult(records, run, outdir, rows, source)

    from gradfilter.method.ensemble import LoRAEnsemble

    torch.manual_seed(config.seed)
    ens = LoRAEnsemble(model, members=config.members, r=config.rank, alpha=config.alpha,
                       dropout=config.dropout, target_modules=config.targets, seed=config.seed,
                       layers_from=config.lora_layers_from, prefix_cache=config.prefix_cache)
    opt = ens.make_optimizer(lr=config.lr)
    pad_id = pad_id_of(tok)
    m = config.members
    # The trajectory: [rows, members, checkpoints] squared norms, their lora_A and
    # lora_B shares (in-flight only) and the optimizer step each was taken at.
    n_ck = len(norm_epochs)
    traj = {"sq": np.full((len(ok), m, n_ck), np.nan),
            "sq_a": np.full((len(ok), m, n_ck), np.nan),
            "sq_b": np.full((len(ok), m, n_ck), np.nan),
            "visit_step": np.full((len(ok), m, n_ck), -1, dtype=np.int64)}
    state = {"warmup": 0, "epoch": 0, "step": 0, "snapshot": None, "snap_batch": 0,
             "snaps_done": [], "tokens": 0, "padded": 0, "train_s": 0.0, "snapshot_s": 0.0,
             "losses": []}

    ckpt_path = os.path.join(outdir, CHECKPOINT_FILE) if outdir else None
    identity = {"config": config.identity(), "rows": _fingerprint(rows)}
    if outdir:
        os.makedirs(outdir, exist_ok=True)
        if os.path.exists(ckpt_path):
            ck = torch.load(ckpt_path, weights_only=False)
            if ck["identity"] != identity:
                raise ValueError(
                    f"{outdir} holds a checkpoint of a different run (other data or settings); "
                    "use another output folder or delete it"
                )
            ens.adapters.load_state_dict(ck["adapters"])
            opt.load_state_dict(ck["optimizer"])
            ens.step = ck["ensemble_step"]
            traj, state = ck["trajectory"], ck["state"]
            say(f"resuming from {ckpt_path}: warm-up step {state['warmup']}, epoch {state['epoch']}, "
                f"step {state['step']}, snapshot {state['snapshot']} batch {state['snap_batch']}")

    def save() -> None:
        if not ckpt_path:
            return
        _atomic_torch_save({
            "identity": identity,
            "adapters": ens.adapters.state_dict(),
            "optimizer": opt.state_dict(),
            "ensemble_step": ens.step,
            "trajectory": traj, "state": state,
        }, ckpt_path)

    total = warmup + steps_per_epoch * n_epochs + n_snaps * len(snaps)
    done = (state["warmup"] + state["epoch"] * steps_per_epoch + state["step"]
            + len(snaps) * len(state["snaps_done"]) + state["snap_batch"])
    bar = _progress(total, "scoring", progress)
    bar.update(min(done, total))
    last_save = time.perf_counter()
    steps_run = 0

    def maybe_save(clock: str, t: float) -> float:
        """Checkpoint when due; returns the start of the next timed stretch."""
        nonlocal last_save
        if time.perf_counter() - last_save <= config.checkpoint_seconds:
            return t
        state[clock] += time.perf_counter() - t
        save()
        last_save = time.perf_counter()
        return last_save

    def run_snapshot(epoch: int) -> None:
        nonlocal last_save
        c = norm_epochs.index(epoch)
        if state["snapshot"] != epoch:
            state["snapshot"], state["snap_batch"] = epoch, 0
        t = time.perf_counter()
        for bi in range(state["snap_batch"], len(snaps)):
            idx = snaps[bi]
            ids, labels, mask = _collate(encoded, [ok[j] for j in idx], pad_id)
            norms = ens.per_example_grad_norms(
                ids, labels, mask, reduction=config.reduction, max_tokens=config.token_budget or 0,
                rows=[ok[j] for j in idx] if ens.prefix_cache is not None else None)
            traj["sq"][idx, :, c] = (norms.double() ** 2).T.numpy()
            traj["visit_step"][idx, :, c] = ens.step
            state["tokens"] += int(mask.sum()) * m
            state["padded"] += int(mask.numel() - mask.sum()) * m
            state["snap_batch"] = bi + 1
            bar.update(1)
            t = maybe_save("snapshot_s", t)
        state["snapshot_s"] += time.perf_counter() - t
        state["snapshot"], state["snap_batch"] = None, 0
        state["snaps_done"].append(epoch)
        save()
        last_save = time.perf_counter()

    def due_snapshots() -> None:
        if config.norms == "inflight":
            return
        for epoch in norm_epochs:
            if state["epoch"] >= epoch and epoch not in state["snaps_done"]:
                run_snapshot(epoch)

    def train(step: list[list[int]], record: int | None) -> None:
        """One folded optimizer step; ``record``: the trajectory column to fill in flight."""
        nonlocal steps_run
        batches = [_collate(encoded, [ok[j] for j in idx], pad_id) for idx in step]
        visit = ens.step
        out = ens.train_step(
            batches, opt, max_tokens=config.token_budget,
            member_rows=[[ok[j] for j in idx] for idx in step]
            if ens.prefix_cache is not None else None,
            record_norms=record is not None, reduction=config.reduction, by_factor=True)
        losses = out[0] if record is not None else out
        if record is not None:
            sq, parts = out[1].numpy(), {k: v.numpy() for k, v in out[2].items()}
            for mi, idx in enumerate(step):  # [M, B], of each row's own loss
                traj["sq"][idx, mi, record] = sq[mi, : len(idx)]
                traj["sq_a"][idx, mi, record] = parts["A"][mi, : len(idx)]
                traj["sq_b"][idx, mi, record] = parts["B"][mi, : len(idx)]
                traj["visit_step"][idx, mi, record] = visit
        seq = max(b[0].shape[1] for b in batches)
        real = sum(int(b[2].sum()) for b in batches)
        state["tokens"] += real
        state["padded"] += seq * sum(b[0].shape[0] for b in batches) - real
        state["losses"].append([state["epoch"], state["step"], losses.tolist()])
        bar.update(1)
        steps_run += 1

    def stop_if_asked(clock: str, t: float) -> None:
        if stop_after is not None and steps_run >= stop_after:
            state[clock] += time.perf_counter() - t
            save()
            bar.close()
            raise KeyboardInterrupt(f"stopped after {steps_run} training steps")

    # Warm-up: steps drawn from extra shuffled epochs (their own data-order salt).
    t = time.perf_counter()
    while state["warmup"] < warmup:
        w_epoch, w_step = divmod(state["warmup"], steps_per_epoch)
        schedule = member_schedule(lengths, config.batch_size, WARMUP_EPOCH_SALT + w_epoch,
                                   ens.member_seeds, config.seed)
        train(schedule[w_step], None)
        state["warmup"] += 1
        stop_if_asked("train_s", t)
        t = maybe_save("train_s", t)
    state["train_s"] += time.perf_counter() - t

    # Snapshots that a resumed run had finished are skipped; one in progress goes on.
    due_snapshots()
    while state["epoch"] < n_epochs:
        epoch = state["epoch"]
        schedule = member_schedule(lengths, config.batch_size, epoch, ens.member_seeds, config.seed)
        record = (norm_epochs.index(epoch + 1)
                  if config.norms == "inflight" and epoch + 1 in norm_epochs else None)
        t = time.perf_counter()
        while state["step"] < len(schedule):
            train(schedule[state["step"]], record)
            state["step"] += 1
            stop_if_asked("train_s", t)
            t = maybe_save("train_s", t)
        state["train_s"] += time.perf_counter() - t
        state["epoch"], state["step"] = epoch + 1, 0
        save()
        last_save = time.perf_counter()
        due_snapshots()
    bar.close()

    timings["train_s"] = state["train_s"]
    timings["snapshot_s"] = state["snapshot_s"]
    meta = row_meta(rows, encoded)
    records = records_from_trajectory(meta, ok, config, traj["sq"], norm_epochs)
    timings["total_s"] = time.perf_counter() - t_start
    counted = {"tokens": state["tokens"], "padded": state["padded"],
               "seconds": state["train_s"] + state["snapshot_s"]}
    run = _run_summary(config, source, plan, timings, counted, model)
    run["member_seeds"] = ens.member_seeds
    run["final_losses"] = state["losses"][-1][2] if state["losses"] else None
    if ens.prefix_cache is not None:
        run["prefix_cache"] = {"layers_from": ens.layers_from, "rows": len(ens.prefix_cache),
                               "rows_computed": ens.prefix_cache.computed_rows,
                               "bytes": ens.prefix_cache.nbytes}
    ens.remove()
    if outdir:
        _write_norms(outdir, traj, ok, len(rows), norm_epochs,
                     [warmup + e * steps_per_epoch for e in norm_epochs])
        _write_outputs(outdir, records, run)
    return ScoreResult(records, run, outdir, rows, source)


def pad_id_of(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def _run_summary(config, source, plan, timings, counted, model) -> dict[str, Any]:
    total_tokens = counted["tokens"] + counted["padded"]
    return {
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "device": str(next(model.parameters()).device)},
        "seed": config.seed,
        "method": config.method,
        "source": {"kind": getattr(source, "kind", None), "path": getattr(source, "path", None)},
        "plan": plan,
        "timings": timings,
        "tokens_processed": counted["tokens"],
        "tokens_per_second": counted["tokens"] / max(1e-9, counted["seconds"]),
        "padding_fraction": counted["padded"] / max(1, total_tokens),
    }


def _response_text(row: Any) -> str:
    if row.kind == "chat":
        return "\n".join(m["content"] for m in row.messages or [] if m.get("role") == "assistant")
    return row.output


def _forward_method(config, model, tok, rows, encoded, ok, snaps, pad_id):
    """Scores of the forward-only baselines: ``(values over ok rows, token counts)``."""
    from gradfilter.io.data import encode_pair
    from gradfilter.method.selectors import example_losses, ifd_from_losses, random_scores

    counted = {"tokens": 0, "padded": 0, "seconds": 0.0}
    if config.method == "random":
        return {"random": random_scores(len(ok), config.seed)}, counted
    model.eval()

    def losses(encs: list[Any]) -> np.ndarray:
        out = np.full(len(ok), np.nan)
        t = time.perf_counter()
        for idx in snaps:
            ids, labels, mask = _collate(encs, idx, pad_id)
            out[idx] = example_losses(model, ids, labels, mask).double().numpy()
            counted["tokens"] += int(mask.sum())
            counted["padded"] += int(mask.numel() - mask.sum())
        counted["seconds"] += time.perf_counter() - t
        return out

    cond = losses([encoded[i] for i in ok])
    if config.method == "loss":
        return {"loss": cond}, counted
    alone_enc = [encode_pair(tok, "", _response_text(rows[i]), config.max_length) for i in ok]
    alone = losses(alone_enc)
    values = {"cond_loss": cond, "alone_loss": alone,
              "ifd": ifd_from_losses(cond, alone, "loss_ratio"),
              "ifd_ppl": ifd_from_losses(cond, alone, "ppl_ratio")}
    return values, counted


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


ROW_FIELDS = ("index", "id", "status", "n_tokens", "n_response_tokens", "truncated")


def row_meta(rows: list[Any], encoded: list[Any]) -> list[dict[str, Any]]:
    """What a record says about its row besides scores (also read back from scores.jsonl)."""
    return [{"index": row.index, "id": row.id, "status": row.status,
             "n_tokens": None if enc is None else enc.n_tokens,
             "n_response_tokens": None if enc is None else enc.n_response_tokens,
             "truncated": None if enc is None else enc.truncated}
            for row, enc in zip(rows, encoded)]


def records_from_trajectory(meta: list[dict[str, Any]], ok: list[int], config: ScoreConfig,
                            sq: np.ndarray, norm_epochs: list[int]) -> list[dict[str, Any]]:
    """The records of an ensemble method from the ``[ok rows, M, checkpoints]`` norms:
    the early and late points are the columns of epochs ``config.early`` / ``late``."""
    for e in (config.early,) if config.method == "grand" else (config.early, config.late):
        if e not in norm_epochs:
            raise ValueError(f"epoch {e} has no recorded norms; recorded epochs: {norm_epochs}")
    early_sq = sq[:, :, norm_epochs.index(config.early)]
    late_sq = None if config.method == "grand" else sq[:, :, norm_epochs.index(config.late)]
    return _records(meta, ok, config, early_sq=early_sq, late_sq=late_sq)


def _records(meta, ok, config: ScoreConfig, *, early_sq=None, late_sq=None,
             values: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One record per input row; ``score`` is the method's score, ``rank`` its rank."""
    from gradfilter.method.gsnr import ablation_scores, gsnr_components, rank_scores
    from gradfilter.method.selectors import HIGHER_IS_BETTER, ifd_rank_scores

    n = len(meta)
    values = dict(values or {})
    comp: dict[str, np.ndarray] = {}
    if early_sq is not None and late_sq is not None:
        comp = gsnr_components(early_sq, late_sq, config.gsnr_config())
        values.update({f"ablation.{k}": v for k, v in ablation_scores(comp).items()})
    elif early_sq is not None:
        values["early_mean"] = np.mean(early_sq, axis=1)
    method = config.method
    if method in ("gsnr", "drop", "late_var"):
        method_score = comp[method]
    elif method == "grand":
        method_score = values["early_mean"]
    elif method in ("ifd", "ifd_ppl"):
        method_score = ifd_rank_scores(values[method])
    else:
        method_score = values[method]
    full = np.full(n, np.nan)
    full[ok] = method_score
    ranks = rank_scores(full, higher_is_better=HIGHER_IS_BETTER[method])
    pos = {row_i: j for j, row_i in enumerate(ok)}
    records = []
    for i, info in enumerate(meta):
        j = pos.get(i)

        def at(arr, j=j):
            return None if j is None or arr is None else _num(arr[j])

        rec = {
            "index": info["index"],
            "id": info["id"],
            "status": info["status"],
            "method": method,
            "score": _num(full[i]),
            "gsnr": at(comp.get("gsnr")),
            "drop": at(comp.get("drop")),
            "late_var": at(comp.get("late_var")),
            "early_mean": at(comp.get("early_mean", values.get("early_mean"))),
            "late_mean": at(comp.get("late_mean")),
            "early_sq": None if j is None or early_sq is None else [_num(v) for v in early_sq[j]],
            "late_sq": None if j is None or late_sq is None else [_num(v) for v in late_sq[j]],
            "n_tokens": info["n_tokens"],
            "n_response_tokens": info["n_response_tokens"],
            "truncated": info["truncated"],
            "rank": int(ranks[i]),
        }
        for name, arr in values.items():
            if name.startswith("ablation."):
                if j is not None:
                    rec.setdefault("ablation", {})[name.split(".", 1)[1]] = _num(arr[j])
            elif name not in rec:
                rec[name] = at(arr)
        if method in ("ifd", "ifd_ppl") and j is not None:
            rec["discarded"] = not (values[method][j] < 1.0)
        records.append(rec)
    return records


def _write_norms(outdir: str, traj: dict[str, np.ndarray], ok: list[int], n_rows: int,
                 epochs: list[int], steps: list[int]) -> None:
    """``OUTDIR/norms.npz``: the trajectory over every input row (NaN / -1 where a
    row was not scored), with the epoch and end-of-epoch optimizer step of each
    checkpoint.  float64, so that a rescore reproduces the scores exactly."""
    import io

    arrays: dict[str, np.ndarray] = {}
    for name, arr in traj.items():
        full = np.full((n_rows,) + arr.shape[1:], -1 if arr.dtype.kind == "i" else np.nan,
                       dtype=arr.dtype)
        full[ok] = arr
        arrays[name] = full
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, epoch=np.asarray(epochs, dtype=np.int64),
                        step=np.asarray(steps, dtype=np.int64), scored=np.asarray(ok, dtype=np.int64))
    _atomic_write(os.path.join(outdir, NORMS_FILE), buf.getvalue())


def read_norms(outdir: str) -> dict[str, np.ndarray]:
    """The arrays of ``OUTDIR/norms.npz`` (see :func:`score`): ``sq``, ``sq_a``,
    ``sq_b`` ``[rows, members, checkpoints]`` float64, ``visit_step`` (int64),
    ``epoch`` and ``step`` ``[checkpoints]``, ``scored`` (the scored row positions)."""
    path = os.path.join(outdir, NORMS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: only an ensemble run (gsnr, drop, late_var, "
                                "grand) of this version records norms")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rescore(outdir: str, *, formula: str | None = None, early: int | None = None,
            late: int | None = None, method: str | None = None,
            output: str | None = None, **gsnr_options: Any) -> ScoreResult:
    """Recompute every score and rank of a finished ensemble run from its stored
    norms, with another formula, early / late epoch or method; no model is loaded.

    Writes ``scores.jsonl`` and ``run.json`` (and the plots) to ``output``
    (default: ``outdir`` itself) and copies ``norms.npz`` there.  With the run's
    own settings the new ``scores.jsonl`` is byte-identical to the old one.
    ``gsnr_options``: ``drop``, ``spread``, ``of``, ``ddof``, ``eps``.
    """
    from gradfilter.method.selectors import ENSEMBLE_METHODS

    records, run = read_scores(outdir)
    norms = read_norms(outdir)
    changes = {k: v for k, v in dict(formula=formula, early=early, late=late, method=method,
                                     **gsnr_options).items() if v is not None}
    cfg_dict = dict(run["config"])
    cfg_dict.update(changes)
    config = ScoreConfig(**cfg_dict)
    if config.method not in ENSEMBLE_METHODS:
        raise ValueError(f"rescore works for the ensemble methods {', '.join(ENSEMBLE_METHODS)}; "
                         f"got {config.method!r}")
    config.validate()
    epochs = [int(e) for e in norms["epoch"]]
    for e in (config.early,) if config.method == "grand" else (config.early, config.late):
        if e not in epochs:
            raise ValueError(f"epoch {e} has no recorded norms in {outdir}; recorded: {epochs} "
                             "(record more with score --snapshots)")
    meta = [{k: r[k] for k in ROW_FIELDS} for r in records]
    ok = [int(i) for i in norms["scored"]]
    new = records_from_trajectory(meta, ok, config, norms["sq"][ok], epochs)
    run = dict(run, config=dataclasses.asdict(config), method=config.method)
    dest = output or outdir
    _write_outputs(dest, new, run)
    if os.path.abspath(dest) != os.path.abspath(outdir):
        with open(os.path.join(outdir, NORMS_FILE), "rb") as f:
            _atomic_write(os.path.join(dest, NORMS_FILE), f.read())
    return ScoreResult(new, run, dest)


def _write_outputs(outdir: str, records: list[dict], run: dict) -> None:
    from gradfilter.run.plots import plot_drop_vs_variance, plot_gsnr_distribution

    os.makedirs(outdir, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _atomic_write(os.path.join(outdir, SCORES_FILE), lines.encode("utf-8"))
    _atomic_write(os.path.join(outdir, RUN_FILE), json.dumps(run, indent=2).encode("utf-8"))
    if not any(r["drop"] is not None for r in records):
        return
    g = np.array([np.nan if r["gsnr"] is None else r["gsnr"] for r in records])
    d = np.array([np.nan if r["drop"] is None else r["drop"] for r in records])
    v = np.array([np.nan if r["late_var"] is None else r["late_var"] for r in records])
    top = np.array([r["rank"] <= max(1, len(records) // 10) and r["score"] is not None
                    for r in records])
    threshold = float(np.nanmin(np.where(top, g, np.nan))) if top.any() else None
    plot_gsnr_distribution(g, os.path.join(outdir, "gsnr_distribution.png"), threshold)
    plot_drop_vs_variance(d, v, os.path.join(outdir, "drop_vs_variance.png"), top)


# -- selection ------------------------------------------------------------------------------


def read_scores(outdir: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = os.path.join(outdir, SCORES_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run `gradfilter score DATA -o {outdir}` first")
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(outdir, RUN_FILE), encoding="utf-8") as f:
        run = json.load(f)
    return records, run


def _select_from(records, rows, source, ratio, top_k, output, order):
    from gradfilter.method.gsnr import select_top
    from gradfilter.io.rows import write_subset

    from gradfilter.method.selectors import HIGHER_IS_BETTER

    method = records[0].get("method", "gsnr") if records else "gsnr"
    key = "score" if records and "score" in records[0] else "gsnr"
    g = np.array([np.nan if r[key] is None else r[key] for r in records])
    chosen = select_top(g, ratio=ratio, top_k=top_k, n_rows=len(records),
                        higher_is_better=HIGHER_IS_BETTER[method]).tolist()
    return write_subset(rows, source, chosen, output, order=order), chosen


def select(outdir: str, ratio: float | None = None, top_k: int | None = None,
           output: str | None = None, order: str = "rank"):
    """Write the top rows of a finished run in the input's own format.

    k = floor(ratio * input rows) (or ``top_k``), never more than the rows that
    scored.  Returns ``(what write_subset returned, selected indices)``.
    """
    from gradfilter.io.rows import load_rows

    records, run = read_scores(outdir)
    src = run.get("source", {})
    if not src.get("path"):
        raise ValueError(f"{outdir} was scored from in-memory rows; select from the ScoreResult")
    rows, source = load_rows(src["path"], fields=run["config"].get("fields") or None)
    if len(rows) != len(records):
        raise ValueError(
            f"{src['path']} now has {len(rows)} rows but was scored with {len(records)}; re-run score"
        )
    if output is None:
        ext = {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}.get(source.kind, "")
        output = os.path.join(outdir, "selected" + ext)
    return _select_from(records, rows, source, ratio, top_k, output, order)
