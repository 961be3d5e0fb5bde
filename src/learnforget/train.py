"""The training engine: one loop for base pretraining and for finetuning.

Reads top to bottom: the settings (:class:`TrainConfig`), the loop (:func:`train`), and the two
entry points the pipeline scripts call: :func:`pretrain_base` and :func:`finetune`.

Continuation. A finetuning checkpoint holds the model (or adapter) and ``state.pt`` (optimizer,
step, data position, RNG states, tokens seen). :func:`finetune` continues from an earlier
checkpoint of the same run only when the learning rate at every step is the same whatever the
duration: the schedule is length-independent (constant) or ``schedule_length: longest`` makes
every duration of the run share one schedule over the longest duration. Continuing then gives
the same weights as training in one go (bitwise on CPU with the same thread count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import random
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from learnforget.io import atomic_path, read_json, read_jsonl, sha256_file, write_json
from learnforget.methods import MethodConfig, method_from_dict
from learnforget.modeling import build_model, count_parameters, flops_per_token, load_model
from learnforget.schedules import SCHEDULES, length_independent, make_schedule
from learnforget.tokens import IGNORE_INDEX, Batches, load_tokens, mix

OPTIMIZERS = ("adamw",)
UNITS = ("epochs", "tokens", "steps")
SCHEDULE_LENGTHS = ("duration", "longest")


# ----------------------------------------------------------------------------- settings
@dataclass
class TrainConfig:
    """Training settings (``train_cfg``); unknown keys and bad values raise ValueError naming them."""

    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence (CPT window / IFT truncation)."})
    optimizer: str = field(default="adamw", metadata={"help": "Optimizer: adamw (torch.optim.AdamW)."})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "Adam betas."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay on matrices (dim >= 2)."})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global gradient norm; 0 turns clipping off."})
    schedule: str = field(default="constant", metadata={"help": "LR schedule: constant, cosine, wsd."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    warmup_fraction: float | None = field(
        default=None, metadata={"help": "Warm-up as a fraction of the schedule's length (instead of warmup_steps)."})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine/wsd: final LR as a fraction of the peak."})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: fraction of the steps spent decaying."})
    schedule_length: str = field(
        default="duration",
        metadata={"help": "Length of a length-dependent schedule: 'duration' (each duration is its own run, "
                          "trained from the base) or 'longest' (one schedule over the run's longest duration; "
                          "shorter durations are its intermediate checkpoints and may be continued)."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    seed: int = field(default=0, metadata={"help": "Seed for init, adapter init, data order, dropout."})

    def __post_init__(self):
        def bad(name, msg):
            raise ValueError(f"train_cfg.{name}: {msg}, got {getattr(self, name)!r}")

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (is_num(self.lr) and self.lr > 0):
            bad("lr", "must be a positive number")
        for name in ("batch_size", "seq_len", "threads"):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= 1):
                bad(name, "must be a positive integer")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
                and all(is_num(b) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (is_num(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be a number >= 0")
        if not (is_num(self.eps) and self.eps > 0):
            bad("eps", "must be a positive number")
        if not (is_num(self.grad_clip) and self.grad_clip >= 0):
            bad("grad_clip", "must be a number >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if not (is_int(self.warmup_steps) and self.warmup_steps >= 0):
            bad("warmup_steps", "must be an integer >= 0")
        if self.warmup_fraction is not None:
            if not (is_num(self.warmup_fraction) and 0 <= self.warmup_fraction < 1):
                bad("warmup_fraction", "must be a number in [0, 1)")
            if self.warmup_steps:
                bad("warmup_fraction", "cannot be combined with warmup_steps > 0")
        if not (is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            bad("min_lr_ratio", "must be in [0, 1]")
        if not (is_num(self.decay_fraction) and 0 <= self.decay_fraction <= 1):
            bad("decay_fraction", "must be in [0, 1]")
        if self.schedule_length not in SCHEDULE_LENGTHS:
            bad("schedule_length", f"must be one of {', '.join(SCHEDULE_LENGTHS)}")
        if not is_int(self.seed):
            bad("seed", "must be an integer")

    @classmethod
    def from_dict(cls, d: dict | "TrainConfig" | None) -> "TrainConfig":
        if isinstance(d, TrainConfig):
            return d
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train_cfg: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @property
    def length_independent(self) -> bool:
        """Every step's learning rate is the same whatever the run's length (so a checkpoint
        continues to any longer duration and adding a duration trains only what is new)."""
        return length_independent(self.schedule) and self.warmup_fraction is None

    @property
    def spans_longest(self) -> bool:
        """One length-dependent schedule over the run's longest duration; shorter durations are
        its intermediate checkpoints."""
        return not self.length_independent and self.schedule_length == "longest"

    @property
    def continues(self) -> bool:
        """Whether a duration continues from the run's previous one instead of the base."""
        return self.length_independent or self.spans_longest

    def warmup_for(self, total_steps: int) -> int:
        if self.warmup_fraction is not None:
            return int(math.ceil(self.warmup_fraction * total_steps))
        return self.warmup_steps

    def schedule_fn(self, total_steps: int):
        return make_schedule(self.schedule, warmup_steps=self.warmup_for(total_steps), total_steps=total_steps,
                             min_lr_ratio=self.min_lr_ratio, decay_fraction=self.decay_fraction)


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
def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, method: MethodConfig | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (nanoGPT's split).
    A method's :meth:`~learnforget.methods.MethodConfig.weight_decay` overrides the config's."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    wd = method.weight_decay() if method is not None else None
    wd = cfg.weight_decay if wd is None else wd
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


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
) -> tuple[torch.nn.Module, dict]:
    """Train ``model`` from ``start_step`` to ``end_step`` (optimizer updates) and return (model, state).

    ``state`` is what a previous call returned (to continue); without it the optimizer is fresh,
    the data starts at epoch 0 and the RNGs are seeded with ``cfg.seed``. The LR at step s is
    ``cfg.lr * schedule(s)`` with the schedule spanning ``schedule_total`` steps (default
    ``end_step``). One JSONL record per step is appended to ``log_path``: step (after the
    update, 1-based), loss, lr, grad_norm, tokens (cumulative non-padding inputs), loss_tokens,
    epoch (fractional), elapsed (cumulative training seconds).

    ``method`` (a :class:`~learnforget.methods.MethodConfig`) gets its per-step hooks called:
    ``regularizer`` is added to the loss, ``lr_multiplier`` scales the schedule and
    ``after_step`` runs after each optimizer step.
    """
    cfg = TrainConfig.from_dict(cfg)
    torch.set_num_threads(cfg.threads)
    schedule_total = end_step if schedule_total is None else schedule_total
    sched = cfg.schedule_fn(schedule_total)
    opt = make_optimizer(model, cfg, method)
    params = [p for g in opt.param_groups for p in g["params"]]
    if state is not None:
        if int(state["step"]) != start_step:
            raise ValueError(f"state is at step {state['step']} but start_step is {start_step}")
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

    model.train()
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    bar = tqdm(total=end_step - start_step, desc=desc, disable=not progress, mininterval=2.0, unit="step")
    t0 = time.perf_counter()
    try:
        for step in range(start_step, end_step):
            lr = cfg.lr * sched(step) * (method.lr_multiplier(step) if method is not None else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = next(batches)
            logits = model(input_ids=batch.input_ids, use_cache=False).logits
            if batch.n_loss_tokens:
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                       batch.targets.reshape(-1), ignore_index=IGNORE_INDEX)
            else:  # nothing to learn in this batch (e.g. prompts longer than seq_len)
                loss = logits.sum() * 0.0
            reg = method.regularizer(model) if method is not None else None
            opt.zero_grad(set_to_none=True)
            (loss if reg is None else loss + reg).backward()
            if cfg.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=False))
            else:
                gnorm = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            opt.step()
            if method is not None:
                method.after_step(model, opt, step)
            tokens += batch.n_tokens
            loss_tokens += batch.n_loss_tokens
            now = time.perf_counter()
            loss_value = float(loss.detach())
            if log is not None:
                rec = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                       "loss_tokens": loss_tokens,
                       "epoch": round(batches.epoch + batches.index / batches.n_items, 6),
                       "elapsed": round(elapsed + now - t0, 4)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    elapsed += time.perf_counter() - t0
    new_state = {
        "step": end_step,
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "elapsed": elapsed,
        "position": list(batches.position),
        "optimizer": opt.state_dict(),
        "rng": _rng_state(),
        "schedule_total": schedule_total,
        "train_cfg": cfg.to_dict(),
    }
    return model, new_state


