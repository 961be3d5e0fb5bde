"""The report job: every evaluation and spectral analysis -> the tidy tables (``metrics.csv``,
``spectral.csv``, ``training.csv``), the figures the study has data for and ``report.md``.

:func:`build` is what ``workflow/scripts/report.py`` calls with the rule's inputs, params and
outputs; it reads top to bottom as the job's steps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd

from learnforget.core import provenance
from learnforget.core.io import atomic_path, read_json
from learnforget.report import metrics as results
from learnforget.report.markdown import evaluation_protocol, write_report
from learnforget.report.registry import BY_NAME, FigureInputs
from learnforget.report.tables import run_groups
from learnforget.train import keep

log = logging.getLogger(__name__)

Paths = Iterable[str | os.PathLike]


def spectral_table(paths: Paths, series: Mapping[str, str]) -> pd.DataFrame:
    """The spectral analyses' tables in one, sorted, with each run's ``series`` second."""
    spectral = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    spectral = spectral.sort_values(["run", "duration", "layer", "module"], kind="stable").reset_index(drop=True)
    spectral.insert(1, "series", spectral["run"].map(series))
    return spectral


def write_tables(tables: Mapping[str | os.PathLike, pd.DataFrame]) -> None:
    """Each table to its CSV path, atomically."""
    for path, table in tables.items():
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)


def figure_inputs(metrics: pd.DataFrame, spectral: pd.DataFrame, spectra: Paths, spec: Mapping,
                  series: Mapping[str, str], compose: Mapping | None) -> FigureInputs:
    """What the figures are drawn from; ``spectra``: the ``spectral/RUN/DURATION.npz`` files."""
    groups = run_groups(metrics)
    return FigureInputs(
        metrics=metrics, spectral=spectral,
        learning={domain: tuple(v) for domain, v in spec["learning"].items()},
        forgetting=tuple(spec["forgetting"]),
        composites={n: c["kind"] for n, c in (compose or {}).get("composites", {}).items()},  # LoRAHub composites
        groups={**groups, **{run: groups[s] for run, s in series.items() if s in groups}},  # runs and series
        series=series,
        spectra={(Path(p).parent.name, float(Path(p).stem)): p for p in spectra},
        spectrum=spec["config"]["analysis"]["spectrum"],
    )


def draw_figures(names: Sequence[str], inputs: FigureInputs, fig_dir: Path) -> dict[str, str]:
    """Draw the named figures (the registry's, in that order); name -> its PNG. A figure the
    config promised but the results cannot fill stops the job."""
    drawn = {}
    for name in names:
        log.info("figure %s", name)
        drawn[name] = BY_NAME[name].draw(inputs, fig_dir)
    missing = [name for name, files in drawn.items() if not files]
    if missing:
        raise SystemExit(f"report: no data for figure(s) {', '.join(missing)}: check evaluation.groups and analysis")
    return {name: next(f for f in files if str(f).endswith(".png")) for name, files in drawn.items()}


def lm_eval_shots(evals: Paths) -> dict:
    """task -> the shots lm-eval actually used (the base runs every task)."""
    n_shot = {}
    for path in evals:
        if not str(path).endswith(".scored.json"):
            n_shot.update(read_json(path).get("n-shot") or {})
    return n_shot


def build(*, evals: Sequence[str], spectral: Sequence[str], spectra: Sequence[str], manifests: Sequence[str],
          compose: Sequence[str], spec: Mapping, figures: Sequence[str], metrics_csv, spectral_csv, training_csv,
          report_md, repo) -> None:
    """The report job. Inputs: evaluation and scoring JSONs (``evals``), spectral tables (CSV)
    and spectra (``.npz``), training job folders (``manifests``: each holds a
    ``manifest.json``), the compose stage's record (a list of none or one); ``spec``: the
    rule's params (study, headline groups, runs' meta, config); ``figures``: the names to draw;
    then the output paths and the repository (for provenance)."""
    series = {name: m["series"] for name, m in spec["runs"].items()}
    metrics = results.collect(evals, groups=spec["groups"])
    runs_spectral = spectral_table(spectral, series)
    training = results.training_table(Path(d) / "manifest.json" for d in manifests)
    write_tables({metrics_csv: metrics, spectral_csv: runs_spectral, training_csv: training})

    results_dir = Path(report_md).parent
    record = read_json(compose[0]) if compose else None
    inputs = figure_inputs(metrics, runs_spectral, spectra, spec, series, record)
    pngs = draw_figures(figures, inputs, results_dir / "figures")

    prov = provenance.collect(
        repo, results_dir,
        seeds={"study": spec["config"]["seed"], **{r: m["seed"] for r, m in spec["runs"].items()}},
    )
    write_report(metrics, runs_spectral, pngs, report_md, config=spec["config"], provenance=prov,
                 learning=inputs.learning, forgetting=inputs.forgetting, title=None,
                 protocol=evaluation_protocol(spec["groups"], lm_eval_shots(evals)),
                 disk=keep.disk_usage(results_dir, spec["runs"]), compose=record)
    log.info("report: %d metric rows, %d spectral rows, figures %s", len(metrics), len(runs_spectral), sorted(pngs))
