"""Plots written atomically as PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

from excise.io import atomic_write_bytes


def _fig_to_png(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def heatmap(
    matrix: Any,
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xticklabels: Sequence[str] | None = None,
    yticklabels: Sequence[str] | None = None,
    cmap: str = "viridis",
    center: float | None = None,
    annotate: bool = False,
    colorbar_label: str = "",
) -> Path:
    """A labelled heatmap; ``center`` makes a diverging colour scale symmetric around it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    h, w = m.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * w, 18), min(1.5 + 0.3 * h, 14)))
    kw: dict[str, Any] = {}
    if center is not None and np.isfinite(m).any():
        span = np.nanmax(np.abs(m[np.isfinite(m)] - center)) or 1.0
        kw = {"vmin": center - span, "vmax": center + span}
    im = ax.imshow(m, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xticklabels is not None:
        ax.set_xticks(range(w))
        ax.set_xticklabels(list(xticklabels), rotation=90, fontsize=7)
    if yticklabels is not None:
        ax.set_yticks(range(h))
        ax.set_yticklabels(list(yticklabels), fontsize=7)
    if annotate and h * w <= 400:
        for i in range(h):
            for j in range(w):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    return _fig_to_png(fig, path)


def grid_heatmaps(
    matrices: Sequence[Any], titles: Sequence[str], path: str | Path, *, suptitle: str = "", cmap: str = "viridis",
    ticklabels: Sequence[str] | None = None,
) -> Path:
    """Several heatmaps side by side (e.g. one attention pattern per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(matrices)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, m, t in zip(axes.flat, matrices, titles):
        ax.imshow(np.asarray(m, dtype=float), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        if ticklabels is not None and len(ticklabels) <= 40:
            ax.set_xticks(range(len(ticklabels)))
            ax.set_xticklabels(ticklabels, rotation=90, fontsize=5)
            ax.set_yticks(range(len(ticklabels)))
            ax.set_yticklabels(ticklabels, fontsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    return _fig_to_png(fig, path)


def scatter_errorbars(
    x: Sequence[float], y: Sequence[float], yerr: Sequence[tuple[float, float]], labels: Sequence[str],
    path: str | Path, *, xlabel: str = "", ylabel: str = "", title: str = "", logx: bool = False,
) -> Path:
    """Labelled points with vertical 95% CI bars (e.g. compute vs robustness); NaN bars are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for xi, yi, (lo, hi), lab in zip(x, y, yerr, labels):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        # a percentile CI of a gap statistic need not contain its point estimate: clip the bars at the point
        err = [[max(0.0, yi - lo)], [max(0.0, hi - yi)]] if np.isfinite(lo) and np.isfinite(hi) else None
        ax.errorbar([xi], [yi], yerr=err, fmt="o", capsize=3)
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("symlog")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _fig_to_png(fig, path)


def lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, xlabel: str = "", ylabel: str = "",
    title: str = "", hline: float | None = None,
) -> Path:
    """One line per named series of (x, y) points (e.g. forget accuracy vs relearning steps).

    ``hline`` draws a dashed threshold (e.g. the level at which a concept counts as relearned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", markersize=3, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1, label="threshold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _fig_to_png(fig, path)
