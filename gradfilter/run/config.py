"""The settings of a scoring run: one dataclass, its validation, and the part of
it that a checkpoint must agree on.  The CLI takes its defaults from here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

#: The fields that ``resolve_schedule`` sets from ``early_after`` and the rows: two
#: configs with the same ``early_after`` (> 0) are compared without them.
RESOLVED_FIELDS = ("early", "late", "epochs", "snapshots")


#: ``ScoreConfig.host_memory`` settings.
HOST_MEMORY = ("fast", "lean")


@dataclass
class ScoreConfig:
    """Everything that determines a scoring run (and so its checkpoint)."""

    method: str = "gsnr"  # see gradfilter.method.registry.METHODS
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
    # The early point is at least this many optimizer steps into training: when
    # epoch ``early`` starts sooner (small data), early, late and epochs move on by
    # whole epochs (resolve_schedule), so the same setting means the same stage of
    # training at any data size.  0: epochs early / late as given.
    early_after: int = 0
    # "snapshot": norms from eval-mode passes after epochs early and late;
    # "inflight": recorded by the training steps of epochs early and late themselves
    # (same backward as the weight gradient; no extra pass, dropout active).
    norms: str = "snapshot"
    lr: float = 2e-4
    batch_size: int = 8
    # Padded tokens in one folded forward/backward (all members together); bounds
    # memory.  None: sized from the memory at hand (gradfilter.run.budget); 0: no limit.
    token_budget: int | None = None
    max_length: int = 512
    seed: int = 0
    template: str | None = None
    reduction: str = "mean"
    drop: str = "normalized"
    spread: str = "var"
    of: str = "squared"
    ddof: int = 0
    eps: float = 1e-8
    # "snr_cv": chosen by docs/quality-criterion.md (docs/method.md#choosing-the-default);
    # "paper" is the reconstruction of the paper's D / (V + eps).  See gradfilter.method.gsnr.
    formula: str = "snr_cv"
    fields: dict[str, str] = field(default_factory=dict)
    checkpoint_seconds: float = 60.0
    # "auto": CUDA when available (under torchrun: the process's LOCAL_RANK device),
    # else the CPU; or "cpu", "cuda", "cuda:N".  Not in the identity: a run may
    # resume on another device.
    device: str = "auto"
    # Across torchrun processes: "auto", "member", "data" or "AxB" (member groups x
    # processes per group); see gradfilter.run.dist.  Not in the identity: the
    # checkpoints record the layout they were written with.
    parallel: str = "auto"
    # Host memory on a CPU: "fast" lets glibc keep freed memory for reuse (1.7x
    # the speed of "lean" on the default run, at 1.6x its peak; the
    # automatic budget allows for it); "lean" maps every tensor of 1 MiB or more on
    # its own and unmaps it when freed (peak close to the bytes in use, each large
    # tensor paid in page faults).  See gradfilter.run.budget.  Not in the
    # identity: the same scores either way.
    host_memory: str = "fast"

    def validate(self) -> None:
        from gradfilter.method.registry import method

        method(self.method)  # a clear error for an unknown method
        from gradfilter.run.dist import check_parallel

        check_parallel(self.parallel)
        if self.members < 1:
            raise ValueError(f"members must be at least 1, got {self.members}")
        if self.host_memory not in HOST_MEMORY:
            raise ValueError(f"host_memory must be fast or lean, got {self.host_memory!r}")
        if not 1 <= self.early < self.late <= self.epochs:
            raise ValueError(
                f"need 1 <= early < late <= epochs, got early={self.early}, late={self.late}, "
                f"epochs={self.epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.token_budget is not None and (
            isinstance(self.token_budget, bool)
            or not isinstance(self.token_budget, int)
            or self.token_budget < 0
        ):
            raise ValueError(
                f"token_budget must be an integer >= 0 (0: no limit) or None (sized from "
                f"the memory at hand), got {self.token_budget!r}"
            )
        if self.token_budget and self.token_budget < self.max_length:
            # One row per member is the floor of a folded pass, whatever the budget.
            raise ValueError(
                f"token_budget ({self.token_budget}) must be at least "
                f"max_length ({self.max_length})"
            )
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(
                f"dtype must be float32, bfloat16, float16 or float64, got {self.dtype!r}"
            )
        if (
            isinstance(self.lora_layers_from, bool)
            or not isinstance(self.lora_layers_from, int)
            or self.lora_layers_from < 0
        ):
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
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or self.warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if (
            isinstance(self.early_after, bool)
            or not isinstance(self.early_after, int)
            or self.early_after < 0
        ):
            raise ValueError(f"early_after must be an int >= 0, got {self.early_after!r}")
        if self.snapshots is not None:
            snaps = list(self.snapshots)
            bad = [
                e
                for e in snaps
                if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e <= self.epochs
            ]
            if bad or not snaps:
                raise ValueError(
                    f"snapshots must be epochs in 1..{self.epochs}, got {self.snapshots!r}"
                )
            missing = [e for e in (self.early, self.late) if e not in snaps]
            if missing:
                raise ValueError(
                    f"snapshots {snaps} must include the early and late epochs "
                    f"({self.early}, {self.late})"
                )
        self._check_training_numbers()
        self._check_targets_form()
        if not (
            self.device in ("auto", "cpu", "cuda")
            or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.gsnr_config()  # validates the G-SNR options

    def _check_targets_form(self) -> None:
        """``targets`` is None, ``"all-linear"`` or a non-empty list of module names;
        whether they match the proxy is checked on its architecture before it loads."""
        t = self.targets
        if t is None or t == "all-linear":
            return
        if isinstance(t, str) or not all(isinstance(n, str) and n.strip() for n in t) or not t:
            raise ValueError(
                "targets must be 'all-linear' or a non-empty list of module names "
                f"(e.g. q_proj,v_proj), got {t!r}"
            )

    def _check_training_numbers(self) -> None:
        """Rank, epochs, dropout, lr, alpha and the template, before any model loads."""
        for name in ("rank", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, lo, hi in (("dropout", 0.0, 1.0),):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and lo <= value < hi):
                raise ValueError(f"{name} must be in [{lo}, {hi}), got {value!r}")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.template is not None and (
            not isinstance(self.template, str) or "{instruction}" not in self.template
        ):
            raise ValueError(
                f"template must contain the placeholder {{instruction}}, got {self.template!r}"
            )

    def resolve_schedule(self, steps_per_epoch: int) -> ScoreConfig:
        """The config with ``early``, ``late`` and ``epochs`` moved on by whole epochs
        until epoch ``early`` starts at least ``early_after`` optimizer steps into
        training (warm-up steps count), given ``steps_per_epoch``; itself when no
        move is needed.  Kept epochs (``snapshots``) move with them: every epoch
        stays every epoch, and a list gains the new early and late epochs."""
        if self.early_after <= 0 or steps_per_epoch < 1:
            return self
        first = 1
        while self.warmup_steps + (first - 1) * steps_per_epoch < self.early_after:
            first += 1
        shift = first - self.early
        if shift <= 0:
            return self
        early, late = self.early + shift, self.late + shift
        epochs = max(self.epochs, late + (self.epochs - self.late))
        snaps = self.snapshots
        if snaps is not None:
            if list(snaps) == list(range(1, self.epochs + 1)):
                snaps = list(range(1, epochs + 1))
            else:
                snaps = sorted(set(snaps) | {early, late})
        return dataclasses.replace(self, early=early, late=late, epochs=epochs, snapshots=snaps)

    def norm_epochs(self) -> list[int]:
        """The epochs whose per-example norms the run records, ascending."""
        return sorted(set(self.snapshots or ()) | {self.early, self.late})

    def gsnr_config(self):
        from gradfilter.method.gsnr import GSNRConfig

        return GSNRConfig(
            drop=self.drop,
            spread=self.spread,
            of=self.of,
            ddof=self.ddof,
            eps=self.eps,
            formula=self.formula,
        )

    def identity(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        d = dataclasses.asdict(self)
        d.pop("checkpoint_seconds")
        d.pop("device")
        d.pop("parallel")
        d.pop("host_memory")
        d.pop("prefix_cache")  # same scores (to rounding) with or without
        for k in ("formula", "drop", "spread", "of", "ddof", "eps"):
            d.pop(k)  # scoring only, applied to the stored norms at the end
        return d
