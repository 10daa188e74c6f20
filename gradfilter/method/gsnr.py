r"""G-SNR scores from ensemble gradient norms, and top-fraction selection.

Definitions
-----------
Inputs are two arrays of shape ``[N, M]``: ``early_sq[i, m] = ||g_i^(m,s)||^2``
and ``late_sq[i, m] = ||g_i^(m,t)||^2``, the squared norm of the gradient of
example ``i``'s loss with respect to the LoRA parameters of ensemble member
``m`` (``M`` members), taken at the early snapshot ``s`` (after epoch 1) and at
the late snapshot ``t`` (after epoch 2).

.. math::

    G_i^{(e)} = \frac{1}{M} \sum_{m=1}^{M} \lVert g_i^{(m,e)} \rVert^2,
    \qquad e \in \{s, t\},

    D_i = \frac{G_i^{(s)} - G_i^{(t)}}{G_i^{(s)} + \epsilon}
        \quad (\texttt{drop="normalized"}),

    D_i = \log\frac{G_i^{(s)} + \epsilon}{G_i^{(t)} + \epsilon}
        \quad (\texttt{drop="log\_ratio"}),

    D_i = G_i^{(s)} - G_i^{(t)}
        \quad (\texttt{drop="unnormalized"}),

    V_i = \frac{1}{M - \delta} \sum_{m=1}^{M} (x_{im} - \bar x_i)^2,
    \qquad x_{im} = \lVert g_i^{(m,t)} \rVert^2 \; (\texttt{of="squared"})
    \text{ or } \lVert g_i^{(m,t)} \rVert \; (\texttt{of="norm"}),

with ``delta = ddof`` (0: population variance) and ``V_i`` replaced by
``sqrt(V_i)`` for ``spread="std"``. Finally

.. math::

    \mathrm{GSNR}_i = \frac{D_i}{V_i + \epsilon},

higher is better: a large, consistent drop of the gradient norm between the
two snapshots.  This is ``formula="paper"``, the reconstruction of the paper's
score.  It is not scale-free: when every example's norm grows by a shared
factor between the snapshots (early in LoRA training, where ``B`` grows from
zero), every ``D_i`` is negative and ``D_i / V_i`` ranks the examples with the
largest late spread (the noisiest) first.

Scale-free formulas
-------------------
They keep the paper's intent (signal: how far the ensemble's gradient falls
between the snapshots; noise: how much the members disagree late) but are
unchanged when all squared norms are multiplied by one factor per snapshot:

.. math::

    \ell_i = \log\frac{G_i^{(s)} + \epsilon}{G_i^{(t)} + \epsilon}
        - \operatorname{median}_j \log\frac{G_j^{(s)} + \epsilon}{G_j^{(t)} + \epsilon}
    \qquad \text{(the drop relative to the cohort's typical drop)},

    c_i = \frac{\operatorname{std}_m x_{im}}{\bar x_i + \epsilon},
    \quad x_{im} = \lVert g_i^{(m,t)} \rVert^2
    \qquad \text{(the late coefficient of variation across members)}.

* ``formula="log_cv"``: ``ell_i - log(c_i + c0)`` with ``c0 = 1e-3``, the log of
  (relative drop / relative spread): a larger drop and a smaller spread both
  raise the score, and neither can flip the other's sign.
* ``formula="snr_cv"``: ``ell_i / (c_i + c0)``, a signal-to-noise ratio in the
  usual sense: a drop larger than the cohort's, consistent across members,
  ranks first; a smaller one, consistent across members, ranks last; rows
  whose members disagree sit near zero.
* ``formula="rank"``: the mean of the two normalised ranks, ``rank(ell)``
  (larger first) and ``rank(c)`` (smaller first), each scaled to ``[0, 1]``
  (``1`` = best); ties take their mean rank.

Length-centred level
--------------------
``formula="length_level"`` uses neither the drop nor the spread but the level of
the late norm, compared with rows of the same length.  With ``n_i`` the row's
response tokens and

.. math::

    L_i = \frac{1}{M} \sum_{m=1}^{M} \log\left(\lVert g_i^{(m,t)} \rVert^2 + \epsilon\right),

the scored rows are cut into ``k = max(1, min(10, N // 20))`` quantile bins of
``log n_i`` and the score is ``median(L of the row's bin) - L_i``: a norm lower
than is usual for the row's length ranks first.  The per-example norm of a mean
token loss depends strongly on the number of tokens, which hides the row's own
signal in the raw level; within a length bin it shows.  It is scale-free (one
factor on every norm cancels) and needs the rows' lengths (``lengths``).

With one member ``c_i = 0`` for every row, so ``log_cv`` and ``rank`` order by
``ell`` alone and ``snr_cv`` by ``ell / c0``.  NaN rows stay NaN and are left
out of the cohort median and of the ranks.

A row that contains NaN (the example could not be scored) gives NaN in every
quantity that depends on it: NaN in ``early_sq[i]`` makes ``G_i^(s)``, ``D_i``
and ``GSNR_i`` NaN; NaN in ``late_sq[i]`` makes ``G_i^(t)``, ``V_i``, ``D_i``
and ``GSNR_i`` NaN.

Ranking and selection
---------------------
:func:`rank_scores` gives rank 1 to the best finite score; equal scores are
ordered by input position (earlier first); rows whose score is not finite
(unscored) come after every scored row, in input order. :func:`select_top`
keeps the first ``k`` rows of that order, where ``k = floor(ratio * n_rows)``
(or ``k = top_k``), capped at the number of finite scores, so that an unscored
row is never selected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from gradfilter.method.registry import SCORES as _SCORES

DROPS = ("normalized", "log_ratio", "unnormalized")
#: The G-SNR formulas (see the module docstring).
FORMULAS = ("paper", "log_cv", "snr_cv", "rank", "length_level")
#: Bins of ``length_level``: at most this many, with at least ``LEVEL_BIN_ROWS`` rows each.
LEVEL_BINS = 10
LEVEL_BIN_ROWS = 20
#: Floor added to the coefficient of variation in the scale-free formulas.
CV_FLOOR = 1e-3
SPREADS = ("var", "std")
OFS = ("squared", "norm")

#: Score name -> direction: +1 when a higher value is better, -1 when a lower one is
#: (a view of :data:`gradfilter.method.registry.SCORES`).
SCORES: dict[str, int] = {n: (1 if s.higher_is_better else -1) for n, s in _SCORES.items()}

#: Score name -> key of the :func:`gsnr_components` dictionary that holds its values.
SCORE_SOURCES: dict[str, str] = {n: s.source for n, s in _SCORES.items()}


@dataclass(frozen=True)
class GSNRConfig:
    """Variant of the G-SNR formula (see the module docstring for the maths).

    Attributes:
        drop: ``"normalized"`` ``(G^s - G^t) / (G^s + eps)``, ``"log_ratio"``
            ``log((G^s + eps) / (G^t + eps))`` or ``"unnormalized"`` ``G^s - G^t``.
        spread: ``"var"`` (variance across members) or ``"std"`` (its square root).
        of: ``"squared"`` (spread of the squared norms) or ``"norm"`` (spread of
            the norms, the square roots of the inputs).
        ddof: delta degrees of freedom of the variance: divisor ``M - ddof``.
        eps: positive constant added to the denominators (and, for
            ``"log_ratio"``, inside the logarithm).
        formula: ``"paper"`` (``D / (V + eps)`` with the options above), or
            one of the scale-free ``"log_cv"``, ``"snr_cv"``, ``"rank"`` (which
            use ``eps`` but not ``drop`` / ``spread`` / ``of`` / ``ddof``).

    Raises:
        ValueError: an unknown ``drop`` / ``spread`` / ``of`` (the message lists
            the allowed values), ``ddof < 0``, or ``eps`` not positive and finite.
        TypeError: ``ddof`` not an integer or ``eps`` not a real number.
    """

    drop: str = "normalized"
    spread: str = "var"
    of: str = "squared"
    ddof: int = 0
    eps: float = 1e-8
    formula: str = "paper"

    def __post_init__(self) -> None:
        _check_choice("formula", self.formula, FORMULAS)
        _check_choice("drop", self.drop, DROPS)
        _check_choice("spread", self.spread, SPREADS)
        _check_choice("of", self.of, OFS)
        if isinstance(self.ddof, bool) or not isinstance(self.ddof, numbers.Integral):
            raise TypeError(f"ddof must be a non-negative integer, got {self.ddof!r}")
        if self.ddof < 0:
            raise ValueError(f"ddof must be a non-negative integer, got {self.ddof!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, numbers.Real):
            raise TypeError(f"eps must be a positive finite number, got {self.eps!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}")
        object.__setattr__(self, "ddof", int(self.ddof))
        object.__setattr__(self, "eps", float(self.eps))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _as_sq_matrix(name: str, x: object) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real-valued [N, M] array: {exc}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape [N, M] (2-D), got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(
            f"{name} contains infinite values; mark an example that could not be scored "
            "with NaN instead"
        )
    if (arr < 0).any():
        raise ValueError(f"{name} holds squared norms and must be >= 0; found negative values")
    return arr


def gsnr_components(
    early_sq: np.ndarray,
    late_sq: np.ndarray,
    config: GSNRConfig = GSNRConfig(),
    lengths: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    r"""Per-example quantities of the G-SNR formula.

    ``early_mean = G^(s)``, ``late_mean = G^(t)``, ``drop = D``,
    ``late_var = V`` (the spread selected by ``config``: variance or standard
    deviation, of squared norms or of norms), ``late_cv = c`` (the late
    coefficient of variation of the squared norms) and ``gsnr``, the score of
    ``config.formula`` (``D / (V + eps)`` for ``"paper"``); see the module
    docstring for the definitions.

    Args:
        early_sq: ``[N, M]`` squared gradient norms at the early snapshot
            (float64; a NaN row marks an example that could not be scored).
        late_sq: ``[N, M]`` squared gradient norms at the late snapshot.
        config: formula variant.
        lengths: ``[N]`` response tokens of each example; needed by
            ``formula="length_level"`` only.

    Returns:
        Dict with keys ``early_mean``, ``late_mean``, ``drop``, ``late_var``,
        ``late_cv``, ``gsnr``, each a float64 array of shape ``[N]``.

    Raises:
        ValueError: shapes differ or are not ``[N, M]`` with ``M >= 1``;
            ``ddof >= M``; an entry is negative or infinite.
        TypeError: ``config`` is not a :class:`GSNRConfig`.
    """
    if not isinstance(config, GSNRConfig):
        raise TypeError(f"config must be a GSNRConfig, got {type(config).__name__}")
    early = _as_sq_matrix("early_sq", early_sq)
    late = _as_sq_matrix("late_sq", late_sq)
    if early.shape != late.shape:
        raise ValueError(
            f"early_sq and late_sq must have the same shape [N, M]; got {early.shape} "
            f"and {late.shape}"
        )
    n, m = early.shape
    if m < 1:
        raise ValueError("need at least one ensemble member (M >= 1); got M = 0")
    if config.ddof >= m:
        raise ValueError(
            f"ddof={config.ddof} needs at least {config.ddof + 1} ensemble members; got M={m}"
        )
    eps = config.eps
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        g_s = early.mean(axis=1)
        g_t = late.mean(axis=1)
        x = late if config.of == "squared" else np.sqrt(late)
        spread = x.var(axis=1, ddof=config.ddof)
        if config.spread == "std":
            spread = np.sqrt(spread)
        if config.drop == "normalized":
            drop = (g_s - g_t) / (g_s + eps)
        elif config.drop == "log_ratio":
            drop = np.log(g_s + eps) - np.log(g_t + eps)
        else:
            drop = g_s - g_t
        cv = late.std(axis=1) / (g_t + eps)
        if config.formula == "paper":
            gsnr = drop / (spread + eps)
        elif config.formula == "length_level":
            gsnr = length_level(np.log(late + eps).mean(axis=1), _as_lengths(lengths, n))
        else:
            gsnr = _scale_free(config.formula, np.log(g_s + eps) - np.log(g_t + eps), cv)
    out = {
        "early_mean": g_s,
        "late_mean": g_t,
        "drop": drop,
        "late_var": spread,
        "late_cv": cv,
        "gsnr": gsnr,
    }
    return {k: np.asarray(v, dtype=np.float64).reshape(n) for k, v in out.items()}


def _scale_free(formula: str, log_drop: np.ndarray, cv: np.ndarray) -> np.ndarray:
    """The scale-free scores from the log drop and the late CV (module docstring)."""
    ok = np.isfinite(log_drop) & np.isfinite(cv)
    out = np.full(log_drop.shape, np.nan)
    if not ok.any():
        return out
    ell = log_drop[ok] - np.median(log_drop[ok])
    c = cv[ok]
    if formula == "log_cv":
        out[ok] = ell - np.log(c + CV_FLOOR)
    elif formula == "snr_cv":
        out[ok] = ell / (c + CV_FLOOR)
    else:  # rank
        out[ok] = 0.5 * (_unit_rank(ell) + _unit_rank(-c))
    return out


def _as_lengths(lengths: object, n: int) -> np.ndarray:
    if lengths is None:
        raise ValueError("formula 'length_level' needs the rows' lengths (response tokens)")
    arr = np.asarray(lengths, dtype=np.float64).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"lengths must have one entry per row ({n}), got shape {arr.shape}")
    return arr


def length_level(level: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``median(level of the row's length bin) - level`` (module docstring); rows
    with a NaN level or no positive length are NaN and in no bin."""
    out = np.full(level.shape, np.nan)
    ok = np.isfinite(level) & np.isfinite(lengths) & (lengths > 0)
    n = int(ok.sum())
    if not n:
        return out
    k = max(1, min(LEVEL_BINS, n // LEVEL_BIN_ROWS))
    log_n = np.log(lengths[ok])
    edges = np.quantile(log_n, np.linspace(0.0, 1.0, k + 1))
    which = np.searchsorted(edges[1:-1], log_n, side="right")
    lv = level[ok]
    centred = np.empty(n)
    for b in np.unique(which):
        members = which == b
        centred[members] = np.median(lv[members]) - lv[members]
    out[ok] = centred
    return out


def _unit_rank(x: np.ndarray) -> np.ndarray:
    """Mean ranks of ``x`` scaled to ``[0, 1]`` (1 = largest); ties share their mean rank."""
    n = x.size
    if n == 1:
        return np.ones(1)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=np.float64)
    xs = x[order]
    # Ties: every member of a run of equal values gets the run's mean rank.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], n]
    for a, b in zip(starts, ends, strict=False):
        if b - a > 1:
            ranks[order[a:b]] = (a + b - 1) / 2.0
    return ranks / (n - 1)


def ablation_scores(components: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of every score in :data:`SCORES`, keyed by score name.

    ``late_norm`` is ``G^(t)`` and ``early_norm`` is ``G^(s)``; the other names
    are the :func:`gsnr_components` entries of the same name. Rank each with
    ``higher_is_better=score_direction(name)``.
    """
    missing = sorted(set(SCORE_SOURCES.values()) - set(components))
    if missing:
        raise ValueError(f"components lacks the keys {missing}; pass gsnr_components(...)")
    return {name: components[key] for name, key in SCORE_SOURCES.items()}


def score_direction(name: str) -> bool:
    """``True`` when a higher value of score ``name`` is better (``SCORES[name] > 0``)."""
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; known scores: {', '.join(SCORES)}")
    return SCORES[name] > 0


def _as_scores(scores: object) -> np.ndarray:
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"scores must be a real-valued 1-D array: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {arr.shape}")
    return arr


def _check_direction(higher_is_better: object) -> bool:
    if not isinstance(higher_is_better, (bool, np.bool_)):
        raise TypeError(
            "higher_is_better must be a bool (for a SCORES direction d use d > 0 or "
            f"score_direction(name)); got {higher_is_better!r}"
        )
    return bool(higher_is_better)


def _order(scores: np.ndarray, higher_is_better: bool) -> tuple[np.ndarray, int]:
    """Indices from best to worst, and the number of finite scores."""
    finite = np.isfinite(scores)
    scored = np.flatnonzero(finite)
    unscored = np.flatnonzero(~finite)
    key = -scores[scored] if higher_is_better else scores[scored]
    best_first = scored[np.argsort(key, kind="stable")]
    return np.concatenate([best_first, unscored]).astype(np.int64), scored.size


def rank_scores(scores: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Rank of each row, 1 = best, as an int64 array of shape ``[N]``.

    Finite scores are ranked by value (descending when ``higher_is_better``,
    ascending otherwise); equal scores keep their input order. Rows whose score
    is NaN or infinite (unscored) get ranks ``n_scored + 1 .. N`` in input order.
    """
    arr = _as_scores(scores)
    order, _ = _order(arr, _check_direction(higher_is_better))
    ranks = np.empty(arr.size, dtype=np.int64)
    ranks[order] = np.arange(1, arr.size + 1, dtype=np.int64)
    return ranks


def select_top(
    scores: np.ndarray,
    *,
    ratio: float | None = None,
    top_k: int | None = None,
    n_rows: int | None = None,
    higher_is_better: bool = True,
) -> np.ndarray:
    """Indices of the selected rows, best first (int64).

    ``k = floor(ratio * n_rows)`` or ``k = top_k``; the result holds the first
    ``min(k, n_scored)`` rows of the :func:`rank_scores` order, where
    ``n_scored`` is the number of finite scores, so an unscored row is never
    selected. ``ratio`` is read at its shortest decimal form (``0.29`` is
    29/100 exactly), so ``ratio=0.29, n_rows=100`` keeps 29 rows.

    Args:
        scores: ``[N]`` scores; NaN or infinite = unscored.
        ratio: fraction in ``(0, 1]`` of ``n_rows`` to keep.
        top_k: number of rows to keep (``>= 0``).
        n_rows: the N of ``floor(ratio * N)``; defaults to ``len(scores)`` and
            may not be smaller. Only used with ``ratio``.
        higher_is_better: direction of the scores.

    Raises:
        ValueError: not exactly one of ``ratio`` / ``top_k``; ``ratio`` outside
            ``(0, 1]``; ``top_k`` negative; ``n_rows < len(scores)``; ``scores``
            not 1-D.
        TypeError: ``ratio`` not a real number; ``top_k`` or ``n_rows`` not an
            integer; ``higher_is_better`` not a bool.
    """
    arr = _as_scores(scores)
    direction = _check_direction(higher_is_better)
    if (ratio is None) == (top_k is None):
        raise ValueError("give exactly one of ratio and top_k")
    if n_rows is None:
        n_rows = arr.size
    elif isinstance(n_rows, bool) or not isinstance(n_rows, numbers.Integral):
        raise TypeError(f"n_rows must be an integer, got {n_rows!r}")
    elif n_rows < arr.size:
        raise ValueError(f"n_rows={n_rows} is smaller than the number of scores ({arr.size})")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise TypeError(f"ratio must be a number in (0, 1], got {ratio!r}")
        if not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        exact = Fraction(repr(float(ratio)))
        k = math.floor(exact * int(n_rows))
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise TypeError(f"top_k must be a non-negative integer, got {top_k!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
        k = int(top_k)
    order, n_scored = _order(arr, direction)
    return order[: min(k, n_scored)]
