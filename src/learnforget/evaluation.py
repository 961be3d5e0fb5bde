"""Evaluation through lm-eval: the task registry and scoring one checkpoint.

The offline tasks are lm-eval YAML files in ``learnforget/tasks/`` that read our JSONL data.
Their data paths are only known at run time, so :func:`evaluate_checkpoint` renders them into
a temporary folder with absolute paths (from the registry below) and indexes only that folder
(``TaskManager(include_defaults=False)``: indexing lm-eval's ~15k built-in tasks costs ~10 s).
A task name that is not in the registry is passed through to lm-eval's own registry (for
example ``gsm8k``); only then are the built-in tasks indexed.

One job = one model load (a full model, or a base model plus an unmerged peft adapter) and one
``lm_eval.simple_evaluate`` call over all tasks, with ``bootstrap_iters=0`` and fixed seeds.

This module imports lm-eval, torch and transformers lazily: importing it (for :data:`TASKS`,
e.g. from config validation or the Snakefile) is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from learnforget import io

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
    ``"exact_match,strict-match"``); :mod:`learnforget.results` turns them into tidy names.
    """

    name: str
    yaml: str | None
    """File name in ``learnforget/tasks/``; None for a task of lm-eval's built-in registry."""
    data: Mapping[str, str] = field(default_factory=dict)
    """Split -> data file relative to the data root (``results/data``)."""
    domain: str = "source"
    """``math`` or ``code`` (a finetuning target domain) or ``source`` (what may be forgotten)."""
    primary_metric: str = ""
    """The headline metric key (figures and the report use it)."""
    metrics: tuple[str, ...] = ()
    """The metric keys kept in the tidy results (the primary one included)."""
    description: str = ""

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

    @property
    def local(self) -> bool:
        """True for our offline YAML tasks, False for lm-eval built-ins."""
        return self.yaml is not None


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
    )
}


