"""Checkpoint integrity (learnforget.core.integrity): fake checkpoints with real manifests, no model."""

import json
import os
import time
from pathlib import Path

import pytest

from learnforget.core import integrity
from learnforget.core.integrity import STAMP, CorruptCheckpoint, quarantine, scan, verify
from learnforget.core.io import sha256_file

OLD = time.time() - 3600  # files "written an hour ago": past the racy window, so stamps are trusted

ADAPTER = {
    "model/adapter_model.safetensors": b"\x01weights" * 4096,
    "model/adapter_config.json": b'{"r": 8}',
    "state.pt": b"optimiser-state" * 1000,
    "train_log.jsonl": b'{"step": 1}\n',
}


def make_ckpt(path: Path, files=ADAPTER, mtime=OLD) -> Path:
    """A checkpoint folder as training leaves it: the files, a manifest of their sha256, Snakemake's timestamp."""
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
        os.utime(path / rel, (mtime, mtime))
    manifest = {"kind": "finetune", "files": {rel: sha256_file(path / rel) for rel in files}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / ".snakemake_timestamp").touch()
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def hashes(monkeypatch):
    """Count the files learnforget.core.integrity hashes."""
    calls = []

    def counting(path):
        calls.append(Path(path).name)
        return sha256_file(path)

    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


def corrupt_message(ckpt, **kw) -> str:
    with pytest.raises(CorruptCheckpoint) as info:
        verify(ckpt, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(ckpt) in msg
    return msg


def test_intact_checkpoint_verifies_and_the_stamp_spares_rehashing(tmp_path, hashes):
    ckpt = make_ckpt(tmp_path / "ckpt")
    dir_mtime = os.stat(ckpt).st_mtime_ns
    verify(ckpt)
    assert sorted(hashes) == sorted(Path(r).name for r in ADAPTER)
    stamp = json.loads((ckpt / STAMP).read_text())
    assert set(stamp["files"]) == set(ADAPTER)
    assert os.stat(ckpt).st_mtime_ns == dir_mtime  # writing the stamp leaves the folder's mtime alone
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    hashes.clear()
    stamp_mtime = os.stat(ckpt / STAMP).st_mtime_ns
    verify(ckpt)
    assert hashes == []
    assert os.stat(ckpt / STAMP).st_mtime_ns == stamp_mtime  # unchanged stamp is not rewritten
    verify(ckpt, cache=False)
    assert len(hashes) == len(ADAPTER)


def test_cache_false_neither_reads_nor_writes_the_stamp(tmp_path, hashes):
    ckpt = make_ckpt(tmp_path / "ckpt")
    verify(ckpt, cache=False)
    verify(ckpt, cache=False)
    assert len(hashes) == 2 * len(ADAPTER)
    assert not (ckpt / STAMP).exists()


def test_racily_clean_files_are_hashed_again(tmp_path, hashes):
    ckpt = make_ckpt(tmp_path / "ckpt", mtime=time.time())  # just written: same tick as the verification
    verify(ckpt)
    verify(ckpt)
    assert len(hashes) == 2 * len(ADAPTER)


@pytest.mark.parametrize("damage, file, why", [
    ("truncate", "model/adapter_model.safetensors", "sha256 mismatch"),
    ("flip", "state.pt", "sha256 mismatch"),
    ("delete", "model/adapter_config.json", "missing"),
    ("delete", "manifest.json", "missing"),
    ("no_files", "manifest.json", 'no "files"'),
    ("empty_files", "manifest.json", 'no "files"'),
    ("bad_json", "manifest.json", "not valid JSON"),
    ("escape", "manifest.json", "outside the checkpoint"),
    ("dir", "state.pt", "not a regular file"),
])
def test_damage_is_named(tmp_path, damage, file, why):
    ckpt = make_ckpt(tmp_path / "ckpt")
    target = ckpt / file
    if damage == "truncate":
        with open(target, "r+b") as fh:
            fh.truncate(100)
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))  # same size, new mtime
    elif damage == "delete":
        target.unlink()
    elif damage == "no_files":
        target.write_text(json.dumps({"kind": "finetune"}))
    elif damage == "empty_files":
        target.write_text(json.dumps({"files": {}}))
    elif damage == "bad_json":
        target.write_text('{"files": {"state.pt": ')
    elif damage == "escape":
        target.write_text(json.dumps({"files": {"../elsewhere": "0" * 64}}))
    elif damage == "dir":
        target.unlink()
        target.mkdir()
    for cache in (True, False):
        msg = corrupt_message(ckpt, cache=cache)
        assert f"({file}: " in msg and why in msg, msg
    assert not (ckpt / STAMP).exists()  # a corrupt checkpoint gets no stamp


