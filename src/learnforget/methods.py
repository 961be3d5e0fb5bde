"""The registry of finetuning methods.

Each method is a config dataclass (fields documented in ``metadata["help"]``, validated in
``__post_init__``) registered under a name with :func:`register`. A method knows how to turn a
base model into the model to train (:meth:`MethodConfig.prepare`), how to save what it trained
(:meth:`MethodConfig.save`) and how to load that again to continue (:meth:`MethodConfig.load`).
Adding a method is one new registered class; nothing else in the code names methods.

A config file names a method by ``type`` plus its fields::

    method: {type: lora, rank: 16, target: all}   # alpha defaults to 2 * rank (as the paper)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from learnforget.modeling import load_model

METHODS: dict[str, type["MethodConfig"]] = {}

# Llama linear module names per target group (the paper's "attention", "MLP", "all").
TARGET_GROUPS: dict[str, list[str]] = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
TARGET_GROUPS["all"] = TARGET_GROUPS["attention"] + TARGET_GROUPS["mlp"]


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


def _check(cond: bool, cls_name: str, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{cls_name}.{field_name}: {msg}")


@dataclass
class MethodConfig:
    """Base class: a method's settings plus the hooks the training loop calls.

    The loop (:func:`learnforget.train.train`) calls, in order:

    - ``prepare(model, total_steps=T)`` once on the base model (T: the optimizer steps of the
      whole schedule; :attr:`needs_total_steps` methods such as AdaLoRA depend on it);
    - every step: ``loss = task_loss + regularizer(model)`` (when not None), backward, gradient
      clipping, the optimizer step with ``lr = peak * schedule(step) * lr_multiplier(step)``, then
      ``after_step(model, optimizer, step)`` (gradients are still there; ``step`` is 0-based);
    - ``summary(model)`` once at the end, recorded in the checkpoint's manifest;
    - ``save(model, ckpt / "model", tokenizer)`` writes the published checkpoint (a normal HF
      model, or a peft adapter when :attr:`is_adapter`); ``save_state(model, ckpt)`` writes
      anything else resuming needs into the checkpoint folder ``ckpt`` (by default nothing);
      ``load(base_dir, ckpt, total_steps=T)`` reads both back as a trainable model;
      ``extra_state(model)`` / ``load_extra_state(model, d)`` carry other method state
      (tensors and plain values) through ``state.pt``.
    """

    type: ClassVar[str] = ""
    is_adapter: ClassVar[bool] = False
    needs_total_steps: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

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


@register("full")
@dataclass
class FullConfig(MethodConfig):
    """Full finetuning: every parameter of the base model is trained."""

    def prepare(self, model, total_steps=None):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, out_dir, tokenizer=None):
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def load(self, base_dir, ckpt_dir, total_steps=None):
        return self.prepare(load_model(Path(ckpt_dir) / "model"))


@register("lora")
@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA (Hu et al. 2021) through peft: W + (alpha / rank) * B @ A on the target modules."""

    is_adapter: ClassVar[bool] = True

    rank: int = field(default=16, metadata={"help": "LoRA rank r (the paper: 16, 64, 256)."})
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling numerator; default 2 * rank (the paper's choice)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target: str | list[str] = field(
        default="all",
        metadata={"help": "Modules to adapt: 'attention' (q,k,v,o), 'mlp' (gate,up,down), 'all', "
                          "or an explicit list of module names."},
    )
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(rank)."})

    def __post_init__(self):
        n = type(self).__name__
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
               n, "rank", f"must be a positive integer, got {self.rank!r}")
        if self.alpha is None:
            self.alpha = 2 * self.rank
        _check(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
               n, "alpha", f"must be a positive number, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               n, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target, str):
            _check(self.target in TARGET_GROUPS, n, "target",
                   f"must be one of {', '.join(TARGET_GROUPS)} or a list of module names, got {self.target!r}")
        else:
            _check(isinstance(self.target, (list, tuple)) and len(self.target) > 0
                   and all(isinstance(t, str) and t for t in self.target),
                   n, "target", f"must be a group name or a non-empty list of module names, got {self.target!r}")
            self.target = list(self.target)
        _check(isinstance(self.rslora, bool), n, "rslora", f"must be true or false, got {self.rslora!r}")

    @property
    def target_modules(self) -> list[str]:
        return list(TARGET_GROUPS[self.target]) if isinstance(self.target, str) else list(self.target)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.rslora,
            bias="none",
        )

    def prepare(self, model, total_steps=None):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def save(self, model, out_dir, tokenizer=None):
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def load(self, base_dir, ckpt_dir, total_steps=None):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base_dir), str(Path(ckpt_dir) / "model"), is_trainable=True)


@register("dora")
@dataclass
class DoraMethodConfig(LoraMethodConfig):
    """DoRA (Liu et al. 2024): LoRA on the direction of W plus a trained magnitude vector."""

    def peft_config(self):
        cfg = super().peft_config()
        cfg.use_dora = True
        return cfg
