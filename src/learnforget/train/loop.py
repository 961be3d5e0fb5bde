"""The training engine: one loop for base pretraining and for finetuning.

Reads top to bottom: the settings (:class:`TrainConfig`), the loop (:func:`train`), and the two
entry points the pipeline scripts call: :func:`pretrain_base` and :func:`finetune`.

Durations. A finetuning checkpoint holds the published model (or adapter), ``state.pt``
(optimizer, step, data position, RNG states, tokens seen, method state) and a manifest. How the
durations of a run relate is its *mode* (:data:`MODES`, :meth:`TrainConfig.mode`): with a
length-independent schedule each duration continues from the previous one (``continue``), or,
when the schedule ends in a cool-down (inverse_sqrt, wsd), one trunk runs to each duration's
cool-down start and a short cool-down branch per duration gives its checkpoint (``branch``);
a length-dependent schedule (cosine) trains each duration from the base (``restart``) unless
``schedule_length: longest`` shares one schedule over the longest duration (``longest``).
Continuing gives the same weights as training in one go (bitwise on CPU, same thread count).

Resume. With a ``resume_dir`` a job snapshots its whole state at an interval; a job killed and
rerun continues from the snapshot and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from learnforget.train import fsdp
from learnforget.train import keep
from learnforget.core import perf
from learnforget.train.accounting import measured_peak_flops, peak_memory_mib, speed
from learnforget.core.io import atomic_path, read_json, read_jsonl, sha256_file, write_json
from learnforget.train.methods import MethodConfig, method_from_dict
from learnforget.train.settings import UNITS, TrainConfig
from learnforget.train.modeling import build_model, count_parameters, flops_per_token, load_model
from learnforget.train.optim import make_optimizer as _make_optimizer
from learnforget.train.schedules import cooldown_start
from learnforget.data.tokens import IGNORE_INDEX, Batches, load_tokens, mix

def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, method: MethodConfig | None = None
                   ) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters. A method's
    :meth:`~learnforget.train.methods.MethodConfig.weight_decay` overrides the config's."""
    wd = method.weight_decay() if method is not None else None
    return _make_optimizer(model, cfg.optimizer, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           weight_decay=cfg.weight_decay if wd is None else wd)


