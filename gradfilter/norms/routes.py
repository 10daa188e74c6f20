"""The one route chooser: which of the two exact reductions a per-example norm takes.

For one example with ``n`` rows of a layer's factors ``L: [n, a]`` and
``R: [n, b]`` the squared norm ``||L^T R||_F^2`` can be taken

* directly: form the ``a x b`` tile and square-sum it, ``2 n a b`` FLOPs;
* by the Gram ("ghost") identity ``<L L^T, R R^T>``, ``2 n^2 (a + b)`` FLOPs.

Every backend (the reference, the C++ op, the Triton kernels) asks this module,
so the three choose alike.  A batch of several examples is judged by the sum of
its examples' costs (:func:`choose_packed_route`); with equal lengths that is
the single-example rule.  The memory knob of the blocked reductions and the
reading of ``TRITON_INTERPRET`` live here too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (the one
    place that reads it; Triton's own ``knobs`` are preferred where they exist)."""
    try:
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None:
            return bool(knobs.runtime.interpret)
    except (ImportError, OSError, RuntimeError):
        pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


#: Largest temporary (in elements) a reduction may allocate at once; blocks of
#: examples or of gradient rows are sized to stay under it.
TEMP_BUDGET = 1 << 24

#: Fixed cost of one extra round of small kernels (launch, threading), in FLOP
#: equivalents; decides whether reducing a ragged batch example by example (no
#: padding work, B times the launches) beats one padded batch.
LAUNCH_FLOPS = 2_000_000


def direct_cost(n: int, a: int, b: int) -> int:
    """FLOPs of the direct route for one example with ``n`` rows."""
    return 2 * n * a * b + a * b


def ghost_cost(n: int, a: int, b: int) -> int:
    """FLOPs of the Gram route for one example with ``n`` rows."""
    return 2 * n * n * (a + b) + n * n


def choose_route(n: int, a: int, b: int) -> str:
    """``"direct"`` or ``"ghost"``, whichever the FLOP model says is cheaper."""
    return "ghost" if ghost_cost(n, a, b) < direct_cost(n, a, b) else "direct"


def route_cost(n: int, a: int, b: int) -> int:
    """FLOPs of the cheaper route for one example with ``n`` rows."""
    return min(direct_cost(n, a, b), ghost_cost(n, a, b))


def choose_packed_route(
    lengths: torch.Tensor | Mapping[int, int] | Iterable[int], a: int, b: int
) -> str:
    """``"direct"`` or ``"ghost"`` for a batch whose examples have ``lengths`` rows:
    the route with the smaller summed per-example cost.  ``lengths`` may also be
    a mapping ``{length: number of examples}`` (then nothing is read from a
    tensor)."""
    if isinstance(lengths, Mapping):
        pairs = ((int(n), int(c)) for n, c in lengths.items())
    elif isinstance(lengths, torch.Tensor):
        uniq, counts = torch.unique(lengths.to("cpu", torch.int64), return_counts=True)
        pairs = zip(uniq.tolist(), counts.tolist(), strict=False)
    else:
        seen: dict[int, int] = {}
        for n in lengths:
            seen[int(n)] = seen.get(int(n), 0) + 1
        pairs = seen.items()
    direct = ghost = 0
    for n, c in pairs:
        direct += c * direct_cost(n, a, b)
        ghost += c * ghost_cost(n, a, b)
    return "ghost" if ghost < direct else "direct"
