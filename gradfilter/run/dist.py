"""Runs across processes with ``torch.distributed`` (``torchrun``).

``gradfilter score`` started by ``torchrun --nproc-per-node N`` (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` set) initialises the process group itself: NCCL when the
run is on CUDA, gloo on CPU.

The ``N`` processes form ``a x b`` (:class:`Layout`): ``a`` member groups, each
training a contiguous share of the ensemble's members, and ``b`` processes per
group sharing that group's rows.

- **member-parallel** (``b = 1``): the members are independent (each has its own
  adapters, optimiser state, data order and dropout masks, all keyed by its
  seed), so each process trains and measures its share of the members over
  every row, with no communication until the end, when rank 0 gathers every
  member's norms and writes the outputs.  A member computes exactly what it
  computes in a single-process run: its batches are padded to the length the
  full fold would use and chunked by the full fold's token budget (see
  :class:`gradfilter.run.loop.EnsembleRun`).
- **data-parallel** (``b > 1``): every optimizer step of the group's members is
  split by rows across the group's ``b`` processes (contiguous parts of each
  member's batch, so the data order is the single-process one); each process
  computes the gradient of its rows' share of the step's loss (weighted by the
  whole batch's token count, with the dropout masks of the rows' places in the
  whole batch), the group all-reduces the stacked LoRA gradients and losses, and
  every process takes the same AdamW step.  The norm passes are split by batch
  (rounds of ``b`` batches), and in-flight norms are gathered after each step,
  so every process of a group holds the group's whole trajectory.  Checkpoints
  are saved by the whole group at the same step, and the previous one is kept,
  so a process killed while saving resumes from the step its group shares.
  Gradients are summed across processes instead of within one, so the scores
  agree with one process to float32 rounding, not bit for bit.

``--parallel auto`` (the default) is member-parallel when ``N`` is at most the
number of members, and otherwise ``a`` = the largest divisor of ``N`` not above
the number of members; ``member``, ``data`` (``a = 1``) and ``AxB`` choose.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def world_from_env() -> World:
    """The world ``torchrun`` describes in the environment (one process if none)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is not in a world of WORLD_SIZE {size}")
    return World(rank=rank, size=size, local_rank=local)


def start(world: World, device: torch.device) -> bool:
    """Join the process group unless already in one; NCCL for a CUDA run, gloo
    otherwise.  Returns whether it was joined here (and so is to be left here)."""
    if not world.distributed:
        return False
    if not torch.distributed.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != world.size:
            raise ValueError(
                f"the process group has {torch.distributed.get_world_size()} processes, "
                f"WORLD_SIZE says {world.size}"
            )
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    torch.distributed.init_process_group(backend, **kwargs)
    return True


def member_share(members: int, world: World) -> list[int]:
    """The members (0-based indices of the full ensemble) this process trains:
    a contiguous share, the first ``members % size`` processes taking one more."""
    if world.size > members:
        raise ValueError(
            f"{world.size} processes for {members} members: a member-parallel run splits "
            f"its members across processes, so it needs at most as many processes as "
            f"members (--members >= {world.size}, --nproc-per-node <= {members}, or "
            "--parallel data)"
        )
    base, extra = divmod(members, world.size)
    first = world.rank * base + min(world.rank, extra)
    return list(range(first, first + base + (world.rank < extra)))


PARALLEL_MODES = ("auto", "member", "data")
_AXB = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


def check_parallel(mode: Any) -> None:
    """Raise ValueError unless ``mode`` is ``auto``, ``member``, ``data`` or ``AxB``."""
    if not isinstance(mode, str) or not (mode in PARALLEL_MODES or _AXB.match(mode)):
        raise ValueError(
            f"parallel must be 'auto', 'member', 'data' or 'AxB' (member groups x "
            f"processes per group, e.g. 2x3), got {mode!r}"
        )


@dataclass(frozen=True)
class Layout:
    """``groups`` member groups x ``data`` processes per group; rank ``r`` is
    process ``r % data`` of group ``r // data``."""

    groups: int = 1
    data: int = 1

    @property
    def size(self) -> int:
        return self.groups * self.data

    @property
    def mode(self) -> str:
        if self.size == 1:
            return "single"
        if self.data == 1:
            return "member"
        return "data" if self.groups == 1 else "member x data"

    def group(self, rank: int) -> int:
        return rank // self.data

    def data_rank(self, rank: int) -> int:
        return rank % self.data

    def group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.data, (group + 1) * self.data))

    def share(self, members: int, rank: int) -> list[int]:
        """The members process ``rank`` trains (its group's contiguous share)."""
        return member_share(members, World(self.group(rank), self.groups))

    def describe(self, members: int) -> str:
        if self.mode == "member":
            return f"member-parallel across {self.size} processes"
        if self.mode == "data":
            return f"data-parallel across {self.size} processes ({members} members each)"
        shares = [len(self.share(members, g * self.data)) for g in range(self.groups)]
        return (
            f"member x data-parallel across {self.size} processes: {self.groups} member "
            f"groups ({'/'.join(map(str, shares))} members) x {self.data} processes each"
        )

    def to_json(self, members: int) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "processes": self.size,
            "member_groups": self.groups,
            "processes_per_group": self.data,
            "members_by_rank": [self.share(members, r) for r in range(self.size)],
        }


