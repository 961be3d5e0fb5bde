"""Interruption end to end: jobs of every stage killed (before their commit, or mid-write), and
Snakemake itself killed, then rerun as the README says: nothing half-written is ever used and
the results are byte-identical to an uninterrupted run (the session's ``tiny_study``)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from learnforget.core.io import CRASH_ENV, read_json, read_jsonl
from workflow_utils import REPO, snakemake

TINY = REPO / "tests" / "tiny.yaml"


def _snakemake_cmd(work: Path, configfile: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(configfile), *args]


def _crashing(work: Path, pattern: str, *args: str) -> str:
    """Run Snakemake with every output matching ``pattern`` SIGKILLing its writer just before
    the rename; return its output (it must fail)."""
    proc = subprocess.run(_snakemake_cmd(work, TINY, "--cores", "2", *args), capture_output=True, text=True,
                          timeout=600, env={**os.environ, CRASH_ENV: pattern})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    return out


def _staging(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def _losses(ckpt: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in read_jsonl(ckpt / "train_log.jsonl")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


UPSTREAM = [  # (rules killed in one Snakemake call, the outputs they write, the target asked for)
    (("data_source", "data_math", "data_code"), "results/data/*/train.jsonl",
     ["results/data/source/train.jsonl", "results/data/math/train.jsonl", "results/data/code/train.jsonl"]),
    (("tokenizer",), "results/tokenizer", ["results/tokenizer"]),
    (("tokenize",), "results/tokens/*", ["results/tokens/source", "results/tokens/math_generic"]),
    (("base",), "results/base/model", ["results/base/model"]),
]


@pytest.mark.e2e
def test_killed_data_tokenizer_tokenize_and_base_jobs_then_plain_rerun_rebuild_the_same_base(tiny_study, tmp_path):
    """Each upstream rule is SIGKILLed in turn (just before its rename), in one study folder; a
    plain rerun then builds a base model byte-identical to the uninterrupted study's, from
    byte-identical data, tokenizer and tokens (so everything downstream is identical too)."""
    work = tmp_path / "study"
    work.mkdir()
    for rules, pattern, outputs in UPSTREAM:
        out = _crashing(work, f"*{pattern}", "--keep-going", *outputs)
        for rule in rules:
            assert f"Error in rule {rule}" in out, (rule, out[-3000:])
        for output in outputs:
            target = work / output
            assert not target.exists(), output  # nothing half-written under the final name
            assert _staging(target), output  # the killed writer's staging folder
    snakemake(work, TINY, "--cores", "2", "results/base/model")
    res, ref = work / "results", tiny_study / "results"
    base = read_json(res / "base" / "model" / "manifest.json")["files"]
    assert base.pop("train_log.jsonl") and len(base) >= 4  # the log holds wall times
    assert base == {k: v for k, v in read_json(ref / "base" / "model" / "manifest.json")["files"].items()
                    if k != "train_log.jsonl"}
    assert (res / "base" / "model" / "model.safetensors").read_bytes() == \
        (ref / "base" / "model" / "model.safetensors").read_bytes()
    assert _losses(res / "base" / "model") == _losses(ref / "base" / "model")
    assert sorted(p.name for p in (res / "tokens").iterdir()) == ["math_generic", "source"]  # the base's
    for folder in ("data", "tokenizer", "tokens/source", "tokens/math_generic"):
        assert _files(res / folder) == _files(ref / folder), folder
    for _, _, outputs in UPSTREAM:
        for output in outputs:
            assert not _staging(work / output), output  # cleaned up by the rerun


# ----------------------------------------------------------------------------- processes
def _ppids() -> dict[int, int]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> list[int]:
    ppids, found, todo = _ppids(), [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in ppids.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _train_job(snakemake_pid: int) -> list[int]:
    """The processes of a running train job under a Snakemake process (the shell Snakemake
    starts and the Python running the rule's script)."""
    return [pid for pid in _descendants(snakemake_pid) if re.search(r"\.train\.py\b", _cmdline(pid))]


def _start(work: Path, config: Path, log: Path) -> subprocess.Popen:
    """Snakemake in a process group of its own, its output in ``log``."""
    with open(log, "w") as fh:
        return subprocess.Popen(_snakemake_cmd(work, config, "--cores", "2"), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_for(what: str, cond, proc: subprocess.Popen, log: Path, limit_s: float = 600):
    """Poll ``cond`` until it returns something true (the limit only keeps a broken run from hanging)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {what} within {limit_s} s")


@pytest.mark.e2e
def test_a_job_killed_mid_write_and_then_snakemake_killed_then_the_documented_rerun(tiny_study, tmp_path):
    """A training job is SIGKILLed while it trains inside its staging folder (after its first
    resume snapshot); Snakemake reports the failure and nothing is under the final name. The
    plain rerun resumes it, and Snakemake itself is SIGKILLed mid-job with its whole process
    group. The README's commands (``--unlock``, then the plain command) finish the study with
    byte-identical tables, the job resumed from its snapshot."""
    work = tmp_path / "copy"
    shutil.copytree(tiny_study, work, symlinks=True)
    res = work / "results"
    target = res / "runs" / "math-lora" / "2"
    shutil.rmtree(target)
    (res / "report.md").unlink()  # what depends on the checkpoint is rebuilt (see test_workflow's kill tests)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["finetune"]["save_every_steps"] = 1  # a runtime setting: retrains nothing by itself
    config = tmp_path / "snapshots.yaml"
    config.write_text(yaml.safe_dump(cfg))
    snapshot = res / "resume" / "math-lora" / "2" / "job.json"

    # 1. the job, killed mid-write: it has a staging folder and has snapshotted at least once
    log = tmp_path / "killed-job.log"
    proc = _start(work, config, log)
    job = _wait_for("a training job with a snapshot", lambda: snapshot.exists() and _staging(target)
                    and _train_job(proc.pid), proc, log)
    for pid in job:  # freeze it where it is, then kill it
        os.kill(pid, signal.SIGSTOP)
    assert not target.exists() and _staging(target)
    for pid in job:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=600)
    out = log.read_text()
    assert proc.returncode != 0 and "Error in rule train" in out, out[-3000:]
    assert not target.exists() and _staging(target) and snapshot.exists()

    # 2. the plain rerun, and Snakemake killed with its job while the job writes again
    log = tmp_path / "killed-snakemake.log"
    stale = set(_staging(target))  # the killed job's, removed by the next write of the output
    proc = _start(work, config, log)
    _wait_for("the rerun's training job writing", lambda: set(_staging(target)) - stale and _train_job(proc.pid),
              proc, log)
    os.killpg(proc.pid, signal.SIGSTOP)
    assert not target.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not target.exists()
    # a killed Snakemake leaves its lock: the plain command refuses and names --unlock
    locked = snakemake(work, config, "--cores", "2", check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr

    # 3. as the README says: unlock, then the plain command
    snakemake(work, config, "--unlock")
    snakemake(work, config, "--cores", "2")
    for table in ("metrics.csv", "spectral.csv"):
        assert (res / table).read_bytes() == (tiny_study / "results" / table).read_bytes(), table
    manifest = read_json(target / "manifest.json")
    assert manifest["resumed_from_step"], manifest  # from the killed job's snapshot
    # math-lora/1's training state went by the keep policy when 2 was first trained: the job
    # replayed from the base, which gives the same weights as continuing
    assert manifest["continued_from"] is None and "dropped by the keep policy" in manifest["note"]
    assert not _staging(target) and not (res / "resume" / "math-lora" / "2").exists()
