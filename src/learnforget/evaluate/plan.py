"""Evaluation plans: the study's task groups (``evaluation.groups``) and what each checkpoint runs.

A task group names tasks (the registry's, lm-eval built-ins or the user's ``task_dirs``), their
role in the study (learning, forgetting, other) and how they are run (shots, limit, batch size,
sampling settings). :func:`check_groups` validates them for the config, :func:`plan` turns them
into the JSON-able list of tasks one checkpoint's evaluation runs (Snakemake params: its repr
decides reruns), :func:`headline` names the report's primary metrics.

Config validation and Snakemake's main process import this module: it imports neither lm-eval
nor torch (:mod:`learnforget.core.hub` reads lm-eval's task files without importing lm-eval's
task code).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from learnforget.core import hub
from learnforget.evaluate.registry import DIVERSITY_METRICS, TASKS, metric_name

#: Roles of a task group (see the config reference: evaluation.groups).
ROLES = ("learning", "forgetting", "other")
#: Group fields that only apply to sampled generation tasks (lf_humaneval, lf_code_gen).
SAMPLING_FIELDS = ("samples", "temperature", "top_p", "max_gen_toks", "k", "timeout_s")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class GroupSpec:
    """One task group of ``evaluation.groups``: tasks, their role and how they are run."""

    tasks: tuple[str, ...] = field(metadata=_help(
        "Task names: the registry's (lf_*), lm-eval built-ins (gsm8k, hellaswag, ...) or tasks in "
        "evaluation.task_dirs. A task belongs to one group."))
    role: str = field(default="other", metadata=_help(
        "learning (one group per run domain), forgetting (exactly one group) or other."))
    domain: str | None = field(default=None, metadata=_help(
        "The run domain (math, code) a learning group measures; an other group with a domain is "
        "evaluated on the base and that domain's runs only."))
    metric: str | dict | None = field(default=None, metadata=_help(
        "The group's metric (lm-eval name: acc, acc_norm, exact_match, bits_per_byte, pass@1, ...), "
        "or a mapping task -> metric; required for learning and forgetting groups."))
    filter: str | dict = field(default="none", metadata=_help(
        "lm-eval filter of the metric (strict-match, flexible-extract; none), or task -> filter."))
    num_fewshot: int | dict | None = field(default=None, metadata=_help(
        "Shots, for every task or as task -> shots (null: each task's own default)."))
    limit: int | None = field(default=None, metadata=_help(
        "Documents per task (null: evaluation.limit)."))
    batch_size: int | None = field(default=None, metadata=_help(
        "lm-eval batch size (null: evaluation.batch_size)."))
    samples: int = field(default=10, metadata=_help(
        "Sampled tasks: completions per problem (the paper: 50 for HumanEval)."))
    temperature: float = field(default=0.2, metadata=_help("Sampled tasks: sampling temperature."))
    top_p: float = field(default=0.95, metadata=_help("Sampled tasks: nucleus sampling top-p."))
    max_gen_toks: int = field(default=256, metadata=_help("Sampled tasks: most new tokens per completion."))
    k: tuple[int, ...] = field(default=(1, 10), metadata=_help(
        "Sampled tasks: the k of pass@k (k above the samples per problem are skipped)."))
    timeout_s: float = field(default=10.0, metadata=_help(
        "lf_humaneval: wall-clock limit per executed completion, seconds (CPU, memory, file size "
        "and process limits: learnforget.score.sandbox defaults)."))

    @classmethod
    def from_dict(cls, raw: Mapping) -> "GroupSpec":
        """Validate one group; ValueError naming the field (the caller adds the key path)."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"a group must be a mapping, got {raw!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {sorted(known)}")
        if "tasks" not in raw:
            raise ValueError("tasks: required")
        tasks = raw["tasks"]
        if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks \
                or not all(isinstance(t, str) and t for t in tasks):
            raise ValueError(f"tasks: a non-empty list of task names, got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: duplicate names in {list(tasks)}")
        kw = dict(raw)
        kw["tasks"] = tuple(tasks)
        if "k" in kw:
            ks = kw["k"]
            if not isinstance(ks, (list, tuple)) or not ks or not all(_posint(x) for x in ks):
                raise ValueError(f"k: a non-empty list of positive integers, got {ks!r}")
            kw["k"] = tuple(sorted(set(ks)))
        spec = cls(**kw)
        spec._check(explicit=set(raw))
        return spec

    def _check(self, explicit: set[str]) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: one of {ROLES}, got {self.role!r}")
        if self.role == "learning" and not self.domain:
            raise ValueError("domain: required for a learning group (the run domain it measures)")
        if self.role == "forgetting" and self.domain is not None:
            raise ValueError("domain: the forgetting group is evaluated on every run and has no domain")
        if self.role in ("learning", "forgetting") and self.metric is None:
            raise ValueError(f"metric: required for a {self.role} group")
        for name in ("metric", "filter", "num_fewshot"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                extra = sorted(set(value) - set(self.tasks))
                if extra:
                    raise ValueError(f"{name}: names tasks that are not in this group: {extra}")
                if name == "metric" and set(value) != set(self.tasks):
                    raise ValueError(f"metric: a mapping must give every task a metric; missing "
                                     f"{sorted(set(self.tasks) - set(value))}")
        for task in self.tasks:
            shots = self.shots(task)
            if shots is not None and not (isinstance(shots, int) and not isinstance(shots, bool) and shots >= 0):
                raise ValueError(f"num_fewshot: a non-negative integer, got {shots!r}")
            for name, getter in (("metric", self.metric_of), ("filter", self.filter_of)):
                value = getter(task)
                if value is not None and (not isinstance(value, str) or not value or "," in value):
                    raise ValueError(f"{name}: a name without commas, got {value!r}")
        for name in ("limit", "batch_size", "samples", "max_gen_toks"):
            value = getattr(self, name)
            if value is not None and not _posint(value):
                raise ValueError(f"{name}: a positive integer, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature: a positive number, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s: a positive number, got {self.timeout_s!r}")
        sampled = [t for t in self.tasks if t in TASKS and TASKS[t].sampled]
        set_sampling = sorted(explicit & set(SAMPLING_FIELDS))
        if set_sampling and not sampled:
            raise ValueError(f"{', '.join(set_sampling)}: only for sampled tasks "
                             f"({sorted(t for t, e in TASKS.items() if e.sampled)}), none in this group")

    def metric_of(self, task: str) -> str | None:
        return self.metric.get(task) if isinstance(self.metric, Mapping) else self.metric

    def filter_of(self, task: str) -> str:
        return self.filter.get(task, "none") if isinstance(self.filter, Mapping) else self.filter

    def shots(self, task: str) -> int | None:
        return self.num_fewshot.get(task) if isinstance(self.num_fewshot, Mapping) else self.num_fewshot

    def metric_key(self, task: str) -> str | None:
        """lm-eval's ``"metric,filter"`` key of ``task``'s group metric (None: no metric set)."""
        metric = self.metric_of(task)
        return None if metric is None else f"{metric},{self.filter_of(task)}"

    def applies_to(self, run_domain: str | None) -> bool:
        """Whether a checkpoint of a run of ``run_domain`` is evaluated on this group (None:
        the base model, evaluated on every group)."""
        return self.domain is None or run_domain is None or run_domain == self.domain


def _posint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def parse_groups(groups: Mapping[str, Mapping]) -> dict[str, GroupSpec]:
    """``evaluation.groups`` -> name -> :class:`GroupSpec`; ValueError ``"groups.NAME: ..."``."""
    out = {}
    for name, raw in groups.items():
        try:
            out[name] = GroupSpec.from_dict(raw)
        except (TypeError, ValueError) as exc:
            text = str(exc).strip("'\"")
            key, sep, msg = text.partition(": ")
            if sep and key.isidentifier():
                raise ValueError(f"groups.{name}.{key}: {msg}") from None
            raise ValueError(f"groups.{name}: {text}") from None
    return out


_TASK_LINE = re.compile(r"^task:\s*[\"']?([A-Za-z0-9_.\-]+)[\"']?\s*$", re.M)


def task_dir_index(task_dirs: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Task name -> YAML file of the lm-eval tasks defined in the user's ``task_dirs``
    (a quick scan for ``task: NAME`` lines; lm-eval itself loads them). ValueError naming a
    folder that does not exist or a task defined twice."""
    index: dict[str, Path] = {}
    for d in task_dirs:
        d = Path(d)
        if not d.is_dir():
            raise ValueError(f"task_dirs: {d} is not a folder")
        for path in sorted(d.rglob("*.yaml")):
            for name in _TASK_LINE.findall(path.read_text(encoding="utf-8", errors="replace")):
                if name in index and index[name] != path:
                    raise ValueError(f"task_dirs: task {name!r} is defined in both {index[name]} and {path}")
                index[name] = path
    return index


def check_groups(ev: Mapping, run_domains: Iterable[str], *, builtin: Callable[[str], bool] | None = None) -> dict[str, GroupSpec]:
    """Cross-checks of the ``evaluation`` section (ValueError ``"KEY.PATH: message"``): groups
    valid; a task in one group only; every task known (registry, ``task_dirs`` or lm-eval's
    built-ins, looked up by ``builtin``); group names distinct from task names; exactly one
    forgetting group and one learning group per run domain."""
    try:
        groups = parse_groups(ev["groups"])
        local = task_dir_index(ev.get("task_dirs") or [])
    except ValueError as exc:
        raise ValueError(f"evaluation.{exc}") from None
    if builtin is None:
        def builtin(name: str) -> bool:
            return hub.find_task_yaml(name) is not None

    owner: dict[str, str] = {}
    for gname, g in groups.items():
        for j, task in enumerate(g.tasks):
            where = f"evaluation.groups.{gname}.tasks[{j}]"
            if task in owner:
                raise ValueError(f"{where}: task {task!r} is already in group {owner[task]!r}")
            owner[task] = gname
            if task not in TASKS and task not in local and not builtin(task):
                raise ValueError(f"{where}: unknown task {task!r}: not in the registry {sorted(TASKS)}, "
                                 "not in evaluation.task_dirs and not an lm-eval task")
            entry = TASKS.get(task)
            key = g.metric_key(task)
            if entry is not None and key is not None and key not in entry.metrics and not entry.sampled:
                raise ValueError(f"evaluation.groups.{gname}.metric: task {task!r} has no metric {key!r}; "
                                 f"it has {list(entry.metrics)}")
            if entry is not None and entry.sampled and key is not None:
                metric = g.metric_of(task)
                allowed = [*(m.split(",")[0] for m in entry.metrics), *DIVERSITY_METRICS]
                if entry.scorer == "humaneval":
                    allowed += [f"pass@{k}" for k in g.k]
                if metric not in allowed:
                    raise ValueError(f"evaluation.groups.{gname}.metric: task {task!r} scores {allowed}, "
                                     f"not {metric!r}")
    clash = sorted(set(groups) & (set(owner) | set(TASKS)))
    if clash:
        raise ValueError(f"evaluation.groups.{clash[0]}: a group cannot be named like a task")
    forgetting = [n for n, g in groups.items() if g.role == "forgetting"]
    if len(forgetting) != 1:
        raise ValueError(f"evaluation.groups: exactly one group needs role forgetting, found {forgetting or 'none'}")
    learning: dict[str, str] = {}
    for n, g in groups.items():
        if g.role == "learning":
            if g.domain in learning:
                raise ValueError(f"evaluation.groups.{n}.domain: domain {g.domain!r} already has the learning "
                                 f"group {learning[g.domain]!r}")
            learning[g.domain] = n
    for dom in sorted(set(run_domains)):
        if dom not in learning:
            raise ValueError(f"evaluation.groups: no learning group for the runs' domain {dom!r} "
                             "(add a group with role: learning, domain: " + dom + ")")
    return groups


def headline(groups: Mapping[str, GroupSpec]) -> dict:
    """The report's primary metrics: ``{"learning": {domain: [group, metric]},
    "forgetting": [group, metric]}`` (metric: the tidy name of the group's rows)."""

    def tidy(name: str, g: GroupSpec) -> str:
        keys = {metric_name(g.metric_key(t)) for t in g.tasks}
        return keys.pop() if len(keys) == 1 else "score"

    out: dict[str, Any] = {"learning": {}}
    for name, g in groups.items():
        if g.role == "learning":
            out["learning"][g.domain] = [name, tidy(name, g)]
        elif g.role == "forgetting":
            out["forgetting"] = [name, tidy(name, g)]
    return out


def plan(ev: Mapping, run_domain: str | None) -> list[dict]:
    """What one checkpoint's evaluation runs: a JSON-able list with, per task, its group and
    settings (``num_fewshot``, ``limit``, ``batch_size``, and ``sampling`` for sampled tasks).
    ``run_domain`` None: the base model (every group)."""
    groups = parse_groups(ev["groups"])
    out = []
    for gname, g in groups.items():
        if not g.applies_to(run_domain):
            continue
        for task in g.tasks:
            entry = TASKS.get(task)
            item = {
                "task": task,
                "group": gname,
                "num_fewshot": g.shots(task),
                "limit": g.limit if g.limit is not None else ev.get("limit"),
                "batch_size": g.batch_size or ev.get("batch_size", 32),
                "sampling": None,
            }
            if entry is not None and entry.sampled:
                item["sampling"] = {"samples": g.samples, "temperature": float(g.temperature),
                                    "top_p": float(g.top_p), "max_gen_toks": g.max_gen_toks,
                                    "k": list(g.k), "timeout_s": float(g.timeout_s), "scorer": entry.scorer}
            out.append(item)
    return out


def normalise_plan(items: Iterable, batch_size: int, limit: int | float | None,
                   num_fewshot: Mapping[str, int] | None) -> list[dict]:
    """The items :func:`learnforget.evaluate.harness.evaluate_checkpoint` runs: plan items
    (see :func:`plan`) from dicts or bare task names (these take the keyword
    defaults); ValueError for duplicates, bad shots or shots naming tasks not evaluated."""
    num_fewshot = dict(num_fewshot or {})
    for name, shots in num_fewshot.items():
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise ValueError(f"num_fewshot[{name!r}] must be a non-negative integer, got {shots!r}")
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"task": item, "group": None, "num_fewshot": num_fewshot.get(item), "limit": limit,
                    "batch_size": batch_size, "sampling": None}
        out.append(dict(item))
    if not out:
        raise ValueError("no evaluation tasks given")
    names = [i["task"] for i in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate evaluation tasks in {names}")
    unknown = sorted(set(num_fewshot) - set(names))
    if unknown:
        raise ValueError(f"num_fewshot names tasks that are not evaluated: {unknown}")
    for i in out:
        entry = TASKS.get(i["task"])
        if entry is not None and entry.sampled and not i.get("sampling"):
            raise ValueError(f"task {i['task']!r} is sampled: its plan item needs 'sampling' settings")
    return out


def hub_tasks(ev: Mapping) -> list[str]:
    """The configured tasks that come from lm-eval's built-ins (their datasets from the hub)."""
    groups = parse_groups(ev["groups"])
    local = task_dir_index(ev.get("task_dirs") or [])
    return sorted({t for g in groups.values() for t in g.tasks if t not in TASKS and t not in local})
