"""Figure and table helpers shared by the study notebooks.

Everything here draws on matplotlib axes or writes files; nothing computes model outputs. Figures are saved as
PNG with stable names (``savefig``); tables are written as Markdown and CSV side by side (``write_table``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from gmmseg_core._files import atomic_write, atomic_write_text

# softmax in wine, not tab10 red: red and the official head's green look alike to red-green colour-blind readers
HEAD_COLORS = {"softmax": "#882255", "gmm_paper": "#1f77b4", "gmm_official": "#2ca02c", "gmm": "#1f77b4"}
# (model, score) -> colour of notebook 04's curves and bars: each model's scores in shades of its head colour,
# the softmax model's MSP in the head colour itself, so that it and the GMM densities (the pair compared most)
# stay apart for the three kinds of colour-blind readers; the curves' line styles tell the models apart too
SCORE_COLORS = {("softmax", "msp"): HEAD_COLORS["softmax"], ("softmax", "max_logit"): "#c2150a",
                ("softmax", "energy"): "#af6a7a", ("softmax", "entropy"): "#cea4a6", ("softmax", "sml"): "#410b15",
                ("gmm_paper", "msp"): "#aec7e8", ("gmm_paper", "gmm"): HEAD_COLORS["gmm_paper"],
                ("gmm_official", "gmm"): HEAD_COLORS["gmm_official"]}


def to_numpy(x) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def savefig(fig, figures_dir, name: str, dpi: int = 110) -> Path:
    """Save ``fig`` as ``<figures_dir>/<name>.png`` (stable name, tight bounding box) and return the path.

    Written atomically: a run stopped while saving leaves the previous figure whole, never a truncated PNG."""
    if not name or "/" in name or name.endswith(".png"):
        raise ValueError(f"name must be a bare file stem like 'closed_set_miou', got {name!r}")
    path = Path(figures_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


# ---------------------------------------------------------------- tables


def fmt_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``[0.61, 0.63] -> "62.0 ± 1.4"`` (sample std; a single value prints without the spread)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float) * scale
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], digits: int = 3) -> str:
    """GitHub Markdown table of ``rows`` (dicts) restricted to ``columns``; floats with ``digits`` decimals."""

    def cell(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping], columns: Sequence[str], figures_dir, stem: str,
                title: str | None = None, notes: str | None = None, csv_rows: Sequence[Mapping] | None = None,
                csv_columns: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (title, table, notes) and ``<stem>.csv`` into ``figures_dir``, each atomically.

    The CSV holds ``csv_rows`` / ``csv_columns`` when given (raw numbers for machines), else the same rows
    as the Markdown table.

    Returns
    -------
    (md_path, csv_path)
    """
    figures_dir = Path(figures_dir)
    figures_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = figures_dir / f"{stem}.md", figures_dir / f"{stem}.csv"
    text = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns)
    if notes:
        text += "\n" + notes.strip() + "\n"
    atomic_write_text(md_path, text)
    csv_rows = rows if csv_rows is None else csv_rows
    csv_columns = list(columns if csv_columns is None else csv_columns)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=csv_columns, extrasaction="ignore")
            w.writeheader()
            for r in csv_rows:
                w.writerow({c: r.get(c) for c in csv_columns})

    atomic_write(csv_path, write_csv)
    return md_path, csv_path


# ---------------------------------------------------------------- 2-D toy figures


def decision_regions(ax, xx, yy, probs, X, y, title: str = "", colors: Sequence[str] | None = None,
                     show_confidence: bool = True):
    """Draw the argmax regions of ``probs`` (G1, G2, C) over the grid (xx, yy) with the points ``X`` (N,2).

    The shading is the max posterior (confidence), so a reader sees where the classifier is sure.
    """
    probs = to_numpy(probs)
    C = probs.shape[-1]
    colors = colors or plt.cm.tab10.colors[:C]
    pred = probs.argmax(-1)
    rgb = np.asarray([matplotlib.colors.to_rgb(colors[c]) for c in range(C)])[pred]
    if show_confidence:
        conf = probs.max(-1)
        conf = (conf - 1.0 / C) / (1 - 1.0 / C)  # 0 at chance, 1 at certainty
        rgb = 1 - (1 - rgb) * (0.15 + 0.6 * np.clip(conf, 0, 1))[..., None]
    ax.imshow(rgb, origin="lower", extent=(xx.min(), xx.max(), yy.min(), yy.max()), aspect="auto")
    X, y = to_numpy(X), to_numpy(y)
    for c in range(C):
        m = y == c
        ax.scatter(X[m, 0], X[m, 1], s=6, color=colors[c], edgecolor="k", linewidth=0.2)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def density_contours(ax, xx, yy, log_density, X=None, y=None, title: str = "", levels: int = 12,
                     colors: Sequence[str] | None = None):
    """Filled contours of a log-density (G1, G2) with optional points ``X`` (N, 2) coloured by their class ``y``
    (N,): ``colors[c]`` for class c (the same colours as ``decision_regions``), matplotlib's tab10 without."""
    ld = to_numpy(log_density)
    lo = np.percentile(ld, 5)
    cs = ax.contourf(xx, yy, np.maximum(ld, lo), levels=levels, cmap="viridis")
    if X is not None:
        X, y = to_numpy(X), to_numpy(y).astype(np.int64)
        colors = colors or plt.cm.tab10.colors
        ax.scatter(X[:, 0], X[:, 1], color=[colors[c] for c in y], s=3, alpha=0.5)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return cs


