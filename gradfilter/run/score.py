"""GradFiltering end to end: rows -> tokens -> LoRA ensemble -> G-SNR -> ranking.

:func:`score` reads as its steps: load the proxy, :func:`prepare` the rows,
:func:`plan` the work, train the ensemble through the plan while recording the
per-example norms of every norm epoch (:class:`gradfilter.run.loop.EnsembleRun`),
and turn the early and late columns into records.  It writes
``OUTDIR/scores.jsonl`` (one row per input row, in input order),
``OUTDIR/run.json``, ``OUTDIR/norms.npz`` (the trajectory) and two plots.  The
run checkpoints to ``OUTDIR/checkpoint.pt`` as it goes, so the same command
after a kill resumes where it stopped and ends with the same scores.
:func:`rescore` recomputes scores from ``norms.npz`` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradfilter.method.registry import METHODS
from gradfilter.run.budget import choose_token_budget
from gradfilter.run.config import ScoreConfig
from gradfilter.run.dist import (
    DataGroup,
    Layout,
    World,
    agree,
    choose_layout,
    finish,
    gather,
    run_device,
    start,
    together,
    world_from_env,
)
from gradfilter.run.forward import pad_id_of, run_summary, score_forward
from gradfilter.run.loop import EnsembleRun, TrainingDiverged
from gradfilter.run.records import (
    NORMS_FILE,
    ROW_FIELDS,
    RUN_FILE,
    SCORES_FILE,
    atomic_write,
    read_norms,
    read_run,
    read_scores,
    record_table,
    records_from_trajectory,
    row_meta,
    rows_fingerprint,
    write_norms,
    write_outputs,
)
from gradfilter.run.select import select, select_from
from gradfilter.run.state import CHECKPOINT_FILE, RunState, claim_outdir, fingerprint, run_identity

WORLD = World()

__all__ = [
    "CHECKPOINT_FILE",
    "NORMS_FILE",
    "RUN_FILE",
    "SCORES_FILE",
    "Plan",
    "Prepared",
    "ScoreConfig",
    "ScoreResult",
    "plan",
    "prepare",
    "read_norms",
    "read_scores",
    "rescore",
    "score",
    "select",
]


@dataclass
class ScoreResult:
    """What ``score`` returns: the per-row records and the run summary."""

    records: list[dict[str, Any]]
    run: dict[str, Any]
    outdir: str | None
    rows: list[Any] = field(repr=False, default_factory=list)
    source: Any = field(repr=False, default=None)

    def select(
        self,
        ratio: float | None = None,
        top_k: int | None = None,
        output: str | None = None,
        order: str = "rank",
    ):
        """The top rows, written in the input's own format (see :func:`select`).  A
        streamed run (``stream=True``) selects from its folder, reading the input again."""
        if self.run.get("stream"):
            if not self.outdir:
                raise ValueError(
                    "a streamed run without an output folder holds no rows to write; score "
                    "with an output folder and select from it"
                )
            return select(self.outdir, ratio, top_k, output, order)
        return select_from(self.records, self.rows, self.source, ratio, top_k, output, order)


@dataclass
class Prepared:
    """The loaded rows: ``encoded[i]`` is None for a row that cannot be scored
    (its status says why); ``ok`` lists the scorable positions.  With ``store``
    (a :class:`gradfilter.run.store.RowStore`, ``--stream``) ``rows`` and
    ``encoded`` read the rows from disk as they are used."""

    rows: Any
    source: Any
    encoded: Any
    store: Any = None

    @property
    def ok(self) -> Any:
        if self.store is not None:
            return self.store.ok
        return [i for i, e in enumerate(self.encoded) if e is not None]

    @property
    def lengths(self) -> Any:
        if self.store is not None:
            return self.store.length[self.store.ok]
        return [len(self.encoded[i].input_ids) for i in self.ok]

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.store is not None:  # kinds in order of first appearance, as below
            bad = sorted(self.store.statuses)
            first_ok = next((k for k, i in enumerate(bad) if k != i), len(bad))
            n_ok = self.store.n - len(bad)
            for k, i in enumerate(bad):
                if k == first_ok and n_ok:
                    out["ok"] = n_ok
                key = status_kind(self.store.statuses[i])
                out[key] = out.get(key, 0) + 1
            if n_ok and "ok" not in out:
                out["ok"] = n_ok
            return out
        for r in self.rows:
            key = status_kind(r.status)
            out[key] = out.get(key, 0) + 1
        return out

    def set_status(self, i: int, status: str) -> None:
        if self.store is not None:
            self.store.set_status(i, status)
        else:
            self.rows[i].status = status

    def drop(self, i: int, status: str) -> None:
        """Row ``i`` is not scored after all; ``status`` says why."""
        if self.store is not None:
            self.store.drop(i, status)
        else:
            self.rows[i].status = status
            self.encoded[i] = None

    def drop_all(self, status: str) -> None:
        for i in list(self.ok):
            self.drop(int(i), status)

    def meta(self) -> Any:
        """Every row's :data:`ROW_FIELDS` (a list, or the store itself)."""
        return self.store if self.store is not None else row_meta(self.rows, self.encoded)

    def fingerprint(self) -> str:
        if self.store is not None:
            return self.store.rows_fingerprint
        return rows_fingerprint(self.rows)

    @property
    def truncated(self) -> int:
        if self.store is not None:
            return int(self.store.truncated[self.store.length > 0].sum())
        return sum(1 for e in self.encoded if e is not None and e.truncated)


