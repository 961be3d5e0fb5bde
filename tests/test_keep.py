"""The disk keep policy: superseded checkpoints drop their training state, stay intact, and
continuing from them still gives the same weights; disk used per run."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import yaml

from learnforget.study import config as lfconfig
from learnforget.core import integrity
from learnforget.train import keep
from learnforget.core.integrity import DROPPED, CorruptCheckpoint
from learnforget.core.io import read_json, sha256_file, write_json
from learnforget.report.markdown import disk_table
from learnforget.train.loop import finetune
from test_train import CFG, _same_weights, _weights, world  # noqa: F401  (world: a fixture)
from workflow_utils import REPO

TINY = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())


def _runs(**finetune_overrides):
    raw = copy.deepcopy(TINY)
    raw["finetune"].update(finetune_overrides)
    return {r.name: r for r in lfconfig.expand_runs(lfconfig.validate(raw))}


# ----------------------------------------------------------------------------- integrity
def _fake_ckpt(path, files, **manifest):
    path.mkdir(parents=True)
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    write_json(path / "manifest.json", {"files": {rel: sha256_file(path / rel) for rel in files}, **manifest})
    return path


def test_integrity_treats_a_file_dropped_by_policy_as_intact_and_nothing_else(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "runs" / "r" / "1", {"model/model.safetensors": b"w" * 100, "state.pt": b"s" * 50})
    freed = keep.drop_training_state(ckpt, reason="test")
    assert freed == 50 and not (ckpt / "state.pt").exists()
    record = read_json(ckpt / DROPPED)["files"]["state.pt"]
    assert record["size"] == 50 and record["sha256"] == read_json(ckpt / "manifest.json")["files"]["state.pt"]
    integrity.verify(ckpt, cache=False)
    integrity.verify(ckpt)  # with the stamp
    assert integrity.scan(tmp_path, log=None) == []
    assert keep.drop_training_state(ckpt, reason="again") == 0  # idempotent
    # a record for other contents does not cover the missing file
    bad = read_json(ckpt / DROPPED)
    bad["files"]["state.pt"]["sha256"] = "ab" * 32
    write_json(ckpt / DROPPED, bad)
    with pytest.raises(CorruptCheckpoint, match=r"state.pt: missing"):
        integrity.verify(ckpt)
    (ckpt / DROPPED).write_text("{not json")  # an unreadable record records nothing
    with pytest.raises(CorruptCheckpoint, match=r"state.pt: missing"):
        integrity.verify(ckpt)
    # a recorded file that is still there (a drop interrupted before its unlink) is verified as usual
    other = _fake_ckpt(tmp_path / "other", {"model/model.safetensors": b"w", "state.pt": b"s" * 9})
    write_json(other / DROPPED, {"files": {"state.pt": {"sha256": sha256_file(other / "state.pt"), "size": 9}}})
    (other / "state.pt").write_bytes(b"t" * 9)
    with pytest.raises(CorruptCheckpoint, match=r"state.pt: sha256 mismatch"):
        integrity.verify(other, cache=False)
    # the model itself is never covered
    write_json(other / DROPPED, {"files": {"model/model.safetensors": {"sha256": "0" * 64}}})
    (other / "model" / "model.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match=r"model/model.safetensors: missing"):
        integrity.verify(other, cache=False)


def test_a_drop_changes_no_date_snakemake_or_the_folder_has(tmp_path):
    ckpt = _fake_ckpt(tmp_path / "1", {"model/model.safetensors": b"w", "state.pt": b"s" * 10})
    (ckpt / ".snakemake_timestamp").write_text("")
    os.utime(ckpt / ".snakemake_timestamp", ns=(10**18, 10**18))
    os.utime(ckpt, ns=(10**18, 10**18))
    keep.drop_training_state(ckpt, reason="test")
    assert os.stat(ckpt / ".snakemake_timestamp").st_mtime_ns == os.stat(ckpt).st_mtime_ns == 10**18


# ----------------------------------------------------------------------------- which checkpoints drop
def _chain(root, labels, *, trunks=(), leaves=False):
    """Fake finished checkpoints of a run, each recording what it continued from like finetune does."""
    made = {}
    for prefix, chain in (("trunk/", trunks), ("", labels)):
        for i, label in enumerate(chain):
            if leaves or prefix == "":
                prev = f"trunk/{label}" if trunks and prefix == "" else (
                    None if leaves or i == 0 else f"{prefix}{chain[i - 1]}")
            else:
                prev = None if i == 0 else f"trunk/{chain[i - 1]}"
            fp = keep.manifest_fingerprint(made[prev]) if prev else None
            made[f"{prefix}{label}"] = _fake_ckpt(root / f"{prefix}{label}", {"model/w": label.encode(),
                                                  "state.pt": b"s" * 10}, continued_from_manifest=fp)
    return made


def test_continue_mode_drops_all_but_the_newest_once_continued(tmp_path):
    run = _runs()["math-lora"]
    assert run.mode == "continue" and keep.dependents(run) == {"1": ["2"]}
    root = tmp_path / "runs" / "math-lora"
    _chain(root, ["1"])
    assert keep.prune_run(run, tmp_path) == []  # 2 is not finished: 1 is the newest so far
    shutil.rmtree(root)
    _chain(root, ["1", "2"])
    assert keep.prune_run(run, tmp_path, "all") == []
    done = keep.prune_run(run, tmp_path)
    assert [(p.relative_to(root).as_posix(), n) for p, n in done] == [("1", 10)]
    assert not (root / "1" / "state.pt").exists() and (root / "2" / "state.pt").exists()
    assert keep.prune_run(run, tmp_path) == []
    with pytest.raises(ValueError, match="keep.optimizer_state"):
        keep.prune_run(run, tmp_path, "oldest")


def test_a_checkpoint_rebuilt_under_an_old_successor_keeps_its_state(tmp_path):
    """2 continued from an earlier 1; 1 was rebuilt since (forcerun, a changed setting): 2 is about
    to be rebuilt from the new 1, which must not lose its state before that."""
    run = _runs()["math-lora"]
    root = tmp_path / "runs" / "math-lora"
    _chain(root, ["1", "2"])
    shutil.rmtree(root / "1")
    _fake_ckpt(root / "1", {"model/w": b"new", "state.pt": b"s" * 10})
    assert keep.prune_run(run, tmp_path) == [] and (root / "1" / "state.pt").exists()


def test_branch_mode_keeps_the_newest_trunk_and_branch(tmp_path):
    run = _runs()["code-lora"]
    assert run.mode == "branch"
    assert keep.dependents(run) == {"trunk/1": ["trunk/2", "1"], "trunk/2": ["2"]}
    root = tmp_path / "runs" / "code-lora"
    _chain(root, ["1", "2"], trunks=["1", "2"])
    shutil.rmtree(root / "2")  # trunk/1 is continued by trunk/2 and branch 1 only once both exist
    dropped = {p.relative_to(root).as_posix() for p, _ in keep.prune_run(run, tmp_path)}
    assert dropped == {"trunk/1"}
    _fake_ckpt(root / "2", {"model/w": b"2", "state.pt": b"s" * 10},
               continued_from_manifest=keep.manifest_fingerprint(root / "trunk" / "2"))
    dropped = {p.relative_to(root).as_posix() for p, _ in keep.prune_run(run, tmp_path)}
    assert dropped == {"1"}  # a cool-down branch nothing continues from, superseded by 2
    assert all((root / d / "state.pt").exists() for d in ("2", "trunk/2"))  # the newest keep it


def test_restart_mode_drops_once_the_next_duration_is_finished(tmp_path):
    run = _runs(schedule="cosine")["math-lora"]
    assert run.mode == "restart" and keep.dependents(run) == {}
    root = tmp_path / "runs" / "math-lora"
    _chain(root, ["1"], leaves=True)
    assert keep.prune_run(run, tmp_path) == []
    _fake_ckpt(root / "2", {"model/w": b"2", "state.pt": b"s"})
    assert [p.name for p, _ in keep.prune_run(run, tmp_path)] == ["1"]


def test_a_damaged_checkpoint_is_left_to_the_integrity_scan(tmp_path):
    run = _runs()["math-lora"]
    root = tmp_path / "runs" / "math-lora"
    _chain(root, ["1", "2"])
    (root / "1" / "state.pt").write_bytes(b"damaged!!!")
    assert keep.prune_run(run, tmp_path) == [] and (root / "1" / "state.pt").exists()


# ----------------------------------------------------------------------------- real training
def test_continuing_from_a_checkpoint_without_its_state_replays_with_the_same_weights(world, tmp_path):  # noqa: F811
    """Training state dropped from 1 once 2 continued from it; the newest still continues; a
    duration inserted before 2 (needs 1's state) replays from the base with the same weights
    as continuing from an untouched copy of 1."""
    run = _runs()["math-lora"]
    root = tmp_path / "results" / "runs" / "math-lora"
    kw = dict(method={"type": "full"}, train_cfg=CFG, durations=[1, 1.5, 2, 3], progress=False)
    ft = lambda d, out, prev=None: finetune(world / "base", world / "math_ift", "ift", duration=d,  # noqa: E731
                                            out_dir=out, prev_checkpoint_dir=prev, **kw)
    ft(1, root / "1")
    shutil.copytree(root / "1", tmp_path / "copy1")
    two = ft(2, root / "2", root / "1")
    assert two["continued_from_manifest"] == keep.manifest_fingerprint(root / "1")
    (done,) = keep.prune_run(run, tmp_path / "results")
    assert done == (root / "1", (tmp_path / "copy1" / "state.pt").stat().st_size)
    assert not keep.has_training_state(root / "1") and keep.has_training_state(root / "2")
    assert integrity.scan(tmp_path / "results", log=None) == []
    # the newest continues as before
    three = ft(3, tmp_path / "3", root / "2")
    assert three["continued_from"] == str(root / "2") and three["start_step"] == two["step"]
    # a duration between 1 and 2 needs 1's state: replayed from the base, same weights
    replayed = ft(1.5, tmp_path / "1.5", root / "1")
    assert replayed["continued_from"] is None and replayed["start_step"] == 0
    assert "dropped by the keep policy" in replayed["note"]
    ft(1.5, tmp_path / "1.5-continued", tmp_path / "copy1")
    assert _same_weights(_weights(tmp_path / "1.5"), _weights(tmp_path / "1.5-continued"))
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k != "elapsed"}  # noqa: E731
                       for line in (p / "train_log.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "1.5") == strip(tmp_path / "1.5-continued")


def test_a_cooldown_branch_rebuilt_from_a_trunk_without_state_replays_exactly(world, tmp_path):  # noqa: F811
    run = _runs()["code-lora"]
    root = tmp_path / "results" / "runs" / "code-lora"
    cfg = dict(CFG, schedule="wsd", cooldown_fraction=0.4, warmup_steps=2, min_lr_ratio=0.0)
    kw = dict(method={"type": "lora", "rank": 4}, train_cfg=cfg, durations=[1, 2], progress=False)
    ft = lambda d, out, prev=None, part="final": finetune(  # noqa: E731
        world / "base", world / "math_ift", "ift", duration=d, part=part, out_dir=out, prev_checkpoint_dir=prev, **kw)
    ft(1, root / "trunk" / "1", part="trunk")
    ft(1, root / "1", root / "trunk" / "1")
    ft(2, root / "trunk" / "2", root / "trunk" / "1", part="trunk")
    ft(2, root / "2", root / "trunk" / "2")
    dropped = {p.relative_to(root).as_posix() for p, _ in keep.prune_run(run, tmp_path / "results")}
    assert dropped == {"trunk/1", "1"}
    rebuilt = ft(1, tmp_path / "1-again", root / "trunk" / "1")  # e.g. after its quarantine
    assert rebuilt["continued_from"] is None and rebuilt["step"] == read_json(root / "1" / "manifest.json")["step"]
    assert _same_weights(_weights(tmp_path / "1-again"), _weights(root / "1"))


# ----------------------------------------------------------------------------- disk use
def test_disk_usage_per_run_and_in_the_report(tmp_path):
    res = tmp_path / "results"
    ckpt = _fake_ckpt(res / "runs" / "a" / "1", {"model/w": b"w" * 1000, "state.pt": b"s" * 500})
    keep.drop_training_state(ckpt, reason="test")
    (res / "resume" / "a" / "2").mkdir(parents=True)
    (res / "resume" / "a" / "2" / "state.pt").write_bytes(b"r" * 300)
    (res / "evals" / "a").mkdir(parents=True)
    (res / "evals" / "a" / "1.json").write_bytes(b"e" * 70)
    (res / "spectral" / "a").mkdir(parents=True)
    (res / "spectral" / "a" / "1.csv").write_bytes(b"c" * 30)
    (res / "base" / "model").mkdir(parents=True)
    (res / "base" / "model" / "model.safetensors").write_bytes(b"b" * 2000)
    (res / "metrics.csv").write_bytes(b"m" * 5)
    disk = keep.disk_usage(res, ["a", "b"]).set_index("run")
    a = disk.loc["a"]
    manifest_and_record = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    assert a["checkpoints"] == 1000 + manifest_and_record and a["resume"] == 300
    assert (a["evaluations"], a["analysis"], a["freed_by_keep_policy"]) == (70, 30, 500)
    assert a["total"] == a["checkpoints"] + 300 + 70 + 30
    assert disk.loc["b", "total"] == 0 and disk.loc["base", "checkpoints"] == 2000
    assert disk.loc["all of results/", "total"] == a["total"] + 2000 + 5
    lines = "\n".join(disk_table(disk.reset_index()))
    assert "**Disk used per run (MiB)**" in lines and "| a |" in lines and "freed by the keep policy" in lines


def test_a_failing_drop_never_fails_the_job_that_prunes(tmp_path, monkeypatch):
    """Pruning runs after a training job's output is complete: an error is logged, not raised
    (a failed job would have its finished output deleted by Snakemake)."""
    run = _runs()["math-lora"]
    root = tmp_path / "runs" / "math-lora"
    _chain(root, ["1", "2"])

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keep, "drop_training_state", broken)
    lines = []
    assert keep.prune_run(run, tmp_path, log=lines.append) == []
    assert len(lines) == 1 and "left" in lines[0] and "No space left" in lines[0]
    assert (root / "1" / "state.pt").exists()
