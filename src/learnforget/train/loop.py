"""The training engine: one loop for base pretraining and for finetuning.

Reads top to bottom: the optimizer and the RNG state, the process layout (:class:`Dist`), the
loop (:func:`train`, one optimizer update per :func:`_train_step`), and the two entry points the
pipeline scripts call: :func:`pretrain_base` and :func:`finetune`. The settings are
:mod:`learnforget.train.settings`; checkpoints on disk are :mod:`learnforget.train.checkpoints`.

Durations. A finetuning checkpoint holds the published model (or adapter), ``state.pt``
(optimizer, step, data position, RNG states, tokens seen, method state) and a manifest. How the
durations of a run relate is its *mode* (:data:`~learnforget.train.settings.MODES`,
:meth:`TrainConfig.mode`): with a length-independent schedule each duration continues from the
previous one (``continue``), or, when the schedule ends in a cool-down (inverse_sqrt, wsd), one
trunk runs to each duration's cool-down start and a short cool-down branch per duration gives
its checkpoint (``branch``); a length-dependent schedule (cosine) trains each duration from the
base (``restart``) unless ``schedule_length: longest`` shares one schedule over the longest
duration (``longest``). Continuing gives the same weights as training in one go (bitwise on
CPU, same thread count).

Resume. With a ``resume_dir`` a job snapshots its whole state at an interval; a job killed and
rerun continues from the snapshot and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from learnforget.core import perf
from learnforget.core.io import atomic_path, read_json, write_json
from learnforget.core.provenance import code_version, library_versions
from learnforget.data.tokenizer import load_tokenizer
from learnforget.data.tokens import IGNORE_INDEX, Batches, load_tokens, mix
from learnforget.train import checkpoints, fsdp, keep
from learnforget.train.accounting import measured_peak_flops, peak_memory_mib, speed
from learnforget.train.checkpoints import StartPoint
from learnforget.train.methods import MethodConfig, as_method
from learnforget.train.modeling import build_model, count_parameters, flops_per_token, load_model
from learnforget.train.optim import make_optimizer as _make_optimizer
from learnforget.train.settings import UNITS, TrainConfig, plan_segment

log = logging.getLogger(__name__)


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


# ----------------------------------------------------------------------------- processes
class Dist:
    """The process's place in a (possibly) multi-process job launched by accelerate/torchrun.

    One process: no accelerate, no process group. Several (``WORLD_SIZE`` > 1 in the
    environment): an :class:`accelerate.Accelerator` sets up the process group (gloo on CPU, nccl
    on GPU) and wraps the model in DDP; each process takes every ``world``-th row of the global
    batch, and the loss is scaled so that the averaged gradients equal the one-process gradient
    of the whole batch. A method that shards (``shards_with_fsdp``: full finetuning) is sharded
    over several processes with FSDP2 instead of replicated (:mod:`learnforget.train.fsdp`):
    weights, gradients and optimizer state are split over the processes, and gathered on the
    main one to save.
    """

    def __init__(self, device: str = "cpu", method: MethodConfig | None = None):
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

    def wrap(self, model: torch.nn.Module, cfg: TrainConfig, method: MethodConfig | None):
        """``(model, sharded, optimizer)``: the model as this layout trains it (FSDP-sharded, or
        DDP-wrapped by accelerate) and its optimizer; ``sharded`` is the FSDP model (else None)."""
        sharded = None
        if self.fsdp:
            model = sharded = fsdp.shard_model(model, self.mesh, precision=cfg.precision)
        elif self.accelerator is not None:
            model = self.accelerator.prepare(model)
        opt = make_optimizer(self.unwrap(model), cfg, method)
        if self.accelerator is not None and not self.fsdp:
            opt = self.accelerator.prepare(opt)
        return model, sharded, opt

    def plain_model(self, model, sharded):
        """The plain model to save: under FSDP gathered on the main process (a collective; the
        others get None), else unwrapped from DDP."""
        return fsdp.unsharded_model(sharded) if self.fsdp else self.unwrap(model)


def _state(step, tokens, loss_tokens, elapsed, batches, opt, schedule_total, cfg, model=None) -> dict:
    """The resumable training state. ``model``: the FSDP-sharded model, whose optimizer state is
    gathered to the main process (a collective: every process calls this; others get None)."""
    optimizer = fsdp.full_optimizer_state_dict(model, opt) if model is not None else opt.state_dict()
    return {"step": step, "tokens": tokens, "loss_tokens": loss_tokens, "elapsed": elapsed,
            "position": list(batches.position), "optimizer": optimizer, "rng": _rng_state(),
            "schedule_total": schedule_total, "train_cfg": cfg.to_dict()}


# ----------------------------------------------------------------------------- the loop
def _restore(state: dict | None, start_step: int, end_step: int, opt, sharded, batches: Batches, cfg: TrainConfig,
             dist: Dist) -> tuple[int, int, float]:
    """Continue from ``state`` (optimizer, data position, RNGs) or start fresh (data at epoch 0,
    RNGs seeded with ``cfg.seed``); returns the (tokens, loss_tokens, elapsed) so far."""
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
    return tokens, loss_tokens, elapsed


class _StepLog:
    """Where each step's record goes: the JSONL log and TensorBoard (main process only) and the
    progress bar."""

    def __init__(self, log_path, tensorboard_dir, *, total: int, desc: str, progress: bool, dist: Dist):
        self.tb = None
        if tensorboard_dir is not None and dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("train.tensorboard is on but the tensorboard package is not installed "
                                   "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(str(tensorboard_dir))
        self.file = open(log_path, "a", encoding="utf-8") if (log_path and dist.is_main) else None
        self.bar = tqdm(total=total, desc=desc, disable=not (progress and dist.is_main), mininterval=2.0, unit="step")

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(f"train/{key}", rec[key], rec["step"])
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _accumulate(model, forward, parts, n_loss: float, autocast, method: MethodConfig | None, dist: Dist):
    """Forward and backward of this process's share of the global batch, in micro-batches
    (``parts``); returns the summed cross-entropy of its loss tokens."""
    ce = 0.0
    for i, batch in enumerate(parts):
        last = i == len(parts) - 1
        # DDP: gradients are all-reduced on the last micro-batch's backward only
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
    return ce


def _grad_norm(params, grad_clip: float, dist: Dist) -> float:
    """The global gradient norm, clipped to ``grad_clip`` when it is > 0."""
    if dist.fsdp:  # the global norm over every shard (clipping when grad_clip > 0)
        return fsdp.clip_grad_norm(params, grad_clip)
    if grad_clip > 0 and dist.accelerator is not None:
        return float(dist.accelerator.clip_grad_norm_(params, grad_clip))
    if grad_clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


def _train_step(step: int, model, forward, opt, params, batches: Batches, cfg: TrainConfig,
                method: MethodConfig | None, autocast, dist: Dist):
    """One optimizer update on the next global batch: ``(cross-entropy summed over this
    process's loss tokens, tokens, loss tokens (both over every process), gradient norm)``."""
    items = batches.next_items()
    mine = items[dist.rank::dist.world]
    mb = cfg.micro_batch_size or max(1, len(mine))
    # gradient accumulation: the process's share in passes of micro_batch_size sequences
    parts = [batches.make_batch(mine[i:i + mb]) for i in range(0, max(1, len(mine)), mb)]
    n_tok, n_loss = dist.sum([sum(b.n_tokens for b in parts), sum(b.n_loss_tokens for b in parts)])
    opt.zero_grad(set_to_none=True)
    ce = _accumulate(model, forward, parts, n_loss, autocast, method, dist)
    gnorm = _grad_norm(params, cfg.grad_clip, dist)
    opt.step()
    if method is not None:
        # the method's randomness (e.g. ReLoRA's re-initialisation) is seeded from the step, the
        # same in every process, and does not shift the data order or dropout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            method.after_step(dist.unwrap(model), opt, step)
    return ce, n_tok, n_loss, gnorm


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
    model, sharded, opt = dist.wrap(model, cfg, method)
    params = [p for g in opt.param_groups for p in g["params"]]
    # train.compile: the forward (and so its backward) through inductor; the same parameters
    forward = torch.compile(model) if cfg.compile else model
    tokens, loss_tokens, elapsed = _restore(state, start_step, end_step, opt, sharded, batches, cfg, dist)
    # bf16: autocast, or under FSDP its mixed-precision policy (bf16 compute, fp32 shards)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16,
                              enabled=cfg.precision == "bf16" and not dist.fsdp)
    model.train()  # dropout on
    out = _StepLog(log_path, tensorboard_dir, total=end_step - start_step, desc=desc, progress=progress, dist=dist)
    t0 = last_snap = time.perf_counter()
    try:
        for step in range(start_step, end_step):
            lr = cfg.lr * sched(step) * (method.lr_multiplier(step) if method is not None else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            ce, n_tok, n_loss, gnorm = _train_step(step, model, forward, opt, params, batches, cfg, method,
                                                   autocast, dist)
            tokens += int(n_tok)
            loss_tokens += int(n_loss)
            now = time.perf_counter()
            loss_value = dist.sum([float(ce.detach())])[0] / n_loss if n_loss else 0.0
            out.write({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                       "loss_tokens": loss_tokens, "epoch": round(batches.epoch + batches.index / batches.n_items, 6),
                       "elapsed": round(elapsed + now - t0, 4)})
            due = (cfg.save_every_steps and (step + 1 - start_step) % cfg.save_every_steps == 0) or \
                  (cfg.save_every_minutes and now - last_snap >= 60 * cfg.save_every_minutes)
            if snapshot is not None and due and step + 1 < end_step:
                snap_state = _state(step + 1, tokens, loss_tokens, elapsed + now - t0, batches, opt,
                                    schedule_total, cfg, sharded)
                plain = dist.plain_model(model, sharded)
                if dist.is_main:
                    snapshot(plain, snap_state)
                dist.barrier()
                last_snap = time.perf_counter()
    finally:
        out.close()
    elapsed += time.perf_counter() - t0
    final = _state(end_step, tokens, loss_tokens, elapsed, batches, opt, schedule_total, cfg, sharded)
    # under FSDP the main process gets the gathered, plain model (the others None: they do not save)
    return dist.plain_model(model, sharded), final


# ----------------------------------------------------------------------------- entry points
def _with_seed(train_cfg: dict, seed: int | None) -> TrainConfig:
    """The training settings, with the run's seed when one is given."""
    cfg = TrainConfig.from_dict(train_cfg)
    return dataclasses.replace(cfg, seed=int(seed)) if seed is not None else cfg


def _check_eos(td, tokenizer) -> None:
    if td.eos_id is not None and td.eos_id != tokenizer.eos_token_id:
        raise ValueError(f"tokens use eos id {td.eos_id} but the tokenizer's is {tokenizer.eos_token_id}")


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
    cfg = _with_seed(train_cfg, seed)
    torch.set_num_threads(cfg.threads)
    items = list(token_dirs_with_weights.items()) if isinstance(token_dirs_with_weights, dict) \
        else [tuple(x) for x in token_dirs_with_weights]
    parts = [(load_tokens(d), float(w)) for d, w in items]
    td = mix(parts, seed=cfg.seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    _check_eos(td, tokenizer)
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
            "final_loss": checkpoints.last_loss(tmp / "train_log.jsonl"),
            "parameters": {"trainable": trainable, "total": total},
            "threads": cfg.threads,
            **peak_memory_mib("cpu"),
            "code_version": code_version(),
            "versions": library_versions(),
            "files": checkpoints.file_hashes(tmp),
        }
        manifest["wall_seconds"] = round(time.time() - wall0, 3)
        write_json(tmp / "manifest.json", manifest)
    return manifest


@dataclasses.dataclass
class _Job:
    """One finetuning job: what it trains, on which data, to which point of its run."""

    m: MethodConfig
    cfg: TrainConfig
    dist: Dist
    plan: dict  # plan_segment's
    run_cfg: dict  # the run's identity (_run_identity)
    batches: Batches
    td: object  # the token data (learnforget.data.tokens)
    base_dir: str | Path
    token_dir: str | Path
    regime: str
    duration: float
    unit: str
    part: str
    run_name: str | None

    @property
    def key(self) -> dict:
        """Which job of the run this is (a resume snapshot's ``job.json`` names it)."""
        return {"part": self.part, "end_step": self.plan["end_step"], "schedule_total": self.plan["schedule_total"]}


def _continue_from(prev: Path, m: MethodConfig, base_dir, run_cfg: dict, plan: dict) -> StartPoint:
    """The start of a job that continues the checkpoint ``prev`` (or, when the keep policy dropped
    its training state, replays from the nearest earlier one of its chain that has it)."""
    checkpoints.check_same_run(read_json(prev / "manifest.json").get("run_cfg", {}), run_cfg, prev, plan["mode"])
    start = StartPoint()
    loaded = checkpoints.load_origin(m, base_dir, prev, run_cfg, plan)
    if loaded is not None:
        origin, start.model, start.state, start.log = loaded
        if start.state["step"] > plan["end_step"]:
            raise ValueError(f"{origin} is at step {start.state['step']}, beyond this job's {plan['end_step']} steps")
        if plan["mode"] == "longest" and start.state["schedule_total"] != plan["schedule_total"]:
            raise ValueError(f"{origin} used a schedule of {start.state['schedule_total']} steps, "
                             f"this run {plan['schedule_total']}")
        start.state["schedule_total"] = plan["schedule_total"]
        start.continued_from, start.continued_from_manifest = str(origin), keep.manifest_fingerprint(origin)
    if start.continued_from != str(prev):
        start.note = (f"the training state of {prev} was dropped by the keep policy: replayed from "
                      f"{start.continued_from or 'the base'}")
        log.info(start.note)
    return start


def _start_point(job: _Job, *, snap: Path | None, prev_checkpoint_dir) -> StartPoint:
    """Where a finetuning job starts: its own resume snapshot, the checkpoint it continues, or the
    base with the method's fresh adapters (seeded with ``cfg.seed``)."""
    m, cfg, base_dir, plan, run_cfg = job.m, job.cfg, job.base_dir, job.plan, job.run_cfg
    start = None
    if snap is not None:
        start = checkpoints.read_snapshot(snap, m, base_dir, run_cfg, job.key, plan["method_total"],
                                          is_main=job.dist.is_main)
        if start is not None:
            log.info(f"resuming {job.run_name or m.type} from its snapshot at step {start.resumed_from} ({snap})")
    if start is None and prev_checkpoint_dir is not None and plan["from"] == "base":
        start = StartPoint(note=f"not continued from {prev_checkpoint_dir}: the run's schedule depends on its "
                                f"length (mode {plan['mode']!r}); trained from the base")
    elif start is None and prev_checkpoint_dir is not None:
        start = _continue_from(Path(prev_checkpoint_dir), m, base_dir, run_cfg, plan)
    elif start is None and plan["from"] == "trunk":
        raise ValueError("a cool-down branch needs its trunk checkpoint (prev_checkpoint_dir)")
    start = start or StartPoint()
    if start.state is None:
        base = load_model(base_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            start.model = m.prepare(base, total_steps=plan["method_total"])
    if start.resumed_from is None:
        start.segment_start = start.step
    return start


def _train_job(job: _Job, start: StartPoint, *, snap: Path | None, tmp: Path, live_log: Path, progress: bool):
    """Train the job from its start to its end step (snapshotting into ``snap`` when given);
    returns ``(model, state, seconds)``."""
    m, cfg, plan = job.m, job.cfg, job.plan

    def snapshot(model_now, state_now):
        checkpoints.write_snapshot(snap, m, model_now, state_now, live_log, run_cfg=job.run_cfg, job=job.key,
                                   start=start)

    t0 = time.perf_counter()
    model, new_state = train(start.model, job.batches, cfg, start_step=start.step, end_step=plan["end_step"],
                             schedule_total=plan["schedule_total"], state=start.state, log_path=live_log,
                             progress=progress, desc=f"{job.run_name or m.type} {job.part} {job.duration:g} {job.unit}",
                             method=m, snapshot=snapshot if snap is not None else None, dist=job.dist,
                             tensorboard_dir=tmp / "tensorboard" if cfg.tensorboard else None)
    return model, new_state, time.perf_counter() - t0


def _finetune_manifest(job: _Job, model, *, start: StartPoint, new_state: dict, params: tuple[int, int],
                       tokens_before: int, job_seconds: float, peak, live_log: Path, tmp: Path) -> dict:
    """The checkpoint's manifest: the job, its run, what it continued from, speed, and the sha256
    of every file written so far (the manifest is the checkpoint's integrity record)."""
    m, cfg, plan, batches, dist = job.m, job.cfg, job.plan, job.batches, job.dist
    trainable, total = params
    base_cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    fpt = flops_per_token(base_cfg, cfg.seq_len)
    job_tokens = new_state["tokens"] - tokens_before
    return {
        "kind": "finetune",
        "run": job.run_name,
        "part": job.part,
        "mode": plan["mode"],
        "run_cfg": job.run_cfg,
        "method": m.to_dict(),
        "is_adapter": m.is_adapter,
        "regime": job.regime,
        "duration": job.duration,
        "unit": job.unit,
        "step": new_state["step"],
        "start_step": start.segment_start,
        "resumed_from_step": start.resumed_from,
        "schedule_total": plan["schedule_total"],
        "steps_per_epoch": batches.steps_per_epoch,
        "epochs_seen": new_state["step"] / batches.steps_per_epoch,
        "tokens": new_state["tokens"],
        "loss_tokens": new_state["loss_tokens"],
        "continued_from": start.continued_from,
        "continued_from_manifest": start.continued_from_manifest,
        "note": start.note,
        "job_train_seconds": round(job_seconds, 3),
        "job_tokens": job_tokens,
        **speed(job_tokens, job_seconds, fpt, peak),
        "train_seconds_total": round(new_state["elapsed"], 3),
        "final_loss": checkpoints.last_loss(live_log),
        "parameters": {"trainable": trainable, "total": total},
        "method_summary": m.summary(model),
        "processes": dist.world,
        "fsdp": dist.fsdp,
        "device": str(dist.device),
        "precision": cfg.precision,
        "threads": cfg.threads,
        **peak_memory_mib(dist.device),
        "code_version": code_version(),
        "versions": library_versions(),
        "files": checkpoints.file_hashes(tmp),
    }


def _write_checkpoint(job: _Job, tmp: Path, model, new_state: dict, tokenizer, *, live_log: Path,
                      **manifest_args) -> dict:
    """The published model, its resume files, the model card (adapters) and last the manifest,
    into the checkpoint's temporary folder ``tmp``; returns the manifest."""
    m = job.m
    checkpoints.write_point(m, model, new_state, tmp, tokenizer)
    if m.is_adapter:  # a model card replaces peft's template (before the manifest hashes the folder)
        checkpoints.write_card(m, tmp / "model", base_dir=job.base_dir, run=job.run_name, regime=job.regime,
                               token_dir=job.token_dir, td=job.td, duration=job.duration, unit=job.unit,
                               state=new_state, epochs=new_state["step"] / job.batches.steps_per_epoch,
                               part=job.part, cfg=job.cfg, final_loss=checkpoints.last_loss(live_log))
    return _finetune_manifest(job, model, new_state=new_state, live_log=live_log, tmp=tmp, **manifest_args)


def _run_identity(m: MethodConfig, cfg: TrainConfig, *, base_dir, token_dir, regime: str, packing: bool, unit: str,
                  durations: list[float]) -> dict:
    """What makes a run itself (the manifest's ``run_cfg``): a job continues or resumes only a
    checkpoint of the same run (:func:`learnforget.train.checkpoints.check_same_run`)."""
    return {"base_dir": str(base_dir), "token_dir": str(token_dir), "regime": regime, "packing": packing,
            "method": m.to_dict(), "train_cfg": cfg.result_dict(), "unit": unit, "durations": durations,
            "tokens_sha256": checkpoints.dir_fingerprint(Path(token_dir), checkpoints.TOKEN_FILES),
            "base_sha256": checkpoints.base_fingerprint(Path(base_dir))}


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
    """Train one job of a run (see :func:`~learnforget.train.settings.plan_segment`) and write its
    checkpoint folder ``out_dir``.

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
    cfg = _with_seed(train_cfg, seed)
    m = as_method(method)
    torch.set_num_threads(cfg.threads)
    dist = Dist(device, method=m)
    durations = sorted({float(d) for d in (durations or [duration])} | {duration})

    tokenizer = load_tokenizer(base_dir)
    td = load_tokens(token_dir)
    _check_eos(td, tokenizer)
    batches = Batches(td, regime, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tokenizer.pad_token_id,
                      packing=packing, group_by_length=cfg.group_by_length)
    # this job's place in the run's schedule
    plan = plan_segment(cfg, m, part, duration_to_steps(duration, unit, batches),
                        duration_to_steps(max(durations), unit, batches))
    run_cfg = _run_identity(m, cfg, base_dir=base_dir, token_dir=token_dir, regime=regime, packing=packing,
                            unit=unit, durations=durations)
    job = _Job(m, cfg, dist, plan, run_cfg, batches, td, base_dir, token_dir, regime, duration, unit, part, run_name)
    snap = Path(resume_dir) if resume_dir is not None else None
    start = _start_point(job, snap=snap, prev_checkpoint_dir=prev_checkpoint_dir)

    params = count_parameters(start.model)  # (trainable, total) as prepared
    tokens_before = start.tokens
    peak = measured_peak_flops(dist.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32) \
        if dist.is_main else None
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(out_dir)) if dist.is_main else Path(tempfile.mkdtemp())
        tmp.mkdir(exist_ok=True)
        live_log = tmp / "train_log.jsonl"
        live_log.write_text("".join(json.dumps(r) + "\n" for r in start.log if r["step"] <= start.step))

        model, new_state, job_seconds = _train_job(job, start, snap=snap, tmp=tmp, live_log=live_log,
                                                   progress=progress)
        if not dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            return {}
        manifest = _write_checkpoint(job, tmp, model, new_state, tokenizer, live_log=live_log, start=start,
                                     params=params, tokens_before=tokens_before, job_seconds=job_seconds, peak=peak)
        manifest["job_wall_seconds"] = round(time.time() - wall0, 3)
        write_json(tmp / "manifest.json", manifest)
    dist.barrier()
    if snap is not None and snap.exists():
        shutil.rmtree(snap)
    return manifest
