"""The training loop of an ensemble run: warm-up steps, epochs, and the norm
points (in-flight columns or snapshot passes), with checkpoints as it goes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradfilter.method.schedule import WARMUP_EPOCH_SALT, member_schedule
from gradfilter.run.config import ScoreConfig
from gradfilter.run.dist import World
from gradfilter.run.state import RunState, checkpoint_file, load_checkpoint, save_checkpoint


def collate(encoded: list[Any], idx: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    from gradfilter.io.data import pad_batch

    return pad_batch([encoded[i] for i in idx], pad_id)


class TrainingDiverged(ValueError):
    """A member's training loss stopped being finite."""


class EnsembleRun:
    """Trains a :class:`~gradfilter.LoRAEnsemble` through the plan and records the
    per-example norms of every norm epoch into ``state.trajectory``.

    ``ok``: positions of the scorable rows; ``encoded``: every row's tokens (None
    for unscorable ones); ``plan``: a :class:`gradfilter.run.score.Plan`.

    In a run across processes (``world``), ``ens`` holds this process's share of
    the members and ``all_seeds`` every member's seed: each step's batches are
    drawn for the whole ensemble and padded to the length the whole fold would
    have, so a member computes what it computes in one process.  With ``group``
    (a :class:`gradfilter.run.dist.DataGroup`), the process takes its part of
    the rows of every step and norm pass, and the group sums the gradients and
    gathers the norms (data-parallel; see :mod:`gradfilter.run.dist`)."""

    def __init__(
        self,
        config: ScoreConfig,
        ens: Any,
        encoded: list[Any],
        ok: list[int],
        lengths: list[int],
        plan: Any,
        pad_id: int,
        outdir: str | None,
        identity: dict,
        say: Callable[[str], None],
        progress: bool,
        world: World | None = None,
        all_seeds: list[int] | None = None,
        group: Any = None,
    ) -> None:
        from gradfilter.run.budget import set_host_memory

        set_host_memory(config.host_memory)  # how freed activations are handled
        self.config, self.ens, self.encoded, self.ok = config, ens, encoded, ok
        self.lengths, self.plan, self.pad_id, self.say = lengths, plan, pad_id, say
        self.opt = ens.make_optimizer(lr=config.lr)
        self.world = world or World()
        self.group = group if group is not None and group.size > 1 else None
        self.sync = self.group.grad_sync(list(ens.adapters.parameters())) if self.group else None
        self._supervised: dict[int, int] = {}
        self.all_seeds = list(ens.member_seeds) if all_seeds is None else list(all_seeds)
        self.share = [self.all_seeds.index(s) for s in ens.member_seeds]
        self.state = RunState.new(len(ok), ens.members, len(plan.norm_epochs))
        name = checkpoint_file(self.world.rank, self.world.size)
        self.ckpt_path = os.path.join(outdir, name) if outdir else None
        self.identity = identity
        self.steps_run = 0
        self._resume()
        self.bar = _progress(plan.total_steps, "scoring", progress)
        self.bar.update(min(plan.done_steps(self.state), plan.total_steps))
        self.last_save = time.perf_counter()

    # -- checkpoints ----------------------------------------------------------------

    def _resume(self) -> None:
        if not self.ckpt_path:
            return
        if self.group is not None:
            ck = self._group_checkpoint()
        else:
            ck = load_checkpoint(self.ckpt_path, self.identity)
        if ck is None:
            return
        self.ens.adapters.load_state_dict(ck["adapters"])
        self.opt.load_state_dict(ck["optimizer"])
        self.ens.step = ck["ensemble_step"]
        self.state = RunState.from_checkpoint(ck["state"])
        s = self.state
        self.say(
            f"resuming from {self.ckpt_path}: warm-up step {s.warmup}, epoch {s.epoch}, "
            f"step {s.step}, snapshot {s.snapshot} batch {s.snap_batch}"
        )

    def _group_checkpoint(self) -> dict | None:
        """The newest checkpoint (this one or the one kept before it) whose place in
        training every process of the data group has: the group saves together, but
        a process killed while saving may be one checkpoint behind."""
        mine, error = [], None
        try:
            for path in (self.ckpt_path, self.prev_path):
                ck = load_checkpoint(path, self.identity)
                if ck is not None:
                    mine.append((path, ck))
        except ValueError as e:  # every process raises it, none waits for the others
            error = str(e)
        got = self.group.gather(([_place(c) for _, c in mine], error))
        errors = [e for _, e in got if e]
        if errors:
            raise ValueError(errors[0])
        everyone = [places for places, _ in got]
        common = [p for p in everyone[0] if all(p in theirs for theirs in everyone)]
        if not common:
            if any(everyone):
                self.say(
                    "warning: the processes of a data-parallel group hold no checkpoint of "
                    "the same step; starting the group's training again"
                )
            return None
        best = max(common)
        path, ck = next((p, c) for p, c in mine if _place(c) == best)
        if path != self.ckpt_path:  # drop the newer one the others lack: the group agrees again
            os.replace(path, self.ckpt_path)
        return ck

    @property
    def prev_path(self) -> str:
        return self.ckpt_path + ".prev"

    def save(self) -> None:
        if self.ckpt_path and self.group is not None and os.path.exists(self.ckpt_path):
            os.replace(self.ckpt_path, self.prev_path)  # kept until the group has moved on
        if self.ckpt_path:
            save_checkpoint(
                self.ckpt_path,
                self.identity,
                self.ens.adapters.state_dict(),
                self.opt.state_dict(),
                self.ens.step,
                self.state,
            )
        self.last_save = time.perf_counter()

    def _maybe_save(self, clock: str, t: float) -> float:
        """Checkpoint when due (in a data-parallel group: when due on any of its
        processes, all at once); returns the start of the next timed stretch."""
        due = time.perf_counter() - self.last_save > self.config.checkpoint_seconds
        if self.group is not None:
            due = self.group.any(due)
        if not due:
            return t
        setattr(self.state, clock, getattr(self.state, clock) + time.perf_counter() - t)
        self.save()
        return self.last_save

    def _stop_if_asked(self, stop_after: int | None, t: float) -> None:
        if stop_after is not None and self.steps_run >= stop_after:
            self.state.train_s += time.perf_counter() - t
            self.save()
            self.bar.close()
            raise KeyboardInterrupt(f"stopped after {self.steps_run} training steps")

    # -- the story ------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> RunState:
        """Warm-up, then each epoch followed by its due snapshot passes."""
        self.warm_up(stop_after)
        self.due_snapshots()  # a resumed run finishes a pass it was in
        while self.state.epoch < self.plan.epochs:
            self.train_epoch(stop_after)
            self.due_snapshots()
        self.bar.close()
        return self.state

    def warm_up(self, stop_after: int | None) -> None:
        """``warmup_steps`` steps drawn from extra shuffled epochs; nothing recorded."""
        spe, t = self.plan.steps_per_epoch, time.perf_counter()
        while self.state.warmup < self.plan.warmup:
            w_epoch, w_step = divmod(self.state.warmup, spe)
            schedule = self.schedule(WARMUP_EPOCH_SALT + w_epoch)
            self.train_step(*schedule[w_step], None)
            self.state.warmup += 1
            self._stop_if_asked(stop_after, t)
            t = self._maybe_save("train_s", t)
        self.state.train_s += time.perf_counter() - t

    def train_epoch(self, stop_after: int | None) -> None:
        epoch = self.state.epoch
        schedule = self.schedule(epoch)
        record = (
            self.plan.norm_epochs.index(epoch + 1)
            if self.config.norms == "inflight" and epoch + 1 in self.plan.norm_epochs
            else None
        )
        t = time.perf_counter()
        while self.state.step < len(schedule):
            self.train_step(*schedule[self.state.step], record)
            self.state.step += 1
            self._stop_if_asked(stop_after, t)
            t = self._maybe_save("train_s", t)
        self.state.train_s += time.perf_counter() - t
        self.state.epoch, self.state.step = epoch + 1, 0
        self.save()

    def schedule(self, epoch: int) -> list[tuple[list[list[int]], int | None]]:
        """Each step of the epoch: this process's members' batches, and the length to
        pad them to (None in one process: the longest row of the batches)."""
        full = member_schedule(
            self.lengths, self.config.batch_size, epoch, self.all_seeds, self.config.seed
        )
        if len(self.share) == len(self.all_seeds) and self.group is None:
            return [(step, None) for step in full]
        return [
            ([step[m] for m in self.share], max(self.lengths[j] for b in step for j in b))
            for step in full
        ]

    def supervised(self, j: int) -> int:
        """Scorable row ``j``'s supervised token count (a member loss's weight)."""
        n = self._supervised.get(j)
        if n is None:
            labels = np.asarray(self.encoded[self.ok[j]].labels)
            n = self._supervised[j] = int((labels[1:] != -100).sum())
        return n

    def _part(self, step: list[list[int]]) -> tuple[list[list[int]], Any]:
        """This process's rows of each member's batch, and ``train_step``'s
        ``part_of`` for them (None outside a data-parallel group)."""
        if self.group is None:
            return step, None
        from gradfilter.run.dist import split_rows

        start, stop = split_rows(len(step[0]), self.group.size, self.group.index)
        counts = [sum(self.supervised(j) for j in idx) for idx in step]
        widths = [max(self.lengths[j] for j in idx) for idx in step]
        return [idx[start:stop] for idx in step], (counts, start, widths)

    def train_step(self, step: list[list[int]], pad_to: int | None, record: int | None) -> None:
        """One folded optimizer step; ``record``: the trajectory column it fills in flight."""
        ens, ok, state = self.ens, self.ok, self.state
        whole = step
        step, part_of = self._part(step)
        batches = [collate(self.encoded, [ok[j] for j in idx], self.pad_id) for idx in step]
        visit = ens.step
        out = ens.train_step(
            batches,
            self.opt,
            max_tokens=self.config.token_budget,
            member_rows=[[ok[j] for j in idx] for idx in step]
            if ens.prefix_cache is not None
            else None,
            record_norms=record is not None,
            reduction=self.config.reduction,
            by_factor=True,
            pad_to=pad_to,
            part_of=part_of,
            grad_sync=self.sync,
        )
        losses = out[0] if record is not None else out
        if not bool(torch.isfinite(losses).all()):
            raise TrainingDiverged(
                f"training diverged: member losses {[round(x, 4) for x in losses.tolist()]} at "
                f"optimizer step {visit} (epoch {state.epoch + 1}); lower --lr or check --alpha"
            )
        if record is not None:
            traj = state.trajectory
            sq, parts = out[1].numpy(), {k: v.numpy() for k, v in out[2].items()}
            if self.group is not None:  # every process of the group records the whole step
                got = self.group.gather((sq, parts["A"], parts["B"]))
                sq = np.concatenate([g[0] for g in got], axis=1)
                parts = {
                    k: np.concatenate([g[i] for g in got], axis=1) for i, k in ((1, "A"), (2, "B"))
                }
                step = whole
            for mi, idx in enumerate(step):  # [M, B], of each row's own loss
                traj["sq"][idx, mi, record] = sq[mi, : len(idx)]
                traj["sq_a"][idx, mi, record] = parts["A"][mi, : len(idx)]
                traj["sq_b"][idx, mi, record] = parts["B"][mi, : len(idx)]
                traj["visit_step"][idx, mi, record] = visit
        seq = max([b[0].shape[1] for b in batches] + [pad_to or 0])
        real = sum(int(b[2].sum()) for b in batches)  # this process's tokens
        state.tokens += real
        state.padded += seq * sum(b[0].shape[0] for b in batches) - real
        state.losses.append([state.epoch, state.step, losses.tolist()])
        self.bar.update(1)
        self.steps_run += 1

    def due_snapshots(self) -> None:
        if self.config.norms == "inflight":
            return
        for epoch in self.plan.norm_epochs:
            if self.state.epoch >= epoch and epoch not in self.state.snaps_done:
                self.snapshot(epoch)

    def snapshot(self, epoch: int) -> None:
        """An eval-mode norm pass over every scorable row after ``epoch``."""
        state = self.state
        c = self.plan.norm_epochs.index(epoch)
        if state.snapshot != epoch:
            state.snapshot, state.snap_batch = epoch, 0
        t = time.perf_counter()
        if self.group is not None:
            self._group_snapshot(c, t)
            return
        for bi in range(state.snap_batch, len(self.plan.snaps)):
            self._snap_batch(self.plan.snaps[bi], c)
            state.snap_batch = bi + 1
            self.bar.update(1)
            t = self._maybe_save("snapshot_s", t)
        self._snapshot_done(epoch, t)

    def _snap_batch(self, idx: list[int], c: int) -> None:
        """Norms of the scorable rows ``idx`` into trajectory column ``c``."""
        state, ens, m = self.state, self.ens, self.ens.members
        rows = [self.ok[j] for j in idx]
        ids, labels, mask = collate(self.encoded, rows, self.pad_id)
        norms = ens.per_example_grad_norms(
            ids,
            labels,
            mask,
            reduction=self.config.reduction,
            max_tokens=self.config.token_budget or 0,
            rows=rows if ens.prefix_cache is not None else None,
        )
        state.trajectory["sq"][idx, :, c] = (norms.double() ** 2).T.numpy()
        state.trajectory["visit_step"][idx, :, c] = ens.step
        state.tokens += int(mask.sum()) * m
        state.padded += int(mask.numel() - mask.sum()) * m

    def _snapshot_done(self, epoch: int, t: float) -> None:
        state = self.state
        state.snapshot_s += time.perf_counter() - t
        state.snapshot, state.snap_batch = None, 0
        state.snaps_done.append(epoch)
        self.save()

    def _group_snapshot(self, c: int, t: float) -> None:
        """A data-parallel norm pass: rounds of one batch per process of the group;
        at the end the group gathers the column, so each process holds all of it."""
        state, snaps, size = self.state, self.plan.snaps, self.group.size
        epoch = state.snapshot
        for r0 in range(state.snap_batch, len(snaps), size):
            bi = r0 + self.group.index
            if bi < len(snaps):
                self._snap_batch(snaps[bi], c)
            state.snap_batch = min(r0 + size, len(snaps))
            self.bar.update(state.snap_batch - r0)
            t = self._maybe_save("snapshot_s", t)
        mine = [j for bi in range(self.group.index, len(snaps), size) for j in snaps[bi]]
        traj = state.trajectory
        got = self.group.gather(
            (mine, traj["sq"][mine, :, c].copy(), traj["visit_step"][mine, :, c].copy())
        )
        for rows, sq, visit in got:
            traj["sq"][rows, :, c] = sq
            traj["visit_step"][rows, :, c] = visit
        self._snapshot_done(epoch, t)


def _place(ck: dict) -> tuple:
    """Where in training a checkpoint was saved (comparable, later is larger)."""
    s = ck["state"]
    snap = s.get("snapshot")
    return (
        int(ck["ensemble_step"]),
        len(s.get("snaps_done", [])),
        -1 if snap is None else int(snap),
        int(s.get("snap_batch", 0)),
    )


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )
