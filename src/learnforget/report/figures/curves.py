"""The learning and forgetting curves: a metric against training duration per (domain, regime),
one line per series from the base model (at duration 0), 95% intervals over seeds as bands."""

from __future__ import annotations

from typing import Mapping

import matplotlib.pyplot as plt
import pandas as pd

from learnforget.report.figures.style import (STYLE, axis_label, draw_series, finish_duration_axes, run_styles, save,
                                              subplots)
from learnforget.report.registry import FigureInputs
from learnforget.report.tables import (base_value, drop_intervals, duration_curves, higher_is_better, metric_table,
                                       panel_title, resolve_learning, run_method_types, run_methods, run_settings)


def _curves_data(metrics, spec_for, errors: bool = False) -> dict:
    if metrics is None or len(metrics) == 0:
        return {}
    settings = run_settings(metrics)
    data = {}
    for key in sorted(set(settings.values())):
        spec = spec_for(key)
        if not spec:
            continue
        tab = metric_table(metrics, spec, errors=True)
        b = base_value(tab)
        panel = duration_curves(tab, [r for r, k in settings.items() if k == key], b)
        if panel:
            data[key] = panel
    return data if errors else drop_intervals(data)


def learning_curves_data(metrics: pd.DataFrame, *, learning: Mapping, errors: bool = False) -> dict:
    """``{(domain, regime): {"base": [(0, y)], series: [(duration, y), ...]}}`` (series start at
    base); ``errors=True``: ``(duration, y, ci95, n_seeds)``."""
    if not learning:
        return {}
    return _curves_data(metrics, lambda key: resolve_learning(learning, *key), errors)


def forgetting_curves_data(metrics: pd.DataFrame, *, forgetting, errors: bool = False) -> dict:
    """Same layout as ``learning_curves_data`` for the forgetting score."""
    if not forgetting:
        return {}
    return _curves_data(metrics, lambda key: forgetting, errors)


def _plot_curves(metrics, data, spec_for, out_dir, name, title, duration_labels, hline_base: bool):
    methods = run_methods(metrics)
    styles = run_styles([r for p in data.values() for r in p if r != "base"], run_method_types(metrics))
    with plt.rc_context(STYLE):
        fig, axes = subplots(len(data), 5.0, 3.9)
        for ax, (key, panel) in zip(axes, data.items()):
            spec = spec_for(key)
            draw_series(ax, panel, styles, methods, hline_base)
            ax.set_title(panel_title(key))
            ax.set_ylabel(axis_label(metrics, spec))
            reg = key[1]
            ax.set_xlabel((duration_labels or {}).get(reg, (duration_labels or {}).get(key[0], "training duration")))
            if not higher_is_better(metrics, spec):
                ax.invert_yaxis()
            finish_duration_axes(ax, panel)
        fig.suptitle(title, fontsize=12, y=1.01)
        fig.tight_layout()
        return save(fig, out_dir, name)


def learning_curves(metrics: pd.DataFrame, out_dir, *, learning: Mapping, name: str = "learning_curves",
                    duration_labels: Mapping[str, str] | None = None, return_data: bool = False):
    """Primary learning metric vs training duration per run (base at 0), one panel per setting."""
    data = learning_curves_data(metrics, learning=learning, errors=True)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: resolve_learning(learning, *k), out_dir, name,
                             "Learning: target-domain metric vs training duration", duration_labels, False)
    return (files, drop_intervals(data)) if return_data else files


def forgetting_curves(metrics: pd.DataFrame, out_dir, *, forgetting, name: str = "forgetting_curves",
                      duration_labels: Mapping[str, str] | None = None, return_data: bool = False):
    """Forgetting score vs training duration per run; the base score is a dotted line."""
    data = forgetting_curves_data(metrics, forgetting=forgetting, errors=True)
    files = []
    if data:
        files = _plot_curves(metrics, data, lambda k: forgetting, out_dir, name,
                             "Forgetting: source-domain score vs training duration", duration_labels, True)
    return (files, drop_intervals(data)) if return_data else files


def draw_learning(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``learning`` figure."""
    return learning_curves(inputs.metrics, out_dir, learning=inputs.learning, name="learning")


def draw_forgetting(inputs: FigureInputs, out_dir) -> list[str]:
    """The report's ``forgetting`` figure."""
    return forgetting_curves(inputs.metrics, out_dir, forgetting=inputs.forgetting, name="forgetting")
