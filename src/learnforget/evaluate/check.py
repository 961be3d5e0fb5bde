"""Check of a study config's ``evaluation`` section (registered in
:mod:`learnforget.study.sections`): the groups (:func:`learnforget.evaluate.plan.check_groups`)
and the local copies of hub datasets."""

from __future__ import annotations

from pathlib import Path

from learnforget.evaluate.plan import check_groups
from learnforget.study.basics import ConfigError


def check_evaluation(cfg: dict) -> None:
    """``evaluation``: valid groups for the runs' domains; ``datasets`` entries are folders."""
    try:
        check_groups(cfg["evaluation"], {r["domain"] for r in cfg["runs"]})
    except ValueError as exc:
        path, _, msg = str(exc).partition(": ")
        raise ConfigError(path, msg) from None
    for dataset_id, folder in cfg["evaluation"]["datasets"].items():
        if not Path(folder).is_dir():
            raise ConfigError(f"evaluation.datasets.{dataset_id}", f"{folder} is not a folder")
