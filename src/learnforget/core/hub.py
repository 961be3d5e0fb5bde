"""Offline preflight for lm-eval built-in tasks that read Hugging Face hub datasets.

The pipeline runs on machines that may have no network. A configured evaluation task from
lm-eval's built-in registry (``gsm8k``, ``hellaswag``, ...) reads a hub dataset with
``datasets.load_dataset(dataset_path, dataset_name)``; without the network that fails deep
inside an evaluation job. :func:`check_tasks` finds this out while the Snakemake DAG is
built, and stops with one line that names the dataset and how to provide it.

Rules
-----
Finding a task (:func:`find_task_yaml`, :func:`task_dataset`)
    The YAML files under ``lm_eval/tasks`` are scanned once per process for top-level lines
    ``task: NAME`` (``NAME`` optionally quoted); group files, whose ``task:`` is a list, name
    no task. ``include:`` is resolved with lm-eval's own YAML loader, without importing the
    ``!function`` helpers. lm-eval's ``TaskManager`` is never built: indexing its 14k tasks
    takes about 8 s, the scan here about 0.5 s.

Where a dataset is available (:func:`check_tasks`), first match wins
    1. ``local``: ``evaluation.datasets`` maps the dataset id to a directory (a copy of the
       dataset repository, e.g. from ``hf download --repo-type dataset ID --local-dir DIR``),
       or the task's ``dataset_path`` is a local builder (:data:`LOCAL_BUILDERS`) or an
       existing directory. A mapped directory that does not exist is an error.
    2. ``cache``: the dataset repository is in the hub cache (:func:`hub_cache_dir`,
       ``datasets--ORG--NAME/snapshots/REVISION``), or ``datasets`` has prepared the task's
       config in its cache (:func:`datasets_cache_dir`, ``ORG___NAME/CONFIG/VERSION/HASH``).
       ``datasets`` 5.2 never reads the hub cache without a network (with
       ``HF_HUB_OFFLINE=1`` it does not look, and without it retries the hub for ~50 s), so
       a hub-cache copy is read as a local directory: its snapshot is the ``local_path``.
    3. ``hub``: the hub answers (:func:`hub_reachable`).
    Anything else raises :class:`DatasetUnavailable`. Task names lm-eval does not know, and
    tasks without a ``dataset_path``, are left out: other code reports unknown tasks.

Reading a local copy (:func:`local_override`)
    A task config whose ``dataset_path`` has a local directory gets that directory as its
    ``dataset_path``, so ``datasets.load_dataset(DIR, dataset_name)`` reads the copy (the
    ``configs:`` header of its ``README.md`` maps config names to data files; see
    :func:`write_local_dataset`).

Cache locations are computed from the environment at call time, the way ``huggingface_hub``
and ``datasets`` compute them at import time (``HF_HOME``, ``HF_HUB_CACHE``,
``HF_DATASETS_CACHE``, ``XDG_CACHE_HOME``). Only ``lm_eval`` (its lazy top-level package)
and ``yaml`` are imported; neither ``datasets`` nor ``huggingface_hub`` is.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import yaml

#: ``dataset_path`` values that name a ``datasets`` builder reading local files.
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})

#: Environment variables that put ``huggingface_hub`` / ``datasets`` offline when true.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")

_TRUE = frozenset({"1", "true", "yes", "on"})
_DEFAULT_ENDPOINT = "https://huggingface.co"

# A top-level ``task:`` line (the key may be quoted) with one scalar name, double-quoted,
# single-quoted or plain;
# a list (``task: [...]`` or ``task:`` followed by ``- item`` lines) does not match.
_TASK_LINE = re.compile(
    r"""^(?:task|"task"|'task'):[ \t]*(?:"([^"\n]+)"|'([^'\n]+)'|([^\s"'#\[{!&*|>][^\s#]*))[ \t]*(?:\#.*)?$""",
    re.MULTILINE,
)