def duration_to_steps(duration: float, unit: str, batches: Batches) -> int:
    """epochs -> ceil(epochs * steps_per_epoch); tokens -> ceil(tokens / (batch * seq_len)); steps as given."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    duration = float(duration)
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a positive number, got {duration!r}")
    if unit == "epochs":
        return batches.steps_for_epochs(duration)
    if unit == "tokens":
        return int(math.ceil(duration / (batches.batch_size * batches.seq_len) - 1e-9))
    if duration != int(duration):
        raise ValueError(f"a duration in steps must be whole, got {duration!r}")
    return int(duration)


# ----------------------------------------------------------------------------- RNG state
def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ----------------------------------------------------------------------------- the loop
class Dist:
    """The process's place in a (possibly) multi-process job launched by accelerate/torchrun.

    One process: no accelerate, no process group. Several (``WORLD_SIZE`` > 1 in the
    environment): an :class:`accelerate.Accelerator` sets up the process group (gloo on CPU, nccl
    on GPU) and wraps the model in DDP; each process takes every ``world``-th row of the global
    batch, and the loss is scaled so that the averaged gradients equal the one-process gradient
    of the whole batch. Full finetuning over several processes (``method`` of ``type: full``) is
    sharded with FSDP2 instead of replicated (:mod:`learnforget.train.fsdp`): weights, gradients and
    optimizer state are split over the processes, and gathered on the main one to save.
    """

    def __init__(self, device: str = "cpu", method: MethodConfig | None = None):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        self.accelerator = None
        self.fsdp, self.mesh = False, None
        if self.world > 1 or self.device.type == "cuda":
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision="no")
            self.device = self.accelerator.device
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if method is not None and fsdp.wanted(method, self.world):
            self.fsdp, self.mesh = True, fsdp.device_mesh(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model) if self.accelerator is not None else model


def _state(step, tokens, loss_tokens, elapsed, batches, opt, schedule_total, cfg, model=None) -> dict:
    """The resumable training state. ``model``: the FSDP-sharded model, whose optimizer state is
    gathered to the main process (a collective: every process calls this; others get None)."""
    optimizer = fsdp.full_optimizer_state_dict(model, opt) if model is not None else opt.state_dict()
    return {"step": step, "tokens": tokens, "loss_tokens": loss_tokens, "elapsed": elapsed,
            "position": list(batches.position), "optimizer": optimizer, "rng": _rng_state(),
            "schedule_total": schedule_total, "train_cfg": cfg.to_dict()}


def train(
    model: torch.nn.Module,
    batches: Batches,
    cfg: TrainConfig | dict,
    *,
    end_step: int,
    start_step: int = 0,
    schedule_total: int | None = None,
    state: dict | None = None,
    log_path: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
    method: MethodConfig | None = None,
    snapshot: Callable[[torch.nn.Module, dict], None] | None = None,
    dist: Dist | None = None,
    tensorboard_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` from ``start_step`` to ``end_step`` (optimizer updates) and return (model, state).

    ``state`` is what a previous call returned (to continue); without it the optimizer is fresh,
    the data starts at epoch 0 and the RNGs are seeded with ``cfg.seed``. The LR at step s is
    ``cfg.lr * schedule(s)`` with the schedule spanning ``schedule_total`` steps (``None``: the
    schedule's length-independent trunk). One JSONL record per step is appended to
    ``log_path``: step (after the update, 1-based), loss, lr, grad_norm, tokens (cumulative
    non-padding inputs), loss_tokens, epoch (fractional), elapsed (cumulative training seconds).

    ``method`` (a :class:`~learnforget.train.methods.MethodConfig`) gets its per-step hooks called:
    ``regularizer`` is added to the loss, ``lr_multiplier`` scales the schedule and
    ``after_step`` runs after each optimizer step (under an RNG forked and seeded from the
    step, so that its randomness is the same in every process and does not shift the data
    order or dropout). ``snapshot(model, state)`` is called every ``cfg.save_every_steps``
    steps or ``cfg.save_every_minutes`` minutes, whichever comes first (not after the last
    step: the caller saves that).
    """
    cfg = TrainConfig.from_dict(cfg)
    dist = dist or Dist()
    torch.set_num_threads(cfg.threads)
    perf.tune_allocator()  # heap reuse for the per-step tensors (learnforget.core.perf)
    sched = cfg.schedule_fn(schedule_total)
    sharded = None  # the FSDP-sharded model (full finetuning over several processes)
    if dist.fsdp:
        model = sharded = fsdp.shard_model(model, dist.mesh, precision=cfg.precision)
    elif dist.accelerator is not None:
        model = dist.accelerator.prepare(model)
    opt = make_optimizer(dist.unwrap(model), cfg, method)
    if dist.accelerator is not None and not dist.fsdp:
        opt = dist.accelerator.prepare(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    # train.compile: the forward (and so its backward) through inductor; the same parameters
    forward = torch.compile(model) if cfg.compile else model
    if state is not None:
        if int(state["step"]) != start_step:
            raise ValueError(f"state is at step {state['step']} but start_step is {start_step}")
        if dist.fsdp:  # the main process's full optimizer state, scattered to the shards
            fsdp.load_full_optimizer_state_dict(sharded, opt, state["optimizer"] if dist.is_main else None)
        else:
            opt.load_state_dict(state["optimizer"])
        batches.set_position(state["position"])
        _set_rng_state(state["rng"])
        tokens, loss_tokens, elapsed = int(state["tokens"]), int(state["loss_tokens"]), float(state["elapsed"])
    else:
        if start_step != 0:
            raise ValueError("start_step > 0 needs the state of the run being continued")
        batches.set_position((0, 0))
        _seed_all(cfg.seed)
        tokens, loss_tokens, elapsed = 0, 0, 0.0
    if end_step < start_step:
        raise ValueError(f"end_step {end_step} is before start_step {start_step}")

    from tqdm.auto import tqdm

    tb = None
    if tensorboard_dir is not None and dist.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("train.tensorboard is on but the tensorboard package is not installed "
                               "(pip install tensorboard)") from exc
        tb = SummaryWriter(str(tensorboard_dir))
    # bf16: autocast, or under FSDP its mixed-precision policy (bf16 compute, fp32 shards)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16" and not dist.fsdp)
    model.train()
    log = open(log_path, "a", encoding="utf-8") if (log_path and dist.is_main) else None
    bar = tqdm(total=end_step - start_step, desc=desc, disable=not (progress and dist.is_main),
               mininterval=2.0, unit="step")
    t0 = last_snap = time.perf_counter()
    try:
        for step in range(start_step, end_step):
            lr = cfg.lr * sched(step) * (method.lr_multiplier(step) if method is not None else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            items = batches.next_items()
            mine = items[dist.rank::dist.world]
            mb = cfg.micro_batch_size or max(1, len(mine))
            # gradient accumulation: the process's share in passes of micro_batch_size sequences
            parts = [batches.make_batch(mine[i:i + mb]) for i in range(0, max(1, len(mine)), mb)]
            n_tok, n_loss = dist.sum([sum(b.n_tokens for b in parts), sum(b.n_loss_tokens for b in parts)])
            opt.zero_grad(set_to_none=True)
            ce = 0.0
            for i, batch in enumerate(parts):
                last = i == len(parts) - 1
                sync = contextlib.nullcontext() if last or dist.accelerator is None or dist.fsdp \
                    else dist.accelerator.no_sync(model)
                with sync:
                    with autocast:
                        logits = forward(input_ids=batch.input_ids.to(dist.device), use_cache=False).logits
                    ce_part = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                              batch.targets.to(dist.device).reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
                    # mean over the global batch's loss tokens; DDP averages gradients over processes
                    loss = ce_part * (dist.world / n_loss) if n_loss else logits.sum() * 0.0
                    if last and method is not None:
                        reg = method.regularizer(dist.unwrap(model))
                        if reg is not None:
                            loss = loss + reg
                    if dist.accelerator is not None and not dist.fsdp:
                        dist.accelerator.backward(loss)
                    else:
                        loss.backward()
                ce = ce + ce_part.detach()
            if dist.fsdp:  # the global norm over every shard (clipping when grad_clip > 0)
                gnorm = fsdp.clip_grad_norm(params, cfg.grad_clip)
            elif cfg.grad_clip > 0 and dist.accelerator is not None:
                gnorm = float(dist.accelerator.clip_grad_norm_(params, cfg.grad_clip))
            elif cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True))
            else:
                gnorm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            opt.step()
            if method is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed * 1_000_003 + step)
                    method.after_step(dist.unwrap(model), opt, step)
            tokens += int(n_tok)
            loss_tokens += int(n_loss)
            now = time.perf_counter()
            loss_value = dist.sum([float(ce.detach())])[0] / n_loss if n_loss else 0.0
            rec = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                   "loss_tokens": loss_tokens, "epoch": round(batches.epoch + batches.index / batches.n_items, 6),
                   "elapsed": round(elapsed + now - t0, 4)}
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if tb is not None:
                for key in ("loss", "lr", "grad_norm"):
                    tb.add_scalar(f"train/{key}", rec[key], step + 1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            due = (cfg.save_every_steps and (step + 1 - start_step) % cfg.save_every_steps == 0) or \
                  (cfg.save_every_minutes and now - last_snap >= 60 * cfg.save_every_minutes)
            if snapshot is not None and due and step + 1 < end_step:
                snap_state = _state(step + 1, tokens, loss_tokens, elapsed + now - t0, batches, opt,
                                    schedule_total, cfg, sharded)
                plain = fsdp.unsharded_model(sharded) if dist.fsdp else dist.unwrap(model)
                if dist.is_main:
                    snapshot(plain, snap_state)
                dist.barrier()
                last_snap = time.perf_counter()
    finally:
        bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    elapsed += time.perf_counter() - t0
    final = _state(end_step, tokens, loss_tokens, elapsed, batches, opt, schedule_total, cfg, sharded)
    # under FSDP the main process gets the gathered, plain model (the others None: they do not save)
    return (fsdp.unsharded_model(sharded) if dist.fsdp else dist.unwrap(model)), final


# ----------------------------------------------------------------------------- helpers
def _dir_fingerprint(root: Path, names: Sequence[str], known: dict[str, str] | None = None) -> str:
    """sha256 over the named files of a folder (those that exist), in order. ``known``: file ->
    sha256 already verified (a checkpoint manifest's), used instead of hashing the file again."""
    h = hashlib.sha256()
    for name in names:
        if (root / name).is_file():
            digest = (known or {}).get(name) or sha256_file(root / name)
            h.update(name.encode() + b"\0" + digest.encode())
    return h.hexdigest()


def _base_fingerprint(base_dir: Path) -> str:
    """sha256 over the base model's config and weights (a sharded model's index and shards
    too; a single-file model's fingerprint is as it always was)."""
    shards = sorted(p.name for p in base_dir.glob("model-*.safetensors"))
    # the base's manifest hashes were just verified (launch.finetune_job): a 7B model is not
    # hashed again by every job
    manifest = base_dir / "manifest.json"
    known = read_json(manifest).get("files") if manifest.is_file() else None
    return _dir_fingerprint(base_dir, ("config.json", "model.safetensors", *(
        ["model.safetensors.index.json", *shards] if shards else [])), known=known)


def _file_hashes(root: Path, skip: Sequence[str] = ("manifest.json",)) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and str(p.relative_to(root)) not in skip}