@dataclass
class Plan:
    """The work of a run, decided before any of it is done."""

    ensemble: bool
    epochs: int
    norm_epochs: list[int]
    warmup: int
    steps_per_epoch: int
    snaps: list[list[int]]  # norm-pass batches (positions among the scorable rows)
    snapshot_passes: int
    summary: dict[str, Any]
    description: str

    @property
    def total_steps(self) -> int:
        return (
            self.warmup
            + self.steps_per_epoch * self.epochs
            + self.snapshot_passes * len(self.snaps)
        )

    def done_steps(self, state: Any) -> int:
        return (
            state.warmup
            + state.epoch * self.steps_per_epoch
            + state.step
            + len(self.snaps) * len(state.snaps_done)
            + state.snap_batch
        )


def prepare(
    data: Any,
    config: ScoreConfig,
    tokenizer: Any,
    store: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Prepared:
    """Load and tokenise the rows (:class:`Prepared`); a row that cannot be encoded
    gets the reason as its status.  ``store``: a folder to stream the rows into
    (:func:`gradfilter.run.store.build_store`) instead of holding them."""
    if store is not None:
        from gradfilter.run.store import build_store

        built = build_store(
            data, store, tokenizer, config.max_length, config.template, config.fields or None,
            log=log,
        )  # fmt: skip
        return Prepared(built.rows, _stream_source(data, config), built.encoded, built)
    from gradfilter.io.data import encode_rows
    from gradfilter.io.rows import load_rows

    rows, source = load_rows(data, fields=config.fields or None)
    encoded, statuses = encode_rows(
        rows, tokenizer, config.max_length, config.template, small=True
    )  # int32 arrays: 8 bytes a token
    for row, status in zip(rows, statuses, strict=True):
        row.status = status
    return Prepared(rows, source, encoded)


def _stream_source(data: str | os.PathLike[str], config: ScoreConfig) -> Any:
    """The :class:`~gradfilter.io.rows.Source` of streamed rows (no rows held)."""
    from pathlib import Path

    from gradfilter.io.rows import Source, _checked_kind, _resolve_fields

    fields = _resolve_fields(config.fields or None)
    return Source(_checked_kind(Path(data), "auto"), str(data), fields)


@dataclass
class Counts:
    """What a plan needs to know of the rows: their number, statuses (by kind),
    the token count of each scorable row (input order) and how many were cut."""

    rows: int
    statuses: dict[str, int]
    lengths: np.ndarray
    truncated: int


def status_kind(status: str) -> str:
    """The kind of a row status, without the row's particulars ("ok", "empty
    response", "invalid JSON on line 3 (...)" -> "invalid JSON on line 3")."""
    return status.split(" (")[0].split(":")[0]


def counts_of(prepared: Prepared) -> Counts:
    return Counts(
        rows=len(prepared.rows),
        statuses=prepared.statuses(),
        lengths=np.asarray(prepared.lengths, dtype=np.int64),
        truncated=prepared.truncated,
    )


def member_steps(n_rows: int, batch_size: int, level_batches: int = 4) -> int:
    """Optimizer steps of one epoch of :func:`~gradfilter.method.schedule.member_schedule`
    over ``n_rows`` rows (levels of ``level_batches`` batches, the last one short)."""
    size = batch_size * level_batches
    full, rest = divmod(n_rows, size)
    return full * level_batches + -(-rest // batch_size)


def snapshot_batch_count(lengths: np.ndarray, batch_size: int, token_budget: int | None) -> int:
    """``len(snapshot_batches(lengths, batch_size, token_budget))`` without building them."""
    n = 0
    cur = 0
    for length in np.sort(np.asarray(lengths, dtype=np.int64)).tolist():
        if cur and (cur >= batch_size or (token_budget and (cur + 1) * length > token_budget)):
            n += 1
            cur = 0
        cur += 1
    return n + (1 if cur else 0)


def steps_per_epoch(config: ScoreConfig, prepared: Prepared) -> int:
    """Optimizer steps in one epoch over the scorable rows."""
    return member_steps(len(prepared.ok), config.batch_size)


def plan(config: ScoreConfig, prepared: Prepared) -> Plan:
    """Epochs, warm-up, norm epochs and norm-pass batches of a run, and its summary."""
    from gradfilter.method.schedule import snapshot_batches

    ensemble = METHODS[config.method].kind == "ensemble"
    per_pass = config.members if ensemble else 1
    snaps = snapshot_batches(
        prepared.lengths,
        config.batch_size,
        config.token_budget // per_pass if config.token_budget else None,
    )
    return plan_from_counts(config, counts_of(prepared), snaps)


def plan_from_counts(config: ScoreConfig, counts: Counts, snaps: list | None = None) -> Plan:
    """:func:`plan` from :class:`Counts` alone; without ``snaps`` (a dry run over a
    stream) the norm-pass batches are counted, not built, and the plan holds none."""
    ensemble = METHODS[config.method].kind == "ensemble"
    epochs = (config.early if config.method == "grand" else config.epochs) if ensemble else 0
    norm_epochs = [e for e in config.norm_epochs() if e <= epochs] if ensemble else []
    passes = len(norm_epochs) if config.norms == "snapshot" else 0
    n_ok = len(counts.lengths)
    spe = member_steps(n_ok, config.batch_size)
    warmup = config.warmup_steps if ensemble else 0
    # Norm passes fold all members into one batch; forward-only methods do not.
    per_pass = config.members if ensemble else 1
    budget = config.token_budget // per_pass if config.token_budget else None
    n_snaps = (
        len(snaps)
        if snaps is not None
        else snapshot_batch_count(counts.lengths, config.batch_size, budget)
    )
    summary = {
        "rows": counts.rows,
        "scorable_rows": n_ok,
        "statuses": counts.statuses,
        "tokens": int(counts.lengths.sum()),
        "truncated_rows": counts.truncated,
        "method": config.method,
        "training_steps": spe * epochs + warmup,
        "snapshot_batches": passes * n_snaps,
        "member_sequences_processed": (
            n_ok * config.members * (epochs + passes) + warmup * config.batch_size * config.members
        ),
    }
    if ensemble:
        summary["schedule"] = {
            "warmup_steps": warmup,
            "steps_per_epoch": spe,
            "epochs": epochs,
            "early": config.early,
            "late": config.late,
            "norm_epochs": norm_epochs,
            "norms": config.norms,
            "early_after": config.early_after,
            "early_starts_at_step": warmup + (config.early - 1) * spe,
        }
        work = (
            f"{warmup} warm-up steps, {epochs} epochs x {spe} steps and {passes} snapshot "
            f"passes x {n_snaps} batches, {config.members} members in each folded pass"
        )
        if config.norms == "inflight":
            work += f"; norms recorded in flight during epochs {norm_epochs}"
    else:
        work = f"forward passes over {n_snaps} batches ({config.method})"
    text = (
        f"{summary['rows']} rows ({summary['scorable_rows']} scorable; {summary['statuses']}), "
        f"{summary['tokens']} tokens, {summary['truncated_rows']} truncated; plan: {work}"
    )
    return Plan(ensemble, epochs, norm_epochs, warmup, spe, snaps or [], passes, summary, text)


def check_proxy_settings(config: ScoreConfig) -> None:
    """The LoRA targets and ``lora_layers_from`` against the proxy's architecture,
    from its configuration alone, so that a bad setting fails before the weights
    load (seconds to minutes for a large proxy)."""
    if METHODS[config.method].kind != "ensemble":
        return
    from gradfilter.io.models import proxy_skeleton
    from gradfilter.method.lora import resolve_targets

    try:
        skeleton = proxy_skeleton(config.proxy)
    except (OSError, ValueError, ImportError, KeyError):
        return  # the loader itself gives the error for a proxy it cannot find or read
    resolve_targets(skeleton, config.targets, config.lora_layers_from)


def _load_proxy(
    config: ScoreConfig, given: tuple[Any, Any] | None, device: torch.device | None = None
) -> tuple[Any, Any]:
    """The proxy and its tokenizer on ``device`` (None: where a given model is)."""
    if given is None:
        from gradfilter.io.models import load_proxy

        model, tok = load_proxy(config.proxy, dtype=getattr(torch, config.dtype))
    else:
        model, tok = given
    if device is not None:
        model = model.to(device)
    if getattr(model.config, "_attn_implementation", None) == "eager":
        # sdpa keeps the attention matrices out of the saved activations.
        model.config._attn_implementation = "sdpa"
    return model, tok


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
    force: bool = False,
    stream: bool = False,
) -> ScoreResult:
    """Score every row of ``data`` by ``config.method`` (G-SNR by default).

    Args:
        data: a path (Alpaca JSON/JSONL, chat ``messages`` JSONL, Parquet, a saved
            Hugging Face dataset), a list of dicts, or a ``datasets.Dataset``.
        outdir: where scores, run summary, norms, plots and the checkpoint go;
            None keeps everything in memory (no resume).
        config: the run's settings (:class:`ScoreConfig`).
        dry_run: report rows, tokens and the planned work, then stop.
        model_and_tokenizer: use this proxy instead of loading ``config.proxy``.
        stop_after: stop (as if killed) after this many training steps; for tests.
        force: ``outdir`` may hold the outputs of another run; they are removed.
            Without it such a folder is refused (a finished run of the same
            settings is simply finished again; an interrupted one resumes).
        stream: read ``data`` as a stream into files under ``outdir`` (a
            temporary folder without one; :mod:`gradfilter.run.store`) instead
            of holding every row in memory: for corpora larger than memory.
            The scores are the same; ``ScoreResult.records`` is then
            :class:`~gradfilter.run.records.Records` (made as they are read)
            and ``ScoreResult.rows`` light rows without their texts.

    Raises:
        ValueError: bad settings, an unusable output folder, no scorable row (the
            per-row statuses are still written to ``scores.jsonl``), or training
            that diverged (a non-finite loss).
    """
    config = config or ScoreConfig()
    config.validate()
    world = world_from_env()
    say = _process_log(log or (lambda s: print(s, file=sys.stderr)), world)
    device = (
        None
        if model_and_tokenizer is not None and config.device == "auto"
        else run_device(config.device, world)
    )
    joined = start(world, device or next(model_and_tokenizer[0].parameters()).device)
    try:
        result = _score(
            data, outdir, config, world, device, say, progress, dry_run,
            model_and_tokenizer, stop_after, force, stream,
        )  # fmt: skip
    except BaseException:
        if joined:
            finish(world, wait=False)
        raise
    if joined:
        finish(world)
    return result


def _check_positions(config: ScoreConfig, model: Any) -> None:
    """A proxy with learned absolute positions (GPT-2's ``n_positions``) cannot
    read past them: refuse a longer ``max_length`` before any row is run."""
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    if isinstance(limit, int) and config.max_length > limit:
        raise ValueError(
            f"--max-length {config.max_length} is longer than the proxy's {limit} learned "
            f"positions (n_positions); give --max-length {limit} or less"
        )


def _process_log(say: Callable[[str], None], world: World) -> Callable[[str], None]:
    """Rank 0 says everything; the other processes only warnings and errors."""
    if world.main:
        return say

    def other(message: str) -> None:
        if message.startswith(("warning", "error")):
            say(f"[rank {world.rank}] {message}")

    return other


def _score(
    data, outdir, config, world, device, say, progress, dry_run, model_and_tokenizer,
    stop_after, force, stream=False,
) -> ScoreResult:  # fmt: skip
    ensemble = METHODS[config.method].kind == "ensemble"
    if world.distributed and not ensemble:
        raise ValueError(
            f"--method {config.method} is a forward pass without an ensemble; it runs in one "
            "process (start it without torchrun)"
        )
    layout = choose_layout(config.members, world.size, config.parallel) if ensemble else Layout()
    share = layout.share(config.members, world.rank) if ensemble else []
    if model_and_tokenizer is None:
        check_proxy_settings(config)  # before the output folder is touched
    if outdir and not dry_run:
        together(world, claim_outdir, outdir, config, force, world.size)
    if config.members == 1 and config.method in ("gsnr", "late_var"):
        say(
            "warning: with one member the late variance is 0 for every row, so G-SNR is the "
            "drop divided by eps (the paper formula) and late_var ranks every row the same"
        )
    t_start = time.perf_counter()
    model, tok = _load_proxy(config, model_and_tokenizer, device)
    _check_positions(config, model)
    timings = {"load_s": time.perf_counter() - t_start}
    if dry_run:
        return _dry_run(data, outdir, config, model, tok, world, share, say, layout)
    if stream:
        _check_stream(data, config)
    t0 = time.perf_counter()
    with _store_folder(outdir if stream else None, world, stream) as folder:
        prepared = prepare(data, config, tok, store=folder, log=say)
        timings["tokenize_s"] = time.perf_counter() - t0
        try:
            return _score_prepared(
                prepared, outdir, config, world, say, progress, model, tok, timings,
                stop_after, share, layout, t_start,
            )  # fmt: skip
        finally:
            if prepared.store is not None:
                prepared.store.close()  # reopened on demand by the records it backs


def _check_stream(data: Any, config: ScoreConfig) -> None:
    """``stream`` reads a file or folder with an ensemble method."""
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(
            "stream=True reads the rows from a file or folder (JSON Lines, Parquet, a saved "
            f"dataset); {type(data).__name__} rows are already in memory: score them without it"
        )
    if METHODS[config.method].kind != "ensemble":
        raise ValueError(
            f"--stream runs the ensemble methods; --method {config.method} reads every row "
            "at once: run it without --stream"
        )


@contextlib.contextmanager
def _store_folder(outdir: str | None, world: World, stream: bool):
    """Where a streamed run keeps its rows (None: held in memory): ``OUTDIR/rows``
    (one folder per process under torchrun), else a temporary folder."""
    if not stream:
        yield None
        return
    name = "rows" if world.size == 1 else f"rows.rank{world.rank}"
    if outdir:
        yield os.path.join(outdir, name)
        return
    with tempfile.TemporaryDirectory(prefix="gradfilter-rows-") as tmp:
        yield os.path.join(tmp, name)


def _score_prepared(
    prepared, outdir, config, world, say, progress, model, tok, timings, stop_after, share,
    layout, t_start,
) -> ScoreResult:  # fmt: skip
    ensemble = METHODS[config.method].kind == "ensemble"
    config, budget = choose_token_budget(
        config, model, prepared, outdir, share=len(share) or None,
        agree=lambda b: min(gather(world, b)),
    )  # fmt: skip
    if ensemble:
        config = config.resolve_schedule(steps_per_epoch(config, prepared))
    work = plan(config, prepared)
    _note_parallel(work, config, world, share, layout)
    work.summary["token_budget"] = budget.to_json()
    say(f"{work.description}; {budget.describe()}")
    if len(prepared.ok) == 0:
        _no_row_scored(config, prepared, work, outdir, world.main)
    if work.ensemble:
        records, counted, extra = _score_ensemble(
            config, model, tok, prepared, work, outdir, say, progress, stop_after, timings,
            world, share, layout,
        )  # fmt: skip
    else:
        records, counted, extra = score_forward(config, model, tok, prepared, work, timings)
    timings["total_s"] = time.perf_counter() - t_start
    run = {**run_summary(config, prepared.source, work.summary, timings, counted, model), **extra}
    run["token_budget"] = budget.to_json()
    run["rows_fingerprint"] = prepared.fingerprint()
    if prepared.store is not None:
        run["stream"] = {"rows_folder": prepared.store.folder, "rows": prepared.store.n}
    if outdir and world.main:
        write_outputs(outdir, records, run)
    rows = prepared.rows
    if prepared.store is not None and not outdir:  # the temporary store goes with the run
        records, rows = list(records), list(rows)
    return ScoreResult(records, run, outdir, rows, prepared.source)


def _note_parallel(
    work: Plan, config: ScoreConfig, world: World, share: list[int], layout: Layout
) -> None:
    if world.distributed:
        work.summary["parallel"] = layout.to_json(config.members)
        work.description += f"; {layout.describe(config.members)} (members {share} on this one)"


def _dry_run(data, outdir, config, model, tok, world, share, say, layout) -> ScoreResult:
    """Plan the run over a stream of the rows (:mod:`gradfilter.run.stream`): host
    memory bounded by a chunk of rows, whatever the corpus size; nothing trained."""
    from gradfilter.run.budget import pick_token_budget
    from gradfilter.run.stream import count_rows

    ensemble = METHODS[config.method].kind == "ensemble"
    budget = pick_token_budget(
        config, model, outdir, share=len(share) or None, agree=lambda b: min(gather(world, b))
    )
    auto = None if budget.how == "given" else budget.token_budget
    counts = count_rows(
        data, config, tok, members=config.members if ensemble else 1, auto_budget=auto, log=say
    )
    config = dataclasses.replace(config, token_budget=budget.token_budget)
    if ensemble:
        config = config.resolve_schedule(member_steps(len(counts.lengths), config.batch_size))
    work = plan_from_counts(config, counts)
    _note_parallel(work, config, world, share, layout)
    work.summary["token_budget"] = budget.to_json()
    say(f"{work.description}; {budget.describe()}")
    return ScoreResult(
        [], {"plan": work.summary, "config": dataclasses.asdict(config)}, outdir, [], None
    )


def _mark_non_finite(
    prepared: Prepared, config: ScoreConfig, sq: np.ndarray, norm_epochs: list[int]
) -> None:
    """A scored row whose early or late norm is not finite (overflow, a member that
    diverged on it) says so in its status instead of silently having no score;
    infinite entries of ``sq`` become NaN (in place)."""
    needed = [config.early] if config.method == "grand" else [config.early, config.late]
    cols = [norm_epochs.index(e) for e in needed]
    bad = ~np.isfinite(sq[:, :, cols]).all(axis=(1, 2))
    sq[~np.isfinite(sq)] = np.nan  # an infinite norm is no measurement: NaN, as unscored
    ok = prepared.ok
    for j in np.flatnonzero(bad).tolist():
        prepared.set_status(int(ok[j]), f"gradient norm not finite at epochs {needed}")


def _no_row_scored(
    config: ScoreConfig, prepared: Prepared, work: Plan, outdir: str | None, main: bool = True
):
    """Write every row's status (when there is a folder; rank 0), then raise."""
    if outdir and main:
        meta = prepared.meta()
        run = {
            "config": dataclasses.asdict(config),
            "method": config.method,
            "plan": work.summary,
            "scored": 0,
        }
        write_outputs(outdir, record_table(meta, [], config, **_empty_inputs(config)), run)
    raise ValueError(
        "no row can be scored: "
        + json.dumps(work.summary["statuses"])
        + (f"; the status of every row is in {outdir}/{SCORES_FILE}" if outdir else "")
    )


def _empty_inputs(config: ScoreConfig) -> dict[str, Any]:
    """``build_records`` inputs of a run that scored no row."""
    method = METHODS[config.method]
    if method.kind != "ensemble":
        return {"values": {method.source: np.zeros(0)}}
    empty = np.zeros((0, config.members))
    return {"early_sq": empty, "late_sq": None if config.method == "grand" else empty}


def _score_ensemble(
    config, model, tok, prepared, work, outdir, say, progress, stop_after, timings,
    world=WORLD, share=None, layout=None,
):  # fmt: skip
    """Train the ensemble (this process's ``share`` of the members) through the plan;
    records from every member's early and late norms (gathered from every process)."""
    from gradfilter.method.ensemble import LoRAEnsemble

    share = list(range(config.members)) if share is None else share
    seeds = [config.seed + m for m in range(config.members)]
    torch.manual_seed(config.seed)
    ens = LoRAEnsemble(
        model,
        members=len(share),
        r=config.rank,
        alpha=config.alpha,
        dropout=config.dropout,
        target_modules=config.targets,
        seed=config.seed,
        member_seeds=[seeds[m] for m in share],
        layers_from=config.lora_layers_from,
        prefix_cache=config.prefix_cache,
    )
    ens.fold_members = config.members  # chunks sized as in one process
    identity = run_identity(config, prepared.rows, prepared.encoded, model, tok)
    agree(world, "the settings, rows and proxy", fingerprint(identity))
    layout = layout or Layout(world.size, 1)
    group = DataGroup(layout, world.rank) if layout.data > 1 else None
    if world.distributed:
        identity["processes"] = {"world_size": world.size, "members": share}
        if layout.data > 1:
            identity["processes"]["layout"] = [layout.groups, layout.data]
    ok = prepared.ok
    diverged = None
    try:
        loop = EnsembleRun(
            config,
            ens,
            prepared.encoded,
            ok,
            prepared.lengths,
            work,
            pad_id_of(tok),
            outdir,
            identity,
            say,
            progress and world.main,
            world=world,
            all_seeds=seeds,
            group=group,
        )
        state = loop.run(stop_after)
    except TrainingDiverged as e:
        diverged = str(e)
    finally:
        ens.remove()  # the proxy is left without hooks, whatever happened
    comm: dict[str, Any] = {}
    if world.distributed:
        t0 = time.perf_counter()
        parts = gather(world, (diverged, None if diverged else state.shareable()))
        comm["final_gather_s"] = time.perf_counter() - t0
        if group is not None:
            comm["group_collectives_s"] = gather(world, group.seconds)
        diverged = next((d for d, _ in parts if d), None)
        if diverged is None:
            # one process per member group holds the group's (gathered) trajectory;
            # every process counted the tokens it ran
            leaders = [p for r, (_, p) in enumerate(parts) if layout.data_rank(r) == 0]
            state = RunState.merged(leaders)
            state.tokens = sum(p["tokens"] for _, p in parts)
            state.padded = sum(p["padded"] for _, p in parts)
    if diverged is not None:
        prepared.drop_all(f"not scored: {diverged}")  # every row still gets its status
        _no_row_scored(config, prepared, work, outdir, world.main)
    timings["train_s"], timings["snapshot_s"] = state.train_s, state.snapshot_s
    _mark_non_finite(prepared, config, state.trajectory["sq"], work.norm_epochs)
    meta = prepared.meta()
    records = records_from_trajectory(
        meta, ok, config, state.trajectory["sq"], work.norm_epochs, table=prepared.store is not None
    )
    if outdir and world.main:
        write_norms(
            outdir,
            state.trajectory,
            ok,
            meta,
            work.norm_epochs,
            [work.warmup + e * work.steps_per_epoch for e in work.norm_epochs],
        )
    counted = {
        "tokens": state.tokens,
        "padded": state.padded,
        "seconds": state.train_s + state.snapshot_s,
    }
    extra: dict[str, Any] = {
        "member_seeds": seeds,
        "final_losses": state.losses[-1][2] if state.losses else None,
    }
    if comm:  # wall seconds in collectives (waiting for the slowest process included)
        extra["communication"] = comm
    if ens.prefix_cache is not None:
        extra["prefix_cache"] = {
            "layers_from": ens.layers_from,
            "rows": len(ens.prefix_cache),
            "rows_computed": ens.prefix_cache.computed_rows,
            "bytes": ens.prefix_cache.nbytes,
        }
    return records, counted, extra


def rescore(
    outdir: str,
    *,
    formula: str | None = None,
    early: int | None = None,
    late: int | None = None,
    method: str | None = None,
    output: str | None = None,
    plots: bool = True,
    **gsnr_options: Any,
) -> ScoreResult:
    """Recompute every score and rank of a finished ensemble run from its stored
    norms, with another formula, early / late epoch or method; no model is loaded.

    Writes ``scores.jsonl`` and ``run.json`` (and the plots) to ``output``
    (default: ``outdir`` itself) and copies ``norms.npz`` there.  With the run's
    own settings the new ``scores.jsonl`` is byte-identical to the old one.
    ``gsnr_options``: ``drop``, ``spread``, ``of``, ``ddof``, ``eps``.  ``plots=False``
    leaves the plots out (about a third of the time on 100,000 rows).
    """
    run = read_run(outdir)
    norms = read_norms(outdir, keys=("sq", "epoch", "scored", "rows"))
    changes = {
        k: v
        for k, v in dict(
            formula=formula, early=early, late=late, method=method, **gsnr_options
        ).items()
        if v is not None
    }
    config = ScoreConfig(**{**run["config"], **changes})
    if METHODS.get(config.method) is None or METHODS[config.method].kind != "ensemble":
        names = [n for n, m in METHODS.items() if m.kind == "ensemble"]
        raise ValueError(
            f"rescore works for the ensemble methods {', '.join(names)}; got {config.method!r}"
        )
    config.validate()
    epochs = [int(e) for e in norms["epoch"]]
    for e in (config.early,) if config.method == "grand" else (config.early, config.late):
        if e not in epochs:
            raise ValueError(
                f"epoch {e} has no recorded norms in {outdir}; recorded: {epochs} "
                "(record more with score --snapshots)"
            )
    if "rows" in norms:
        meta = json.loads(str(norms["rows"]))
    else:  # norms.npz written before the rows' fields were stored there
        meta = [{k: r[k] for k in ROW_FIELDS} for r in read_scores(outdir)[0]]
    ok = [int(i) for i in norms["scored"]]
    new = records_from_trajectory(meta, ok, config, norms["sq"][ok], epochs)
    run = dict(run, config=dataclasses.asdict(config), method=config.method)
    dest = output or outdir
    write_outputs(dest, new, run, plots=plots)
    if os.path.abspath(dest) != os.path.abspath(outdir):
        with open(os.path.join(outdir, NORMS_FILE), "rb") as f:
            atomic_write(os.path.join(dest, NORMS_FILE), f.read())
    return ScoreResult(new, run, dest)
