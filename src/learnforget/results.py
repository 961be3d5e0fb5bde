"""Evaluation JSONs -> tidy rows (``metrics.csv``).

One row per run x duration x task x metric with the columns of :data:`COLUMNS`.

Metric names: lm-eval keys are ``"metric,filter"``. The tidy name is the bare metric when the
filter is ``none`` (``acc``, ``bits_per_byte``) and ``metric_filter`` otherwise
(``exact_match_strict-match``); see :func:`metric_name`. Standard errors (``*_stderr``) and
lm-eval's bookkeeping fields (``alias``, ``name``, ``sample_len``) are dropped, and for tasks in
the registry only the metrics it lists are kept.

Roles (``role``):

- the base model (``method == "base"``): a task of a target domain (math, code) is
  ``learning`` and the row's ``domain`` is the task's; a source task's higher-is-better metric
  is ``forgetting`` (domain ``source``); anything else is ``other`` (domain: the task's).
- a finetuned run of domain D: tasks of domain D are ``learning``; source tasks are
  ``forgetting`` where higher is better, else ``other``; other tasks are ``other``; ``domain``
  is the run's.

Tasks outside the registry (lm-eval built-ins passed through) have no domain: ``other``.
"""

from __future__ import annotations

import os
from typing import Iterable

from learnforget import io
from learnforget.evaluation import TASKS, get_task

COLUMNS = [
    "run",
    "method",
    "domain",
    "regime",
    "duration",
    "task",
    "metric",
    "value",
    "role",
    "higher_is_better",
    "task_version",
]
#: Target (finetuning) domains; the rest of the registry's domains is ``source``.
TARGET_DOMAINS = ("math", "code")
_SKIP_FIELDS = {"alias", "name", "sample_len", "samples"}


def metric_name(key: str) -> str:
    """``"acc,none"`` -> ``"acc"``; ``"exact_match,strict-match"`` -> ``"exact_match_strict-match"``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


def primary_metric(task: str) -> str:
    """The tidy name of a registry task's headline metric (KeyError naming an unknown task)."""
    return metric_name(get_task(task).primary_metric)


def _role(base: bool, run_domain: str, task_domain: str | None, hib: bool | None) -> tuple[str, str | None]:
    """(role, domain column) of one metric row."""
    if base:
        if task_domain in TARGET_DOMAINS:
            return "learning", task_domain
        if task_domain == "source" and hib is True:
            return "forgetting", "source"
        return "other", task_domain
    if task_domain is not None and task_domain == run_domain:
        return "learning", run_domain
    if task_domain == "source" and hib is True:
        return "forgetting", run_domain
    return "other", run_domain


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def tidy_rows(eval_json: dict) -> list[dict]:
    """Rows (dicts with :data:`COLUMNS`) of one evaluation JSON (see module docstring)."""
    meta = eval_json.get("learnforget") or {}
    missing = [k for k in ("run", "method", "duration") if k not in meta]
    if missing:
        raise ValueError(f"evaluation JSON lacks learnforget.{missing} (who/when was evaluated)")
    base = meta["method"] == "base"
    run_domain = meta.get("domain") or ""
    try:
        duration = float(meta["duration"])
    except (TypeError, ValueError):
        raise ValueError(f"learnforget.duration {meta['duration']!r} is not a number") from None
    versions = eval_json.get("versions") or {}
    hib_all = eval_json.get("higher_is_better") or {}
    rows = []
    for task in sorted(eval_json.get("results") or {}):
        res = eval_json["results"][task]
        entry = TASKS.get(task)
        task_domain = entry.domain if entry else None
        for key in sorted(res):
            if key in _SKIP_FIELDS or "," not in key:
                continue
            bare, _, _filt = key.partition(",")
            if bare.endswith("_stderr"):
                continue
            if entry is not None and key not in entry.metrics:
                continue
            value = _number(res[key])
            if value is None:
                continue
            hib = (hib_all.get(task) or {}).get(bare)
            hib = None if hib is None else bool(hib)
            role, domain = _role(base, run_domain, task_domain, hib)
            version = versions.get(task)
            rows.append(
                {
                    "run": meta["run"],
                    "method": meta["method"],
                    "domain": domain,
                    "regime": meta.get("regime") or "",
                    "duration": duration,
                    "task": task,
                    "metric": metric_name(key),
                    "value": value,
                    "role": role,
                    "higher_is_better": hib,
                    "task_version": None if version is None else str(version),
                }
            )
    return rows


def collect(eval_json_paths: Iterable[str | os.PathLike]):
    """All rows of the given evaluation JSONs as a DataFrame, sorted by run, duration, task, metric."""
    import pandas as pd

    rows = []
    for path in eval_json_paths:
        try:
            rows.extend(tidy_rows(io.read_json(path)))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["duration"] = df["duration"].astype(float)
    df["value"] = df["value"].astype(float)
    df = df.sort_values(["run", "duration", "task", "metric"], kind="mergesort").reset_index(drop=True)
    dupes = df.duplicated(["run", "duration", "task", "metric"])
    if dupes.any():
        first = df[dupes].iloc[0]
        raise ValueError(
            f"duplicate result rows, e.g. run={first['run']} duration={first['duration']} "
            f"task={first['task']} metric={first['metric']}"
        )
    return df


TRAINING_COLUMNS = ["run", "part", "method", "mode", "regime", "duration", "unit", "step", "start_step",
                    "resumed_from_step", "tokens", "job_tokens", "tokens_per_s", "gflops_per_s",
                    "peak_gflops_per_s", "mfu", "peak_memory_mib", "peak_memory_kind", "trainable_parameters",
                    "total_parameters", "processes", "device", "precision", "threads", "job_train_seconds",
                    "job_wall_seconds", "final_loss"]


def training_table(manifest_paths: Iterable[str | os.PathLike]):
    """One row per training job (the base, every trunk and every checkpoint) from their
    manifests: speed, MFU against the measured peak, peak memory, parameters, wall time."""
    import pandas as pd

    rows = []
    for path in manifest_paths:
        m = io.read_json(path)
        base = m.get("kind") == "base"
        rows.append({
            "run": "base" if base else m["run"], "part": "base" if base else m.get("part", "final"),
            "method": "base" if base else m["method"]["type"], "mode": m.get("mode"),
            "regime": "cpt" if base else m.get("regime"), "duration": m.get("duration"), "unit": m.get("unit"),
            "step": m.get("step"), "start_step": 0 if base else m.get("start_step"),
            "resumed_from_step": m.get("resumed_from_step"), "tokens": m.get("tokens"),
            "job_tokens": m.get("tokens") if base else m.get("job_tokens"),
            "trainable_parameters": m["parameters"]["trainable"], "total_parameters": m["parameters"]["total"],
            "job_train_seconds": m.get("train_seconds") if base else m.get("job_train_seconds"),
            "job_wall_seconds": m.get("wall_seconds") if base else m.get("job_wall_seconds"),
            **{k: m.get(k) for k in ("tokens_per_s", "gflops_per_s", "peak_gflops_per_s", "mfu", "peak_memory_mib",
                                     "peak_memory_kind", "processes", "device", "precision", "threads",
                                     "final_loss")},
        })
    df = pd.DataFrame(rows, columns=TRAINING_COLUMNS)
    order = {"base": 0, "trunk": 1, "final": 2}
    df = df.assign(_o=df["part"].map(order)).sort_values(["run", "duration", "_o"], kind="mergesort")
    return df.drop(columns="_o").reset_index(drop=True)
