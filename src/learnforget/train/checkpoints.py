"""Finetuning checkpoints on disk: writing and reading a point (model, ``state.pt``, method state),
the fingerprints that tie a checkpoint to its data and base, the chain of checkpoints a job
continues from, and the resume snapshot of a running job.

A checkpoint folder holds ``model/`` (the published model or adapter, :meth:`MethodConfig.save`),
anything else the method needs to resume (:meth:`MethodConfig.save_state`), ``state.pt``
(optimizer, step, data position, RNG states, tokens seen, method state), ``train_log.jsonl`` and
``manifest.json`` (every file's sha256). A resume snapshot has the same files plus ``job.json``
(which job it belongs to) instead of the manifest.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from learnforget.core import integrity, modelcard
from learnforget.core.io import atomic_path, read_json, read_jsonl, sha256_file, write_json
from learnforget.train import keep
from learnforget.train.methods import MethodConfig
from learnforget.train.settings import TrainConfig

log = logging.getLogger(__name__)

#: What makes two jobs the same run: a job continues only from a checkpoint that agrees on all.
SAME_RUN_KEYS = ("regime", "packing", "method", "train_cfg", "unit", "tokens_sha256", "base_sha256")
TOKEN_FILES = ("ids.npy", "mask.npy", "offsets.npy")


# ----------------------------------------------------------------------------- fingerprints
def dir_fingerprint(root: Path, names: Sequence[str], known: dict[str, str] | None = None) -> str:
    """sha256 over the named files of a folder (those that exist), in order. ``known``: file ->
    sha256 already verified (a checkpoint manifest's), used instead of hashing the file again."""
    h = hashlib.sha256()
    for name in names:
        if (root / name).is_file():
            digest = (known or {}).get(name) or sha256_file(root / name)
            h.update(name.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over the base model's config and weights (a sharded model's index and shards
    too; a single-file model's fingerprint is as it always was)."""
    shards = sorted(p.name for p in base_dir.glob("model-*.safetensors"))
    # the base's manifest hashes were just verified (launch.finetune_job): a 7B model is not
    # hashed again by every job
    manifest = base_dir / "manifest.json"
    known = read_json(manifest).get("files") if manifest.is_file() else None
    return dir_fingerprint(base_dir, ("config.json", "model.safetensors", *(
        ["model.safetensors.index.json", *shards] if shards else [])), known=known)


def file_hashes(root: Path, skip: Sequence[str] = ("manifest.json",)) -> dict[str, str]:
    """sha256 of every file under ``root`` but ``skip``, by relative path (a manifest's ``files``)."""
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and str(p.relative_to(root)) not in skip}


def last_loss(log_path: Path) -> float | None:
    """The loss of the last record of a ``train_log.jsonl`` (None: no records)."""
    if not log_path.exists():
        return None
    recs = read_jsonl(log_path)
    return recs[-1]["loss"] if recs else None


def check_same_run(prev: dict, now: dict, where: Path, mode: str) -> None:
    """ValueError unless the run config ``prev`` of checkpoint ``where`` is the same run as ``now``."""
    for key in SAME_RUN_KEYS:
        if prev.get(key) != now.get(key):
            raise ValueError(f"cannot continue from {where}: its {key} differs "
                             f"({prev.get(key)!r} there, {now.get(key)!r} here)")
    if mode == "longest" and prev.get("durations") != now.get("durations"):
        raise ValueError(f"cannot continue from {where}: its schedule spans durations {prev.get('durations')}, "
                         f"this one {now.get('durations')}")


# ----------------------------------------------------------------------------- points
def write_point(m: MethodConfig, model, state: dict, tmp: Path, tokenizer=None) -> None:
    """The model, the method's resume files and ``state.pt`` into the folder ``tmp``."""
    m.save(model, tmp / "model", tokenizer)
    m.save_state(model, tmp)
    torch.save({**state, "method": m.extra_state(model)}, tmp / "state.pt")


def load_point(m: MethodConfig, base_dir, ckpt: Path, total_steps):
    """Model (trainable), state and log of a checkpoint or resume folder."""
    state = torch.load(ckpt / "state.pt", weights_only=True, mmap=True)
    model = m.load(base_dir, ckpt, total_steps=total_steps)
    m.load_extra_state(model, state.get("method", {}))
    train_log = read_jsonl(ckpt / "train_log.jsonl") if (ckpt / "train_log.jsonl").exists() else []
    return model, state, train_log


def write_card(m: MethodConfig, model_dir: Path, *, base_dir, run, regime, token_dir, td, duration, unit, state,
               epochs, part, cfg: TrainConfig, final_loss) -> None:
    """The adapter's model card (learnforget.core.modelcard): data, method, duration; no scores yet."""
    text = modelcard.training_card(
        base_model=modelcard.base_model_of(model_dir, str(base_dir)), run=run, method=m.to_dict(), regime=regime,
        dataset=Path(token_dir).name, data_meta=td.meta, duration=duration, unit=unit, step=state["step"],
        tokens=state["tokens"], epochs=epochs, part=part, train=cfg.result_dict(), seed=cfg.seed,
        final_loss=final_loss)
    modelcard.write_card(model_dir, text)


def _replay_origin(prev: Path, run_cfg: dict, mode: str) -> Path | None:
    """The nearest checkpoint of ``prev``'s chain (``prev`` itself first) that still has its
    training state, intact and of the same run; None: none has."""
    origin, seen = prev, set()
    while origin is not None and not keep.has_training_state(origin):
        seen.add(origin.resolve())
        earlier = read_json(origin / "manifest.json").get("continued_from")
        origin = Path(earlier) if earlier else None
        if origin is None or origin.resolve() in seen or not (origin / "manifest.json").is_file():
            return None
        try:
            integrity.verify(origin)
            check_same_run(read_json(origin / "manifest.json").get("run_cfg", {}), run_cfg, origin, mode)
        except (integrity.CorruptCheckpoint, ValueError) as exc:
            log.info(f"not replaying from {origin} ({exc}); training from the base")
            return None
    return origin


def load_origin(m: MethodConfig, base_dir, prev: Path, run_cfg: dict, plan: dict):
    """What a job continuing from ``prev`` starts from: ``(checkpoint, model, state, log)`` of
    ``prev``, or, when the keep policy dropped its training state (learnforget.train.keep), of the
    nearest earlier checkpoint of its chain (``continued_from`` in each manifest) that still
    has it, intact and of the same run; None: none has, train from the base. Replaying the
    steps in between gives the same weights as continuing (bitwise on CPU)."""
    for _attempt in range(3):  # a concurrent job may drop a state between the check and the load
        origin = _replay_origin(prev, run_cfg, plan["mode"])
        if origin is None:
            return None
        try:
            return (origin, *load_point(m, base_dir, origin, plan["method_total"]))
        except FileNotFoundError:
            if keep.has_training_state(origin):
                raise
    raise RuntimeError(f"the training state of {prev}'s chain kept disappearing while it was loaded")


# ----------------------------------------------------------------------------- where a job starts
@dataclass
class StartPoint:
    """Where a finetuning job starts: the model to train and, when it continues earlier training,
    that training's state and log, and what the manifest says about it."""

    model: Any = None
    state: dict | None = None
    log: list = field(default_factory=list)
    continued_from: str | None = None
    continued_from_manifest: str | None = None  # sha256 of that checkpoint's manifest (learnforget.train.keep)
    resumed_from: int | None = None  # the step of this job's own snapshot it resumed at
    note: str | None = None
    segment_start: int | None = None  # the step this job started at (kept across resumes)

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0

    @property
    def tokens(self) -> int:
        return self.state["tokens"] if self.state else 0


def read_snapshot(snap: Path, m: MethodConfig, base_dir, run_cfg: dict, job: dict, method_total,
                  *, is_main: bool) -> StartPoint | None:
    """The job's own resume snapshot in ``snap`` when there is one of this same job (one of
    another job or configuration is deleted by the main process); None otherwise."""
    if not (snap / "job.json").exists():
        return None
    saved = read_json(snap / "job.json")
    if saved.get("run_cfg") == run_cfg and saved.get("job") == job:
        model, state, train_log = load_point(m, base_dir, snap, method_total)
        return StartPoint(model=model, state=state, log=train_log, continued_from=saved.get("continued_from"),
                          continued_from_manifest=saved.get("continued_from_manifest"),
                          resumed_from=int(state["step"]), note=saved.get("note"),
                          segment_start=saved.get("start_step"))
    if is_main:
        log.info(f"ignoring the snapshot in {snap}: it belongs to another job or configuration")
        shutil.rmtree(snap)
    return None


def write_snapshot(snap: Path, m: MethodConfig, model, state: dict, live_log: Path, *, run_cfg: dict, job: dict,
                   start: StartPoint) -> None:
    """Replace the resume snapshot ``snap`` with the training point now (atomically)."""
    with atomic_path(snap) as tmp:
        tmp.mkdir()
        write_point(m, model, state, tmp)
        shutil.copyfile(live_log, tmp / "train_log.jsonl")
        write_json(tmp / "job.json", {"run_cfg": run_cfg, "job": job, "continued_from": start.continued_from,
                                      "continued_from_manifest": start.continued_from_manifest,
                                      "note": start.note, "start_step": start.segment_start})
