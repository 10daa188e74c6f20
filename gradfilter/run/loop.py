"""The training loop of an ensemble run: warm-up steps, epochs, and the norm
points (in-flight columns or snapshot passes), with checkpoints as it goes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

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
    have, so a member computes what it computes in one process."""

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
    ) -> None:
        from gradfilter.run.budget import return_freed_memory

        return_freed_memory()  # the activations of a pass do not stay resident after it
        self.config, self.ens, self.encoded, self.ok = config, ens, encoded, ok
        self.lengths, self.plan, self.pad_id, self.say = lengths, plan, pad_id, say
        self.opt = ens.make_optimizer(lr=config.lr)
        self.world = world or World()
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

    def save(self) -> None:
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
        """Checkpoint when due; returns the start of the next timed stretch."""
        if time.perf_counter() - self.last_save <= self.config.checkpoint_seconds:
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
        if len(self.share) == len(self.all_seeds):
            return [(step, None) for step in full]
        return [
            ([step[m] for m in self.share], max(self.lengths[j] for b in step for j in b))
            for step in full
        ]

    def train_step(self, step: list[list[int]], pad_to: int | None, record: int | None) -> None:
        """One folded optimizer step; ``record``: the trajectory column it fills in flight."""
        ens, ok, state = self.ens, self.ok, self.state
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
            for mi, idx in enumerate(step):  # [M, B], of each row's own loss
                traj["sq"][idx, mi, record] = sq[mi, : len(idx)]
                traj["sq_a"][idx, mi, record] = parts["A"][mi, : len(idx)]
                traj["sq_b"][idx, mi, record] = parts["B"][mi, : len(idx)]
                traj["visit_step"][idx, mi, record] = visit
        seq = max([b[0].shape[1] for b in batches] + [pad_to or 0])
        real = sum(int(b[2].sum()) for b in batches)
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
        state, ens, m = self.state, self.ens, self.ens.members
        c = self.plan.norm_epochs.index(epoch)
        if state.snapshot != epoch:
            state.snapshot, state.snap_batch = epoch, 0
        t = time.perf_counter()
        for bi in range(state.snap_batch, len(self.plan.snaps)):
            idx = self.plan.snaps[bi]
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
            state.snap_batch = bi + 1
            self.bar.update(1)
            t = self._maybe_save("snapshot_s", t)
        state.snapshot_s += time.perf_counter() - t
        state.snapshot, state.snap_batch = None, 0
        state.snaps_done.append(epoch)
        self.save()


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
