"""Figures of influence matrices: heatmaps with block boundaries, histograms, lr sweeps (matplotlib).

Every figure states which sign it shows. sign="loss" shows M as eif() returns it (loss after
minus before; negative = learned); sign="logprob" shows -M, the paper's figure sign (change in
log-probability of the target; positive = more likely). Either way "learned" is drawn blue.
Importing this module leaves matplotlib's backend alone (a notebook keeps its own); the `jaxeif`
command and `python -m jaxeif.experiments.X` pick the file backend Agg (jaxeif.cli).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from jaxeif import io

SIGNS = {
    "loss": ("Δ loss = loss after − loss before\n(negative = learned)", "RdBu_r"),
    "logprob": ("−Δ loss = Δ log p(target)\n(positive = more likely, learned)", "RdBu"),
}


def _signed(values, sign: str) -> np.ndarray:
    if sign not in SIGNS:
        raise ValueError(
            f"sign must be one of {list(SIGNS)} (loss: M as computed; logprob: -M, the paper's sign), got {sign!r}"
        )
    values = np.asarray(values, dtype=np.float64)
    return -values if sign == "logprob" else values


def _runs(labels: Sequence) -> list[tuple[int, int, object]]:
    """(start, stop, label) of each run of equal consecutive labels."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((start, i, labels[start]))
            start = i
    return out


def heatmap(
    M,
    *,
    ax=None,
    boundaries: Sequence[int] = (),
    major_boundaries: Sequence[int] = (),
    labels: Sequence | None = None,
    groups: Sequence | None = None,
    sign: str = "loss",
    title: str | None = None,
    clip_percentile: float = 99.0,
    diagonal: bool = True,
    row_label: str = "fine-tuned on sample i",
):
    """Heatmap of M[i, j] (rows: fine-tuned on i; columns: evaluated on j) with block lines and run labels.

    Colours are symmetric about 0 and clipped at the `clip_percentile` of |M| off the diagonal (the colour
    bar says so); "learned" is blue whichever `sign` is shown.

    Args:
        M: f[n, m] influence matrix.
        ax: a matplotlib Axes to draw into; None: a new Figure.
        boundaries: indices where thin block lines go.
        major_boundaries: indices where thick block lines go.
        labels: one label per row, shown once per run of equal labels (e.g. digits).
        groups: one outer label per row, shown once per run (e.g. noise level).
        sign: "loss" shows M as computed (negative = learned); "logprob" shows -M, the paper's sign.
        title: the title.
        clip_percentile: percentile of |M| off the diagonal where the colours saturate.
        diagonal: False greys out self-influence.
        row_label: the y axis label.

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: M is not 2-d, an unknown `sign`, or `labels`/`groups` of the wrong length.
    """
    values = _heatmap_values(M, sign, labels=labels, groups=groups)
    vmax = _clip_value(values, clip_percentile)
    shown = values.copy()
    if not diagonal and values.shape[0] == values.shape[1]:
        shown[np.eye(values.shape[0], dtype=bool)] = np.nan
    label, cmap_name = SIGNS[sign]
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.6, 7.6), layout="constrained")
    fig = ax.figure
    im = ax.imshow(
        shown, cmap=plt.get_cmap(cmap_name).with_extremes(bad="0.75"), vmin=-vmax, vmax=vmax, interpolation="nearest"
    )
    _block_lines(ax, boundaries, color="0.35", lw=0.4)
    _block_lines(ax, major_boundaries, color="black", lw=1.6)
    if labels is not None:
        _run_ticks(ax, labels)
    if groups is not None:
        _group_ticks(ax, groups)
    ax.set_xlabel("evaluated on sample j")
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, shrink=0.82, extend="both", pad=0.06)
    cbar.set_label(f"{label}\ncolours clipped at ±{vmax:.3g} ({clip_percentile:g}th pct of |M|)", fontsize=9)
    return fig


def _heatmap_values(M, sign: str, *, labels, groups) -> np.ndarray:
    """M in the figure's sign, f64[n, m], after checking its shape against `labels` and `groups`."""
    values = _signed(M, sign)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-d matrix, got shape {values.shape}")
    for name, seq in (("labels", labels), ("groups", groups)):
        if seq is not None and len(seq) != values.shape[0]:
            raise ValueError(f"`{name}` needs one entry per row ({values.shape[0]}), got {len(seq)}")
    return values


