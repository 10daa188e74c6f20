"""The resumable state of a scoring run and its checkpoint.

A checkpoint (``OUTDIR/checkpoint.pt``) holds only tensors and plain Python
values and is read with ``torch.load(weights_only=True)``, so a file planted in
the output folder cannot run code.  Its identity says which run it belongs to:
the settings that change the result, a hash of every row's content and tokens,
and a fingerprint of the proxy's weights and tokenizer.  A checkpoint of another
run, or an unreadable one, is refused with a message that says what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gradfilter.run.config import RESOLVED_FIELDS, ScoreConfig
from gradfilter.run.records import NORMS_FILE, RUN_FILE, SCORES_FILE

CHECKPOINT_FILE = "checkpoint.pt"
#: A process's checkpoint in a run across ``size`` processes (torchrun).
RANK_CHECKPOINT = "checkpoint-rank{rank}-of-{size}.pt"


def checkpoint_file(rank: int = 0, size: int = 1) -> str:
    """The checkpoint's file name for process ``rank`` of ``size``."""
    return CHECKPOINT_FILE if size == 1 else RANK_CHECKPOINT.format(rank=rank, size=size)


def checkpoints_in(outdir: str) -> list[str]:
    """The checkpoint files (of any number of processes) in ``outdir``."""
    try:
        names = os.listdir(outdir)
    except OSError:
        return []
    return sorted(
        n
        for n in names
        if n == CHECKPOINT_FILE
        or (n.startswith("checkpoint-rank") and n.endswith((".pt", ".pt.prev")))
    )


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value (e.g. a run identity)."""
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


TRAJECTORY_KEYS = ("sq", "sq_a", "sq_b", "visit_step")


@dataclass
class RunState:
    """Where a run is: warm-up steps done, the epoch and step in it, the snapshot
    pass in progress, counters, the losses of every step, and the trajectory
    (``[scored rows, members, checkpoints]`` squared norms, their ``lora_A`` /
    ``lora_B`` shares, and the optimizer step each was recorded at)."""

    warmup: int = 0
    epoch: int = 0
    step: int = 0
    snapshot: int | None = None
    snap_batch: int = 0
    snaps_done: list[int] = field(default_factory=list)
    tokens: int = 0
    padded: int = 0
    train_s: float = 0.0
    snapshot_s: float = 0.0
    losses: list[list[Any]] = field(default_factory=list)
    trajectory: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def new(cls, rows: int, members: int, checkpoints: int) -> RunState:
        shape = (rows, members, checkpoints)
        traj = {k: np.full(shape, np.nan) for k in ("sq", "sq_a", "sq_b")}
        traj["visit_step"] = np.full(shape, -1, dtype=np.int64)
        return cls(trajectory=traj)

    def to_checkpoint(self) -> dict[str, Any]:
        d = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "trajectory"
        }
        d["trajectory"] = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.trajectory.items()
        }
        return d

    def shareable(self) -> dict[str, Any]:
        """The state as plain values and arrays, to send to another process."""
        return dataclasses.asdict(self)

    @classmethod
    def merged(cls, parts: list[dict[str, Any]]) -> RunState:
        """One state from the :meth:`shareable` states of processes that each ran a
        share of the members (in member order) over the same steps: trajectories
        and losses side by side, token counts added, times the longest."""
        first = parts[0]
        traj = {
            k: np.concatenate([p["trajectory"][k] for p in parts], axis=1)
            for k in first["trajectory"]
        }
        losses = [
            [step[0], step[1], [x for p in parts for x in p["losses"][i][2]]]
            for i, step in enumerate(first["losses"])
        ]
        return cls(
            **{
                **{k: v for k, v in first.items() if k not in ("trajectory", "losses")},
                "tokens": sum(p["tokens"] for p in parts),
                "padded": sum(p["padded"] for p in parts),
                "train_s": max(p["train_s"] for p in parts),
                "snapshot_s": max(p["snapshot_s"] for p in parts),
                "losses": losses,
                "trajectory": traj,
            }
        )

    @classmethod
    def from_checkpoint(cls, d: dict[str, Any]) -> RunState:
        d = dict(d)
        traj = {k: v.numpy().copy() for k, v in d.pop("trajectory").items()}
        return cls(**d, trajectory=traj)


def _hash_rows(rows: list[Any], encoded: list[Any]) -> str:
    """Every row's position, id, status, token ids and labels: any change of a
    row's content (or of the tokenizer's output) changes the hash."""
    h = hashlib.sha256()
    for r, e in zip(rows, encoded, strict=True):
        h.update(f"{r.index}\x1f{r.id}\x1f{r.status}\x1f".encode())
        if e is not None:
            h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
            h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, tokenizer: Any) -> str:
    """A hash of the proxy: every parameter's name, shape, dtype and bytes, and the
    tokenizer's class and vocabulary size.  Any change of a weight changes it
    (sha256: about 0.75 s per 256 MB of weights on a loaded 2-core CPU)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}\x1f{tuple(p.shape)}\x1f{p.dtype}\x1f".encode())
        h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    h.update(f"{type(tokenizer).__name__}\x1f{len(tokenizer)}".encode())
    return h.hexdigest()[:16]