class DatasetUnavailable(Exception):
    """A configured task's dataset cannot be read here; ``str()`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def tasks_dir() -> Path:
    """The folder of lm-eval's built-in task YAMLs."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


@functools.cache
def _task_index() -> dict[str, Path]:
    """Task name -> YAML file, over every built-in task YAML (the first file in path order
    wins; in lm-eval 0.4.13 no scalar task name is defined twice)."""
    index: dict[str, Path] = {}
    for path in sorted(tasks_dir().rglob("*.yaml")):
        for match in _TASK_LINE.finditer(path.read_text(encoding="utf-8")):
            name = next(group for group in match.groups() if group)
            index.setdefault(name, path)
    return index


def find_task_yaml(name: str) -> Path | None:
    """The YAML file that defines lm-eval's built-in task ``name``, or None.

    Only files whose top-level ``task:`` is the scalar ``name`` count (group files list
    their tasks and are not a task's file). The scan is done once per process.
    """
    return _task_index().get(name)


@functools.cache
def _yaml_loader() -> ModuleType:
    """lm-eval's YAML loader module, ``lm_eval/tasks/_yaml_loader.py``.

    It is private, but lm-eval is pinned to 0.4.13 (pyproject.toml). It is loaded from its
    file because importing ``lm_eval.tasks._yaml_loader`` runs ``lm_eval/tasks/__init__.py``,
    which imports the TaskManager, ``datasets`` and ``pandas`` (about 1 s); the module itself
    needs only ``yaml``. When lm-eval's own copy is already imported, that one is used.
    """
    loaded = sys.modules.get("lm_eval.tasks._yaml_loader")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        "learnforget._lm_eval_yaml_loader", tasks_dir() / "_yaml_loader.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_task_yaml(path: str | Path) -> dict[str, Any]:
    """A task YAML as a dict, ``include:`` files merged in (the including file's keys win).

    ``!function`` tags are not imported: they load as the path of the function they name.
    """
    return _yaml_loader().load_yaml(path, resolve_func=False)


def task_dataset(name: str) -> tuple[str, str | None] | None:
    """``(dataset_path, dataset_name)`` of lm-eval's built-in task ``name``.

    None when lm-eval has no such task, or its YAML names no ``dataset_path``.
    """
    path = find_task_yaml(name)
    if path is None:
        return None
    cfg = load_task_yaml(path)
    if not cfg.get("dataset_path"):
        return None
    config = cfg.get("dataset_name")
    return str(cfg["dataset_path"]), None if config is None else str(config)


def _env_path(value: str) -> Path:
    return Path(os.path.expanduser(os.path.expandvars(value)))