def test_missing_files_are_reported_before_anything_is_hashed(tmp_path, hashes):
    ckpt = make_ckpt(tmp_path / "ckpt")
    (ckpt / "train_log.jsonl").unlink()
    (ckpt / "state.pt").write_bytes(b"x")
    assert "(train_log.jsonl: missing)" in corrupt_message(ckpt)
    assert hashes == []


def test_a_missing_folder_is_absent_not_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError):
        verify(tmp_path / "nothing")
    assert not integrity.is_intact(tmp_path / "nothing")


@pytest.mark.parametrize("change", ["truncate", "same_size_new_mtime", "same_size_restored_mtime", "replace"])
def test_changes_after_a_successful_verification_are_caught(tmp_path, change):
    ckpt = make_ckpt(tmp_path / "ckpt")
    verify(ckpt)
    assert (ckpt / STAMP).exists()
    time.sleep(0.05)  # past the coarse timestamp tick of the files' creation, so a write moves their ctime
    target = ckpt / "model/adapter_model.safetensors"
    size = target.stat().st_size
    if change == "truncate":
        os.truncate(target, size // 2)
        os.utime(target, (OLD, OLD))  # even with the old mtime put back
    elif change == "same_size_new_mtime":
        with open(target, "r+b") as fh:
            fh.seek(10)
            fh.write(b"\xff\xfe")
    elif change == "same_size_restored_mtime":  # size and mtime as stamped: ctime still tells
        with open(target, "r+b") as fh:
            fh.seek(10)
            fh.write(b"\xff\xfe")
        os.utime(target, (OLD, OLD))
    elif change == "replace":  # a new file renamed over it, mtime set to the stamped one
        new = ckpt / "new.bin"
        new.write_bytes(b"\x00" * size)
        os.utime(new, (OLD, OLD))
        os.replace(new, target)
    msg = corrupt_message(ckpt)
    assert "(model/adapter_model.safetensors: sha256 mismatch" in msg
    if change == "truncate":
        assert f"{size} when last verified" in msg


def test_a_stale_or_broken_stamp_is_ignored(tmp_path, hashes):
    ckpt = make_ckpt(tmp_path / "ckpt")
    verify(ckpt)
    stamp = json.loads((ckpt / STAMP).read_text())
    stamp["files"]["state.pt"]["sha256"] = "0" * 64  # stamped for other contents
    (ckpt / STAMP).write_text(json.dumps(stamp))
    hashes.clear()
    verify(ckpt)
    assert hashes == ["state.pt"]
    (ckpt / STAMP).write_text("{not json")
    hashes.clear()
    verify(ckpt)
    assert len(hashes) == len(ADAPTER)
    assert json.loads((ckpt / STAMP).read_text())["files"]["state.pt"]["sha256"] == sha256_file(ckpt / "state.pt")


def test_a_changed_manifest_is_not_vouched_for_by_the_stamp(tmp_path):
    ckpt = make_ckpt(tmp_path / "ckpt")
    verify(ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["state.pt"] = "ab" * 32
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "(state.pt: sha256 mismatch" in corrupt_message(ckpt)


def test_quarantine_moves_the_folder_intact(tmp_path):
    results = tmp_path / "results"
    ckpt = make_ckpt(results / "runs" / "math-lora" / "2")
    (ckpt / "state.pt").write_bytes(b"damaged")
    before = snapshot(ckpt)
    dest = quarantine(ckpt, results / "quarantine")
    assert not ckpt.exists()
    assert dest.parent == results / "quarantine" / "runs" / "math-lora" / "2"
    assert dest.name.endswith("Z")
    assert snapshot(dest) == before
    again = quarantine(make_ckpt(ckpt), results / "quarantine", results_dir=results)
    assert again.parent == dest.parent and again != dest and dest.exists()


def test_quarantine_across_filesystems_copies_then_removes(tmp_path, monkeypatch):
    import errno

    ckpt = make_ckpt(tmp_path / "results" / "base" / "model")
    before = snapshot(ckpt)
    rename = os.rename

    def cross_device(src, dst):
        if Path(src) == ckpt:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst)

    monkeypatch.setattr(integrity.os, "rename", cross_device)
    dest = quarantine(ckpt, tmp_path / "elsewhere", results_dir=tmp_path / "results")
    assert dest.parent == tmp_path / "elsewhere" / "base" / "model"
    assert snapshot(dest) == before and not ckpt.exists()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]


