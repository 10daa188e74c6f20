"""What a run must hold in memory, and the token budget that fits the machine.

:func:`memory_model` writes down, from the proxy's shapes, the bytes a folded
pass needs:

* ``weights``: the proxy's parameters (held all run);
* ``adapters``: the stacked LoRA factors, their gradients and AdamW's two
  moments (float32; four copies);
* ``fixed``: what a pass holds whatever its length: one chunk of the LM head's
  float32 logits and their softmax (:mod:`gradfilter.method.linear_ce`);
* ``train_per_token`` / ``norm_per_token``: per folded token (a token of one
  member's row), what autograd saves for the backward, layer by layer (below),
  plus the transient gradients of the backward; the norm pass (an eval-mode
  pass of the norm engine, no dropout masks) keeps each adapted layer's output
  gradient too.  Neither forms ``[tokens, vocab]`` logits (the ensemble's loss
  takes the head in chunks); a model whose head cannot be chunked is not
  modelled here.

Per decoder layer and token, with ``d`` the width, ``f`` the MLP width, ``kv``
the key/value width, ``e`` the model's bytes per element: two norms keep a
float32 copy of their input (``2 d 4``; ``2 d e`` with the ensemble's lean
RMSNorm, :mod:`gradfilter.method.lean`); attention keeps q, k, v and its output
(``(2 d + 2 kv) e``); the MLP keeps gate, up and the activation (``3 f e``;
``2 f e`` lean); each adapted layer keeps its input in the model's dtype
(``d_in e``; in training, with dropout, its own masked copy and a byte per
element for its mask) and its rank-r hidden state.  An allowance of
``TRANSIENT_WIDTHS`` float32 MLP widths covers the gradients in flight.

:func:`auto_token_budget` turns the model and the memory at hand (host:
``MemAvailable`` of ``/proc/meminfo``; CUDA: ``torch.cuda.mem_get_info``) into a
token budget, keeping a safety fraction free.  ``benchmarks/bench_memory.py``
measures the peaks this model predicts and reports measured / model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: Share of the available memory a run may plan to use.
SAFETY_FRACTION = 0.6
#: The smallest token budget worth running (one short row per member).
MIN_TOKENS = 16
#: Gradients in flight during a backward, per token, in float32 MLP widths.
TRANSIENT_WIDTHS = 2
#: Measured / modelled bytes per token of a norm pass: the norm engine's pass held
#: about 1.7 MB per folded token of SmolLM2-135M in bfloat16 where the terms below
#: account for 0.85 MB (benchmarks/bench_memory.py); the rest is not yet explained,
#: so the model carries it as a factor.
NORM_PASS_OVERHEAD = 2.0


@dataclass(frozen=True)
class MemoryModel:
    """Bytes a run holds (see the module doc); all integers."""

    weights: int
    adapters: int
    fixed: int
    train_per_token: int
    norm_per_token: int

    @property
    def per_token(self) -> int:
        """The larger of the two per-token costs: a budget must fit both passes."""
        return max(self.train_per_token, self.norm_per_token)

    def training_bytes(self, tokens: int) -> int:
        """Peak of a training step over ``tokens`` folded tokens (weights included)."""
        return self.weights + self.adapters + self.fixed + self.train_per_token * tokens

    def norm_pass_bytes(self, tokens: int) -> int:
        """Peak of a snapshot norm pass over ``tokens`` folded tokens (weights included)."""
        return self.weights + self.adapters + self.fixed + self.norm_per_token * tokens


def _size(config: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise ValueError(f"the model config has none of {names}; cannot size its memory")
    return default


def memory_model(
    model: nn.Module,
    members: int,
    rank: int,
    targets: Any = None,
    *,
    dropout: bool = True,
    chunk: int | None = None,
) -> MemoryModel:
    """The :class:`MemoryModel` of an ensemble of ``members`` rank-``rank`` adapters
    on ``targets`` (as :class:`gradfilter.LoRAEnsemble` takes them) of ``model``."""
    from gradfilter.method import linear_ce
    from gradfilter.method.lora import default_targets, in_out, match_targets

    config = getattr(model, "config", None)
    d = _size(config, "hidden_size", "n_embd", "d_model")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    f = _size(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * d)
    heads = _size(config, "num_attention_heads", "n_head", default=1)
    kv = d * _size(config, "num_key_value_heads", default=heads) // heads
    vocab = _size(config, "vocab_size")
    param = next(model.parameters())
    e = param.element_size()
    n = max(e, 4)  # norms compute in float32 (float64 for float64 models)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    matched = match_targets(model, targets if targets is not None else default_targets(model))
    shapes = [in_out(m) for _, m in matched]
    a = 8 if param.dtype == torch.float64 else 4  # adapters' bytes per element
    adapters = 4 * members * rank * sum(i + o for i, o in shapes) * a
    # Saved for the backward, per token: norms, attention, MLP in every layer; each
    # adapter's input and rank-r hidden state.  The
    # ensemble's lean blocks (gradfilter.method.lean) keep a norm's input in the
    # model's dtype and two of the MLP's three widths.
    from gradfilter.method.lean import MLP_CLASSES, RMSNORM_CLASSES

    kinds = {type(m).__name__ for m in model.modules()}
    if kinds & set(RMSNORM_CLASSES):
        n = e
    mlp = 2 if kinds & set(MLP_CLASSES) else 3
    per_layer = 2 * d * n + (2 * d + 2 * kv) * e + mlp * f * e
    inputs = sum(i * e + 2 * rank * a for i, _ in shapes)
    # With dropout each adapter keeps its own masked input and which elements its
    # mask kept, one byte each (gradfilter.method.lora.member_dropout).
    masks = sum(i for i, _ in shapes) if dropout else 0
    final = d * n + d * 4  # the final norm; the loss's hidden-state gradient
    transient = TRANSIENT_WIDTHS * f * 4  # gradients in flight in the backward
    train = layers * per_layer + inputs + masks + final + transient
    # The norm pass (eval mode, no dropout) also holds each adapter's output gradient
    # until the layer's norms are reduced.
    norm = layers * per_layer + inputs + final + transient + sum(o * a for _, o in shapes)
    norm *= NORM_PASS_OVERHEAD
    fixed = 2 * (chunk or linear_ce.CHUNK_TOKENS) * vocab * 4
    return MemoryModel(weights, adapters, fixed, int(train), int(norm))


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes free for this process: ``torch.cuda.mem_get_info`` on a CUDA device,
    else ``MemAvailable`` of ``/proc/meminfo``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise OSError("cannot read the available memory (/proc/meminfo); set --token-budget explicitly")


@dataclass(frozen=True)
class BudgetChoice:
    """A token budget and how it was chosen (written to run.json)."""

    token_budget: int
    how: str  # "given", "auto" or "resumed" (the automatic budget of the interrupted run)
    available_bytes: int | None = None
    safety_fraction: float | None = None
    device: str | None = None
    model: dict | None = None

    def describe(self) -> str:
        if self.how != "auto":
            what = "no limit" if not self.token_budget else str(self.token_budget)
            return f"token budget {what} ({self.how})"
        return (
            f"token budget {self.token_budget} (auto: {self.safety_fraction:.0%} of "
            f"{self.available_bytes / 2**30:.1f} GiB available on {self.device}, "
            f"{self.model['per_token'] / 1024:.0f} KiB per folded token{self._overhead()})"
        )

    def _overhead(self) -> str:
        x = (self.model or {}).get("allocator_overhead", 1.0)
        return f", {x:g}x for freed memory kept for reuse (--host-memory fast)" if x != 1 else ""

    def to_json(self) -> dict:
        return asdict(self)


def auto_token_budget(
    model: nn.Module,
    members: int,
    rank: int,
    targets: Any = None,
    *,
    available: int | None = None,
    safety: float = SAFETY_FRACTION,
    dropout: bool = True,
    overhead: float = 1.0,
) -> BudgetChoice:
    """The largest token budget whose passes fit ``safety`` of the available memory
    (``available`` bytes; None: :func:`available_memory` of the model's device),
    beyond what the process already holds (the loaded proxy), rounded down to a
    multiple of 64; ``overhead``: what the allocator holds over the bytes in use
    (:data:`HEAP_OVERHEAD` for a fast run on a CPU).  A budget that cannot hold
    even ``MIN_TOKENS`` tokens is an error; rows that do not fit the returned
    budget are for the caller to mark (:func:`row_fits`)."""
    if not 0 < safety <= 1:
        raise ValueError(f"safety fraction must be in (0, 1], got {safety}")
    device = next(model.parameters()).device
    if available is None:
        available = available_memory(device)
    mm = memory_model(model, members, rank, targets, dropout=dropout)
    spare = safety * available / overhead - mm.adapters - mm.fixed
    tokens = math.floor(spare / mm.per_token) if spare > 0 else 0
    info = {**asdict(mm), "per_token": mm.per_token, "allocator_overhead": overhead}
    if tokens < MIN_TOKENS:
        raise ValueError(
            f"not enough memory for any folded pass: {available / 2**30:.2f} GiB available on "
            f"{device.type}, {safety / overhead:.0%} of it usable, and the adapters, their "
            f"optimiser and one pass of {MIN_TOKENS} tokens need "
            f"{(mm.adapters + mm.fixed + MIN_TOKENS * mm.per_token) / 2**30:.2f} GiB; free "
            "memory, use fewer --members, or set --token-budget"
        )
    tokens = tokens // 64 * 64 if tokens >= 64 else tokens  # a round number
    return BudgetChoice(tokens, "auto", int(available), safety, device.type, info)


def row_fits(length: int, members: int, token_budget: int | None) -> bool:
    """Whether one row of ``length`` tokens, folded over the members, fits the budget."""
    return not token_budget or length * members <= token_budget


def _resumed_budget(outdir: str | None, config: Any) -> int | None:
    """The token budget of the interrupted run in ``outdir`` with these settings
    (an automatic budget is chosen once per run, so that a resumed run keeps its
    batches), or None."""
    import os

    from gradfilter.run.state import checkpoints_in

    # one process's checkpoint, or any process's of a torchrun run (they share it)
    names = [n for n in checkpoints_in(outdir) if n.endswith(".pt")] if outdir else []
    if not names:
        return None
    path = os.path.join(outdir, names[0])
    try:
        ck = torch.load(path, weights_only=True, map_location="cpu")
        theirs = dict(ck["identity"]["config"])
    except Exception:  # an unreadable checkpoint is refused later, with its message
        return None
    budget = theirs.pop("token_budget", None)
    ours = config.identity()
    ours.pop("token_budget", None)
    return budget if theirs == ours and isinstance(budget, int) else None


def choose_token_budget(
    config: Any,
    model: nn.Module,
    prepared: Any,
    outdir: str | None = None,
    *,
    available: int | None = None,
    share: int | None = None,
    agree: Any = None,
) -> tuple[Any, BudgetChoice]:
    """The run's token budget: ``config.token_budget`` when given (0: no limit),
    else sized from the memory at hand (:func:`auto_token_budget`; ``available``
    overrides the measured bytes), or taken from the interrupted run in ``outdir``.

    With an automatic budget, a scorable row that does not fit it even alone
    (its tokens times the members of a folded pass) gets a status saying so and
    is not scored.  Returns the config with the budget filled in, and the choice.

    Member-parallel runs: ``share`` members of the folded pass live in this
    process (a pass of B tokens holds ``B * share / members`` here), and
    ``agree`` maps this process's budget to the run's (the smallest over the
    processes), so that every process cuts the same batches."""
    import dataclasses

    from gradfilter.method.registry import METHODS

    choice = pick_token_budget(config, model, outdir, available=available, share=share, agree=agree)
    if choice.how == "given":
        return config, choice
    members = config.members if METHODS[config.method].kind == "ensemble" else 1
    budget = choice.token_budget
    for i, length in zip(list(prepared.ok), list(prepared.lengths), strict=True):
        if not row_fits(int(length), members, budget):
            prepared.drop(int(i), too_long_status(int(length), members, budget))
    return dataclasses.replace(config, token_budget=budget), choice


def too_long_status(length: int, members: int, budget: int) -> str:
    """The status of a row that does not fit an automatic token budget."""
    return (
        f"too long for the memory at hand ({length} tokens x {members} "
        f"members > automatic token budget {budget}; score it with a shorter "
        "--max-length, fewer --members or on a machine with more memory)"
    )


def pick_token_budget(
    config: Any,
    model: nn.Module,
    outdir: str | None = None,
    *,
    available: int | None = None,
    share: int | None = None,
    agree: Any = None,
) -> BudgetChoice:
    """The budget part of :func:`choose_token_budget`, without touching any row."""
    import dataclasses

    from gradfilter.method.registry import METHODS

    if config.token_budget is not None:
        return BudgetChoice(config.token_budget, "given")
    ensemble = METHODS[config.method].kind == "ensemble"
    members = config.members if ensemble else 1
    largest = members * config.batch_size * config.max_length  # the largest pass of a run
    resumed = _resumed_budget(outdir, config)
    if resumed is not None:
        choice = BudgetChoice(resumed, "resumed")
    else:
        here = min(share or members, members)
        device = next(model.parameters()).device
        local = _processes_on_node()
        if available is None and device.type != "cuda" and local > 1:
            # the processes of a torchrun run on one machine share its memory
            available = available_memory(device) // local
        choice = auto_token_budget(
            model,
            here,
            config.rank,
            config.targets,
            available=available,
            dropout=config.dropout > 0,
            overhead=HEAP_OVERHEAD
            if device.type == "cpu" and getattr(config, "host_memory", "fast") == "fast"
            else 1.0,
        )
        tokens = min(largest, choice.token_budget * members // here)
        if agree is not None:
            tokens = int(agree(tokens))
        choice = dataclasses.replace(choice, token_budget=tokens)
    return choice


def _processes_on_node() -> int:
    """``LOCAL_WORLD_SIZE`` (torchrun's processes on this machine), 1 without it."""
    import os

    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: Peak host memory of a run with ``host_memory="fast"`` over the same run's with
#: "lean": 3.32 / 2.13 GiB on the default run over 24 Alpaca rows (SmolLM2-135M,
#: bfloat16, budget 2048; benchmarks/bench_malloc.py).  The automatic budget of a
#: fast run on a CPU divides the usable memory by it.  (A ratio of whole-process
#: peaks: over the working set alone it is larger, (3.32 - 0.48) / (2.13 - 0.48)
#: = 1.72 with the loaded proxy's 0.48 GiB taken out; the safety fraction covers
#: the difference.)
HEAP_OVERHEAD = 1.6
_tuned = False


def set_host_memory(mode: str = "lean", threshold: int = 1 << 20) -> bool:
    """How glibc handles freed memory, for the whole process (``ScoreConfig.host_memory``).

    ``"lean"``: freed blocks of ``threshold`` bytes or more go back to the system.
    glibc keeps freed heap memory for reuse, and its mmap threshold grows with the
    blocks freed (up to 32 MiB), so after a training step the activations' memory
    stays resident and the norm pass, allocating other sizes, adds to it.  A fixed
    threshold maps each large tensor on its own and unmaps it when freed; but every
    new one then costs page faults (the kernel zeroes its pages): the default run
    took 1.72x as long (benchmarks/bench_malloc.py).

    ``"fast"``: glibc's own behaviour (after a lean run in the same process: its
    largest dynamic thresholds, 32 MiB mapped, 64 MiB trimmed).

    GRADFILTER_MALLOC_TUNING=0 leaves glibc alone whatever the mode.  Returns
    whether a setting was made; False where there is no glibc."""
    import ctypes
    import os
    import sys

    from gradfilter.run.config import HOST_MEMORY

    global _tuned
    if mode not in HOST_MEMORY:
        raise ValueError(f"host memory must be fast or lean, got {mode!r}")
    if os.environ.get("GRADFILTER_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    if mode == "fast" and not _tuned:
        return False  # glibc's own dynamic thresholds are in force
    try:
        libc = ctypes.CDLL("libc.so.6")
        if mode == "lean":
            ok = libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))
            ok &= libc.mallopt(_M_TRIM_THRESHOLD, int(threshold))
        else:
            ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            ok &= libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):
        return False
    _tuned = True
    return bool(ok)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """``set_host_memory("lean", threshold)``."""
    return set_host_memory("lean", threshold)