def _hf_home() -> Path:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return _env_path(os.environ.get("HF_HOME") or default)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else
    ``HF_HOME/hub`` (``HF_HOME`` defaults to ``$XDG_CACHE_HOME/huggingface``, then
    ``~/.cache/huggingface``)."""
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return _env_path(value) if value else _hf_home() / "hub"


def datasets_cache_dir() -> Path:
    """The ``datasets`` cache of prepared datasets: ``HF_DATASETS_CACHE``, else
    ``HF_HOME/datasets``."""
    value = os.environ.get("HF_DATASETS_CACHE")
    return _env_path(value) if value else _hf_home() / "datasets"


def hub_snapshot(path: str) -> Path | None:
    """The newest non-empty snapshot of the hub dataset repo ``path`` in the hub cache.

    ``hub_cache_dir()/datasets--ORG--NAME/snapshots/REVISION``: the revision ``refs/main``
    names when that snapshot has files, else the most recently modified one. The snapshot is
    a copy of the repository (or of the files downloaded so far) that ``load_dataset`` can
    read as a local directory.
    """
    return cached_snapshot(path, "dataset")


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None,
                    needs: Callable[[Path], bool] | None = None) -> Path | None:
    """The hub cache snapshot of ``repo_id`` (``models--ORG--NAME`` or ``datasets--...``) that
    ``needs`` accepts (default: any non-empty one): ``revision`` as a ref or a commit, else
    ``refs/main``, else the newest."""
    repo = hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ok = needs or (lambda p: any(p.iterdir()))
    ref = repo / "refs" / (revision or "main")
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text(encoding="utf-8").strip())
    if revision:
        candidates.append(snapshots / revision)
    for c in candidates:
        if c.is_dir() and ok(c):
            return c
    if revision:  # a named revision that is not cached is not replaced by another one
        return None
    found = [s for s in snapshots.iterdir() if s.is_dir() and ok(s)]
    return max(found, key=lambda s: s.stat().st_mtime, default=None)


def _snakecase(name: str) -> str:
    # datasets.naming.camelcase_to_snakecase, which names the cache folders.
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name)
    return name.lower()


def prepared_cache(path: str, config: str | None = None) -> Path | None:
    """The folder where ``datasets`` keeps the prepared hub dataset ``path``, if it holds
    ``config`` (any config when None).

    ``datasets`` 5.2 names it ``datasets_cache_dir()/ORG___NAME`` with ``NAME`` in snake case
    (``Org/MyData`` -> ``Org___my_data``; the namespace keeps its case) and prepares each
    config in ``CONFIG/VERSION/HASH/``; offline, ``load_dataset(path, config)`` reloads it.
    """
    *namespace, dataset = path.split("/")
    root = datasets_cache_dir() / "___".join([*namespace, _snakecase(dataset)])
    if any(p.is_dir() for p in root.glob(f"{config or '*'}/*/*")):
        return root
    return None


def dataset_cached(path: str, config: str | None = None) -> bool:
    """Whether the hub dataset ``path`` is in a local cache: its repository in the hub cache
    (:func:`hub_snapshot`) or ``config`` prepared by ``datasets`` (:func:`prepared_cache`)."""
    return hub_snapshot(path) is not None or prepared_cache(path, config) is not None


def hub_offline() -> bool:
    """Whether an :data:`OFFLINE_VARIABLES` variable is true (1, true, yes, on)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in OFFLINE_VARIABLES)


