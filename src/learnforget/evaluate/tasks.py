"""Task files: the registry's lm-eval YAMLs rendered for one study's data, ready for lm-eval.

The package YAMLs name their data under ``{data_root}`` (and ``{humaneval_data}``), which only
a study knows. :func:`render_tasks` writes copies with absolute data paths, and for a sampled
task the study's sampling settings (``repeats`` = samples per problem, temperature, top-p,
most new tokens); ``include:`` parents and ``!function`` modules travel with the tasks that
need them. :func:`learnforget.evaluate.harness.evaluate_checkpoint` renders into each job's
temporary folder; :func:`write_task_files` renders a study's tasks into ``results/tasks``, so
that the stock command line reproduces a score::

    lm_eval --model hf --model_args pretrained=results/base/model --tasks lf_facts \\
        --include_path results/tasks

Files whose content is unchanged are not rewritten (their mtimes stay). Imports neither
lm-eval nor torch: Snakemake's main process calls :func:`write_task_files`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from learnforget.core import io
from learnforget.evaluate.plan import plan
from learnforget.evaluate.registry import (TASK_DIR, TASKS, FunctionRef, data_path, dump_yaml, get_task,
                                           include_parents, load_task_yaml, read_yaml, relative_data_path)


def write_task_files(evaluation: Mapping[str, Any], data_root: str | os.PathLike,
                     out_dir: str | os.PathLike) -> list[Path]:
    """Render every registry task that the study's evaluation groups use into ``out_dir``, with
    data paths under ``data_root`` and the groups' sampling settings (as every checkpoint's
    evaluation renders them, less the job's ``datasets`` cache folder). Returns the files."""
    items = [i for i in plan(evaluation, None) if i["task"] in TASKS]
    sampling = {i["task"]: i["sampling"] for i in items if i["sampling"]}
    return render_tasks([i["task"] for i in items], data_root, out_dir, sampling=sampling)


def render_tasks(
    tasks: Iterable[str], data_root: str | os.PathLike, out_dir: str | os.PathLike, *, cache_dir: str | None = None,
    sampling: Mapping[str, Mapping] | None = None,
) -> list[Path]:
    """Write the YAMLs of the given registry tasks into ``out_dir`` with absolute data paths;
    returns the files (tasks first, then the ``include:`` parents and function modules they need).

    ``cache_dir`` keeps the ``datasets`` arrow cache out of the user's home (one per job,
    removed with it). ``sampling`` (task -> settings of :func:`learnforget.evaluate.plan.plan`)
    sets a sampled task's ``repeats`` (n) and its ``temperature``, ``top_p`` and ``max_gen_toks``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, parents = [], {}
    for name in tasks:
        task = get_task(name)
        text = _render_task(task.path, data_root, cache_dir, (sampling or {}).get(name))
        written.append(_write_if_changed(out / task.yaml, text))
        parents.update(dict.fromkeys(_needed_files(task.path)))
    for path in parents:  # placed as in the package: includes and !function name them relatively
        text = (dump_yaml(_with_data_root(read_yaml(path), data_root)) if path.suffix == ".yaml"
                else path.read_text(encoding="utf-8"))
        written.append(_write_if_changed(out / path.resolve().relative_to(TASK_DIR.resolve()), text))
    return written


def _render_task(path: Path, data_root: str | os.PathLike, cache_dir: str | None,
                 settings: Mapping | None) -> str:
    """One task's own YAML: its data files absolute, the job's cache folder, the sampling settings.

    The task file carries the complete ``dataset_kwargs`` (and ``generation_kwargs`` when
    sampled), merged from its ``include:`` parents: lm-eval replaces a parent's key, it does not
    merge into it.
    """
    cfg = read_yaml(path)
    merged = load_task_yaml(path)
    if "dataset_kwargs" in merged:
        kwargs = dict(merged["dataset_kwargs"])
        kwargs["data_files"] = _absolute(kwargs.get("data_files") or {}, data_root)
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        cfg["dataset_kwargs"] = kwargs
    if settings:
        cfg["repeats"] = int(settings["samples"])
        gen = dict(merged.get("generation_kwargs") or {})
        gen.update(do_sample=True, temperature=float(settings["temperature"]), top_p=float(settings["top_p"]),
                   max_gen_toks=int(settings["max_gen_toks"]))
        cfg["generation_kwargs"] = gen
    return dump_yaml(cfg)


def _with_data_root(cfg: dict[str, Any], data_root: str | os.PathLike) -> dict[str, Any]:
    """An ``include:`` parent with its own data files (if any) made absolute."""
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files:
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": _absolute(files, data_root)}
    return cfg


def _absolute(files: Mapping[str, str], data_root: str | os.PathLike) -> dict[str, str]:
    return {split: str(data_path(relative_data_path(value), data_root)) for split, value in files.items()}


def _needed_files(path: Path) -> Iterator[Path]:
    """The ``include:`` parents of a task YAML (recursively) and the modules of the
    ``!function`` references of the task and its parents (lm-eval imports them from the YAML's
    folder)."""
    for ref in _function_refs(read_yaml(path)):
        yield path.parent / (ref.rsplit(".", 1)[0] + ".py")
    for parent in include_parents(path):
        yield parent
        yield from _needed_files(parent)


def _function_refs(value: Any) -> Iterator[FunctionRef]:
    if isinstance(value, FunctionRef):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _function_refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _function_refs(v)


def _write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, unless it already holds exactly that (its mtime stays)."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(path, text)
    return path