def _clip_value(values: np.ndarray, clip_percentile: float) -> float:
    """The colour limit: the `clip_percentile` of the finite |values| off the diagonal (1 if none or 0)."""
    n, m = values.shape
    off = values[~np.eye(n, m, dtype=bool)] if n == m else values.ravel()
    finite = off[np.isfinite(off)]
    vmax = float(np.percentile(np.abs(finite), clip_percentile)) if finite.size else 1.0
    return vmax if vmax > 0 else 1.0


def _block_lines(ax, at: Sequence[int], **line) -> None:
    """Horizontal and vertical lines before each index in `at`."""
    for b in at:
        ax.axhline(b - 0.5, **line)
        ax.axvline(b - 0.5, **line)


def _run_centres(values: Sequence) -> tuple[list[float], list[str]]:
    """(centre, name) of each run of equal consecutive values."""
    runs = _runs(list(values))
    return [(a + b - 1) / 2 for a, b, _ in runs], [str(v) for _, _, v in runs]


def _run_ticks(ax, labels: Sequence) -> None:
    """One tick per run of equal labels, on both axes."""
    centres, names = _run_centres(labels)
    ax.set_xticks(centres, names, fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.tick_params(length=0)


def _group_ticks(ax, groups: Sequence) -> None:
    """Bold outer labels per run of equal groups, on the top and right axes."""
    centres, names = _run_centres(groups)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, names, fontsize=10, fontweight="bold")
    top.tick_params(length=0)
    right = ax.secondary_yaxis("right")
    right.set_yticks(centres, names, fontsize=10, fontweight="bold", rotation=90, va="center")
    right.tick_params(length=0)


def histogram(
    groups: Mapping[str, np.ndarray],
    *,
    ax=None,
    bins: int = 60,
    sign: str = "loss",
    title: str | None = None,
    clip_percentile: float = 99.5,
):
    """Overlaid density histograms of named value sets (e.g. within- vs between-class influences).

    Args:
        groups: {name: values} the sets to overlay.
        ax: a matplotlib Axes to draw into; None: a new Figure.
        bins: number of bins over the common range.
        sign: "loss" (values as computed) or "logprob" (negated, the paper's sign).
        title: the title.
        clip_percentile: percentile of |values| where the range ends; values beyond it count in the edge bins.

    Returns:
        The matplotlib Figure.

    Raises:
        ValueError: no sets, or an unknown `sign`.
    """
    if not groups:
        raise ValueError("histogram needs at least one named set of values")
    data = {k: _signed(v, sign).ravel() for k, v in groups.items()}
    data = {k: v[np.isfinite(v)] for k, v in data.items()}
    every = np.concatenate(list(data.values()))
    lim = float(np.percentile(np.abs(every), clip_percentile)) if every.size else 1.0
    edges = np.linspace(-lim, lim, bins + 1)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for name, v in data.items():
        ax.hist(
            np.clip(v, -lim, lim),
            bins=edges,
            density=True,
            histtype="step",
            lw=1.6,
            label=f"{name} (n={v.size}, mean {v.mean():.3g})",
        )
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_xlabel(SIGNS[sign][0].replace("\n", " "))
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax.figure


def lr_sweep(
    lrs: Sequence[float],
    magnitude: Sequence[float],
    agreement: Sequence[float],
    *,
    threshold: float,
    chosen: float | None = None,
    title: str | None = None,
    above_floor: Sequence[float] | None = None,
):
    """Two panels over log lr: influence magnitude, and each matrix's agreement with the previous lr's.

    Args:
        lrs: the swept learning rates.
        magnitude: a size of the EIF at each lr (e.g. median |M|).
        agreement: correlation of each lr's matrix with the previous lr's (the first is not defined).
        threshold: the plateau threshold, drawn as a line.
        chosen: the chosen lr, marked; None: none.
        title: the title.
        above_floor: share of off-diagonal entries above the noise floor at each lr, drawn when given.

    Returns:
        The matplotlib Figure.
    """
    lrs = np.asarray(lrs, dtype=float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True, layout="constrained")
    top.loglog(lrs, np.asarray(magnitude, float), "o-")
    top.set_ylabel("median |EIF| off the diagonal")
    bottom.semilogx(lrs, np.asarray(agreement, float), "o-", color="C1")
    bottom.axhline(threshold, color="0.4", ls="--", lw=1, label=f"plateau threshold {threshold:g}")
    if above_floor is not None:
        bottom.semilogx(
            lrs, np.asarray(above_floor, float), "s-", color="C2", ms=4, label="share of entries above the noise floor"
        )
    bottom.set_ylabel("corr(EIF(lr), EIF(previous lr))" if above_floor is None else "agreement / share")
    bottom.set_xlabel("fine-tuning learning rate")
    bottom.set_ylim(min(-0.05, np.nanmin(np.asarray(agreement, float)) - 0.05), 1.05)
    if chosen is not None:
        for a in (top, bottom):
            a.axvline(chosen, color="C3", lw=1.2, label=f"chosen lr {chosen:g}")
    bottom.legend(fontsize=8, loc="lower left")
    if title:
        top.set_title(title)
    return fig


