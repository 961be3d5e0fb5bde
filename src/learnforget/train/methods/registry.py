"""The method registry: the :class:`MethodConfig` base class, :func:`register`, :data:`METHODS`,
:func:`method_from_dict`, the Llama target groups and the field checks the families share.

A method family (``full.py``, ``lora.py``, ...) defines a config dataclass and registers it;
everything else asks the method what it is (its ClassVars and :meth:`MethodConfig.adapter_shape`),
never its name. This module does not import torch: config validation and the memory planner
(which runs in Snakemake's main process) read methods without it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

METHODS: dict[str, type["MethodConfig"]] = {}

# Llama linear module names per target group (the paper's "attention", "MLP", "all").
TARGET_GROUPS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
TARGET_GROUPS["all"] = TARGET_GROUPS["attention"] + TARGET_GROUPS["mlp"]

TARGET_HELP = ("Modules to adapt: 'attention' (q,k,v,o), 'mlp' (gate,up,down), 'all', "
               "or an explicit list of module names.")


def register(name: str):
    """Class decorator: register a :class:`MethodConfig` subclass under ``name``."""

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.type = name
        METHODS[name] = cls
        return cls

    return deco


def method_from_dict(d: dict) -> "MethodConfig":
    """Build a method config from ``{"type": name, **fields}``; unknown names or fields raise."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError("a method needs a 'type' (one of: %s)" % ", ".join(sorted(METHODS)))
    d = dict(d)
    name = d.pop("type")
    if name not in METHODS:
        raise ValueError(f"unknown method type {name!r} (known: {', '.join(sorted(METHODS))})")
    cls = METHODS[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"method {name!r}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known)) or 'none'})")
    return cls(**d)


def as_method(method: "MethodConfig | dict") -> "MethodConfig":
    """``method`` itself, or the method its config dict describes."""
    return method if isinstance(method, MethodConfig) else method_from_dict(method)