# ----------------------------------------------------------------------------- helpers
def _dir_fingerprint(root: Path, names: Sequence[str]) -> str:
    """sha256 over the named files of a folder (those that exist), in order."""
    h = hashlib.sha256()
    for name in names:
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + sha256_file(root / name).encode())
    return h.hexdigest()


def _file_hashes(root: Path, skip: Sequence[str] = ("manifest.json",)) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and str(p.relative_to(root)) not in skip}


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _speed(job_tokens: int, job_seconds: float, fpt: float) -> dict:
    tps = job_tokens / job_seconds if job_seconds > 0 else None
    return {"tokens_per_s": round(tps, 1) if tps else None,
            "flops_per_token": fpt, "gflops_per_s": round(tps * fpt / 1e9, 3) if tps else None}


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
    (see :func:`learnforget.tokens.mix`); an epoch is one pass over the mix. Returns the manifest.
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
        model, state = train(model, batches, cfg, end_step=steps, log_path=live_log, progress=progress,
                             desc="base")
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
            **_speed(state["tokens"], state["elapsed"], fpt),
            "final_loss": _last_loss(tmp / "train_log.jsonl"),
            "parameters": {"trainable": trainable, "total": total},
            "threads": cfg.threads,
            "peak_rss_mib": _peak_rss_mib(),
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
    prev_checkpoint_dir: str | Path | None = None,
    out_dir: str | Path,
    seed: int | None = None,
    progress: bool = True,
    run_name: str | None = None,
) -> dict:
    """Finetune the base with ``method`` up to ``duration`` and write the checkpoint dir ``out_dir``.

    ``durations`` are all durations of the run (same unit); the schedule spans the longest of
    them when it is length-independent or ``schedule_length == 'longest'`` (then the run may
    continue from ``prev_checkpoint_dir``, an earlier duration's checkpoint of the same run),
    otherwise the schedule spans ``duration`` and training starts from the base. Returns the
    manifest.
    """
    wall0 = time.time()
    duration = float(duration)
    cfg = TrainConfig.from_dict(train_cfg)
    if seed is not None:
        cfg = dataclasses.replace(cfg, seed=int(seed))
    m = method if isinstance(method, MethodConfig) else method_from_dict(method)
    torch.set_num_threads(cfg.threads)
    durations = [float(d) for d in (durations or [duration])]
    if float(duration) not in durations:
        durations.append(float(duration))

    tokenizer = _load_tokenizer(base_dir)
    td = load_tokens(token_dir)
    if td.eos_id is not None and td.eos_id != tokenizer.eos_token_id:
        raise ValueError(f"tokens use eos id {td.eos_id} but the tokenizer's is {tokenizer.eos_token_id}")
    batches = Batches(td, regime, cfg.batch_size, cfg.seq_len, seed=cfg.seed, pad_id=tokenizer.pad_token_id)
    steps = duration_to_steps(duration, unit, batches)
    # The schedule spans this duration, or the run's longest one (see TrainConfig.continues).
    independent, shared = cfg.length_independent, cfg.continues
    schedule_total = duration_to_steps(max(durations), unit, batches) if cfg.spans_longest else steps
    run_cfg = {"base_dir": str(base_dir), "token_dir": str(token_dir), "regime": regime,
               "method": m.to_dict(), "train_cfg": cfg.to_dict(), "unit": unit, "durations": sorted(durations),
               "tokens_sha256": _dir_fingerprint(Path(token_dir), ("ids.npy", "mask.npy", "offsets.npy")),
               "base_sha256": _dir_fingerprint(Path(base_dir), ("config.json", "model.safetensors"))}

    state, prev_log, continued_from, note = None, [], None, None
    if prev_checkpoint_dir is not None and not shared:
        note = (f"not continued from {prev_checkpoint_dir}: schedule {cfg.schedule!r} depends on the "
                f"run length (schedule_length=duration); trained from the base")
    elif prev_checkpoint_dir is not None:
        prev = Path(prev_checkpoint_dir)
        prev_manifest = read_json(prev / "manifest.json")
        _check_same_run(prev_manifest.get("run_cfg", {}), run_cfg, prev)
        state = torch.load(prev / "state.pt", weights_only=True)
        if state["step"] > steps:
            raise ValueError(f"{prev} is at step {state['step']}, beyond this duration's {steps} steps")
        if not independent and state["schedule_total"] != schedule_total:
            raise ValueError(f"{prev} used a schedule of {state['schedule_total']} steps, this run {schedule_total}")
        model = m.load(base_dir, prev, total_steps=schedule_total)
        m.load_extra_state(model, state.get("method", {}))
        prev_log = read_jsonl(prev / "train_log.jsonl")
        continued_from = str(prev)
    if state is None:
        base = load_model(base_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = m.prepare(base, total_steps=schedule_total)
    trainable, total = count_parameters(model)
    start_step = state["step"] if state else 0
    tokens_before = state["tokens"] if state else 0

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        log = tmp / "train_log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in prev_log))
        t0 = time.perf_counter()
        model, new_state = train(model, batches, cfg, start_step=start_step, end_step=steps,
                                 schedule_total=schedule_total, state=state, log_path=log, progress=progress,
                                 desc=f"{run_name or m.type} {duration:g} {unit}", method=m)
        job_seconds = time.perf_counter() - t0
        m.save(model, tmp / "model", tokenizer)
        m.save_state(model, tmp)
        new_state["method"] = m.extra_state(model)
        torch.save(new_state, tmp / "state.pt")
        base_cfg = model.config if not m.is_adapter else model.get_base_model().config
        fpt = flops_per_token(base_cfg, cfg.seq_len)
        job_tokens = new_state["tokens"] - tokens_before
        manifest = {
            "kind": "finetune",
            "run": run_name,
            "run_cfg": run_cfg,
            "method": m.to_dict(),
            "is_adapter": m.is_adapter,
            "regime": regime,
            "duration": float(duration),
            "unit": unit,
            "step": new_state["step"],
            "start_step": start_step,
            "schedule_total": schedule_total,
            "steps_per_epoch": batches.steps_per_epoch,
            "epochs_seen": new_state["step"] / batches.steps_per_epoch,
            "tokens": new_state["tokens"],
            "loss_tokens": new_state["loss_tokens"],
            "continued_from": continued_from,
            "note": note,
            "job_train_seconds": round(job_seconds, 3),
            "job_tokens": job_tokens,
            **_speed(job_tokens, job_seconds, fpt),
            "train_seconds_total": round(new_state["elapsed"], 3),
            "final_loss": _last_loss(log),
            "parameters": {"trainable": trainable, "total": total},
            "threads": cfg.threads,
            "peak_rss_mib": _peak_rss_mib(),
            "versions": _versions(),
            "files": _file_hashes(tmp),
        }
        manifest["job_wall_seconds"] = round(time.time() - wall0, 3)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _check_same_run(prev: dict, now: dict, where: Path) -> None:
    def comparable(run_cfg: dict, key: str):
        value = run_cfg.get(key)
        if key == "train_cfg" and isinstance(value, dict):  # thread count does not change the run
            value = {k: v for k, v in value.items() if k != "threads"}
        return value

    for key in ("regime", "method", "train_cfg", "unit", "tokens_sha256", "base_sha256"):
        if comparable(prev, key) != comparable(now, key):
            raise ValueError(f"cannot continue from {where}: its {key} differs "
                             f"({prev.get(key)!r} there, {now.get(key)!r} here)")