@functools.cache
def _connects(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached.

    False at once when :func:`hub_offline`; else whether a TCP connection to the host of
    ``HF_ENDPOINT`` (default https://huggingface.co; port 443, or the URL's port) opens within
    ``timeout`` seconds. The connection's answer is cached per process.
    """
    if hub_offline():
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT") or _DEFAULT_ENDPOINT)
    if not url.hostname:
        return False
    return _connects(url.hostname, url.port or (80 if url.scheme == "http" else 443), timeout)


def _setting(dataset: str) -> str:
    return f"evaluation.datasets.{dataset!r}"


def _locate(
    task: str, dataset: str, config: str | None, local_paths: Mapping[str, str], reachable: Callable[[], bool]
) -> dict[str, Any]:
    """Where ``task`` reads ``dataset`` (see the module rules), or DatasetUnavailable."""

    def found(source: str, local_path: Path | None = None) -> dict[str, Any]:
        return {
            "dataset": dataset,
            "config": config,
            "source": source,
            "local_path": None if local_path is None else str(local_path),
        }

    if dataset in local_paths:
        local = _env_path(local_paths[dataset])
        if not local.is_dir():
            raise DatasetUnavailable(
                f"{_setting(dataset)} is {str(local)!r}, which is not a directory "
                f"(evaluation task {task!r} reads it): give a local copy of the dataset repository"
            )
        return found("local", local)
    if dataset in LOCAL_BUILDERS or Path(dataset).is_dir():
        return found("local")
    snapshot = hub_snapshot(dataset)
    if snapshot is not None:
        return found("cache", snapshot)
    if prepared_cache(dataset, config) is not None:
        return found("cache")
    if reachable():
        return found("hub")
    config_part = "" if config is None else f" (config {config!r})"
    raise DatasetUnavailable(
        f"evaluation task {task!r} needs the Hugging Face dataset {dataset!r}{config_part}, "
        f"which is not cached (HF hub cache {hub_cache_dir()}, datasets cache {datasets_cache_dir()}) "
        f"and the hub is not reachable: download it where there is a network "
        f"(hf download --repo-type dataset {dataset}) and copy the hub cache folder "
        f"datasets--{dataset.replace('/', '--')} into {hub_cache_dir()} (or set HF_HOME to a copied cache), "
        f"or set {_setting(dataset)} to a local copy of the dataset repository "
        f"(hf download --repo-type dataset {dataset} --local-dir DIR)"
    )


def check_tasks(
    tasks: Iterable[str],
    local_paths: Mapping[str, str] | None = None,
    *,
    reachable: Callable[[], bool] = hub_reachable,
) -> dict[str, dict[str, Any]]:
    """Check that every built-in lm-eval task in ``tasks`` can read its dataset.

    ``local_paths`` is ``evaluation.datasets``: hub dataset id -> local copy of its repository.
    Returns ``{task: {"dataset": dataset_path, "config": dataset_name, "source": "local" |
    "cache" | "hub", "local_path": DIR or None}}`` for the tasks lm-eval knows and that have a
    ``dataset_path``; ``local_path`` is the directory to read instead of ``dataset_path``
    (a local copy, or a hub-cache snapshot; pass ``{dataset: local_path}`` to
    :func:`local_override`). ``reachable`` is asked only when a dataset is neither local nor
    cached. Raises :class:`DatasetUnavailable` (see the module rules).
    """
    local_paths = local_paths or {}
    result: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(tasks):
        source = task_dataset(task)
        if source is not None:
            result[task] = _locate(task, *source, local_paths, reachable)
    return result


def local_override(task_cfg: Mapping[str, Any], local_paths: Mapping[str, str] | None) -> dict[str, Any]:
    """A copy of the task config ``task_cfg`` whose ``dataset_path`` is its local directory
    when ``local_paths`` maps it (unchanged otherwise)."""
    cfg = dict(task_cfg)
    local = (local_paths or {}).get(cfg.get("dataset_path"))
    if local is not None:
        cfg["dataset_path"] = str(_env_path(local))
    return cfg


def write_local_dataset(directory: str | Path, config_name: str, splits: Mapping[str, list[dict]]) -> Path:
    """Write config ``config_name`` of a local dataset repository that ``load_dataset`` reads.

    Each split goes to ``DIR/CONFIG/SPLIT.jsonl`` (one JSON record a line), and ``DIR/README.md``
    gets a YAML header ``configs: [{config_name, data_files: [{split, path}, ...]}]``, so
    ``datasets.load_dataset(DIR, config_name)`` loads those splits, offline too. Configs
    already in the README are kept (a config of the same name is replaced); use
    ``"default"`` for a task whose ``dataset_name`` is null. Returns the directory.
    """
    root = Path(directory)
    (root / config_name).mkdir(parents=True, exist_ok=True)
    data_files = []
    for split, records in splits.items():
        relative = f"{config_name}/{split}.jsonl"
        lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (root / relative).write_text("".join(lines), encoding="utf-8")
        data_files.append({"split": split, "path": relative})
    readme = root / "README.md"
    configs: list[dict[str, Any]] = []
    if readme.is_file():
        header = re.match(r"---\n(.*?)\n---\n", readme.read_text(encoding="utf-8"), re.DOTALL)
        configs = (yaml.safe_load(header.group(1)) or {}).get("configs", []) if header else []
    configs = [c for c in configs if c.get("config_name") != config_name]
    configs.append({"config_name": config_name, "data_files": data_files})
    front_matter = yaml.safe_dump({"configs": configs}, sort_keys=False)
    readme.write_text(f"---\n{front_matter}---\n", encoding="utf-8")
    return root
