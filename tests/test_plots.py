"""The diagnostic figures are written as PNG files of the requested size."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradfilter.method.gsnr import gsnr_components, select_top
from gradfilter.run.plots import _heavy_tailed, plot_drop_vs_variance, plot_gsnr_distribution

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _check_png(path: Path, size: tuple[int, int] = (800, 500)) -> None:
    assert path.is_file()
    assert path.stat().st_size > 5000  # a blank 800x500 PNG is far smaller than a drawn figure
    assert _png_size(path) == size


def _run_data(n: int = 300, m: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    early = rng.lognormal(0.0, 0.5, (n, m))
    late = early * rng.uniform(0.2, 1.0, (n, 1)) * rng.lognormal(0.0, 0.2, (n, m))
    late[:3] *= 50.0  # outliers: large late norms
    late[5] = 1.0  # zero late variance -> huge G-SNR
    early[7:12] = np.nan  # unscored rows
    return gsnr_components(early, late)


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_distribution_heavy_tailed_with_threshold(tmp_path: Path) -> None:
    c = _run_data()
    assert _heavy_tailed(c["gsnr"][np.isfinite(c["gsnr"])])
    idx = select_top(c["gsnr"], ratio=0.2)
    out = tmp_path / "hist.png"
    ret = plot_gsnr_distribution(c["gsnr"], str(out), selected_threshold=c["gsnr"][idx[-1]])
    assert ret == str(out)
    _check_png(out)


def test_distribution_light_tailed(tmp_path: Path) -> None:
    g = np.random.default_rng(1).normal(0.0, 1.0, 200)
    g[:4] = np.nan
    assert not _heavy_tailed(g[np.isfinite(g)])
    out = tmp_path / "light.png"
    plot_gsnr_distribution(g, out, selected_threshold=1.0)
    _check_png(out)


@pytest.mark.parametrize(
    "values",
    [np.array([]), np.full(5, np.nan), np.array([2.5]), np.array([0.0, 0.0, np.nan])],
)
def test_distribution_degenerate_inputs(tmp_path: Path, values: np.ndarray) -> None:
    out = tmp_path / "deg.png"
    plot_gsnr_distribution(values, out, selected_threshold=1.0)
    assert out.is_file() and _png_size(out) == (800, 500)


def test_distribution_custom_size_and_errors(tmp_path: Path) -> None:
    out = tmp_path / "small.png"
    plot_gsnr_distribution(np.arange(50.0), out, figsize=(6.0, 4.0), dpi=50)
    assert _png_size(out) == (300, 200)
    with pytest.raises(ValueError, match="selected_threshold must be finite"):
        plot_gsnr_distribution(np.arange(5.0), tmp_path / "x.png", selected_threshold=np.nan)
    with pytest.raises(ValueError, match="1-D"):
        plot_gsnr_distribution(np.ones((2, 2)), tmp_path / "x.png")


def test_scatter_with_selection_and_zero_variance(tmp_path: Path) -> None:
    c = _run_data()
    assert (c["late_var"] == 0).any()
    mask = np.zeros(c["gsnr"].size, dtype=bool)
    mask[select_top(c["gsnr"], ratio=0.2)] = True
    out = tmp_path / "scatter.png"
    assert plot_drop_vs_variance(c["drop"], c["late_var"], str(out), selected=mask) == str(out)
    _check_png(out)


def test_scatter_positive_variance_no_selection(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    out = tmp_path / "scatter_pos.png"
    plot_drop_vs_variance(rng.normal(size=200), rng.lognormal(size=200), out)
    _check_png(out)


@pytest.mark.parametrize(
    ("drop", "var"),
    [
        (np.array([0.1, 0.2, 0.3]), np.zeros(3)),  # no positive variance: linear axis
        (np.full(3, np.nan), np.ones(3)),  # nothing to draw
        (np.array([]), np.array([])),
    ],
)
def test_scatter_degenerate_inputs(tmp_path: Path, drop: np.ndarray, var: np.ndarray) -> None:
    out = tmp_path / "deg.png"
    plot_drop_vs_variance(drop, var, out)
    assert out.is_file() and _png_size(out) == (800, 500)


def test_scatter_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.png"
    with pytest.raises(ValueError, match="same length"):
        plot_drop_vs_variance(np.ones(3), np.ones(4), p)
    with pytest.raises(ValueError, match="boolean mask"):
        plot_drop_vs_variance(np.ones(3), np.ones(3), p, selected=np.array([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        plot_drop_vs_variance(np.ones(3), np.ones(3), p, selected=np.array([True, False]))
    assert not p.exists()


def test_import_is_light_and_pyplot_untouched(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "import gradfilter, gradfilter.method.gsnr, gradfilter.run.plots\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'matplotlib'], 'eager import'\n"
        "gradfilter.run.plots.plot_gsnr_distribution(\n"
        f"    np.arange(9.0), {str(tmp_path / 'a.png')!r})\n"
        "assert 'matplotlib' in sys.modules\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.png").is_file()
