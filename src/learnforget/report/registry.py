"""The report's figures, in one table (:data:`FIGURES`): each figure's name, its caption, the
config condition under which a study has data for it, and its drawing function.

Snakemake's main process imports this module to know the report rule's outputs
(:func:`figure_names`), so it stays light: a figure's drawing function (matplotlib) is imported
only when the report job draws it. Adding a figure is one entry here, a ``draw`` function in a
module of :mod:`learnforget.report.figures` and its caption ``workflow/report/{name}.rst``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any, Callable, Mapping

from learnforget.evaluate.plan import plan
from learnforget.study.config import expand_runs, has_lr_sweep


@dataclass(frozen=True)
class FigureInputs:
    """What the report's figures are drawn from: the report job's tables and settings."""

    metrics: Any  #: metrics.csv as a DataFrame
    spectral: Any  #: spectral.csv as a DataFrame
    learning: Mapping  #: domain -> the learning group's (task, metric)
    forgetting: tuple  #: the forgetting group's (task, metric)
    composites: Mapping[str, str]  #: composite of adapters -> its kind (search, uniform, single)
    groups: Mapping[str, str]  #: run and series -> panel ("domain (regime)")
    series: Mapping[str, str]  #: run -> its series
    spectra: Mapping[tuple[str, float], str]  #: (run, duration) -> singular values (.npz)
    spectrum: Mapping  #: analysis.spectrum of the config: the matrix (layer, module) drawn


def sweeps_a_learning_rate(cfg: dict) -> bool:
    """Some (domain, regime, method) is trained at two or more learning rates."""
    return has_lr_sweep(expand_runs(cfg))


def samples_a_finetuned_run(cfg: dict) -> bool:
    """Some finetuned run's evaluation samples generations (a sampled task)."""
    return any(item["sampling"] for r in expand_runs(cfg) for item in plan(cfg["evaluation"], r.domain))


@dataclass(frozen=True)
class Figure:
    """One figure of the report: ``{name}.png`` and ``.pdf`` in ``results/figures/``."""

    name: str
    #: ``"module:function"`` in :mod:`learnforget.report.figures`: ``function(inputs, out_dir)``
    #: draws the figure and returns the files written (none without data)
    drawn_by: str
    #: the config condition that gives the study data for the figure (None: every study has it)
    needs: Callable[[dict], bool] | None = None

    @property
    def caption(self) -> str:
        """The caption file for ``snakemake --report``, relative to ``workflow/``."""
        return f"report/{self.name}.rst"

    def exists_for(self, cfg: dict) -> bool:
        return self.needs is None or self.needs(cfg)

    def draw(self, inputs: FigureInputs, out_dir) -> list[str]:
        module, function = self.drawn_by.split(":")
        return getattr(import_module(f"learnforget.report.figures.{module}"), function)(inputs, out_dir)


FIGURES = (
    Figure("tradeoff", "learning_vs_forgetting:draw"),
    Figure("learning", "curves:draw_learning"),
    Figure("forgetting", "curves:draw_forgetting"),
    Figure("sensitivity", "lr_sensitivity:draw", needs=sweeps_a_learning_rate),
    Figure("diversity", "generation_diversity:draw", needs=samples_a_finetuned_run),
    Figure("spectral_ranks", "spectral:draw_ranks"),
    Figure("spectral_modules", "spectral:draw_modules"),
    Figure("spectrum", "spectral:draw_spectrum"),
)
BY_NAME = {f.name: f for f in FIGURES}


def figure_names(cfg: dict) -> list[str]:
    """The figures a validated config provides data for, in :data:`FIGURES` order (a figure is
    drawn only then, and a drawn figure is never empty)."""
    return [f.name for f in FIGURES if f.exists_for(cfg)]
