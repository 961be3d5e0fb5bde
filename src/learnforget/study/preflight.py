"""What the workflow does once, while Snakemake parses it and before any job starts: check
that the hub models and datasets the study needs are at hand, move damaged checkpoints aside,
plan the GPUs of the training jobs, write the lm-eval task files the study evaluates with
(``results/tasks/``, data paths resolved, so that the stock ``lm_eval`` command reproduces a row of
``metrics.csv``), and hand the rules their :class:`learnforget.study.jobs.Jobs`.

A problem that would fail a job later stops the workflow here (:class:`StudyStop`); a dry run
only warns, so a study for a cluster can be planned on a laptop offline. Messages go to
stderr, from Snakemake's main process only (its job processes parse the workflow again).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from learnforget.cluster import resources
from learnforget.core import hub, integrity
from learnforget.data import sources
from learnforget.evaluate import plan as evalplan
from learnforget.evaluate.tasks import write_task_files
from learnforget.study.basics import ConfigError
from learnforget.study.config import Run, expand_runs, token_datasets
from learnforget.study.jobs import Jobs

WARNING = "learn-forget: warning (a real run stops here): {}"

#: Where messages go (None: nowhere, in Snakemake's job processes).
Say = Callable[[str], None] | None


class StudyStop(Exception):
    """A problem that stops the workflow before any job starts (the message names its fix)."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def open_study(config: dict, *, dry_run: bool, main_process: bool) -> Jobs:
    """The jobs of the validated study ``config``, after the checks of the module docstring,
    in this order (so messages come in it)."""
    say = _stderr if main_process else None
    check_sources(config, dry_run=dry_run, say=say)
    if main_process:
        quarantine_damaged(config["output_dir"], say=_stderr)
    if main_process and not dry_run:
        # Not a job: a rendering of the config (milliseconds; unchanged files are not rewritten),
        # so a finished study's DAG stays as it was.
        out = config["output_dir"]
        write_task_files(config["evaluation"], f"{out}/data", f"{out}/tasks")
    runs = expand_runs(config)
    plans = plan_training(config, runs, dry_run=dry_run, say=say)
    return Jobs(config, runs, train_plans=plans)


def check_sources(config: dict, *, dry_run: bool, say: Say) -> None:
    """Hub models and datasets (the pretrained model, data.hub datasets, lm-eval tasks'
    datasets) must be local, cached or reachable."""
    checks = (
        lambda: sources.check_available(config, datasets=token_datasets(config)),
        lambda: hub.check_tasks(evalplan.hub_tasks(config["evaluation"]), config["evaluation"]["datasets"]),
    )
    for check in checks:
        try:
            check()
        except (hub.DatasetUnavailable, sources.SourceUnavailable) as exc:
            if not dry_run:
                raise StudyStop(str(exc)) from exc
            if say:
                say(WARNING.format(exc))


def quarantine_damaged(out: str, *, say: Callable[[str], None]) -> None:
    """Damaged checkpoints are moved aside (kept) and rebuilt. A missing intermediate output
    alone does not make Snakemake rerun what depends on it (that is how temp() files work), so
    the report, which every checkpoint feeds, is moved aside too: remaking it remakes the
    checkpoints and everything downstream of them."""
    corrupt = integrity.scan(out, quarantine_root=f"{out}/quarantine", log=say)
    if corrupt and Path(f"{out}/report.md").exists():
        stale = Path(f"{out}/quarantine/report-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.md")
        stale.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f"{out}/report.md", stale)


def plan_training(config: dict, runs: list[Run], *, dry_run: bool, say: Say) -> dict:
    """Each run's training plan (:func:`learnforget.cluster.resources.train_plans`: GPUs, host
    memory). With GPUs, the plans are printed (so a dry run shows them); a job that fits on no
    GPU count (gpu: auto) stops the workflow, or, in a dry run, plans ``resources.max_gpus``."""
    try:
        plans = resources.train_plans(config, runs)
    except ValueError as exc:
        error = ConfigError("resources.gpu", " ".join(str(exc).split()))
        if not dry_run:
            raise StudyStop(str(error)) from exc
        if say:
            say(WARNING.format(error))
        plans = resources.train_plans(config, runs, fallback_gpus=config["resources"]["max_gpus"])
    if say and resources.wants_gpus(config):
        for line in resources.plan_lines(config, runs, plans, config["output_dir"]):
            say(line)
    return plans