def build_results(root: Path) -> Path:
    results = root / "results"
    make_ckpt(results / "base" / "model", {"model.safetensors": b"base" * 1000, "config.json": b"{}"})
    for d in ("1", "2"):
        make_ckpt(results / "runs" / "math-lora" / d)
        make_ckpt(results / "runs" / "code-full" / "trunk" / d,
                  {"model/model.safetensors": b"full" * 1000, "model/config.json": b"{}", "state.pt": b"s" * 99})
    # not checkpoints: the leftovers of atomic writes, a run's other folders
    make_ckpt(results / "runs" / "math-lora" / ".2.x1y2.tmp")
    make_ckpt(results / "runs" / "math-lora" / ".2.old")
    (results / "runs" / "math-lora" / "notes").mkdir()
    return results


def test_scan_quarantines_the_corrupt_ones_and_then_finds_none(tmp_path):
    results = build_results(tmp_path)
    with open(results / "runs/math-lora/2/model/adapter_model.safetensors", "r+b") as fh:
        fh.truncate(10)
    (results / "runs/code-full/trunk/1/state.pt").write_bytes(b"t" * 99)
    assert len(integrity.checkpoint_dirs(results)) == 5
    lines = []
    bad = scan(results, quarantine_root=results / "quarantine", log=lines.append)
    assert [p for p, _ in bad] == [results / "runs/code-full/trunk/1", results / "runs/math-lora/2"]
    assert bad[0][1].startswith("state.pt: sha256 mismatch")
    assert bad[1][1].startswith("model/adapter_model.safetensors: sha256 mismatch")
    assert len(lines) == 2
    for (path, reason), line in zip(bad, lines):
        assert line.startswith(f"learn-forget: checkpoint {path} is corrupt ({reason}); moved to {results / 'quarantine'}")
        assert line.endswith("; it will be rebuilt")
        assert not path.exists()
    assert (results / "quarantine/runs/math-lora/2").is_dir()
    assert len(list((results / "quarantine/runs/code-full/trunk/1").iterdir())) == 1
    assert (results / "base/model").is_dir() and (results / "runs/math-lora/1").is_dir()
    lines.clear()
    assert scan(results, quarantine_root=results / "quarantine", log=lines.append) == []
    assert lines == []


def test_scan_without_a_quarantine_only_reports(tmp_path):
    results = build_results(tmp_path)
    (results / "runs/math-lora/1/manifest.json").unlink()
    (results / "runs/math-lora/4").mkdir()  # empty, at an output's path: Snakemake would take it as done
    lines = []
    bad = scan(results, log=lines.append)
    assert [(p.name, r) for p, r in bad] == [("1", "manifest.json: missing"), ("4", "manifest.json: missing")]
    assert lines == [f"learn-forget: checkpoint {p} is corrupt ({r})" for p, r in bad]
    assert (results / "runs/math-lora/1").is_dir()
    assert scan(tmp_path / "no-results", log=lines.append) == []


def test_scan_is_read_only_without_cache(tmp_path):
    results = build_results(tmp_path)
    before = snapshot(results)
    assert scan(results, cache=False, log=None) == []
    assert snapshot(results) == before
    assert not list(results.rglob(STAMP))


def test_the_command_line(tmp_path, capsys):
    results = build_results(tmp_path)
    assert integrity.main([str(results)]) == 0
    assert "5 checkpoints, 0 corrupt" in capsys.readouterr().out
    (results / "base/model/config.json").write_text("{ }")
    assert integrity.main([str(results), "--full"]) == 1
    assert "base/model is corrupt (config.json: sha256 mismatch" in capsys.readouterr().err


def test_the_exception_pickles():
    import pickle

    exc = pickle.loads(pickle.dumps(CorruptCheckpoint("results/runs/x/2", "state.pt", "missing")))
    assert str(exc) == "checkpoint results/runs/x/2 is corrupt (state.pt: missing)"


def test_verify_managed_leaves_foreign_model_folders_alone(tmp_path):
    from learnforget.core.integrity import verify_managed

    (tmp_path / "hf-model").mkdir()
    (tmp_path / "hf-model" / "config.json").write_text("{}")
    assert verify_managed(tmp_path / "hf-model") is False