def reliability(ax, diagram: Mapping, label: str = "", color=None, min_count: int = 5):
    """Reliability diagram from ``gmmseg_core.metrics.reliability_diagram`` output: accuracy per confidence
    bin against the diagonal (perfect calibration); bins with fewer than ``min_count`` samples are skipped."""
    count = to_numpy(diagram["bin_count"])
    keep = count >= min_count
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.plot(to_numpy(diagram["bin_confidence"])[keep], to_numpy(diagram["bin_accuracy"])[keep], "o-", label=label,
            color=color, ms=3)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")


# ---------------------------------------------------------------- curves


def band(ax, x, curves, label: str, color=None, quantiles=(0.1, 0.9)):
    """Median of ``curves`` (R, T) with a shaded quantile band (spread over restarts/seeds)."""
    curves = to_numpy(curves)
    x = to_numpy(x)
    med = np.nanmedian(curves, 0)
    lo, hi = np.nanquantile(curves, quantiles[0], 0), np.nanquantile(curves, quantiles[1], 0)
    (line,) = ax.plot(x, med, label=label, color=color)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    return line


def pad_curves(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged per-run curves -> (R, T) array, each run's last value carried forward (a converged run stays put)."""
    if len(curves) == 0:
        raise ValueError("pad_curves needs at least one curve, got none")
    T = max(len(c) for c in curves)
    out = np.full((len(curves), T), np.nan)
    for i, c in enumerate(curves):
        c = np.asarray(c, dtype=float)
        out[i, : len(c)] = c
        if len(c):
            out[i, len(c):] = c[-1]
    return out


def roc_pr_axes(curves: Mapping[str, Mapping], title: str = "", axes=None):
    """ROC (left) and precision-recall (right) curves, with one legend for both to the right of the PR panel.

    ``curves[name]`` holds ``fpr``, ``tpr``, ``recall``, ``precision`` arrays (e.g. the ``curves`` of
    ``gmmseg_core.metrics.anomaly_metrics(..., return_curves=True)``) and optionally ``auroc``/``ap`` (shown in
    the legend) and ``color``/``ls``. The legend sits outside the axes: inside, it would hide the curves of an
    inverted score, which run below the ROC diagonal where a legend usually finds room.
    """
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4))
    for name, c in curves.items():
        kw = dict(color=c.get("color"), ls=c.get("ls", "-"), lw=1.5)
        auroc, ap = c.get("auroc"), c.get("ap")
        values = " / ".join("n/a" if v is None else f"{v:.3f}" for v in (auroc, ap))
        axes[0].plot(to_numpy(c["fpr"]), to_numpy(c["tpr"]), **kw)
        axes[1].plot(to_numpy(c["recall"]), to_numpy(c["precision"]), label=f"{name} ({values})", **kw)
    axes[0].plot([0, 1], [0, 1], "k:", lw=1)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip())
    axes[1].set(xlabel="recall", ylabel="precision", title=f"precision-recall {title}".strip(), ylim=(0, 1.02))
    axes[1].legend(fontsize=7, title="AUROC / AP", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes


def training_curves(ax, logs: Mapping[str, Sequence[Mapping]], key: str, step_key: str = "step",
                    colors: Mapping[str, str] | None = None, smooth: int = 1):
    """One line per run label from rows of a training log (e.g. ``log.csv`` rows) for column ``key``."""
    for label, rows in logs.items():
        xs = [float(r[step_key]) for r in rows if r.get(key) not in (None, "")]
        ys = np.asarray([float(r[key]) for r in rows if r.get(key) not in (None, "")])
        if ys.size == 0:
            continue
        if smooth > 1 and ys.size > smooth:  # trailing moving average: no edge artefacts
            ys = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
            xs = xs[smooth - 1:]
        ax.plot(xs, ys, label=label, color=(colors or {}).get(label), lw=1)
    ax.set_xlabel(step_key)
    ax.set_ylabel(key)


def grouped_bars(ax, groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 ylabel: str = "", colors: Mapping[str, str] | None = None):
    """Grouped bar chart: ``series[name] = (means per group, stds per group)`` with error bars.

    ``stds`` None draws no error bars (one run per bar: a spread of 0 draws caps that look like a measured spread).
    The group labels are turned upright when side by side they would overlap (e.g. 19 Cityscapes classes on
    one row); labels that fit stay horizontal.
    """
    n = len(series)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for i, (name, (means, stds)) in enumerate(series.items()):
        ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=name,
               color=(colors or HEAD_COLORS).get(name))
    ax.set_xticks(x)
    labels = ax.set_xticklabels(groups, fontsize=8)
    if _overlapping(ax, labels):
        for label in labels:
            label.set_rotation(90)
    ax.set_ylabel(ylabel)


