"""Diagnostic figures for G-SNR scores, written as PNG files.

matplotlib is imported inside the functions and drives an Agg canvas attached
to its own ``Figure``; pyplot and the global backend are left untouched, and
``import gradfilter`` does not import matplotlib.

An axis is called heavy-tailed when the finite values it shows span more than
``HEAVY_TAIL_FACTOR`` times their inter-quartile range (or span anything while
the inter-quartile range is 0); such an axis uses a symmetric-log scale whose
linear region ends at the 25th percentile of the non-zero ``|x|``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

HEAVY_TAIL_FACTOR = 20.0
FIGSIZE = (8.0, 5.0)
DPI = 100


def _as_vector(name: str, x: object) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real-valued 1-D array: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _heavy_tailed(x: np.ndarray) -> bool:
    """Whether finite values ``x`` span more than ``HEAVY_TAIL_FACTOR`` * IQR."""
    if x.size < 2:
        return False
    span = float(x.max() - x.min())
    if span == 0.0:
        return False
    q25, q75 = np.percentile(x, [25.0, 75.0])
    iqr = float(q75 - q25)
    return iqr == 0.0 or span > HEAVY_TAIL_FACTOR * iqr


def _linthresh(x: np.ndarray) -> float:
    """End of the linear region of a symlog axis: 25th percentile of the non-zero |x|."""
    nz = np.abs(x[x != 0])
    if nz.size == 0:
        return 1.0
    return float(np.percentile(nz, 25.0))


def _new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str], dpi: int) -> str:
    out = os.fspath(path)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def plot_gsnr_distribution(
    gsnr: np.ndarray,
    path: str | os.PathLike[str],
    selected_threshold: float | None = None,
    *,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> str:
    """Histogram of the finite G-SNR values, written to ``path`` as a PNG.

    Non-finite values (unscored rows) are left out of the histogram and
    counted in the title and legend. When the finite values are heavy-tailed
    (see the module docstring) the x axis is symmetric-log with bins of equal
    width on that axis, and the counts are on a log axis so that single
    outliers stay visible. ``selected_threshold`` (for example the score of the
    last selected row) is drawn as a vertical line.

    Returns:
        ``path`` as a string. The image is ``figsize * dpi`` pixels
        (800 x 500 by default).
    """
    values = _as_vector("gsnr", gsnr)
    if selected_threshold is not None:
        selected_threshold = float(selected_threshold)
        if not np.isfinite(selected_threshold):
            raise ValueError(f"selected_threshold must be finite, got {selected_threshold!r}")
    finite = values[np.isfinite(values)]
    n_unscored = values.size - finite.size

    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    heavy = _heavy_tailed(finite)
    xlabel = "G-SNR  $D_i / (V_i + \\epsilon)$"
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        if selected_threshold is not None:
            lo, hi = min(lo, selected_threshold), max(hi, selected_threshold)
        if lo == hi:
            pad = 0.5 if lo == 0 else abs(lo) * 0.05
            lo, hi = lo - pad, hi + pad
        n_bins = int(np.clip(2 * np.sqrt(finite.size), 10, 60))
        if heavy:
            ax.set_xscale("symlog", linthresh=_linthresh(finite))
            tr = ax.xaxis.get_transform()
            t_lo, t_hi = tr.transform(np.array([lo, hi]))
            edges = tr.inverted().transform(np.linspace(t_lo, t_hi, n_bins + 1))
            edges[0], edges[-1] = lo, hi
            xlabel += "  (symlog scale)"
        else:
            edges = np.linspace(lo, hi, n_bins + 1)
        ax.hist(
            finite,
            bins=edges,
            log=heavy,
            color="tab:blue",
            edgecolor="white",
            linewidth=0.5,
            label=f"scored rows: {finite.size}",
        )
    else:
        ax.text(0.5, 0.5, "no scored rows", ha="center", va="center", transform=ax.transAxes)
    ax.plot([], [], " ", label=f"unscored rows (NaN): {n_unscored}")
    if selected_threshold is not None:
        ax.axvline(
            selected_threshold,
            color="tab:red",
            linestyle="--",
            linewidth=1.5,
            label=f"selection threshold = {selected_threshold:.4g}",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of examples" + ("  (log scale)" if heavy and finite.size else ""))
    ax.set_title(f"G-SNR distribution  (N = {values.size}, unscored = {n_unscored})")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _selected_mask(selected: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """The boolean selection mask of :func:`plot_drop_vs_variance` (all False for None)."""
    if selected is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(selected)
    if mask.dtype != np.bool_:
        raise ValueError(
            "selected must be a boolean mask of shape [N]; to use row indices idx, "
            "build mask = np.zeros(N, bool); mask[idx] = True"
        )
    if mask.shape != shape:
        raise ValueError(f"selected must have shape {shape}, got {mask.shape}")
    return mask


def _set_drop_scales(ax: Any, vx: np.ndarray, dy: np.ndarray) -> str:
    """Log / symlog axes for the drawn spreads ``vx`` and drops ``dy``; returns the
    note appended to the x label."""
    note = ""
    positive = vx[vx > 0]
    if positive.size == vx.size:
        ax.set_xscale("log")
        note = "  (log scale)"
    elif positive.size:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
        note = f"  (symlog, linear below {positive.min():.3g})"
    if _heavy_tailed(dy):
        ax.set_yscale("symlog", linthresh=_linthresh(dy))
    return note


def _scatter_drop(
    ax: Any,
    v: np.ndarray,
    d: np.ndarray,
    rest: np.ndarray,
    chosen: np.ndarray | None,
    size: float,
) -> None:
    """Draw the unselected points ``rest`` and, when a selection is given, the
    selected points ``chosen`` larger and on top."""
    ax.scatter(
        v[rest],
        d[rest],
        s=size,
        c="tab:gray",
        alpha=0.5,
        linewidths=0,
        label=(
            f"examples: {int(rest.sum())}" if chosen is None else f"not selected: {int(rest.sum())}"
        ),
    )
    if chosen is not None:
        ax.scatter(
            v[chosen],
            d[chosen],
            s=size * 2.0,
            c="tab:orange",
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
            label=f"selected: {int(chosen.sum())}",
        )


def plot_drop_vs_variance(
    drop: np.ndarray,
    late_var: np.ndarray,
    path: str | os.PathLike[str],
    selected: np.ndarray | None = None,
    *,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> str:
    """Scatter of the drop ``D_i`` (y) against the late spread ``V_i`` (x), as a PNG.

    Rows where either value is not finite are not drawn and are counted in the
    title. The x axis is logarithmic when every drawn ``V_i`` is positive, and
    symmetric-log with its linear region up to the smallest positive ``V_i``
    when some are 0 (or negative); the y axis is symmetric-log when the drops
    are heavy-tailed. ``selected`` is a boolean mask of shape ``[N]`` (convert
    indices from :func:`gradfilter.method.gsnr.select_top` with ``mask[idx] = True``);
    selected points are drawn larger and on top, in another colour.

    Returns:
        ``path`` as a string. The image is ``figsize * dpi`` pixels
        (800 x 500 by default).
    """
    d = _as_vector("drop", drop)
    v = _as_vector("late_var", late_var)
    if d.shape != v.shape:
        raise ValueError(f"drop and late_var must have the same length; got {d.size} and {v.size}")
    mask = _selected_mask(selected, d.shape)
    ok = np.isfinite(d) & np.isfinite(v)
    n_hidden = int(d.size - ok.sum())

    fig = _new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    size = 18.0 if ok.sum() <= 500 else 6.0
    xlabel = "late spread $V_i$ across ensemble members"
    if ok.any():
        xlabel += _set_drop_scales(ax, v[ok], d[ok])
        _scatter_drop(ax, v, d, ok & ~mask, ok & mask if selected is not None else None, size)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no scored rows", ha="center", va="center", transform=ax.transAxes)
    ylabel = "drop $D_i$"
    if ax.get_yscale() == "symlog":
        ylabel += "  (symlog scale)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Drop vs late spread  (N = {d.size}, not shown (NaN/inf) = {n_hidden})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)
