"""Evaluation JSONs -> tidy rows (``metrics.csv``).

One row per run x duration x task x metric with the columns of :data:`COLUMNS`.

Metric names: lm-eval keys are ``"metric,filter"``. The tidy name is the bare metric when the
filter is ``none`` (``acc``, ``bits_per_byte``, ``pass@1``) and ``metric_filter`` otherwise
(``exact_match_strict-match``); see :func:`metric_name`. Standard errors (``*_stderr``) and
lm-eval's bookkeeping fields (``alias``, ``name``, ``sample_len``) are dropped, and for tasks in
the registry only the metrics it lists are kept (``bypass``, the placeholder metric of sampled
tasks, never is).

Rows and their ``role``:

- ``task``: a task's own metric, from lm-eval (``evals/RUN/D.json``) or from the scoring of
  sampled generations (``evals/RUN/D.scored.json``: pass@k, parses);
- ``diversity``: the generation diversity of a sampled task (distinct normalised solutions,
  their share, mean pairwise similarity; paper section 4.4), from the scoring;
- ``learning`` / ``forgetting`` / ``other``: a task group's score (``task`` = the group's name),
  the mean of its tasks' group metric, added by :func:`collect` from ``evaluation.groups``.

``method`` is the method's name in the config, ``method_type`` what it is: the method
registry's type (``full``, ``lora``, ...), ``base`` for the base model, ``compose`` for a
composite of adapters. Figures and findings ask the type, never the name.

``domain``: a learning group's row has the group's domain; every other row of a finetuned run
has the run's domain; the base model's rows have ``""``, except forgetting rows (``source``).

``series``, ``seed``, ``lr``: runs that are replicates of one setting (``runs[].seeds``) share a
series; figures and tables aggregate over the seeds of a series (mean, 95% interval).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from learnforget.core import io
from learnforget.evaluate.plan import GroupSpec, parse_groups
from learnforget.evaluate.registry import TASKS, get_task, metric_name

COLUMNS = [
    "run",
    "method",
    "method_type",
    "domain",
    "regime",
    "duration",
    "task",
    "metric",
    "value",
    "role",
    "higher_is_better",
    "task_version",
    "series",
    "seed",
    "lr",
]
#: Roles of rows (see the module docstring).
ROW_ROLES = ("task", "diversity", "learning", "forgetting", "other")
_SKIP_FIELDS = {"alias", "name", "sample_len", "samples"}


def primary_metric(task: str) -> str:
    """The tidy name of a registry task's headline metric (KeyError naming an unknown task)."""
    return metric_name(get_task(task).primary_metric)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _meta(eval_json: dict) -> tuple[dict, float]:
    meta = eval_json.get("learnforget") or {}
    missing = [k for k in ("run", "method", "duration") if k not in meta]
    if missing:
        raise ValueError(f"evaluation JSON lacks learnforget.{missing} (who/when was evaluated)")
    try:
        duration = float(meta["duration"])
    except (TypeError, ValueError):
        raise ValueError(f"learnforget.duration {meta['duration']!r} is not a number") from None
    return meta, duration


def tidy_rows(eval_json: dict) -> list[dict]:
    """Task and diversity rows (dicts with :data:`COLUMNS`) of one evaluation or scoring JSON."""
    meta, duration = _meta(eval_json)
    domain = "" if meta["method"] == "base" else (meta.get("domain") or "")
    scored = "diversity" in eval_json
    versions = eval_json.get("versions") or {}
    hib_all = eval_json.get("higher_is_better") or {}

    def row(task, metric, value, role, hib, version=None):
        return {"run": meta["run"], "method": meta["method"], "method_type": meta.get("method_type"), "domain": domain,
                "regime": meta.get("regime") or "",
                "duration": duration, "task": task, "metric": metric, "value": value, "role": role,
                "higher_is_better": hib, "task_version": version, "series": meta.get("series") or meta["run"],
                "seed": meta.get("seed"), "lr": meta.get("lr")}

    rows = []
    for task in sorted(eval_json.get("results") or {}):
        res = eval_json["results"][task]
        entry = TASKS.get(task)
        for key in sorted(res):
            if key in _SKIP_FIELDS or "," not in key:
                continue
            bare, _, _filt = key.partition(",")
            if bare.endswith("_stderr") or bare == "bypass":
                continue
            if entry is not None and not scored and key not in entry.metrics:
                continue
            value = _number(res[key])
            if value is None:
                continue
            hib = (hib_all.get(task) or {}).get(bare)
            version = versions.get(task)
            rows.append(row(task, metric_name(key), value, "task", None if hib is None else bool(hib),
                            None if version is None else str(version)))
    for task in sorted(eval_json.get("diversity") or {}):
        for metric, value in sorted(eval_json["diversity"][task].items()):
            value = _number(value)
            if value is not None:
                rows.append(row(task, metric, value, "diversity", None))
    return rows


def group_rows(df, groups: Mapping[str, Mapping | GroupSpec]) -> list[dict]:
    """One row per checkpoint and task group: the mean of the group's tasks' metric (only when
    every task of the group has it for that checkpoint; see the module docstring for roles)."""
    specs = {n: g if isinstance(g, GroupSpec) else None for n, g in groups.items()}
    raw = {n: g for n, g in groups.items() if not isinstance(g, GroupSpec)}
    specs.update(parse_groups(raw))
    tasks = df[df["role"].isin(["task", "diversity"])]
    lookup = {(r.run, r.duration, r.task, r.metric): (r.value, r.higher_is_better)
              for r in tasks.itertuples(index=False)}
    rows = []
    for (run, duration), ck in tasks.groupby(["run", "duration"], sort=True):
        first = ck.iloc[0]
        base = first["method"] == "base"
        for name, g in specs.items():
            if g.metric is None:
                continue
            keys = [(t, metric_name(g.metric_key(t))) for t in g.tasks]
            found = [lookup.get((run, duration, t, m)) for t, m in keys]
            if any(f is None for f in found):
                continue
            names = {m for _, m in keys}
            hibs = {f[1] for f in found}
            if g.role == "learning":
                domain = g.domain
            elif g.role == "forgetting":
                domain = "source" if base else first["domain"]
            else:
                domain = first["domain"]
            rows.append({"run": run, "method": first["method"], "method_type": first["method_type"], "domain": domain,
                         "regime": first["regime"],
                         "duration": duration, "task": name, "metric": names.pop() if len(names) == 1 else "score",
                         "value": sum(f[0] for f in found) / len(found), "role": g.role,
                         "higher_is_better": hibs.pop() if len(hibs) == 1 else None, "task_version": None,
                         "series": first["series"], "seed": first["seed"], "lr": first["lr"]})
    return rows


def collect(eval_json_paths: Iterable[str | os.PathLike], groups: Mapping | None = None):
    """All rows of the given evaluation (and scoring) JSONs as a DataFrame, plus a row per task
    group and checkpoint when ``groups`` (``evaluation.groups``) is given; sorted by run,
    duration, task, metric."""
    import pandas as pd

    rows = []
    for path in eval_json_paths:
        try:
            rows.extend(tidy_rows(io.read_json(path)))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    df = pd.DataFrame(rows, columns=COLUMNS)
    if groups:
        df = pd.concat([df, pd.DataFrame(group_rows(df, groups), columns=COLUMNS)], ignore_index=True)
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
        if m.get("kind") == "pretrained":  # a pretrained base model was linked, not trained
            continue
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
