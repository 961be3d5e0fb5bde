"""The disk keep policy: what a finished checkpoint may shed once nothing needs it, and disk use per run.

``keep.optimizer_state`` in the config (a runtime setting: changing it retrains nothing):

* ``newest`` (the default): the *training state* of a checkpoint - ``state.pt`` (optimizer
  moments, step, data position, RNG states) and a method's resume tensors (AdaLoRA's, ReLoRA's),
  everything that is only needed to continue training from it - is dropped once every job that
  the config continues from it (the next duration; for a trunk, the next trunk and its own
  cool-down branch) has finished *and* records, in its manifest, that it continued from exactly
  this checkpoint (``continued_from_manifest``: the sha256 of this checkpoint's
  ``manifest.json``). A checkpoint nothing continues from (a cool-down branch; every checkpoint
  of a run trained from the base at each duration) loses it once the next duration's
  checkpoint is finished. The newest checkpoint of a run, and its newest trunk, always keep
  their state: a longer duration added later continues from them. The published model or
  adapter, the manifest and the training log are never dropped, so evaluation and analysis
  are unaffected. Each training job applies the policy to its run once its own output is
  complete (:func:`prune_run`, called by the train rule's script).
* ``all``: nothing is dropped.

What guarantees that nothing breaks:

* A drop is recorded *before* the files go, in ``dropped.json`` inside the checkpoint (each
  file's sha256 from the manifest, its size, the reason, the policy, when), and
  :mod:`learnforget.core.integrity` treats a listed file that is missing but recorded there with the
  same sha256 as intact. Snakemake dates a ``directory()`` output by its
  ``.snakemake_timestamp``, which is not touched, and the folder's own mtime is put back, so no
  output looks changed or incomplete.
* A job that must continue from a checkpoint whose state was dropped (a duration inserted
  between two existing ones, or a longer checkpoint rebuilt after quarantine) replays from the
  nearest earlier checkpoint of the same chain that still has its state, or from the base
  (:func:`learnforget.train.loop.finetune`); on CPU the weights are bitwise those of continuing, at
  the cost of the replayed steps. A checkpoint being rebuilt is never pruned under a running
  job: its dependents' manifests name the old manifest's sha256, not the new one's.
* Resume snapshots (``results/resume/``) are removed by the job that wrote them as soon as
  its checkpoint is complete; the disk table of the report shows any left by a killed job.

:func:`disk_usage` gives the bytes per run (checkpoints, resume snapshots, evaluations,
spectral analyses) and the bytes the policy freed, for the report.
"""

from __future__ import annotations

import datetime
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

from learnforget.core.integrity import DROPPED, MANIFEST, CorruptCheckpoint, dropped_by_policy, read_manifest_files, verify
from learnforget.core.io import read_json, sha256_file
from learnforget.train.methods import state_files

POLICIES = ("newest", "all")
STATE = "state.pt"


def training_state_files() -> tuple[str, ...]:
    """Files of a checkpoint needed only to continue training from it: ``state.pt`` and what any
    method's ``save_state`` writes."""
    return (STATE, *state_files())


def manifest_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """sha256 of a checkpoint's ``manifest.json`` (which holds every file's sha256)."""
    return sha256_file(Path(ckpt_dir) / MANIFEST)


def has_training_state(ckpt_dir: str | os.PathLike) -> bool:
    """Whether training can continue from a checkpoint: its training-state files are all there."""
    ckpt = Path(ckpt_dir)
    if not (ckpt / STATE).is_file():
        return False
    try:
        listed = read_manifest_files(ckpt)
    except CorruptCheckpoint:
        return False
    return all((ckpt / name).is_file() for name in training_state_files() if name in listed)


def dependents(run) -> dict[str, list[str]]:
    """Checkpoint of a run (``label`` or ``trunk/label``) -> the checkpoints the config continues
    from it (:meth:`learnforget.study.config.Run.previous`)."""
    out: dict[str, list[str]] = {}
    jobs = [(label, "trunk") for label in run.trunk_labels] + [(label, "final") for label in run.labels]
    for label, part in jobs:
        prev = run.previous(label, part)
        if prev is not None:
            out.setdefault(prev, []).append(("trunk/" if part == "trunk" else "") + label)
    return out


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def drop_training_state(ckpt_dir: str | os.PathLike, *, reason: str, policy: str = "newest") -> int:
    """Remove the training-state files of a finished checkpoint, recording each in
    ``dropped.json`` first (see :mod:`learnforget.core.integrity`); returns the bytes freed. Safe to
    run twice or concurrently; leaves the folder's mtime as it was."""
    ckpt = Path(ckpt_dir)
    listed = read_manifest_files(ckpt)
    names = [n for n in training_state_files() if n in listed and (ckpt / n).is_file()]
    if not names:
        return 0
    before = os.stat(ckpt)
    record = dropped_by_policy(ckpt)
    for name in names:
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:  # dropped meanwhile by a concurrent job, which recorded it
            continue
        record[name] = {"sha256": listed[name], "size": size, "reason": reason,
                        "policy": f"keep.optimizer_state: {policy}", "dropped_at": _utc_now()}
    _write_record(ckpt, {"files": record, "note": "files the keep policy removed from this checkpoint "
                                                  "(learnforget.train.keep); the checkpoint is intact without them"})
    freed = 0
    for name in names:
        try:
            size = (ckpt / name).stat().st_size
            os.unlink(ckpt / name)
            freed += size
        except FileNotFoundError:  # dropped meanwhile by a concurrent job
            pass
    try:
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:
        pass
    return freed


