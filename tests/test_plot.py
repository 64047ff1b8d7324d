"""Figures show the sign they claim, the boundaries asked for, and are written atomically."""

import numpy as np
import pytest

from jaxeif import plot


def _matrix(n=12, seed=0):
    M = np.random.default_rng(seed).normal(size=(n, n))
    np.fill_diagonal(M, -40.0)
    return M


def test_heatmap_logprob_shows_minus_m_with_labelled_colour_bar():
    M = _matrix()
    fig = plot.heatmap(
        M,
        sign="logprob",
        boundaries=[3, 9],
        major_boundaries=[6],
        labels=[0] * 3 + [1] * 3 + [0] * 3 + [1] * 3,
        groups=["a"] * 6 + ["b"] * 6,
        title="t",
    )
    ax = fig.axes[0]
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), -M)
    vmin, vmax = ax.images[0].get_clim()
    off = np.abs(M[~np.eye(12, dtype=bool)])
    assert vmax == pytest.approx(np.percentile(off, 99)) and vmin == pytest.approx(-vmax)  # diagonal not in scale
    cbar_label = fig.axes[-1].get_ylabel()
    assert "more likely" in cbar_label and "clipped" in cbar_label
    assert len(ax.lines) == 2 * 3  # a horizontal and a vertical line per boundary
    assert [lw for lw in sorted({ln.get_linewidth() for ln in ax.lines})] == [0.4, 1.6]
    np.testing.assert_allclose(ax.get_xticks(), [1, 4, 7, 10])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "0", "1"]


def test_heatmap_loss_sign_and_errors():
    M = _matrix(seed=1)
    fig = plot.heatmap(M, sign="loss", diagonal=False)
    shown = np.ma.filled(fig.axes[0].images[0].get_array(), np.nan)
    assert np.all(np.isnan(np.diag(shown)))
    np.testing.assert_allclose(shown[~np.eye(12, dtype=bool)], M[~np.eye(12, dtype=bool)])
    assert "negative = learned" in fig.axes[-1].get_ylabel()
    with pytest.raises(ValueError, match="sign"):
        plot.heatmap(M, sign="prob")
    with pytest.raises(ValueError, match="labels"):
        plot.heatmap(M, labels=[0, 1])


def test_histogram_and_lr_sweep_draw_what_they_get():
    rng = np.random.default_rng(2)
    fig = plot.histogram({"within": rng.normal(-1, 1, 300), "between": rng.normal(1, 1, 500)}, sign="logprob")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("within (n=300") and legend[1].startswith("between (n=500")
    assert float(legend[0].split("mean ")[1].rstrip(")")) > 0.5  # logprob sign flips the mean -1 to +1
    fig = plot.lr_sweep([1e-3, 1e-2, 1e-1], [0.01, 0.1, 1.0], [np.nan, 0.99, 0.4], threshold=0.95, chosen=1e-2)
    top, bottom = fig.axes
    np.testing.assert_allclose(top.lines[0].get_ydata(), [0.01, 0.1, 1.0])
    assert any(np.allclose(ln.get_xdata(), 1e-2) for ln in bottom.lines[1:])  # the chosen lr is marked


def test_save_is_atomic_png(tmp_path):
    fig = plot.heatmap(_matrix())
    path = plot.save(fig, tmp_path / "sub" / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["h.png"]  # no temp file left


def test_curves_draw_lines_references_and_constants():
    """Several lines per panel, the paper's values dashed and lr-free values dotted in each line's colour."""
    lrs = [1e-6, 1e-4, 1e-2]
    fig = plot.curves(
        lrs,
        {"a": {"x": [1, 2, 3], "y": [3, 2, 1]}, "b": [0.1, 10.0, 1000.0]},
        reference={"a": {"y": 2.5}, "b": 5.0},
        constant={"a": {"x": 1.5, "y": 0.5}},
        log_y=["b"],
        chosen=1e-4,
        columns=2,
    )
    a, b = fig.axes[:2]
    solid = [ln for ln in a.lines if ln.get_linestyle() == "-"]
    np.testing.assert_allclose([ln.get_ydata() for ln in solid], [[1, 2, 3], [3, 2, 1]])
    dashed = [ln for ln in a.lines if ln.get_linestyle() == "--"]
    assert (
        len(dashed) == 1 and np.allclose(dashed[0].get_ydata(), 2.5) and dashed[0].get_color() == solid[1].get_color()
    )
    dotted = {
        tuple(ln.get_ydata()): ln.get_color() for ln in a.lines if ln.get_linestyle() == ":" and ln.get_ydata()[0] != 0
    }
    assert dotted[(1.5, 1.5)] == solid[0].get_color() and dotted[(0.5, 0.5)] == solid[1].get_color()
    assert b.get_yscale() == "log" and a.get_yscale() == "linear"
    assert any(np.allclose(ln.get_xdata(), 1e-4) for ln in b.lines)  # the chosen lr is marked