def _overlapping(ax, texts) -> bool:
    """Whether neighbouring ``texts`` (tick labels, left to right) overlap as the figure is laid out now."""
    renderer = ax.figure.canvas.get_renderer() if hasattr(ax.figure.canvas, "get_renderer") else None
    if renderer is None or len(texts) < 2:
        return False
    boxes = [t.get_window_extent(renderer) for t in texts]
    return any(left.x1 > right.x0 for left, right in zip(boxes, boxes[1:]))


# ---------------------------------------------------------------- images


def colorize(label, palette, ignore_index: int = 255) -> np.ndarray:
    """Label map (H, W) -> RGB float image (H, W, 3) in [0, 1]; ignored pixels are black."""
    label = to_numpy(label).astype(np.int64)
    palette = to_numpy(palette).astype(np.float64) / 255.0
    out = np.zeros(label.shape + (3,))
    valid = (label != ignore_index) & (label >= 0) & (label < len(palette))
    out[valid] = palette[label[valid]]
    return out


def class_legend(fig, classes: Sequence[str], palette, ncol: int = 8, fontsize: float = 8):
    """Key of the label colours under ``fig``: one swatch per class in its ``palette`` (C, 3) colour (0-255).

    Placed below the figure's panels, so ``savefig`` (tight bounding box) keeps it and it hides no image.
    Returns the legend.
    """
    from matplotlib.patches import Patch

    palette = to_numpy(palette).astype(np.float64) / 255.0
    if len(palette) < len(classes):
        raise ValueError(f"palette has {len(palette)} colours for {len(classes)} classes; expected one per class")
    handles = [Patch(facecolor=palette[c], edgecolor="k", linewidth=0.3, label=name) for c, name in enumerate(classes)]
    return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(ncol, len(classes)),
                      fontsize=fontsize, frameon=False)


def to_rgb(image) -> np.ndarray:
    """(3, H, W) image in [0, 1] -> (H, W, 3) for imshow (clipped)."""
    return np.clip(to_numpy(image).transpose(1, 2, 0), 0, 1)


def image_grid(rows: Sequence[Sequence], titles: Sequence[str] | None = None, cmaps=None, size: float = 2.0,
               colorbar_cols: Sequence[int] = ()):
    """A grid of panels: ``rows[i][j]`` an (H, W, 3) image or an (H, W) map (drawn with ``cmaps[j]``).

    Returns the figure.
    """
    if len(rows) == 0 or not any(len(r) for r in rows):
        raise ValueError("image_grid needs at least one panel, got none (e.g. a notebook asked for 0 examples)")
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    first = to_numpy(next(r for r in rows if len(r))[0])
    aspect = first.shape[0] / first.shape[1]  # panel height / width, so wide images leave no blank bands
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows * aspect + 0.4 * (titles is not None)),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = axes[i, j]
            p = to_numpy(panel)
            if p.ndim == 3:
                ax.imshow(p, interpolation="nearest")
            else:
                im = ax.imshow(p, cmap=(cmaps or {}).get(j, "magma") if isinstance(cmaps, dict) else
                               (cmaps[j] if cmaps else "magma"), interpolation="nearest")
                if j in colorbar_cols:
                    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            if i == 0 and titles:
                ax.set_title(titles[j], fontsize=9)
            ax.axis("off")
        for j in range(len(row), n_cols):
            axes[i, j].axis("off")
    fig.tight_layout()
    return fig
