"""Training settings: the ``train`` section of a run (:class:`TrainConfig`), the duration units and
modes, which keys are runtime-only, and where each job of a run starts and ends
(:func:`plan_segment`). Read by config validation, the planner and the loop; no torch here."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from learnforget.train.methods import MethodConfig
from learnforget.train.schedules import SCHEDULES, cooldown_start, has_cooldown, length_independent, make_schedule

UNITS = ("epochs", "tokens", "steps")
# The optimizers learnforget.train.optim.make_optimizer builds (named here, without torch).
OPTIMIZERS = ("adamw", "lion")
SCHEDULE_LENGTHS = ("duration", "longest")
PRECISIONS = ("fp32", "bf16")
# Settings that change how a job runs but not what it computes: excluded from the comparison
# that decides whether a checkpoint may be continued, and from Snakemake's params.
RUNTIME_KEYS = ("threads", "save_every_steps", "save_every_minutes", "tensorboard", "micro_batch_size", "compile")
# Settings added after checkpoints existed whose off value is the earlier behaviour: left out of
# the run's identity while off, so earlier checkpoints can still be continued and Snakemake's
# params of existing studies do not change (which would retrain them).
OFF_BY_DEFAULT_KEYS = ("group_by_length",)

# How the durations of one run relate (TrainConfig.mode):
MODES = {
    "continue": "one trunk: each duration continues from the previous one (schedule without cool-down)",
    "branch": "one trunk to each duration's cool-down start, then a cool-down branch per duration",
    "longest": "one schedule over the longest duration; shorter ones are its intermediate checkpoints",
    "restart": "each duration is its own run from the base (the schedule depends on the length)",
}


# ----------------------------------------------------------------------------- settings
@dataclass
class TrainConfig:
    """Training settings (``train_cfg``); unknown keys and bad values raise ValueError naming them."""

    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step (the global batch)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per sequence (CPT window / IFT truncation)."})
    micro_batch_size: int | None = field(default=None, metadata={
        "help": "Sequences per forward/backward pass of a process; the batch is accumulated over passes "
                "(null: a process's whole share of the batch at once). Changes memory, not results "
                "(up to float rounding), so changing it retrains nothing."})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (torch.optim.AdamW) or lion (decoupled Lion, the paper's; weight decay follows the schedule)."})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "Adam/Lion betas."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay on matrices (dim >= 2)."})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global gradient norm; 0 turns clipping off."})
    schedule: str = field(default="constant", metadata={
        "help": "LR schedule: constant, cosine (to min_lr_ratio), inverse_sqrt or wsd (each with a cool-down)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    warmup_fraction: float | None = field(
        default=None, metadata={"help": "Warm-up as a fraction of the schedule's length (instead of warmup_steps; "
                                        "makes every schedule length-dependent)."})
    min_lr_ratio: float = field(default=0.01, metadata={
        "help": "Final LR of cosine and of a cool-down, as a fraction of the peak."})
    cooldown_fraction: float = field(default=0.2, metadata={
        "help": "inverse_sqrt/wsd: share of each duration spent in the linear cool-down (0: none)."})
    schedule_length: str = field(
        default="duration",
        metadata={"help": "Length of a length-dependent schedule (cosine): 'duration' (each duration is its own run, "
                          "trained from the base) or 'longest' (one schedule over the run's longest duration; "
                          "shorter durations are its intermediate checkpoints)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "IFT with padded rows: batches of examples of similar length (each epoch's shuffled order is "
                "sorted by length within groups of 64 batches, longest first, as transformers' group_by_length), "
                "so less padding is computed (bench/train.py). Every example is still seen once per epoch, but "
                "which examples share a batch changes, and so do the results. Not for cpt or packed runs."})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, or bf16 (autocast; fp32 master weights and optimizer state)."})
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads (set from the rule's threads)."})
    save_every_steps: int = field(default=0, metadata={
        "help": "Save the resumable training state every N steps (0: off); a killed job resumes from it."})
    save_every_minutes: float = field(default=10.0, metadata={
        "help": "Also save it every N minutes of training (0: off)."})
    compile: bool = field(default=False, metadata={
        "help": "Run the model's forward and backward through torch.compile (inductor). The first steps compile "
                "(about 23 s cold on 2 CPU cores for the default model; Inductor's cache makes later jobs "
                "start faster); steady steps were 1.03-1.07x faster on CPU (bench/train.py). Worth it for "
                "jobs of thousands of steps, not for the default study's. Same results within float rounding."})
    tensorboard: bool = field(default=False, metadata={
        "help": "Also log loss, lr and grad norm to TensorBoard (in the checkpoint's tensorboard/; needs tensorboard)."})
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
        for name in ("compile", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if self.micro_batch_size is not None and not (is_int(self.micro_batch_size) and self.micro_batch_size >= 1):
            bad("micro_batch_size", "must be a positive integer or null")
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
        if not (is_num(self.cooldown_fraction) and 0 <= self.cooldown_fraction < 1):
            bad("cooldown_fraction", "must be in [0, 1)")
        if self.schedule_length not in SCHEDULE_LENGTHS:
            bad("schedule_length", f"must be one of {', '.join(SCHEDULE_LENGTHS)}")
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}")
        if not (is_int(self.save_every_steps) and self.save_every_steps >= 0):
            bad("save_every_steps", "must be an integer >= 0")
        if not (is_num(self.save_every_minutes) and self.save_every_minutes >= 0):
            bad("save_every_minutes", "must be a number >= 0")
        if not isinstance(self.tensorboard, bool):
            bad("tensorboard", "must be true or false")
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

    def result_dict(self) -> dict[str, Any]:
        """The settings that change what training computes (``to_dict`` minus RUNTIME_KEYS, and
        minus the OFF_BY_DEFAULT_KEYS that are off)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RUNTIME_KEYS and not (k in OFF_BY_DEFAULT_KEYS and v is False)}

    @property
    def length_independent(self) -> bool:
        """The schedule's trunk gives every step the same learning rate whatever the run's length."""
        return length_independent(self.schedule) and self.warmup_fraction is None

    @property
    def has_cooldown(self) -> bool:
        return has_cooldown(self.schedule, self.cooldown_fraction)

    def mode(self, method: MethodConfig | None = None) -> str:
        """How the run's durations relate (see MODES). A method whose setup depends on the run's
        length (AdaLoRA's budget schedule) cannot share a trunk."""
        if self.length_independent and not (method is not None and method.needs_total_steps):
            return "branch" if self.has_cooldown else "continue"
        return "longest" if self.schedule_length == "longest" else "restart"

    def warmup_for(self, total_steps: int | None) -> int:
        if self.warmup_fraction is not None:
            return int(math.ceil(self.warmup_fraction * total_steps))
        return self.warmup_steps

    def schedule_fn(self, total_steps: int | None):
        """The multiplier ``step -> float``; ``total_steps=None`` is the trunk alone."""
        return make_schedule(self.schedule, warmup_steps=self.warmup_for(total_steps), total_steps=total_steps,
                             min_lr_ratio=self.min_lr_ratio, cooldown_fraction=self.cooldown_fraction)


# ----------------------------------------------------------------------------- jobs of a run
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