def get_task(name: str) -> EvalTask:
    """The registry entry for ``name``; KeyError naming it (and the known tasks) otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown evaluation task {name!r}; registry tasks: {sorted(TASKS)}") from None


def required_data(tasks: Iterable[str], data_root: str | os.PathLike) -> list[Path]:
    """The data files the given tasks read (sorted, unique); pass-through tasks need none."""
    root = Path(data_root)
    paths = {root / rel for t in tasks if t in TASKS for rel in TASKS[t].data.values()}
    return sorted(paths)


def render_tasks(
    tasks: Iterable[str], data_root: str | os.PathLike, out_dir: str | os.PathLike, *, cache_dir: str | None = None
) -> list[Path]:
    """Write the YAMLs of the given registry tasks into ``out_dir`` with absolute data paths.

    ``dataset_kwargs.data_files`` comes from the registry (the package YAMLs hold the same
    paths under a ``{data_root}`` placeholder, for the reader); ``cache_dir`` keeps the
    ``datasets`` arrow cache out of the user's home (one per job, removed with it).
    """
    root = Path(data_root).resolve()
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
        kwargs["data_files"] = {split: str(root / rel) for split, rel in task.data.items()}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        cfg["dataset_kwargs"] = kwargs
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
            path = data_root / rel
            if not path.is_file():
                raise FileNotFoundError(f"task {name!r} needs its {split} data {path}, which does not exist")
            info[name][split] = {"path": str(rel), "sha256": io.sha256_file(path)}
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


def _compact_sample(task: str, sample: dict, output_type: str | None) -> dict:
    """One line of the per-sample log: ids, target, response(s) and metric values."""
    rec: dict[str, Any] = {"task": task, "doc_id": sample.get("doc_id"), "filter": sample.get("filter")}
    if output_type != "loglikelihood_rolling":  # a rolling task's target is the whole document
        rec["target"] = sample.get("target")
    resps = sample.get("resps") or []
    filtered = sample.get("filtered_resps")
    if output_type == "generate_until":
        rec["response"] = resps[0][0] if resps and resps[0] else None
        rec["filtered"] = filtered[0] if isinstance(filtered, list) and len(filtered) == 1 else filtered
    else:
        # log-likelihood requests answer (loglikelihood, is_greedy) or a float per request:
        # keep the log-likelihoods only.
        def ll(x):
            return x[0] if isinstance(x, (list, tuple)) else x

        rec["loglikelihood"] = [ll(r[0] if isinstance(r, list) else r) for r in resps]
    for metric in sample.get("metrics") or []:
        if metric in sample:
            rec[metric] = sample[metric]
    return _jsonable(rec)


def _load_task_objects(tm, specs: list[str], num_fewshot: Mapping[str, int]) -> list:
    """Build the Task/Group objects (datasets load here) and set per-task shots.

    ``num_fewshot`` keys are task names; a key naming a requested group or tag applies to its
    tasks (a task's own key wins).
    """
    objs = []
    leaves = set()
    for spec in specs:
        loaded = tm.load([spec])
        leaves.update(loaded["tasks"])
        for name, task in loaded["tasks"].items():
            shots = num_fewshot.get(name, num_fewshot.get(spec))
            if shots is not None:
                task.set_config(key="num_fewshot", value=int(shots))
        groups = loaded.get("groups") or {}
        if spec in groups:
            objs.append(groups[spec])
        else:
            objs.extend(loaded["tasks"].values())
    unknown = sorted(set(num_fewshot) - leaves - set(specs))
    if unknown:
        raise ValueError(f"num_fewshot names tasks that are not evaluated: {unknown}")
    return objs


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    tasks: list[str],
    data_root: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    adapter_dir: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    limit: int | float | None = None,
    num_fewshot: Mapping[str, int] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 1234,
    log_samples_path: str | os.PathLike | None = None,
    extra_meta: dict | None = None,
) -> dict:
    """Score one checkpoint on ``tasks`` and write lm-eval's results to ``out_json``.

    ``model_dir`` is a transformers model folder; with ``adapter_dir`` it is the base model and
    the peft adapter is applied unmerged. ``tokenizer_dir`` defaults to ``model_dir``.
    ``num_fewshot`` maps task names to shots (others: the YAML's value, else 0). ``limit``
    evaluates only the first N documents of each task (testing only). The JSON holds
    lm-eval's ``results``, ``versions``, ``n-shot``, ``higher_is_better``, ``configs``,
    ``n-samples`` and ``config``, plus ``learnforget`` (``extra_meta``), ``data_files``
    (path and sha256 of every data file read) and ``timing_s``. Per-sample records go to
    ``log_samples_path`` as JSONL. Returns the dictionary written.
    """
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no evaluation tasks given")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate evaluation tasks in {tasks}")
    num_fewshot = dict(num_fewshot or {})
    for name, shots in num_fewshot.items():
        if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
            raise ValueError(f"num_fewshot[{name!r}] must be a non-negative integer, got {shots!r}")
    data_root = Path(data_root).resolve()
    local = [t for t in tasks if t in TASKS and TASKS[t].local]
    passthrough = [t for t in tasks if t not in local]
    data_info = _check_data(local, data_root)
    for path in (model_dir, adapter_dir, tokenizer_dir):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{path} is not a directory")

    t = time.perf_counter()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    timing["import"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="lf-eval-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        render_tasks(local, data_root, tmp / "tasks", cache_dir=str(tmp / "datasets-cache"))
        tm = TaskManager(include_path=str(tmp / "tasks"), include_defaults=bool(passthrough))
        missing = [name for name in passthrough if name not in tm.all_tasks]
        if missing:
            raise KeyError(
                f"unknown evaluation task(s) {missing}: neither in the learnforget registry "
                f"{sorted(TASKS)} nor in lm-eval's task registry"
            )
        timing["task_index"] = time.perf_counter() - t
        scope = "with lm-eval built-ins" if passthrough else "local only"
        log.info("indexed tasks in %.1f s (%s)", timing["task_index"], scope)

        t = time.perf_counter()
        task_objs = _load_task_objects(tm, tasks, num_fewshot)
        timing["task_load"] = time.perf_counter() - t
        log.info("built %d task(s) in %.1f s", len(task_objs), timing["task_load"])

        t = time.perf_counter()
        model_args: dict[str, Any] = {
            "pretrained": str(model_dir),
            "tokenizer": str(tokenizer_dir) if tokenizer_dir is not None else None,
            "peft": str(adapter_dir) if adapter_dir is not None else None,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
        }
        lm = HFLM(**{k: v for k, v in model_args.items() if v is not None})
        timing["model_load"] = time.perf_counter() - t
        log.info(
            "loaded %s%s in %.1f s", model_dir, f" + adapter {adapter_dir}" if adapter_dir else "", timing["model_load"]
        )

        t = time.perf_counter()
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objs,
            task_manager=tm,
            limit=limit,
            bootstrap_iters=0,
            log_samples=log_samples_path is not None,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        timing["evaluate"] = time.perf_counter() - t
    if raw is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")

    out = {k: raw[k] for k in RESULT_KEYS if k in raw}
    for name in local:  # point at the package YAML, not the job's temporary copy
        cfg = out.get("configs", {}).get(name)
        if isinstance(cfg, dict):
            (cfg.get("dataset_kwargs") or {}).pop("cache_dir", None)
            cfg.setdefault("metadata", {})["config_source"] = f"learnforget/tasks/{TASKS[name].yaml}"
    out.setdefault("config", {})["model_args"] = model_args
    out["learnforget"] = dict(extra_meta or {})
    out["data_files"] = data_info
    samples = raw.get("samples") or {}
    if log_samples_path is not None:
        t = time.perf_counter()
        configs = raw.get("configs", {})
        records = (
            _compact_sample(task, s, configs.get(task, {}).get("output_type"))
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
        ", ".join(tasks),
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