def _code_version() -> str | None:
    """The git commit of the learn-forget checkout this code runs from (None outside git)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def log_info(msg: str) -> None:
    import logging

    logging.getLogger("learnforget.train.loop").info(msg)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)




# ----------------------------------------------------------------------------- entry points
def pretrain_base(
    tokenizer_dir: str | Path,
    token_dirs_with_weights: Sequence[tuple[str | Path, float]] | dict,
    arch: dict,
    train_cfg: dict,
    out_dir: str | Path,
    log_path: str | Path | None = None,
    seed: int | None = None,
    *,
    duration: float,
    unit: str = "epochs",
    progress: bool = True,
) -> dict:
    """Pretrain a fresh Llama on a weighted mix of CPT token folders; write an HF model dir.

    ``out_dir`` gets the model (safetensors + config.json), the tokenizer files,
    ``train_log.jsonl`` and ``manifest.json``, atomically. ``log_path``, if given, receives the
    same per-step JSONL records live (truncated first). Mix weights are repetition factors
    (see :func:`learnforget.data.tokens.mix`); an epoch is one pass over the mix. Returns the manifest.
    """
    wall0 = time.time()
    cfg = TrainConfig.from_dict(train_cfg)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    torch.set_num_threads(cfg.threads)
    items = list(token_dirs_with_weights.items()) if isinstance(token_dirs_with_weights, dict) \
        else [tuple(x) for x in token_dirs_with_weights]
    parts = [(load_tokens(d), float(w)) for d, w in items]
    td = mix(parts, seed=cfg.seed)
    tokenizer = _load_tokenizer(tokenizer_dir)
    if td.eos_id is not None and td.eos_id != tokenizer.eos_token_id:
        raise ValueError(f"tokens use eos id {td.eos_id} but the tokenizer's is {tokenizer.eos_token_id}")
    batches = Batches(td, "cpt", cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
    steps = duration_to_steps(duration, unit, batches)
    model = build_model(arch, tokenizer, seed=cfg.seed)
    trainable, total = count_parameters(model)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        live_log = Path(log_path) if log_path else tmp / "train_log.jsonl"
        t0 = time.perf_counter()
        model, state = train(model, batches, cfg, end_step=steps, schedule_total=steps, log_path=live_log,
                             progress=progress, desc="base")
        seconds = time.perf_counter() - t0
        if log_path:
            shutil.copyfile(live_log, tmp / "train_log.jsonl")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fpt = flops_per_token(model.config, cfg.seq_len)
        manifest = {
            "kind": "base",
            "arch": arch,
            "train_cfg": cfg.to_dict(),
            "data": [{"dir": str(d), "weight": float(w), "n_docs": p.n_docs, "n_tokens": p.n_tokens}
                     for (d, w), (p, _) in zip(items, parts)],
            "mix_tokens": td.n_tokens,
            "steps_per_epoch": batches.steps_per_epoch,
            "duration": float(duration),
            "unit": unit,
            "step": state["step"],
            "tokens": state["tokens"],
            "train_seconds": round(state["elapsed"], 3),
            "wall_seconds": None,
            **speed(state["tokens"], seconds, fpt, measured_peak_flops("cpu")),
            "final_loss": _last_loss(tmp / "train_log.jsonl"),
            "parameters": {"trainable": trainable, "total": total},
            "threads": cfg.threads,
            **peak_memory_mib("cpu"),
            "code_version": _code_version(),
            "versions": _versions(),
            "files": _file_hashes(tmp),
        }
        manifest["wall_seconds"] = round(time.time() - wall0, 3)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _last_loss(log: Path) -> float | None:
    if not log.exists():
        return None
    recs = read_jsonl(log)
    return recs[-1]["loss"] if recs else None


def plan_segment(cfg: TrainConfig, method: MethodConfig, part: str, steps: int, longest_steps: int) -> dict:
    """Where one job of a run starts and ends.

    ``part`` is ``"final"`` (the evaluated checkpoint of a duration of ``steps`` steps) or
    ``"trunk"`` (mode ``branch`` only: the shared trunk up to that duration's cool-down start).
    Returns ``end_step``, ``schedule_total`` (None: the length-independent trunk),
    ``method_total`` (what :meth:`MethodConfig.prepare` gets) and ``from``: what the job
    continues from, one of ``base``, ``previous`` (the previous duration's checkpoint of the
    same part) or ``trunk`` (this duration's own trunk).
    """
    mode = cfg.mode(method)
    if part == "trunk":
        if mode != "branch":
            raise ValueError(f"a trunk job needs a schedule with a cool-down (mode 'branch'), not {mode!r}")
        c = cooldown_start(cfg.schedule, steps, cfg.cooldown_fraction)
        return {"mode": mode, "end_step": c, "schedule_total": None, "method_total": None, "from": "previous"}
    if part != "final":
        raise ValueError(f"part must be 'final' or 'trunk', got {part!r}")
    if mode == "restart":
        return {"mode": mode, "end_step": steps, "schedule_total": steps, "method_total": steps, "from": "base"}
    if mode == "longest":
        return {"mode": mode, "end_step": steps, "schedule_total": longest_steps, "method_total": longest_steps,
                "from": "previous"}
    if mode == "continue":
        return {"mode": mode, "end_step": steps, "schedule_total": None, "method_total": None, "from": "previous"}
    return {"mode": mode, "end_step": steps, "schedule_total": steps, "method_total": None, "from": "trunk"}


def _load_point(m: MethodConfig, base_dir, ckpt: Path, total_steps):
    """Model (trainable), state and log of a checkpoint or resume folder."""
    state = torch.load(ckpt / "state.pt", weights_only=True, mmap=True)
    model = m.load(base_dir, ckpt, total_steps=total_steps)
    m.load_extra_state(model, state.get("method", {}))
    log = read_jsonl(ckpt / "train_log.jsonl") if (ckpt / "train_log.jsonl").exists() else []
    return model, state, log


def _load_origin(m: MethodConfig, base_dir, prev: Path, run_cfg: dict, plan: dict):
    """What a job continuing from ``prev`` starts from: ``(checkpoint, model, state, log)`` of
    ``prev``, or, when the keep policy dropped its training state (learnforget.train.keep), of the
    nearest earlier checkpoint of its chain (``continued_from`` in each manifest) that still
    has it, intact and of the same run; None: none has, train from the base. Replaying the
    steps in between gives the same weights as continuing (bitwise on CPU)."""
    from learnforget.core import integrity

    for _attempt in range(3):  # a concurrent job may drop a state between the check and the load
        origin, seen = prev, set()
        while origin is not None and not keep.has_training_state(origin):
            seen.add(origin.resolve())
            earlier = read_json(origin / "manifest.json").get("continued_from")
            origin = Path(earlier) if earlier else None
            if origin is None or origin.resolve() in seen or not (origin / "manifest.json").is_file():
                origin = None
                break
            try:
                integrity.verify(origin)
                _check_same_run(read_json(origin / "manifest.json").get("run_cfg", {}), run_cfg, origin, plan["mode"])
            except (integrity.CorruptCheckpoint, ValueError) as exc:
                log_info(f"not replaying from {origin} ({exc}); training from the base")
                origin = None
                break
        if origin is None:
            return None
        try:
            return (origin, *_load_point(m, base_dir, origin, plan["method_total"]))
        except FileNotFoundError:
            if keep.has_training_state(origin):
                raise
    raise RuntimeError(f"the training state of {prev}'s chain kept disappearing while it was loaded")


def _write_point(m: MethodConfig, model, state: dict, tmp: Path, tokenizer=None) -> None:
    m.save(model, tmp / "model", tokenizer)
    m.save_state(model, tmp)
    torch.save({**state, "method": m.extra_state(model)}, tmp / "state.pt")


def _write_card(m: MethodConfig, model_dir: Path, *, base_dir, run, regime, token_dir, td, duration, unit, state,
                epochs, part, cfg, final_loss) -> None:
    """The adapter's model card (learnforget.core.modelcard): data, method, duration; no scores yet."""
    from learnforget.core import modelcard

    text = modelcard.training_card(
        base_model=modelcard.base_model_of(model_dir, str(base_dir)), run=run, method=m.to_dict(), regime=regime,
        dataset=Path(token_dir).name, data_meta=td.meta, duration=duration, unit=unit, step=state["step"],
        tokens=state["tokens"], epochs=epochs, part=part, train=cfg.result_dict(), seed=cfg.seed,
        final_loss=final_loss)
    modelcard.write_card(model_dir, text)


def finetune(
    base_dir: str | Path,
    token_dir: str | Path,
    regime: str,
    method: dict | MethodConfig,
    train_cfg: dict,
    *,
    duration: float,
    unit: str = "epochs",
    durations: Sequence[float] | None = None,
    part: str = "final",
    prev_checkpoint_dir: str | Path | None = None,
    out_dir: str | Path,
    resume_dir: str | Path | None = None,
    seed: int | None = None,
    progress: bool = True,
    run_name: str | None = None,
    packing: bool = False,
    device: str = "cpu",
) -> dict:
    """Train one job of a run (see :func:`plan_segment`) and write its checkpoint folder ``out_dir``.

    ``durations`` are all durations of the run (same unit). ``prev_checkpoint_dir`` is what the
    job continues from (the previous duration's checkpoint, or this duration's trunk); it is
    ignored, with a note in the manifest, when the run's mode restarts from the base. With
    ``resume_dir`` the job snapshots its whole state there every ``save_every_steps`` /
    ``save_every_minutes``; a rerun after a crash or kill continues from the snapshot (when it
    belongs to this same job) and gives the same result as an uninterrupted run; the snapshot
    is deleted once ``out_dir`` is complete. Multi-process (``WORLD_SIZE`` > 1): every process
    trains its share, the main one writes. Returns the manifest.
    """
    wall0 = time.time()
    duration = float(duration)
    cfg = TrainConfig.from_dict(train_cfg)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    m = method if isinstance(method, MethodConfig) else method_from_dict(method)
    torch.set_num_threads(cfg.threads)
    dist = Dist(device, method=m)
    durations = sorted({float(d) for d in (durations or [duration])} | {duration})

    tokenizer = _load_tokenizer(base_dir)
    td = load_tokens(token_dir)
    if td.eos_id is not None and td.eos_id != tokenizer.eos_token_id:
        raise ValueError(f"tokens use eos id {td.eos_id} but the tokenizer's is {tokenizer.eos_token_id}")
    batches = Batches(td, regime, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
                      packing=packing, group_by_length=cfg.group_by_length)
    steps = duration_to_steps(duration, unit, batches)
    plan = plan_segment(cfg, m, part, steps, duration_to_steps(max(durations), unit, batches))
    end_step, schedule_total = plan["end_step"], plan["schedule_total"]
    run_cfg = {"base_dir": str(base_dir), "token_dir": str(token_dir), "regime": regime, "packing": packing,
               "method": m.to_dict(), "train_cfg": cfg.result_dict(), "unit": unit, "durations": durations,
               "tokens_sha256": _dir_fingerprint(Path(token_dir), ("ids.npy", "mask.npy", "offsets.npy")),
               "base_sha256": _base_fingerprint(Path(base_dir))}
    job = {"part": part, "end_step": end_step, "schedule_total": schedule_total}

    state, prev_log, continued_from, resumed_from, note, seg_start = None, [], None, None, None, None
    continued_fp = None  # sha256 of the manifest of the checkpoint continued from (learnforget.train.keep)
    snap = Path(resume_dir) if resume_dir is not None else None
    if snap is not None and (snap / "job.json").exists():
        saved = read_json(snap / "job.json")
        if saved.get("run_cfg") == run_cfg and saved.get("job") == job:
            model, state, prev_log = _load_point(m, base_dir, snap, plan["method_total"])
            resumed_from = int(state["step"])
            continued_from, seg_start = saved.get("continued_from"), saved.get("start_step")
            continued_fp, note = saved.get("continued_from_manifest"), saved.get("note")
            log_info(f"resuming {run_name or m.type} from its snapshot at step {resumed_from} ({snap})")
        elif dist.is_main:
            log_info(f"ignoring the snapshot in {snap}: it belongs to another job or configuration")
            shutil.rmtree(snap)
    if state is None and prev_checkpoint_dir is not None and plan["from"] == "base":
        note = (f"not continued from {prev_checkpoint_dir}: the run's schedule depends on its length "
                f"(mode {plan['mode']!r}); trained from the base")
    elif state is None and prev_checkpoint_dir is not None:
        prev = Path(prev_checkpoint_dir)
        _check_same_run(read_json(prev / "manifest.json").get("run_cfg", {}), run_cfg, prev, plan["mode"])
        loaded = _load_origin(m, base_dir, prev, run_cfg, plan)
        if loaded is not None:
            origin, model, state, prev_log = loaded
            if state["step"] > end_step:
                raise ValueError(f"{origin} is at step {state['step']}, beyond this job's {end_step} steps")
            if plan["mode"] == "longest" and state["schedule_total"] != schedule_total:
                raise ValueError(f"{origin} used a schedule of {state['schedule_total']} steps, "
                                 f"this run {schedule_total}")
            state["schedule_total"] = schedule_total
            continued_from, continued_fp = str(origin), keep.manifest_fingerprint(origin)
        if continued_from != str(prev):
            note = (f"the training state of {prev} was dropped by the keep policy: replayed from "
                    f"{continued_from or 'the base'}")
            log_info(note)
    elif state is None and plan["from"] == "trunk":
        raise ValueError("a cool-down branch needs its trunk checkpoint (prev_checkpoint_dir)")
    if state is None:
        base = load_model(base_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = m.prepare(base, total_steps=plan["method_total"])
    trainable, total = count_parameters(model)
    start_step = state["step"] if state else 0
    tokens_before = state["tokens"] if state else 0
    seg_start = start_step if resumed_from is None else seg_start

    def snapshot(model_now, state_now):
        with atomic_path(snap) as tmp:
            tmp.mkdir()
            _write_point(m, model_now, state_now, tmp)
            shutil.copyfile(live_log, tmp / "train_log.jsonl")
            write_json(tmp / "job.json", {"run_cfg": run_cfg, "job": job, "continued_from": continued_from,
                                          "continued_from_manifest": continued_fp, "note": note,
                                          "start_step": seg_start})

    peak = measured_peak_flops(dist.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32) \
        if dist.is_main else None
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out_dir)) if dist.is_main else Path(tempfile.mkdtemp())
        tmp.mkdir(exist_ok=True)
        live_log = tmp / "train_log.jsonl"
        live_log.write_text("".join(json.dumps(r) + "\n" for r in prev_log if r["step"] <= start_step))
        t0 = time.perf_counter()
        model, new_state = train(model, batches, cfg, start_step=start_step, end_step=end_step,
                                 schedule_total=schedule_total, state=state, log_path=live_log, progress=progress,
                                 desc=f"{run_name or m.type} {part} {duration:g} {unit}", method=m,
                                 snapshot=snapshot if snap is not None else None, dist=dist,
                                 tensorboard_dir=tmp / "tensorboard" if cfg.tensorboard else None)
        job_seconds = time.perf_counter() - t0
        if not dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            return {}
        _write_point(m, model, new_state, tmp, tokenizer)
        if m.is_adapter:  # a model card replaces peft's template (before the manifest hashes the folder)
            _write_card(m, tmp / "model", base_dir=base_dir, run=run_name, regime=regime, token_dir=token_dir,
                        td=td, duration=duration, unit=unit, state=new_state, epochs=new_state["step"] /
                        batches.steps_per_epoch, part=part, cfg=cfg, final_loss=_last_loss(live_log))
        base_cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        fpt = flops_per_token(base_cfg, cfg.seq_len)
        job_tokens = new_state["tokens"] - tokens_before
        manifest = {
            "kind": "finetune",
            "run": run_name,
            "part": part,
            "mode": plan["mode"],
            "run_cfg": run_cfg,
            "method": m.to_dict(),
            "is_adapter": m.is_adapter,
            "regime": regime,
            "duration": duration,
            "unit": unit,
            "step": new_state["step"],
            "start_step": seg_start,
            "resumed_from_step": resumed_from,
            "schedule_total": schedule_total,
            "steps_per_epoch": batches.steps_per_epoch,
            "epochs_seen": new_state["step"] / batches.steps_per_epoch,
            "tokens": new_state["tokens"],
            "loss_tokens": new_state["loss_tokens"],
            "continued_from": continued_from,
            "continued_from_manifest": continued_fp,
            "note": note,
            "job_train_seconds": round(job_seconds, 3),
            "job_tokens": job_tokens,
            **speed(job_tokens, job_seconds, fpt, peak),
            "train_seconds_total": round(new_state["elapsed"], 3),
            "final_loss": _last_loss(live_log),
            "parameters": {"trainable": trainable, "total": total},
            "method_summary": m.summary(model),
            "processes": dist.world,
            "fsdp": dist.fsdp,
            "device": str(dist.device),
            "precision": cfg.precision,
            "threads": cfg.threads,
            **peak_memory_mib(dist.device),
            "code_version": _code_version(),
            "versions": _versions(),
            "files": _file_hashes(tmp),
        }
        manifest["job_wall_seconds"] = round(time.time() - wall0, 3)
        write_json(tmp / "manifest.json", manifest)
    dist.barrier()
    if snap is not None and snap.exists():
        shutil.rmtree(snap)
    return manifest


def _check_same_run(prev: dict, now: dict, where: Path, mode: str) -> None:
    for key in ("regime", "packing", "method", "train_cfg", "unit", "tokens_sha256", "base_sha256"):
        if prev.get(key) != now.get(key):
            raise ValueError(f"cannot continue from {where}: its {key} differs "
                             f"({prev.get(key)!r} there, {now.get(key)!r} here)")
    if mode == "longest" and prev.get("durations") != now.get("durations"):
        raise ValueError(f"cannot continue from {where}: its schedule spans durations {prev.get('durations')}, "
                         f"this one {now.get('durations')}")