# ----------------------------------------------------------------------------- field checks
def check(cond: bool, cls_name: str, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls_name}.{field_name}: {msg}")


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_adapter_fields(cfg, rank_field: str) -> None:
    """Shared checks of the low-rank methods: positive integer rank (``rank_field``), alpha
    (default 2 * rank), dropout in [0, 1) and a target group or list of module names."""
    n = type(cfg).__name__
    rank = getattr(cfg, rank_field)
    check(is_int(rank) and rank >= 1, n, rank_field, f"must be a positive integer, got {rank!r}")
    if cfg.alpha is None:
        cfg.alpha = 2 * rank
    check(is_number(cfg.alpha) and cfg.alpha > 0, n, "alpha", f"must be a positive number, got {cfg.alpha!r}")
    check(is_number(cfg.dropout) and 0.0 <= cfg.dropout < 1.0, n, "dropout",
          f"must be in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg.target, str):
        check(cfg.target in TARGET_GROUPS, n, "target",
              f"must be one of {', '.join(TARGET_GROUPS)} or a list of module names, got {cfg.target!r}")
    else:
        check(isinstance(cfg.target, (list, tuple)) and len(cfg.target) > 0
              and all(isinstance(t, str) and t for t in cfg.target),
              n, "target", f"must be a group name or a non-empty list of module names, got {cfg.target!r}")
        cfg.target = list(cfg.target)


def resolve_targets(target: str | list[str]) -> list[str]:
    """The module names of a target group, or the explicit list itself."""
    return list(TARGET_GROUPS[target]) if isinstance(target, str) else list(target)


# ----------------------------------------------------------------------------- what a method trains
@dataclass(frozen=True)
class AdapterShape:
    """The low-rank tensors a method trains per layer, as the memory planner
    (:mod:`learnforget.cluster.planner`) sizes them: ``rank * (d_in + d_out)`` per targeted module."""

    rank: int  # AdaLoRA: its initial rank init_r (the tensors keep that size while pruning)
    targets: tuple[str, ...]
    magnitude: bool = False        # DoRA: a magnitude vector of d_out per module
    singular_values: bool = False  # AdaLoRA: ``rank`` singular values (lambda) per module
    importance_scores: int = 0     # per trained parameter: AdaLoRA's ipt, exp_avg_ipt and exp_avg_unc


@dataclass
class MethodConfig:
    """Base class: a method's settings plus the hooks the training loop calls.

    The loop (:func:`learnforget.train.loop.train`) calls, in order:

    - ``prepare(model, total_steps=T)`` once on the base model (T: the optimizer steps of the
      whole schedule; :attr:`needs_total_steps` methods such as AdaLoRA depend on it);
    - every step: ``loss = task_loss + regularizer(model)`` (when not None), backward, gradient
      clipping, the optimizer step with ``lr = peak * schedule(step) * lr_multiplier(step)``, then
      ``after_step(model, optimizer, step)`` (gradients are still there; ``step`` is 0-based);
    - ``summary(model)`` once at the end, recorded in the checkpoint's manifest;
    - ``save(model, ckpt / "model", tokenizer)`` writes the published checkpoint (a normal HF
      model, or a peft adapter when :attr:`is_adapter`); ``save_state(model, ckpt)`` writes
      anything else resuming needs into the checkpoint folder ``ckpt`` (by default nothing;
      a method that writes a file names it in :attr:`state_file`);
      ``load(base_dir, ckpt, total_steps=T)`` reads both back as a trainable model;
      ``extra_state(model)`` / ``load_extra_state(model, d)`` carry other method state
      (tensors and plain values) through ``state.pt``.

    The rest of the code asks a method what it is through the ClassVars below and
    :meth:`adapter_shape`, never through its type name.
    """

    type: ClassVar[str] = ""
    #: The published checkpoint is a peft adapter on the frozen base (not a whole model).
    is_adapter: ClassVar[bool] = False
    #: Every weight of the base is trained (the paper's "full finetuning"), not a low-rank update.
    full_finetuning: ClassVar[bool] = False
    #: Over several processes the trainer shards the model with FSDP (learnforget.train.fsdp)
    #: instead of replicating it with DDP.
    shards_with_fsdp: ClassVar[bool] = False
    #: prepare() depends on the run's total steps (the run's durations cannot share a trunk).
    needs_total_steps: ClassVar[bool] = False
    #: The file save_state() writes into a checkpoint (needed only to continue training from it).
    state_file: ClassVar[str | None] = None
    #: The field holding the adapter's rank (None: not a low-rank method).
    rank_field: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        """``{"type": name, **fields}``; a field whose metadata says ``omit_default`` is left out
        while it has its default (options added later keep the dicts of existing runs unchanged)."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("omit_default") and d[f.name] == f.default:
                del d[f.name]
        return {"type": self.type, **d}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @property
    def adapter_rank(self) -> int | None:
        """The adapter's rank (AdaLoRA: its initial rank); None for a method without one."""
        return None if self.rank_field is None else getattr(self, self.rank_field)

    def adapter_shape(self) -> AdapterShape | None:
        """The low-rank tensors this method trains; None when it has none (full finetuning, or a
        method the memory planner has no model of)."""
        return None

    def prepare(self, model: torch.nn.Module, total_steps: int | None = None) -> torch.nn.Module:
        raise NotImplementedError  # pragma: no cover - abstract

    def regularizer(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def weight_decay(self) -> float | None:
        """A weight decay that overrides the run's ``train.weight_decay`` (None: keep it)."""
        return None

    def lr_multiplier(self, step: int) -> float:
        return 1.0

    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        return None

    def summary(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}

    def extra_state(self, model: torch.nn.Module) -> dict[str, Any]:
        return {}

    def load_extra_state(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        return None

    def save(self, model: torch.nn.Module, out_dir: str | Path, tokenizer=None) -> None:
        raise NotImplementedError  # pragma: no cover

    def save_state(self, model: torch.nn.Module, ckpt_dir: str | Path) -> None:
        return None

    def load(self, base_dir: str | Path, ckpt_dir: str | Path, total_steps: int | None = None) -> torch.nn.Module:
        raise NotImplementedError  # pragma: no cover


def state_files() -> tuple[str, ...]:
    """The files any registered method's ``save_state`` writes, in registration order."""
    return tuple(cls.state_file for cls in METHODS.values() if cls.state_file)


def save_pretrained(model, out_dir: str | Path, tokenizer=None) -> None:
    """``model.save_pretrained(out_dir)``, and the tokenizer next to it when given."""
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into the same-named entries of ``model``'s state dict; every name must exist
    with the same shape."""
    import torch  # lazy: keeps torch out of config validation and the planner

    own = model.state_dict()
    bad = sorted(k for k in tensors if k not in own or own[k].shape != tensors[k].shape)
    if bad:
        raise ValueError(f"{what} does not fit the model: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
