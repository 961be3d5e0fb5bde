"""The generation diversity figure (paper section 4.4): distinct solutions per problem and
their mean pairwise similarity against training duration, one column per sampled task."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from learnforget.report.figures.style import STYLE, draw_series, finish_duration_axes, run_styles, save
from learnforget.report.registry import FigureInputs
from learnforget.report.tables import (base_value, drop_intervals, duration_curves, metric_table, run_method_types,
                                       run_methods)

DIVERSITY_METRICS = (("distinct", "distinct solutions per problem"),
                     ("mean_pairwise_similarity", "mean pairwise similarity"))


def diversity_data(metrics: pd.DataFrame, *, errors: bool = False) -> dict:
    """``{(task, metric): {"base": [(0, y)], series: [(duration, y), ...]}}`` from the rows with
    role ``diversity`` (paper section 4.4); series without such rows are left out."""
    if metrics is None or len(metrics) == 0 or "role" not in metrics.columns:
        return {}
    div = metrics[metrics["role"] == "diversity"]
    data = {}
    for task in sorted(div["task"].astype(str).unique()):
        for metric, _ in DIVERSITY_METRICS:
            tab = metric_table(div, (task, metric), errors=True)
            if tab.empty:
                continue
            b = base_value(tab)
            panel = duration_curves(tab, set(tab["run"]) - {"base"}, b)
            if panel:
                data[(task, metric)] = panel
    if not errors:
        data = drop_intervals(data)
    return data


def diversity(metrics: pd.DataFrame, out_dir, *, name: str = "diversity", return_data: bool = False):
    """Generation diversity vs training duration: distinct normalised solutions per problem
    (top) and their mean pairwise similarity (bottom), one column per sampled task."""
    data = diversity_data(metrics, errors=True)
    if not data:
        return ([], {}) if return_data else []
    tasks = sorted({t for t, _ in data})
    rows = [m for m, _ in DIVERSITY_METRICS if any((t, m) in data for t in tasks)]
    methods = run_methods(metrics)
    styles = run_styles([r for p in data.values() for r in p if r != "base"], run_method_types(metrics))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(rows), len(tasks), figsize=(4.8 * len(tasks), 3.6 * len(rows)), squeeze=False)
        for i, metric in enumerate(rows):
            for j, task in enumerate(tasks):
                ax = axes[i][j]
                panel = data.get((task, metric))
                if not panel:
                    ax.set_visible(False)
                    continue
                draw_series(ax, panel, styles, methods, hline_base=True)
                ax.set_title(task)
                ax.set_xlabel("training duration")
                ax.set_ylabel(dict(DIVERSITY_METRICS)[metric])
                finish_duration_axes(ax, panel)
        fig.suptitle("Generation diversity vs training duration (sampled completions per problem)",
                     fontsize=12, y=1.01)
        fig.tight_layout()
        files = save(fig, out_dir, name)
    return (files, drop_intervals(data)) if return_data else files


def draw(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``diversity`` figure."""
    return diversity(inputs.metrics, out_dir)
