"""Runs across processes with ``torch.distributed`` (``torchrun``).

``gradfilter score`` started by ``torchrun --nproc-per-node N`` (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` set) initialises the process group itself: NCCL when the
run is on CUDA, gloo on CPU.

Parallelism: **member-parallel**.  The ensemble's members are independent (each
has its own adapters, optimiser state, data order and dropout masks, all keyed by
its seed), so each process trains and measures a contiguous share of the members
over every row, with no communication until the end, when rank 0 gathers every
member's norms and writes the outputs.  A member computes exactly what it computes
in a single-process run: its batches are padded to the length the full fold would
use and chunked by the full fold's token budget (see
:class:`gradfilter.run.loop.EnsembleRun`).  With more processes than members, the
extra processes would have nothing to do, so such a world is refused.
"""

from __future__ import annotations

import os
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
            f"{world.size} processes for {members} members: a run splits its members "
            f"across processes, so it needs at most as many processes as members "
            f"(--members >= {world.size}, or --nproc-per-node <= {members})"
        )
    base, extra = divmod(members, world.size)
    first = world.rank * base + min(world.rank, extra)
    return list(range(first, first + base + (world.rank < extra)))


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