def _write_record(ckpt: Path, record: dict) -> None:
    """Write ``dropped.json`` atomically under a name of this process's own, so that two jobs
    dropping from one checkpoint at once never disturb each other's write."""
    tmp = ckpt / f".{DROPPED}.{os.getpid()}.{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ckpt / DROPPED)
    finally:
        tmp.unlink(missing_ok=True)


def prune_run(run, results_dir: str | os.PathLike, policy: str = "newest",
              log: Callable[[str], object] | None = None) -> list[tuple[Path, int]]:
    """Apply the policy to one run's checkpoints under ``results_dir`` (``runs/<run>/...``).

    The newest checkpoint and the newest trunk keep their training state. An older one that
    the config continues from loses it once all of its dependents are finished and continued
    from it; an older one nothing continues from (a cool-down branch, a checkpoint of a run
    trained from the base at every duration) once the next duration's checkpoint is finished.
    Never raises once the policy is valid: it runs after a job's output is complete, and a
    failure here (logged) must not fail that job. Returns ``[(checkpoint, bytes freed), ...]``."""
    if policy not in POLICIES:
        raise ValueError(f"keep.optimizer_state must be one of {', '.join(POLICIES)}, got {policy!r}")
    if policy == "all":
        return []
    root = Path(results_dir) / "runs" / run.name
    deps_of = dependents(run)
    done = []
    for prefix, chain in (("trunk/", list(run.trunk_labels)), ("", list(run.labels))):
        for label, later in zip(chain, chain[1:]):  # the newest keeps its state
            ckpt = root / f"{prefix}{label}"
            try:
                why = _superseded(ckpt, root, deps_of.get(f"{prefix}{label}"), f"{prefix}{later}")
                if why is None:
                    continue
                freed = drop_training_state(ckpt, reason=why, policy=policy)
            except Exception as exc:  # noqa: BLE001 - never fail the job whose output is complete
                if log is not None:
                    log(f"keep policy: left {ckpt} as it is ({type(exc).__name__}: {exc})")
                continue
            done.append((ckpt, freed))
            if log is not None:
                log(f"keep policy: dropped the training state of {ckpt} ({freed} bytes): {why}")
    return done


def _superseded(ckpt: Path, root: Path, deps: list[str] | None, later: str) -> str | None:
    """Why a checkpoint's training state may go, or None while it may still be needed."""
    if not has_training_state(ckpt):
        return None
    try:
        verify(ckpt)  # a damaged checkpoint is left to the integrity scan, untouched
    except (CorruptCheckpoint, FileNotFoundError):
        return None
    if deps:
        fingerprint = manifest_fingerprint(ckpt)
        if not all(_continued_from(root / d, fingerprint) for d in deps):
            return None
        return f"continued by {', '.join(f'{root}/{d}' for d in deps)}"
    if not (root / later / MANIFEST).is_file():
        return None
    return f"nothing continues from it and {root}/{later} is finished"


def _continued_from(ckpt: Path, fingerprint: str) -> bool:
    try:
        return read_json(ckpt / MANIFEST).get("continued_from_manifest") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- disk use
DISK_COLUMNS = ["run", "checkpoints", "resume", "evaluations", "analysis", "total", "freed_by_keep_policy"]


def _bytes(path: Path) -> int:
    if path.is_symlink() or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                try:
                    total += p.stat().st_size
                except FileNotFoundError:
                    pass
    return total


def _freed(path: Path) -> int:
    """Bytes the keep policy dropped from the checkpoints under ``path`` (their dropped.json)."""
    if not path.is_dir():
        return 0
    return sum(int(entry.get("size") or 0) for sidecar in path.rglob(DROPPED)
               for entry in dropped_by_policy(sidecar.parent).values())


def disk_usage(results_dir: str | os.PathLike, runs: Iterable[str] = ()):
    """Bytes on disk per run: ``checkpoints`` (``runs/<run>/``, trunks included; the base model
    for ``base``), ``resume`` (its snapshots under ``resume/<run>/``), ``evaluations``
    (``evals/<run>/``), ``analysis`` (``spectral/<run>/``), their ``total``, and
    ``freed_by_keep_policy``; a row per run of ``runs`` and per run found on disk, then
    ``quarantine`` (if any) and ``all of results/`` (data, tokens, logs... included)."""
    import pandas as pd

    res = Path(results_dir)
    names = list(dict.fromkeys([*runs, *sorted(p.name for p in (res / "runs").glob("*") if p.is_dir()),
                                *sorted(p.name for p in (res / "resume").glob("*") if p.is_dir())]))
    rows = []
    for name in ["base", *[n for n in names if n != "base"]]:
        ckpt = res / "base" if name == "base" else res / "runs" / name
        row = {"run": name, "checkpoints": _bytes(ckpt), "resume": _bytes(res / "resume" / name),
               "evaluations": _bytes(res / "evals" / name), "analysis": _bytes(res / "spectral" / name),
               "freed_by_keep_policy": _freed(ckpt)}
        row["total"] = row["checkpoints"] + row["resume"] + row["evaluations"] + row["analysis"]
        rows.append(row)
    if (res / "quarantine").exists():
        q = _bytes(res / "quarantine")
        rows.append({"run": "quarantine", "checkpoints": q, "resume": 0, "evaluations": 0, "analysis": 0,
                     "total": q, "freed_by_keep_policy": 0})
    everything = _bytes(res)
    rows.append({"run": "all of results/", "checkpoints": _bytes(res / "base") + _bytes(res / "runs"),
                 "resume": _bytes(res / "resume"),
                 "evaluations": _bytes(res / "evals"), "analysis": _bytes(res / "spectral"), "total": everything,
                 "freed_by_keep_policy": sum(r["freed_by_keep_policy"] for r in rows)})
    return pd.DataFrame(rows, columns=DISK_COLUMNS)
