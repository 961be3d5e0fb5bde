"""Figures of the study (matplotlib, Agg), one module per family: :mod:`.learning_vs_forgetting`
(the trade-off), :mod:`.curves` (learning and forgetting vs duration), :mod:`.lr_sensitivity`,
:mod:`.generation_diversity`, :mod:`.spectral` (ranks of ΔW per layer and per module, one
matrix's spectrum); their common look in :mod:`.style`. Which figures
a study draws is :mod:`learnforget.report.registry`'s table.

Every plotting function takes the tidy tables (``metrics.csv`` / ``spectral.csv`` as
DataFrames), writes ``{name}.png`` (dpi 150) and ``{name}.pdf`` atomically into ``out_dir``
and returns the list of files written; ``return_data=True`` returns ``(files, data)`` with the
plotted numbers so that tests can check data rather than pixels. A figure whose data is
missing is skipped silently (``[]``); an empty figure is never written.

Which task/metric is the primary learning metric of a domain and which is the forgetting
score is the caller's choice (``learning`` mapping, ``forgetting`` spec); nothing here knows
task names. A spec is ``(task, metric)``; the forgetting spec may also be a list of specs, in
which case their mean is the score (as the paper's mean of three benchmarks).
"""

from learnforget.report.figures.curves import (forgetting_curves, forgetting_curves_data, learning_curves,
                                               learning_curves_data)
from learnforget.report.figures.generation_diversity import DIVERSITY_METRICS, diversity, diversity_data
from learnforget.report.figures.learning_vs_forgetting import composite_points, pareto_front, tradeoff, tradeoff_data
from learnforget.report.figures.lr_sensitivity import sensitivity, sensitivity_data, series_lr
from learnforget.report.figures.spectral import (spectral_modules, spectral_modules_data, spectral_ranks,
                                                 spectral_ranks_data, spectrum, spectrum_data)
from learnforget.report.figures.style import BASE_STYLE, STYLE, run_styles
from learnforget.report.tables import (ci95, higher_is_better, infer_primary, is_base, is_composite,
                                       is_full_finetuning, metric_table, resolve_learning, run_groups, run_settings)

__all__ = [
    "BASE_STYLE",
    "DIVERSITY_METRICS",
    "STYLE",
    "ci95",
    "composite_points",
    "diversity",
    "diversity_data",
    "forgetting_curves",
    "forgetting_curves_data",
    "higher_is_better",
    "infer_primary",
    "is_base",
    "is_composite",
    "is_full_finetuning",
    "learning_curves",
    "learning_curves_data",
    "metric_table",
    "pareto_front",
    "resolve_learning",
    "run_groups",
    "run_settings",
    "run_styles",
    "sensitivity",
    "sensitivity_data",
    "series_lr",
    "spectral_modules",
    "spectral_modules_data",
    "spectral_ranks",
    "spectral_ranks_data",
    "spectrum",
    "spectrum_data",
    "tradeoff",
    "tradeoff_data",
]