def curves(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float] | Mapping[str, Sequence[float]]],
    *,
    reference: Mapping[str, float | Mapping[str, float]] | None = None,
    constant: Mapping[str, Mapping[str, float]] | None = None,
    constant_label: str = "constant",
    log_y: Sequence[str] = (),
    chosen: float | None = None,
    title: str | None = None,
    columns: int = 4,
):
    """One small panel per series over log x (e.g. a metric against lr), the chosen x marked.

    Panels named in `log_y` get a log y axis; other signed series spanning decades a symmetric-log one.

    Args:
        xs: the x values (e.g. learning rates).
        series: {panel: ys} or {panel: {label: ys}} (one line per label, one colour per label).
        reference: {panel: value or {label: value}} drawn dashed (e.g. the paper's value).
        constant: {panel: {label: value}} drawn dotted (a quantity that does not depend on x).
        constant_label: legend text of the dotted lines.
        log_y: panels with a log y axis.
        chosen: the chosen x, marked; None: none.
        title: the figure's title.
        columns: panels per row.

    Returns:
        The matplotlib Figure.
    """
    xs = np.asarray(xs, dtype=float)
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.3 * columns, 2.7 * rows), sharex=True, layout="constrained", squeeze=False
    )
    for ax, (name, ys) in zip(axes.flat, series.items()):
        lines = (
            {k: np.asarray(v, dtype=float) for k, v in ys.items()}
            if isinstance(ys, Mapping)
            else {None: np.asarray(ys, dtype=float)}
        )
        colour = {label: f"C{k}" for k, label in enumerate(lines)}
        for label, y in lines.items():
            ax.plot(xs, y, "o-", ms=3, color=colour[label], label=label)
        ax.set_xscale("log")
        finite = np.concatenate([y[np.isfinite(y)] for y in lines.values()])
        nonzero = np.abs(finite[finite != 0])
        if name in log_y:
            ax.set_yscale("log")
        elif nonzero.size and finite.min() < 0 < finite.max() and nonzero.max() > 100 * nonzero.min():
            linthresh = 10.0 ** np.floor(np.log10(np.median(nonzero)))
            ax.set_yscale("symlog", linthresh=linthresh)
            ax.yaxis.set_major_locator(matplotlib.ticker.SymmetricalLogLocator(linthresh=linthresh, base=100))
            ax.axhline(0, color="0.6", lw=0.8)
        for values, style, what in ((reference, "--", "paper"), (constant, ":", constant_label)):
            if not values or name not in values:
                continue
            flat = values[name] if isinstance(values[name], Mapping) else {None: values[name]}
            for k, (label, value) in enumerate(flat.items()):
                text = f"{what} {value:g}" if label is None else (what if k == 0 else None)
                ax.axhline(value, color=colour.get(label, "C3"), ls=style, lw=1, label=text)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        if chosen is not None:
            ax.axvline(chosen, color="0.3", lw=0.8, ls=":")
        ax.set_title(name, fontsize=9)
    for ax in axes.flat[len(series) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("learning rate")
    if title:
        fig.suptitle(title)
    return fig


def save(fig, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write a figure atomically (`jaxeif.io`) in the format of the path's suffix, then close it.

    Args:
        fig: the matplotlib Figure.
        path: the file to write; its folder is created.
        dpi: resolution of raster formats.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with io.atomic_file(path, "wb") as fh:
            fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
