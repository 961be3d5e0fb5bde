"""Tidy tables, figures and report.md from every evaluation and spectral analysis
(learnforget.report.build)."""

from pathlib import Path

from learnforget.core.logs import setup
from learnforget.report.build import build

setup(snakemake.log[0])  # the job log first: build() logs to it
build(
    evals=list(snakemake.input.evals),
    spectral=list(snakemake.input.spectral),
    spectra=list(snakemake.input.spectra),
    manifests=list(snakemake.input.training),
    compose=list(snakemake.input.compose),
    spec=snakemake.params.spec,
    figures=list(snakemake.params.figures),
    metrics_csv=snakemake.output.metrics,
    spectral_csv=snakemake.output.spectral,
    training_csv=snakemake.output.training,
    report_md=snakemake.output.report,
    repo=Path(snakemake.scriptdir).parents[1],
)
