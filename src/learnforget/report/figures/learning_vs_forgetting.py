"""The trade-off figure (paper Figure 1): learning against forgetting per (domain, regime),
one line per series through its durations from the base model, the Pareto front shaded, and
the composites of adapters as points of their own."""

from __future__ import annotations

from typing import Iterable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from learnforget.report.figures.style import (BASE_STYLE, FALLBACK_MARKERS, STYLE, annotate, axis_label, run_styles,
                                              save, series_label, subplots)
from learnforget.report.registry import FigureInputs
from learnforget.report.tables import (base_value, clean, fmt_duration, higher_is_better, is_composite,
                                       metric_table, panel_title, resolve_learning, run_method_types, run_methods,
                                       run_settings)


def tradeoff_data(metrics: pd.DataFrame, *, learning: Mapping, forgetting, errors: bool = False) -> dict:
    """``{(domain, regime): {"base": [(x, y, 0)], series: [(x, y, duration), ...]}}``.

    x = forgetting score, y = learning metric. Each series' list starts with the base point
    (duration 0) when the base model has both numbers, then its durations in order.
    ``errors=True``: points are ``(x, y, duration, x_ci, y_ci, n_seeds)``.
    """
    if metrics is None or len(metrics) == 0 or not forgetting or not learning:
        return {}
    settings = run_settings(metrics)
    ftab = metric_table(metrics, forgetting, errors=True)
    base_x = base_value(ftab)
    nan = float("nan")
    data = {}
    for key in sorted(set(settings.values())):
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        ltab = metric_table(metrics, lspec, errors=True)
        base_y = base_value(ltab)
        base_pt = [(base_x, base_y, 0.0, nan, nan, 1)] if base_x is not None and base_y is not None else []
        panel = {}
        for run in sorted(r for r, k in settings.items() if k == key):
            xy = ltab[ltab["run"] == run].merge(ftab[ftab["run"] == run],
                                                on=["run", "method", "method_type", "duration"], suffixes=("_y", "_x"))
            pts = [(float(a), float(b), float(d), float(ca), float(cb), int(min(na, nb)))
                   for a, b, d, ca, cb, na, nb in zip(xy["value_x"], xy["value_y"], xy["duration"], xy["ci_x"],
                                                      xy["ci_y"], xy["n_x"], xy["n_y"])]
            pts = [p for p in sorted(pts, key=lambda p: p[2]) if p[2] > 0]
            if pts:
                panel[run] = base_pt + pts
        if panel:
            if base_pt:
                panel = {"base": base_pt, **panel}
            data[key] = panel
    if not errors:
        data = {k: {r: [p[:3] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}
    return data


def pareto_front(points: Iterable[tuple[float, float]], *, x_higher: bool = True, y_higher: bool = True):
    """The points no other point beats on both axes (ties kept), sorted by x (best x last)."""
    pts = list({(float(x), float(y)) for x, y in points if np.isfinite(x) and np.isfinite(y)})
    sx, sy = (1 if x_higher else -1), (1 if y_higher else -1)

    def beats(a, b):  # a dominates b
        return sx * a[0] >= sx * b[0] and sy * a[1] >= sy * b[1] and a != b

    front = [p for p in pts if not any(beats(q, p) for q in pts)]
    return sorted(front, key=lambda p: sx * p[0])


def _shade_front(ax, front, x_higher: bool, y_higher: bool):
    """Shade the region the front dominates (what the studied runs can reach)."""
    if len(front) < 1:
        return
    # the dominated region's boundary: a staircase from the best-y point (worst x) down to the
    # best-x point; between two front points the best reachable y is the next point's
    order = sorted(front, key=lambda p: p[0], reverse=not x_higher)
    sx, sy = [], []
    for i, (x, y) in enumerate(order):
        if i:
            sx.append(order[i - 1][0])
            sy.append(y)
        sx.append(x)
        sy.append(y)
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    worst_x = min(x0, x1) if x_higher else max(x0, x1)
    worst_y = min(y0, y1) if y_higher else max(y0, y1)
    poly_x = [worst_x, *sx, sx[-1], worst_x]
    poly_y = [sy[0], *sy, worst_y, worst_y]
    ax.fill(poly_x, poly_y, color="#9aa5b1", alpha=0.14, zorder=0, lw=0, label="dominated by the Pareto front")
    ax.plot(sx, sy, color="#7b8794", lw=1.0, ls="--", zorder=1)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)


def composite_points(metrics: pd.DataFrame, *, learning: Mapping, forgetting, keys: Iterable[tuple]) -> dict:
    """``{(domain, regime): {composite: (x, y)}}``: each composite of adapters (rows with method
    ``compose``) on every panel whose learning metric it was evaluated on; x = forgetting score,
    y = that panel's learning metric."""
    if metrics is None or len(metrics) == 0 or not forgetting or not learning:
        return {}
    df = clean(metrics)
    df = df[df["method_type"].map(is_composite)]
    if df.empty:
        return {}
    ftab = metric_table(df, forgetting)
    out = {}
    for key in keys:
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        xy = metric_table(df, lspec).merge(ftab, on=["run", "method", "method_type", "duration"],
                                           suffixes=("_y", "_x"))
        pts = {str(r): (float(x), float(y)) for r, x, y in zip(xy["run"], xy["value_x"], xy["value_y"])}
        if pts:
            out[key] = pts
    return out


_COMPOSITE_STYLE = dict(linestyle="none", markeredgecolor="#111111", markeredgewidth=0.9, zorder=5)
_COMPOSITE_KINDS = {"search": ("X", 11, "#2a9d8f"), "uniform": ("P", 9, "#8d99ae"), "single": ("h", 8, None)}
_COMPOSITE_COLORS = ["#e9c46a", "#f4a261", "#b5838d", "#6d597a", "#90be6d", "#577590"]


def _composite_styles(names: Iterable[str], kinds: Mapping[str, str] | None) -> dict:
    """Marker, size and colour per composite: the searched one a large X, the uniform one a
    plus, single adapters hexagons in their own colours (kinds unknown: fallback markers)."""
    styles, n = {}, 0
    for i, name in enumerate(sorted(names)):
        kind = (kinds or {}).get(name)
        marker, size, color = _COMPOSITE_KINDS.get(kind, (FALLBACK_MARKERS[i % len(FALLBACK_MARKERS)], 9, None))
        if color is None:
            color = _COMPOSITE_COLORS[n % len(_COMPOSITE_COLORS)]
            n += 1
        styles[name] = {"marker": marker, "markersize": size, "color": color}
    return styles


def tradeoff(metrics: pd.DataFrame, out_dir, *, learning: Mapping, forgetting, name: str = "tradeoff",
             return_data: bool = False, composites: Mapping[str, str] | None = None):
    """Paper Figure 1: learning (y) vs forgetting score (x), one panel per (domain, regime);
    one line per series through its durations (labelled), starting at the base model (star);
    95% intervals over seeds as error bars; the Pareto front of all the runs' points shaded.
    Composites of adapters (method ``compose``; ``composites``: name -> kind, search, uniform
    or single) are separate points on every panel whose learning metric they have, outside the
    front (their data: ``composite_points``)."""
    data = tradeoff_data(metrics, learning=learning, forgetting=forgetting, errors=True)
    if not data:
        return ([], {}) if return_data else []
    methods = run_methods(metrics)
    styles = run_styles([r for p in data.values() for r in p if r != "base"], run_method_types(metrics))
    extra = composite_points(metrics, learning=learning, forgetting=forgetting, keys=list(data))
    cstyles = _composite_styles({c for pts in extra.values() for c in pts}, composites)
    with plt.rc_context(STYLE):
        fig, axes = subplots(len(data), 5.2, 4.3)
        for ax, (key, panel) in zip(axes, data.items()):
            lspec = resolve_learning(learning, *key)
            for i, (run, pts) in enumerate(r for r in panel.items() if r[0] != "base"):
                st = styles[run]
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, color=st["color"], marker=st["marker"], label=series_label(run, methods.get(run, "")),
                        markeredgecolor="white", markeredgewidth=0.6, zorder=3)
                xe = [0.0 if not np.isfinite(p[3]) else p[3] for p in pts]
                ye = [0.0 if not np.isfinite(p[4]) else p[4] for p in pts]
                if any(xe) or any(ye):
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="none", ecolor=st["color"], elinewidth=0.9,
                                capsize=2.5, alpha=0.8, zorder=2)
                for x, y, d, *_ in pts:
                    if d > 0:
                        annotate(ax, x, y, fmt_duration(d), st["color"], side=i)
            if "base" in panel:
                bx, by, *_ = panel["base"][0]
                ax.plot([bx], [by], linestyle="none", label="base model", **BASE_STYLE)
            for comp, (cx, cy) in sorted(extra.get(key, {}).items()):
                ax.plot([cx], [cy], label=f"{comp} (composite)", **cstyles[comp], **_COMPOSITE_STYLE)
            x_hi, y_hi = higher_is_better(metrics, forgetting), higher_is_better(metrics, lspec)
            ax.margins(x=0.12, y=0.1)
            front = pareto_front([(p[0], p[1]) for pts in panel.values() for p in pts], x_higher=x_hi, y_higher=y_hi)
            _shade_front(ax, front, x_hi, y_hi)
            ax.set_title(panel_title(key))
            ax.set_ylabel(axis_label(metrics, lspec))
            ax.set_xlabel("forgetting score: " + axis_label(metrics, forgetting, "\n(higher = remembers more)"))
            if not y_hi:
                ax.invert_yaxis()
            if not x_hi:
                ax.invert_xaxis()
            n_entries = len(ax.get_legend_handles_labels()[1])
            if n_entries > 4:  # many series or composites: below the panel, never over a point
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.34), ncol=2, fontsize=7.5)
            else:
                ax.legend(loc="best")
        fig.suptitle("Learning vs forgetting (labels: training duration)", fontsize=12, y=1.01)
        fig.tight_layout()
        files = save(fig, out_dir, name)
    short = {k: {r: [p[:3] for p in pts] for r, pts in panel.items()} for k, panel in data.items()}
    return (files, short) if return_data else files


def draw(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``tradeoff`` figure."""
    return tradeoff(inputs.metrics, out_dir, learning=inputs.learning, forgetting=inputs.forgetting, name="tradeoff",
                    composites=inputs.composites)
