"""The one table of selection methods and of the scores an ensemble run yields.

Every other part (the G-SNR records, the run, the CLI, the quality benchmark)
reads these tables; none keeps its own list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A selector that ``gradfilter score --method NAME`` runs.

    kind: ``"ensemble"`` (trains the LoRA ensemble and records norms),
    ``"forward"`` (forward passes of the frozen proxy) or ``"random"``.
    higher_is_better: the direction of its score.
    discard_at: rows whose value is at or above it rank last and are never
    selected (Superfiltering's rule for IFD, ``1.0``).
    source: the key of its value: a :func:`gradfilter.method.gsnr.gsnr_components`
    entry for ensemble methods, a value of the forward pass otherwise.
    """

    name: str
    kind: str
    higher_is_better: bool
    source: str
    help: str
    # Rows whose value is at or above this are discarded (ranked last, never selected).
    discard_at: float | None = None


@dataclass(frozen=True)
class Score:
    """A per-example score that an ensemble run's norms give (the records' ablations)."""

    name: str
    higher_is_better: bool
    source: str  # key of the gsnr_components dictionary
    help: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gsnr", "ensemble", True, "gsnr", "G-SNR, by the run's --formula"),
        Method(
            "drop", "ensemble", True, "drop", "the normalised drop D of the paper formula alone"
        ),
        Method("late_var", "ensemble", False, "late_var", "the late spread V across members alone"),
        Method(
            "grand",
            "ensemble",
            True,
            "early_mean",
            "GraNd-like: mean squared LoRA norm after the early epoch",
        ),
        Method("loss", "forward", True, "loss", "the proxy's per-example response loss"),
        Method("ifd", "forward", True, "ifd", "Superfiltering's IFD, loss-ratio form", 1.0),
        Method("ifd_ppl", "forward", True, "ifd_ppl", "IFD, perplexity-ratio form", 1.0),
        Method("random", "random", True, "random", "a seeded uniform draw"),
    )
}

ENSEMBLE_METHODS = tuple(n for n, m in METHODS.items() if m.kind == "ensemble")
FORWARD_METHODS = tuple(n for n, m in METHODS.items() if m.kind == "forward")

SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score("gsnr", True, "gsnr", "the combined criterion"),
        Score(
            "drop", True, "drop", "a large fall of the norm between the points: the row is learned"
        ),
        Score("late_var", False, "late_var", "low late spread: the members agree"),
        Score("late_cv", False, "late_cv", "low late coefficient of variation, whatever the scale"),
        Score("late_norm", False, "late_mean", "a small late norm: the row is fitted"),
        Score("early_norm", True, "early_mean", "GraNd keeps the highest early norms"),
    )
}


def method(name: str) -> Method:
    """The :class:`Method` called ``name``; a ValueError lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