def choose_layout(members: int, size: int, mode: str = "auto") -> Layout:
    """The ``a x b`` layout of ``size`` processes for ``members`` members (see the
    module docstring); raises ValueError for a layout that cannot hold them."""
    check_parallel(mode)
    if size == 1:
        return Layout()
    if mode == "member" or (mode == "auto" and size <= members):
        member_share(members, World(0, size))  # the error for too many processes
        return Layout(size, 1)
    if mode == "data":
        return Layout(1, size)
    if mode == "auto":
        groups = max(d for d in range(1, members + 1) if size % d == 0)
        return Layout(groups, size // groups)
    a, b = (int(x) for x in _AXB.match(mode).groups())
    if a * b != size:
        raise ValueError(
            f"--parallel {mode} needs {a * b} processes; this run has {size} "
            "(torchrun --nproc-per-node x --nnodes)"
        )
    if a > members:
        raise ValueError(f"--parallel {mode}: {a} member groups for {members} members")
    return Layout(a, b)


def split_rows(n: int, parts: int, part: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a batch of ``n`` that part ``part`` of ``parts``
    takes: contiguous, the first ``n % parts`` parts one row more (maybe none)."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


class DataGroup:
    """The collectives of one process among the ``data`` processes of its member
    group (a data-parallel run); every process of the world builds every group, in
    the same order, as ``torch.distributed.new_group`` requires."""

    def __init__(self, layout: Layout, rank: int) -> None:
        self.layout, self.rank = layout, rank
        self.index = layout.data_rank(rank)
        self.size = layout.data
        self.seconds = 0.0  # wall time in the group's collectives (waiting included)
        self.pg = None
        for g in range(layout.groups):
            pg = torch.distributed.new_group(layout.group_ranks(g))
            if g == layout.group(rank):
                self.pg = pg

    @property
    def leader(self) -> bool:
        return self.index == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        torch.distributed.all_reduce(tensor, group=self.pg)
        self.seconds += time.perf_counter() - t0
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process of the group."""
        t0 = time.perf_counter()
        device = "cpu"
        if torch.distributed.get_backend(self.pg) == "nccl":  # NCCL reduces CUDA tensors only
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.pg)
        self.seconds += time.perf_counter() - t0
        return bool(t.item())

    def gather(self, value: Any) -> list[Any]:
        """Every group member's ``value``, in group order."""
        t0 = time.perf_counter()
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, value, group=self.pg)
        self.seconds += time.perf_counter() - t0
        return out

    def grad_sync(self, params: Sequence[torch.nn.Parameter]):
        """A function that sums ``params``' gradients and a tensor of losses over the
        group, for :func:`gradfilter.method.training.train_step`: a parameter with
        no gradient on a process counts as zero there, and stays without one only
        if no process of the group has one."""

        def sync(total: torch.Tensor) -> torch.Tensor:
            ps = list(params)
            has = torch.tensor([p.grad is not None for p in ps], dtype=torch.int64)
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                    for p in ps
                ]
            )
            device = flat.device
            if device.type == "cuda":
                has = has.to(device)
            self.all_reduce_sum(has)
            self.all_reduce_sum(flat)
            tot = self.all_reduce_sum(total.to(device=device, dtype=torch.float64).clone())
            has = has.cpu()
            offset = 0
            for i, p in enumerate(ps):
                n = p.numel()
                if has[i]:
                    p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
                else:
                    p.grad = None
                offset += n
            return tot.to(total.device)

        return sync


def agree(world: World, what: str, value: Any) -> None:
    """Every process must hold the same ``value`` (e.g. a fingerprint of the
    settings or the data); raises ValueError naming the first one that differs."""
    if not world.distributed:
        return
    values: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(values, value)
    for rank, v in enumerate(values):
        if v != values[0]:
            raise ValueError(
                f"the processes disagree on {what}: rank {rank} has {v!r}, rank 0 has "
                f"{values[0]!r}; start every process with the same command and files"
            )


def gather(world: World, value: Any) -> list[Any]:
    """Every process's ``value``, in rank order (on every process)."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    torch.distributed.all_gather_object(values, value)
    return values


def finish(world: World, wait: bool = True) -> None:
    """Leave the process group (after every process got here, with ``wait``)."""
    if world.distributed and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_device(setting: str, world: World) -> torch.device:
    """The device of ``--device`` for this process: ``auto`` is CUDA when torch
    sees a GPU (the process's ``LOCAL_RANK`` one under torchrun), else the CPU."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "auto":
        return torch.device("cuda", world.local_rank % count) if count else torch.device("cpu")
    device = torch.device(setting)
    if device.type != "cuda":
        return device
    if not count:
        raise ValueError(f"--device {setting}: torch sees no CUDA device on this machine")
    if device.index is None:
        return torch.device("cuda", world.local_rank % count)
    if device.index >= count:
        raise ValueError(f"--device {setting}: this machine has {count} CUDA device(s)")
    return device


def together(world: World, fn, *args, **kwargs) -> Any:
    """Run ``fn`` on rank 0 only (e.g. preparing the output folder); every process
    gets its result, or raises the ValueError it raised."""
    result, error = None, None
    if world.main:
        try:
            result = fn(*args, **kwargs)
        except ValueError as e:
            error = str(e)
    if world.distributed:
        result, error = gather(world, (result, error))[0]
    if error is not None:
        raise ValueError(error)
    return result
