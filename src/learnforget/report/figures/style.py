"""The figures' common look: the matplotlib style, colours and markers per run, panels, saving.

Colours and markers follow what a method is (its type, :mod:`learnforget.report.tables`), never
the name a user gave it: full finetuning in cool colours, the other methods in warm ones, one
marker per method type.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from learnforget.core.io import atomic_path  # noqa: E402
from learnforget.report.tables import fmt_duration, higher_is_better, is_full_finetuning, spec_label  # noqa: E402

STYLE = {
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    "legend.frameon": True,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "#cccccc",
    "font.size": 9,
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "savefig.bbox": "tight",
    "pdf.fonttype": 42,
}

FULL_COLORS = ["#1d4e89", "#00798c", "#52489c", "#3d405b"]
OTHER_COLORS = ["#e8590c", "#c9184a", "#d4a017", "#6a994e", "#9d4edd", "#8d6e63"]
#: Marker per method type; a type not listed gets the next of :data:`FALLBACK_MARKERS`.
MARKERS = {"full": "o", "lora": "s", "dora": "^", "adalora": "D", "relora": "v"}
FALLBACK_MARKERS = ["P", "X", "h", "<", ">", "p"]
BASE_STYLE = dict(marker="*", markersize=15, color="#111111", markeredgecolor="white", markeredgewidth=0.8, zorder=6)


def run_styles(runs: Iterable[str], method_types: Mapping[str, str]) -> dict[str, dict]:
    """Stable colour/marker per run (or per method: any key of ``method_types``): full
    finetuning first, in cool colours, the others in warm ones."""
    runs = sorted(set(runs), key=lambda r: (not is_full_finetuning(method_types.get(r, "")), r))
    styles, nf, no, fb = {}, 0, 0, 0
    for r in runs:
        kind = str(method_types.get(r, ""))
        if is_full_finetuning(kind):
            color = FULL_COLORS[nf % len(FULL_COLORS)]
            nf += 1
        else:
            color = OTHER_COLORS[no % len(OTHER_COLORS)]
            no += 1
        marker = MARKERS.get(kind)
        if marker is None:
            marker = FALLBACK_MARKERS[fb % len(FALLBACK_MARKERS)]
            fb += 1
        styles[r] = {"color": color, "marker": marker}
    return styles


def series_label(run: str, method: str) -> str:
    """A line's legend entry: the run, and its method's name unless the run's name holds it."""
    return run if (not method or method == run or method in run) else f"{run} ({method})"


def subplots(n: int, w: float = 5.0, h: float = 4.0):
    """``n`` panels of ``w`` x ``h`` inches, at most three per row (the spare ones hidden)."""
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False)
    flat = axes.ravel().tolist()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save(fig, out_dir, name: str) -> list[str]:
    """Write ``{name}.png`` (dpi 150) and ``{name}.pdf`` atomically; return their paths."""
    out_dir = Path(out_dir)
    files = []
    for ext in ("png", "pdf"):
        final = out_dir / f"{name}.{ext}"
        with atomic_path(final) as tmp:
            fig.savefig(tmp, format=ext, dpi=150)
        files.append(str(final))
    plt.close(fig)
    return files


def axis_label(metrics, spec, extra: str = "") -> str:
    lab = spec_label(spec)
    if not higher_is_better(metrics, spec):
        return f"{lab}\n(lower is better)"
    return f"{lab}{extra}"


def annotate(ax, x, y, text, color, side: int = 0):
    """Label a point; alternate sides (upper right / lower left) per series to limit overlaps."""
    xytext, ha, va = ((5, 4), "left", "bottom") if side % 2 == 0 else ((-5, -4), "right", "top")
    ax.annotate(text, (x, y), xytext=xytext, textcoords="offset points", fontsize=7.5, color=color,
                ha=ha, va=va, alpha=0.95, zorder=7, fontweight="bold")


def _band(ax, pts, color):
    """95% interval over seeds as a shaded band (points ``(x, y, ci, n)``; nothing for one seed)."""
    if not any(len(p) > 2 and np.isfinite(p[2]) for p in pts):
        return
    xs = [p[0] for p in pts]
    lo = [p[1] - (p[2] if np.isfinite(p[2]) else 0.0) for p in pts]
    hi = [p[1] + (p[2] if np.isfinite(p[2]) else 0.0) for p in pts]
    ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0, zorder=1)


def draw_series(ax, panel, styles, methods, hline_base: bool):
    """One line per series through ``(x, y[, ci, n])`` points with its interval band, and the
    base model as a star (and a dotted line with ``hline_base``)."""
    for run, pts in panel.items():
        if run == "base":
            continue
        st = styles[run]
        _band(ax, pts, st["color"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], marker=st["marker"],
                label=series_label(run, methods.get(run, "")), markeredgecolor="white", markeredgewidth=0.6)
    if "base" in panel:
        bx, by, *_ = panel["base"][0]
        if hline_base:
            ax.axhline(by, color="#555555", linestyle=":", linewidth=1.0, zorder=1)
        ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)


def finish_duration_axes(ax, panel) -> None:
    """A curve panel's x axis: the durations as ticks (when there are few), margins, legend."""
    durs = sorted({p[0] for pts in panel.values() for p in pts})
    if len(durs) <= 10:
        ax.set_xticks(durs)
        ax.set_xticklabels([fmt_duration(d) for d in durs])
    ax.margins(x=0.06, y=0.12)
    ax.legend(loc="best")