def run_identity(
    config: ScoreConfig, rows: list[Any], encoded: list[Any], model: torch.nn.Module, tokenizer: Any
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed."""
    from gradfilter import __version__

    return {
        "version": __version__,
        "config": config.identity(),
        "rows": _hash_rows(rows, encoded),
        "proxy": model_fingerprint(model, tokenizer),
    }


def save_checkpoint(
    path: str, identity: dict, adapters: dict, optimizer: dict, ensemble_step: int, state: RunState
) -> None:
    """Write atomically and durably (temporary file, fsync, rename)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(
            {
                "identity": identity,
                "adapters": adapters,
                "optimizer": optimizer,
                "ensemble_step": ensemble_step,
                "state": state.to_checkpoint(),
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, identity: dict) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to the run ``identity``; None when
    there is none.  Raises ValueError for an unreadable file or another run's."""
    if not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, empty, not a zip, or holds code objects
        raise ValueError(
            f"{path} cannot be read as a gradfilter checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); delete it to start "
            "the run again"
        ) from None
    if not isinstance(ck, dict) or "identity" not in ck:
        raise ValueError(f"{path} is not a gradfilter checkpoint; delete it to start the run again")
    if ck["identity"] != identity:
        what = [k for k in identity if ck["identity"].get(k) != identity[k]]
        names = {
            "config": "settings",
            "rows": "data (row content or tokens)",
            "proxy": "proxy model",
            "processes": "processes or --parallel layout",
        }
        raise ValueError(
            f"{os.path.dirname(path) or '.'} holds a checkpoint of a different run (other "
            f"{', '.join(names.get(w, w) for w in what)}); use another output folder or delete it"
        )
    return ck


#: The files a run writes into its output folder (``--force`` removes them).
RUN_OUTPUTS = (
    SCORES_FILE,
    RUN_FILE,
    NORMS_FILE,
    CHECKPOINT_FILE,
    "gsnr_distribution.png",
    "drop_vs_variance.png",
)


def claim_outdir(outdir: str, config: ScoreConfig, force: bool, processes: int = 1) -> None:
    """Check that ``outdir`` can hold this run, before any work is done.

    It must be a folder we can write (created if missing).  One run per folder: a
    folder whose ``run.json`` or checkpoint belongs to other settings, or whose
    checkpoints were written by another number of processes, is refused unless
    ``force``, which removes the old outputs."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f"output folder {outdir} is an existing file; give a folder")
    try:
        os.makedirs(outdir, exist_ok=True)
        probe = os.path.join(outdir, ".gradfilter-write-test")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"cannot write to the output folder {outdir}: {e.strerror or e}") from None
    from gradfilter.run.records import read_run

    previous = None
    try:
        previous = read_run(outdir)
    except (FileNotFoundError, ValueError):
        pass
    other = previous is not None and _other_settings(previous.get("config", {}), config)
    if other and not force:
        raise ValueError(
            f"{outdir} holds the outputs of another run (method {previous.get('method')!r}, other "
            "settings); use another folder, or --force to replace them"
        )
    mine = {checkpoint_file(r, processes) + end for r in range(processes) for end in ("", ".prev")}
    foreign = [n for n in checkpoints_in(outdir) if n not in mine]
    if foreign and not force:
        raise ValueError(
            f"{outdir} holds checkpoints of a run with another number of processes "
            f"({', '.join(foreign)}), and this run has {processes}; resume it with the same "
            "number of processes (torchrun --nproc-per-node), or --force to start over"
        )
    if force:
        for name in [*RUN_OUTPUTS, *checkpoints_in(outdir)]:
            path = os.path.join(outdir, name)
            if os.path.exists(path):
                os.remove(path)
        import shutil

        for name in os.listdir(outdir):  # the row stores of streamed runs
            path = os.path.join(outdir, name)
            if (name == "rows" or name.startswith("rows.rank")) and os.path.isdir(path):
                shutil.rmtree(path)


def _other_settings(previous: dict, config: ScoreConfig) -> bool:
    """Whether a run's recorded config belongs to other settings than ``config``; an
    automatic token budget (None) matches whatever budget the run chose."""
    names = {f.name for f in dataclasses.fields(ScoreConfig)}
    theirs = ScoreConfig(**{k: v for k, v in previous.items() if k in names}).identity()
    ours = config.identity()
    if config.token_budget is None:
        theirs.pop("token_budget", None)
        ours.pop("token_budget")
    if config.early_after:
        # epochs follow from early_after and the rows (which the checkpoint hashes)
        for k in RESOLVED_FIELDS:
            theirs.pop(k, None)
            ours.pop(k)
    return theirs != ours
