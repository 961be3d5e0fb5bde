"""The learning-rate sensitivity figure (paper section 4.6): learning and forgetting at the
longest duration against the learning rate, one line per method swept over learning rates."""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from learnforget.report.figures.style import STYLE, axis_label, run_styles, save
from learnforget.report.registry import FigureInputs
from learnforget.report.tables import (clean, higher_is_better, method_types_by_name, metric_table, panel_title,
                                       resolve_learning, run_methods, run_settings)


def series_lr(metrics: pd.DataFrame) -> dict[str, float]:
    """series -> learning rate (from the ``lr`` column; series without one are left out)."""
    df = clean(metrics)
    if "lr" not in df.columns:
        return {}
    df = df.assign(lr=pd.to_numeric(df["lr"], errors="coerce")).dropna(subset=["lr"])
    return {str(k): float(v) for k, v in df.groupby("series")["lr"].first().items()}


def sensitivity_data(metrics: pd.DataFrame, *, learning: Mapping, forgetting=None, errors: bool = False) -> dict:
    """``{(domain, regime): {method: [(lr, learning, forgetting), ...]}}`` at each series' longest
    duration, for the methods trained at two or more learning rates (paper section 4.6); empty
    when the config sweeps no learning rate. ``errors=True``: ``(lr, learning, forgetting,
    learning_ci, forgetting_ci, n_seeds)``. ``forgetting`` is NaN where it was not measured."""
    if metrics is None or len(metrics) == 0 or not learning:
        return {}
    settings, lrs, methods = run_settings(metrics), series_lr(metrics), run_methods(metrics)
    ftab = metric_table(metrics, forgetting, errors=True) if forgetting else None
    nan = float("nan")
    data = {}
    for key in sorted(set(settings.values())):
        lspec = resolve_learning(learning, *key)
        if lspec is None:
            continue
        ltab = metric_table(metrics, lspec, errors=True)
        panel: dict[str, list] = {}
        for series in sorted(r for r, k in settings.items() if k == key and r in lrs):
            rows = ltab[(ltab["run"] == series) & (ltab["duration"] > 0)]
            if rows.empty:
                continue
            last = rows.loc[rows["duration"].idxmax()]
            f, fci = nan, nan
            if ftab is not None:
                fr = ftab[(ftab["run"] == series) & (ftab["duration"] == last["duration"])]
                if len(fr):
                    f, fci = float(fr["value"].iloc[0]), float(fr["ci"].iloc[0])
            panel.setdefault(methods.get(series, series), []).append(
                (lrs[series], float(last["value"]), f, float(last["ci"]), fci, int(last["n"])))
        panel = {m: sorted(pts) for m, pts in panel.items() if len({p[0] for p in pts}) >= 2}
        if panel:
            data[key] = panel
    if not errors:
        data = {k: {m: [p[:3] for p in pts] for m, pts in panel.items()} for k, panel in data.items()}
    return data


def sensitivity(metrics: pd.DataFrame, out_dir, *, learning: Mapping, forgetting=None, name: str = "sensitivity",
                return_data: bool = False):
    """Learning metric (top) and forgetting score (bottom) at the longest duration vs learning rate,
    one line per method, one column per (domain, regime); 95% intervals over seeds as error bars."""
    data = sensitivity_data(metrics, learning=learning, forgetting=forgetting, errors=True)
    if not data:
        return ([], {}) if return_data else []
    has_f = any(np.isfinite(p[2]) for panel in data.values() for pts in panel.values() for p in pts)
    nrows, ncols = (2 if has_f else 1), len(data)
    methods = sorted({m for panel in data.values() for m in panel})
    styles = run_styles(methods, method_types_by_name(metrics))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.7 * nrows), squeeze=False)
        for j, (key, panel) in enumerate(data.items()):
            lspec = resolve_learning(learning, *key)
            for i, (col, ci_col, spec) in enumerate(((1, 3, lspec), (2, 4, forgetting))[:nrows]):
                ax = axes[i][j]
                for method, pts in panel.items():
                    st = styles[method]
                    pts = [p for p in pts if np.isfinite(p[col])]
                    if not pts:
                        continue
                    xs, ys = [p[0] for p in pts], [p[col] for p in pts]
                    err = [p[ci_col] if np.isfinite(p[ci_col]) else 0.0 for p in pts]
                    ax.errorbar(xs, ys, yerr=err if any(err) else None, color=st["color"], marker=st["marker"],
                                label=method, markeredgecolor="white", markeredgewidth=0.6, capsize=2.5)
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
                ax.set_ylabel(axis_label(metrics, spec) if i == 0 else
                              "forgetting score: " + axis_label(metrics, spec))
                if not higher_is_better(metrics, spec):
                    ax.invert_yaxis()
                ax.set_title(panel_title(key) + (" — learning" if i == 0 else " — forgetting"))
                ax.legend(loc="best")
        fig.suptitle("Learning-rate sensitivity (at the longest duration)", fontsize=12, y=1.01)
        fig.tight_layout()
        files = save(fig, out_dir, name)
    short = {k: {m: [p[:3] for p in pts] for m, pts in panel.items()} for k, panel in data.items()}
    return (files, short) if return_data else files


def draw(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``sensitivity`` figure."""
    return sensitivity(inputs.metrics, out_dir, learning=inputs.learning, forgetting=inputs.forgetting)
