"""Offline preflight of hub datasets for lm-eval built-in tasks (learnforget.core.hub); no network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learnforget.core import hub

ENV_VARS = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "XDG_CACHE_HOME",
    "HF_ENDPOINT",
    *hub.OFFLINE_VARIABLES,
)

GSM8K = {
    "train": [{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}] * 3,
    "test": [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}] * 2,
}


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF_HOME, no other cache variables, offline."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def fake_hub_cache(home: Path, repo_id: str, revision: str = "abc123") -> Path:
    """The hub-cache layout ``hub/datasets--ORG--NAME/{refs/main, snapshots/REV/...}``."""
    repo = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return hub.write_local_dataset(repo / "snapshots" / revision, "main", GSM8K)


def offline(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return env | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# --- built-in tasks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, dataset",
    [
        ("gsm8k", ("openai/gsm8k", "main")),
        ("hellaswag", ("Rowan/hellaswag", None)),
        ("winogrande", ("allenai/winogrande", "winogrande_xl")),  # has !function tags
        ("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge")),  # includes arc_easy.yaml
        ("aclue_ancient_chinese_culture", ("tyouisen/aclue", "ancient_chinese_culture")),  # quoted keys
    ],
)
def test_task_dataset(task, dataset):
    assert hub.task_dataset(task) == dataset


def test_unknown_task_and_groups():
    assert hub.task_dataset("no_such_task_xyz") is None
    assert hub.find_task_yaml("no_such_task_xyz") is None
    assert hub.find_task_yaml("aclue") is None  # a group: its task: is a list


def test_task_yaml_scan_is_cached():
    first = hub.find_task_yaml("gsm8k")
    assert first is not None and first.name == "gsm8k.yaml"
    start = time.perf_counter()
    assert hub.find_task_yaml("gsm8k") is first
    assert hub.find_task_yaml("hellaswag") is not None
    assert time.perf_counter() - start < 0.01
    assert hub._task_index.cache_info().misses == 1


def test_task_line_pattern():
    text = "\n".join(
        [
            "task: plain  # comment",
            '"task": "quoted"',
            "task: [a, b]",
            "task:",
            "  - listed",
            "  task: nested",
        ]
    )
    names = [next(g for g in m.groups() if g) for m in hub._TASK_LINE.finditer(text)]
    assert names == ["plain", "quoted"]


# --- caches -------------------------------------------------------------------------------


def test_cache_dirs_match_the_libraries(tmp_path):
    """Our call-time paths equal what huggingface_hub and datasets compute at import time."""
    env = offline(tmp_path) | {"HF_DATASETS_CACHE": str(tmp_path / "dsc")}
    code = (
        "import datasets.config as c, huggingface_hub.constants as h\n"
        "print(h.HF_HUB_CACHE)\n"
        "print(c.HF_DATASETS_CACHE)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "hf" / "hub"), str(tmp_path / "dsc")]


def test_cache_dirs_follow_env(hf_home, tmp_path, monkeypatch):
    assert hub.hub_cache_dir() == hf_home / "hub"
    assert hub.datasets_cache_dir() == hf_home / "datasets"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "h"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "d"))
    assert (hub.hub_cache_dir(), hub.datasets_cache_dir()) == (tmp_path / "h", tmp_path / "d")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == tmp_path / "xdg" / "huggingface" / "hub"


def test_dataset_cached_hub_cache(hf_home):
    assert not hub.dataset_cached("openai/gsm8k")
    repo = hf_home / "hub" / "datasets--openai--gsm8k"
    (repo / "snapshots").mkdir(parents=True)
    assert not hub.dataset_cached("openai/gsm8k")  # no snapshot
    (repo / "snapshots" / "old").mkdir()
    assert not hub.dataset_cached("openai/gsm8k")  # an empty snapshot
    (repo / "snapshots" / "old" / "README.md").write_text("x")
    assert hub.hub_snapshot("openai/gsm8k") == repo / "snapshots" / "old"
    hub.write_local_dataset(repo / "snapshots" / "abc123", "main", GSM8K)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert hub.hub_snapshot("openai/gsm8k") == repo / "snapshots" / "abc123"  # refs/main wins
    assert hub.dataset_cached("openai/gsm8k")


def test_dataset_cached_datasets_cache(hf_home):
    # datasets names a prepared hub dataset ORG___snake_case_name/CONFIG/VERSION/HASH.
    assert not hub.dataset_cached("Org/MyData", "main")
    (hf_home / "datasets" / "Org___my_data" / "main" / "0.0.0" / "0123abcd").mkdir(parents=True)
    assert hub.dataset_cached("Org/MyData", "main")
    assert hub.dataset_cached("Org/MyData")
    assert not hub.dataset_cached("Org/MyData", "other")
    assert hub.prepared_cache("Org/MyData") == hf_home / "datasets" / "Org___my_data"


# --- hub reachability ---------------------------------------------------------------------


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_hub_unreachable_offline_without_connecting(hf_home, monkeypatch, var):
    def connect(*args, **kwargs):
        pytest.fail("hub_reachable opened a connection while offline")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(var, "TRUE")
    monkeypatch.setattr(socket, "create_connection", connect)
    assert not hub.hub_reachable()


def test_hub_reachable_probes_endpoint(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub._connects.cache_clear()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_reachable(timeout=1.0)
    calls = []

    def refuse(address, timeout):
        calls.append((address, timeout))
        raise OSError("no network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    assert not hub.hub_reachable(timeout=0.5)
    assert not hub.hub_reachable(timeout=0.5)  # cached
    assert calls == [(("hub.example.invalid", 443), 0.5)]
    hub._connects.cache_clear()


# --- check_tasks --------------------------------------------------------------------------


def unreachable() -> bool:
    return False


def test_check_tasks_unavailable(hf_home):
    with pytest.raises(hub.DatasetUnavailable) as err:
        hub.check_tasks(["gsm8k"], reachable=unreachable)
    message = str(err.value)
    assert "\n" not in message
    for part in ("'gsm8k'", "'openai/gsm8k'", "'main'", "evaluation.datasets", "hf download", "HF_HOME"):
        assert part in message
    assert str(hf_home / "hub") in message and str(hf_home / "datasets") in message


def test_check_tasks_sources(hf_home, tmp_path):
    local = hub.write_local_dataset(tmp_path / "gsm8k", "main", GSM8K)
    assert hub.check_tasks(["gsm8k"], {"openai/gsm8k": str(local)}, reachable=unreachable) == {
        "gsm8k": {"dataset": "openai/gsm8k", "config": "main", "source": "local", "local_path": str(local)}
    }
    hubbed = hub.check_tasks(["gsm8k", "hellaswag"], reachable=lambda: True)
    assert {t: r["source"] for t, r in hubbed.items()} == {"gsm8k": "hub", "hellaswag": "hub"}
    assert hubbed["hellaswag"]["local_path"] is None
    snapshot = fake_hub_cache(hf_home, "openai/gsm8k")
    cached = hub.check_tasks(["gsm8k"], reachable=unreachable)["gsm8k"]
    assert (cached["source"], cached["local_path"]) == ("cache", str(snapshot))
    (hf_home / "datasets" / "Rowan___hellaswag" / "default" / "0.0.0" / "f00d").mkdir(parents=True)
    prepared = hub.check_tasks(["hellaswag"], reachable=unreachable)["hellaswag"]
    assert (prepared["source"], prepared["local_path"]) == ("cache", None)


def test_check_tasks_missing_local_path(hf_home, tmp_path):
    with pytest.raises(hub.DatasetUnavailable, match=r"evaluation\.datasets\.'openai/gsm8k' is .*missing"):
        hub.check_tasks(["gsm8k"], {"openai/gsm8k": str(tmp_path / "missing")}, reachable=lambda: True)


def test_check_tasks_skips_unknown_and_local_builders(hf_home, tmp_path, monkeypatch):
    assert hub.check_tasks(["lf_math", "no_such_task_xyz"], reachable=unreachable) == {}
    assert hub.task_dataset("ruler_cwe") is None  # a built-in task without a dataset_path
    assert hub.check_tasks(["ruler_cwe"], reachable=unreachable) == {}
    for path in ("json", str(tmp_path)):  # a local builder, an existing directory
        monkeypatch.setattr(hub, "task_dataset", lambda name: (path, None))
        assert hub.check_tasks(["my_task"], reachable=unreachable) == {
            "my_task": {"dataset": path, "config": None, "source": "local", "local_path": None}
        }


def test_local_override(tmp_path):
    cfg = {"task": "gsm8k", "dataset_path": "openai/gsm8k", "dataset_name": "main"}
    moved = hub.local_override(cfg, {"openai/gsm8k": str(tmp_path)})
    assert moved == cfg | {"dataset_path": str(tmp_path)}
    assert cfg["dataset_path"] == "openai/gsm8k"
    assert hub.local_override(cfg, {"Rowan/hellaswag": str(tmp_path)}) == cfg
    assert hub.local_override(cfg, None) == cfg


# --- a local copy is read by the real datasets library ------------------------------------


def test_local_copies_load_with_datasets_offline(hf_home, tmp_path):
    """The documented remedies work: a local copy (evaluation.datasets) and a hub-cache
    snapshot are both read by datasets.load_dataset(DIR, config) with the hub offline."""
    local = hub.write_local_dataset(tmp_path / "gsm8k", "main", GSM8K)
    hub.write_local_dataset(local, "socratic", {"test": GSM8K["test"][:1]})
    fake_hub_cache(hf_home, "openai/gsm8k")
    found = hub.check_tasks(["gsm8k"], {"openai/gsm8k": str(local)}, reachable=unreachable)["gsm8k"]
    snapshot = hub.check_tasks(["gsm8k"], reachable=unreachable)["gsm8k"]["local_path"]
    task_cfg = {"dataset_path": "openai/gsm8k", "dataset_name": "main"}
    cfg = hub.local_override(task_cfg, {"openai/gsm8k": found["local_path"]})
    loads = [(cfg["dataset_path"], "main"), (str(local), "socratic"), (snapshot, "main")]
    code = (
        "import json, sys, datasets\n"
        "out = []\n"
        "for path, name in json.loads(sys.argv[1]):\n"
        "    d = datasets.load_dataset(path, name)\n"
        "    out.append({s: d[s].num_rows for s in d})\n"
        "print(json.dumps(out + [d['test'][0]]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(loads)], env=offline(tmp_path), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    *rows, record = json.loads(run.stdout.splitlines()[-1])
    assert rows == [{"train": 3, "test": 2}, {"test": 1}, {"train": 3, "test": 2}]
    assert record == GSM8K["test"][0]
