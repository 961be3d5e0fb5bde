"""The registry of finetuning methods.

Each method is a config dataclass (fields documented in ``metadata["help"]``, validated in
``__post_init__``) registered under a name with :func:`register`. A method knows how to turn a
base model into the model to train (:meth:`MethodConfig.prepare`), how to save what it trained
(:meth:`MethodConfig.save`) and how to load that again to continue (:meth:`MethodConfig.load`).
Adding a method is one new registered class; nothing else in the code names methods.

A config file names a method by ``type`` plus its fields::

    method: {type: lora, rank: 16, target: all}   # alpha defaults to 2 * rank (as the paper)
    method: {type: full, dropout: 0.1}            # or wd: 0.1 (the regularised full baselines)
    method: {type: adalora, init_r: 12, target_r: 8}
    method: {type: relora, rank: 16, merge_every: 100}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from learnforget.train.modeling import load_model

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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_adapter_fields(cfg, rank_field: str) -> None:
    """Shared checks of the low-rank methods: positive integer rank (``rank_field``), alpha
    (default 2 * rank), dropout in [0, 1) and a target group or list of module names."""
    n = type(cfg).__name__
    rank = getattr(cfg, rank_field)
    _check(_is_int(rank) and rank >= 1, n, rank_field, f"must be a positive integer, got {rank!r}")
    if cfg.alpha is None:
        cfg.alpha = 2 * rank
    _check(_is_number(cfg.alpha) and cfg.alpha > 0, n, "alpha", f"must be a positive number, got {cfg.alpha!r}")
    _check(_is_number(cfg.dropout) and 0.0 <= cfg.dropout < 1.0, n, "dropout",
           f"must be in [0, 1), got {cfg.dropout!r}")
    if isinstance(cfg.target, str):
        _check(cfg.target in TARGET_GROUPS, n, "target",
               f"must be one of {', '.join(TARGET_GROUPS)} or a list of module names, got {cfg.target!r}")
    else:
        _check(isinstance(cfg.target, (list, tuple)) and len(cfg.target) > 0
               and all(isinstance(t, str) and t for t in cfg.target),
               n, "target", f"must be a group name or a non-empty list of module names, got {cfg.target!r}")
        cfg.target = list(cfg.target)


def _target_modules(target: str | list[str]) -> list[str]:
    return list(TARGET_GROUPS[target]) if isinstance(target, str) else list(target)


_TARGET_HELP = ("Modules to adapt: 'attention' (q,k,v,o), 'mlp' (gate,up,down), 'all', "
                "or an explicit list of module names.")


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
      anything else resuming needs into the checkpoint folder ``ckpt`` (by default nothing);
      ``load(base_dir, ckpt, total_steps=T)`` reads both back as a trainable model;
      ``extra_state(model)`` / ``load_extra_state(model, d)`` carry other method state
      (tensors and plain values) through ``state.pt``.
    """

    type: ClassVar[str] = ""
    #: The published checkpoint is a peft adapter on the frozen base (not a whole model).
    is_adapter: ClassVar[bool] = False
    #: Every weight of the base is trained (the paper's "full finetuning"), not a low-rank update.
    full_finetuning: ClassVar[bool] = False
    needs_total_steps: ClassVar[bool] = False

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
    """Full finetuning: every parameter of the base model is trained; optionally with residual
    dropout or its own weight decay (the paper's regularised full-finetuning baselines)."""

    full_finetuning: ClassVar[bool] = True

    dropout: float = field(
        default=0.0,
        metadata={"omit_default": True,
                  "help": "Residual dropout in training on the output of every decoder layer's attention and "
                          "MLP, in [0, 1); the saved model is a plain Llama without it."})
    # (not called weight_decay: that name is the MethodConfig hook the optimizer asks)
    wd: float | None = field(
        default=None,
        metadata={"omit_default": True,
                  "help": "Weight decay on matrices for this method, overriding the run's train.weight_decay "
                          "(null keeps it)."})

    def __post_init__(self):
        n = type(self).__name__
        _check(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0, n, "dropout",
               f"must be in [0, 1), got {self.dropout!r}")
        _check(self.wd is None or (_is_number(self.wd) and self.wd >= 0), n,
               "wd", f"must be a number >= 0 or null, got {self.wd!r}")

    def prepare(self, model, total_steps=None):
        for p in model.parameters():
            p.requires_grad_(True)
        if self.dropout > 0:
            _add_residual_dropout(model, self.dropout)
        return model

    def weight_decay(self) -> float | None:
        return None if self.wd is None else float(self.wd)

    def save(self, model, out_dir, tokenizer=None):
        model.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def load(self, base_dir, ckpt_dir, total_steps=None):
        return self.prepare(load_model(Path(ckpt_dir) / "model"))


_DROPOUT_HANDLES = "_learnforget_residual_dropout"


def _add_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Forward hooks that apply dropout (train mode only) to the outputs of each decoder layer's
    ``self_attn`` and ``mlp``, i.e. to what is added to the residual stream. Hooks are not part of
    the state dict or the config, so ``save_pretrained`` writes a plain model."""

    def hook(module, inputs, output):
        if not module.training:
            return None
        if isinstance(output, tuple):  # attention: (output, weights)
            return (torch.nn.functional.dropout(output[0], p, training=True),) + tuple(output[1:])
        return torch.nn.functional.dropout(output, p, training=True)

    for h in getattr(model, _DROPOUT_HANDLES, []):  # preparing twice must not stack hooks
        h.remove()
    handles = []
    for layer in model.modules():
        if isinstance(getattr(layer, "self_attn", None), torch.nn.Module) and \
                isinstance(getattr(layer, "mlp", None), torch.nn.Module):
            handles += [layer.self_attn.register_forward_hook(hook), layer.mlp.register_forward_hook(hook)]
    if not handles:
        raise ValueError("FullConfig.dropout: found no decoder layers (modules with self_attn and mlp) to hook")
    setattr(model, _DROPOUT_HANDLES, handles)


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
    target: str | list[str] = field(default="all", metadata={"help": _TARGET_HELP})
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(rank)."})

    def __post_init__(self):
        _check_adapter_fields(self, "rank")
        _check(isinstance(self.rslora, bool), type(self).__name__, "rslora",
               f"must be true or false, got {self.rslora!r}")

    @property
    def target_modules(self) -> list[str]:
        return _target_modules(self.target)

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


# ----------------------------------------------------------------------------- AdaLoRA
ADALORA_STATE = "adalora_state.safetensors"


@register("adalora")
@dataclass
class AdaLoraMethodConfig(MethodConfig):
    """AdaLoRA (Zhang et al. 2023) through peft: SVD-shaped adapters P diag(E) Q whose ranks are
    pruned from init_r towards an average of target_r by an importance score, on a cubic budget
    schedule over the run (warm-up tinit, pruning, then tfinal steps with the final ranks)."""

    is_adapter: ClassVar[bool] = True
    needs_total_steps: ClassVar[bool] = True

    init_r: int = field(default=12, metadata={"help": "Initial rank of every adapted module."})
    target_r: int = field(
        default=8, metadata={"help": "Average rank per module after pruning (total budget target_r x modules), "
                                     "below init_r."})
    alpha: float | None = field(
        default=None, metadata={"help": "Scaling numerator (scale alpha / init_r); default 2 * init_r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    target: str | list[str] = field(default="all", metadata={"help": _TARGET_HELP})
    tinit: float = field(
        default=0.1, metadata={"help": "Fraction of the run's steps trained at init_r before pruning starts."})
    tfinal: float = field(
        default=0.2, metadata={"help": "Fraction of the run's steps at the end trained with the final ranks fixed "
                                       "(tinit + tfinal < 1)."})
    deltaT: int = field(
        default=10, metadata={"help": "Steps between two rank reallocations while pruning (the final allocation "
                                      "is always made when pruning ends)."})
    beta1: float = field(default=0.85, metadata={"help": "EMA coefficient of the importance (sensitivity) score."})
    beta2: float = field(default=0.85, metadata={"help": "EMA coefficient of the importance's uncertainty."})
    orth_reg_weight: float = field(
        default=0.1, metadata={"help": "Weight of the orthogonality penalty on P and Q added to the loss."})

    def __post_init__(self):
        n = type(self).__name__
        _check_adapter_fields(self, "init_r")
        _check(_is_int(self.target_r) and 1 <= self.target_r < self.init_r, n, "target_r",
               f"must be an integer in [1, init_r={self.init_r}), got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            _check(_is_number(v) and 0.0 <= v < 1.0, n, name, f"must be a fraction in [0, 1), got {v!r}")
        _check(self.tinit + self.tfinal < 1.0, n, "tfinal",
               f"tinit + tfinal must be below 1 to leave steps for pruning, got {self.tinit!r} + {self.tfinal!r}")
        _check(_is_int(self.deltaT) and self.deltaT >= 1, n, "deltaT",
               f"must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            _check(_is_number(v) and 0.0 < v < 1.0, n, name, f"must be in (0, 1), got {v!r}")
        _check(_is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, n, "orth_reg_weight",
               f"must be a number >= 0, got {self.orth_reg_weight!r}")

    @property
    def target_modules(self) -> list[str]:
        return _target_modules(self.target)

    def schedule_steps(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of ``total_steps``: floors of the fractions, so that
        tinit < total_steps - tfinal (at least one pruning step) for any run length."""
        return int(math.floor(self.tinit * total_steps)), int(math.floor(self.tfinal * total_steps))

    def peft_config(self, total_steps: int | None):
        from peft import AdaLoraConfig

        if total_steps is None or not _is_int(total_steps) or total_steps < 1:
            raise ValueError(f"AdaLoraMethodConfig needs the run's total steps (total_steps=...) to schedule the "
                             f"rank budget, got {total_steps!r}")
        tinit, tfinal = self.schedule_steps(total_steps)
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=self.init_r,
            target_r=self.target_r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=self.deltaT,
            beta1=self.beta1,
            beta2=self.beta2,
            orth_reg_weight=self.orth_reg_weight,
            total_step=total_steps,
            bias="none",
        )

    def prepare(self, model, total_steps=None):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(total_steps))

    # --- the state of the trainable adapter and its rank allocator
    @staticmethod
    def _tuner(model):
        return model.base_model  # the AdaLoraModel inside the PeftModel

    def _live_config(self, model):
        tuner = self._tuner(model)
        return tuner.peft_config[tuner.trainable_adapter_name]

    @staticmethod
    def _layers(model):
        from peft.tuners.adalora import AdaLoraLayer

        return [(name, m) for name, m in model.get_base_model().named_modules() if isinstance(m, AdaLoraLayer)]

    def regularizer(self, model):
        """orth_reg_weight x the mean over all P (lora_B) and Q (lora_A) of ||P^T P - I||_F and
        ||Q Q^T - I||_F (AdaLoRA's eq. 4); peft adds it only to a loss computed from labels."""
        if self.orth_reg_weight == 0:
            return None
        adapter = self._tuner(model).trainable_adapter_name
        penalties = []
        for _, layer in self._layers(model):
            for gram in (layer.lora_A[adapter] @ layer.lora_A[adapter].T,     # Q Q^T, r x r
                         layer.lora_B[adapter].T @ layer.lora_B[adapter]):    # P^T P, r x r
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                penalties.append(torch.linalg.matrix_norm(gram - eye))
        if not penalties:
            return None
        return self.orth_reg_weight * torch.stack(penalties).mean()

    def after_step(self, model, optimizer, step):
        # peft's budget schedule counts completed updates (step <= tinit is the warm-up, the
        # final allocation happens at total_step - tfinal); the loop's step is 0-based.
        self._align_allocator(model)
        self._tuner(model).update_and_allocate(step + 1)

    def _kept(self, model) -> dict[str, list[bool]] | None:
        """Per adapted module (full parameter name of its lora_E), which rank-one triplets the
        model uses now: those with a non-zero singular value once pruning has begun (None before:
        all of them). Masked triplets have E exactly 0, so dropping them keeps the function."""
        if self._live_config(model).rank_pattern is None:
            return None
        adapter = self._tuner(model).trainable_adapter_name
        return {f"{name}.lora_E.{adapter}": (layer.lora_E[adapter].detach().view(-1) != 0).tolist()
                for name, layer in self._layers(model)}

    def summary(self, model):
        kept = self._kept(model)
        adapter = self._tuner(model).trainable_adapter_name
        ranks = {}
        for name, layer in self._layers(model):
            key = f"{name}.lora_E.{adapter}"
            ranks[name] = sum(kept[key]) if kept is not None else int(layer.r[adapter])
        return {"ranks": ranks, "total_rank": sum(ranks.values()), "init_total_rank": self.init_r * len(ranks),
                "target_total_rank": self.target_r * len(ranks)}

    def extra_state(self, model):
        cfg = self._live_config(model)
        alloc = self._tuner(model).rankallocator
        pattern = cfg.rank_pattern
        return {
            "total_step": int(cfg.total_step),
            "rank_pattern": None if pattern is None else {k: [bool(x) for x in v] for k, v in pattern.items()},
            "ipt": {k: v.detach().clone() for k, v in alloc.ipt.items()},
            "exp_avg_ipt": {k: v.detach().clone() for k, v in alloc.exp_avg_ipt.items()},
            "exp_avg_unc": {k: v.detach().clone() for k, v in alloc.exp_avg_unc.items()},
        }

    def load_extra_state(self, model, state):
        if not state:
            return
        cfg = self._live_config(model)
        if int(state["total_step"]) != int(cfg.total_step):
            raise ValueError(f"AdaLoRA state was scheduled over {state['total_step']} steps, "
                             f"this run over {cfg.total_step}")
        cfg.rank_pattern = None if state["rank_pattern"] is None else {
            k: list(v) for k, v in state["rank_pattern"].items()}
        alloc = self._tuner(model).rankallocator
        alloc.ipt = dict(state["ipt"])
        alloc.exp_avg_ipt = dict(state["exp_avg_ipt"])
        alloc.exp_avg_unc = dict(state["exp_avg_unc"])
        self._align_allocator(model)

    def _align_allocator(self, model) -> None:
        """Put the allocator's score tensors on their parameters' devices (state.pt loads on the
        CPU; the model may be moved after loading)."""
        tuner = self._tuner(model)
        alloc = tuner.rankallocator
        if not alloc.exp_avg_ipt:
            return
        devices = {n: p.device for n, p in tuner.model.named_parameters() if n in alloc.exp_avg_ipt}
        for scores in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc):
            for n, t in scores.items():
                if n in devices and t.device != devices[n]:
                    scores[n] = t.to(devices[n])

    def save(self, model, out_dir, tokenizer=None):
        """A peft adapter whose rank pattern keeps exactly the triplets in use, so that
        ``PeftModel.from_pretrained`` rebuilds the pruned (smaller) modules with the same output."""
        cfg = self._live_config(model)
        live_pattern = cfg.rank_pattern
        kept = self._kept(model)
        try:
            # peft resizes the saved tensors by cfg.rank_pattern and rewrites its keys in place
            cfg.rank_pattern = kept
            model.save_pretrained(out_dir)
        finally:
            cfg.rank_pattern = live_pattern
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def save_state(self, model, ckpt_dir):
        """The full-size (init_r) adapter tensors, masked triplets included: resuming needs them
        (the published adapter drops pruned triplets and the optimizer state has init_r shapes)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}
        save_file(tensors, str(Path(ckpt_dir) / ADALORA_STATE))

    def load(self, base_dir, ckpt_dir, total_steps=None):
        import json

        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir)
        saved_total = json.loads((ckpt_dir / "model" / "adapter_config.json").read_text())["total_step"]
        if total_steps is None:
            total_steps = saved_total
        elif int(total_steps) != int(saved_total):
            raise ValueError(f"{ckpt_dir} was trained with an AdaLoRA budget over {saved_total} steps, "
                             f"not {total_steps}; it cannot be continued to a different schedule")
        with torch.random.fork_rng(devices=[]):
            model = self.prepare(load_model(base_dir), total_steps=total_steps)
        _load_tensors(model, load_file(str(ckpt_dir / ADALORA_STATE)), "AdaLoRA state")
        return model


def _load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``tensors`` into the same-named entries of ``model``'s state dict; every name must exist
    with the same shape."""
    own = model.state_dict()
    bad = sorted(k for k in tensors if k not in own or own[k].shape != tensors[k].shape)
    if bad:
        raise ValueError(f"{what} does not fit the model: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)


# ----------------------------------------------------------------------------- ReLoRA
RELORA_STATE = "relora_state.safetensors"
_RELORA_MERGES = "_learnforget_relora_merges"


@register("relora")
@dataclass
class ReLoraMethodConfig(LoraMethodConfig):
    """ReLoRA (Lialin et al. 2023): LoRA whose update is merged into the weights every merge_every
    steps, then restarted (A re-initialised, B = 0, optimizer state of A and B pruned by magnitude,
    a short LR re-warm-up); it reaches a high-rank total update. Publishes a merged full model."""

    is_adapter: ClassVar[bool] = False

    merge_every: int = field(default=100, metadata={"help": "Steps between two merge-and-restarts."})
    optimizer_reset: float = field(
        default=0.99, metadata={"help": "Fraction of each LoRA parameter's optimizer state zeroed at a merge "
                                        "(the smallest magnitudes), in [0, 1]."})
    rewarmup_steps: int = field(
        default=10, metadata={"help": "Steps of linear LR re-warm-up after each merge (0: none), "
                                      "at most merge_every."})

    def __post_init__(self):
        super().__post_init__()
        n = type(self).__name__
        _check(_is_int(self.merge_every) and self.merge_every >= 1, n, "merge_every",
               f"must be a positive integer, got {self.merge_every!r}")
        _check(_is_number(self.optimizer_reset) and 0.0 <= self.optimizer_reset <= 1.0, n, "optimizer_reset",
               f"must be a fraction in [0, 1], got {self.optimizer_reset!r}")
        _check(_is_int(self.rewarmup_steps) and 0 <= self.rewarmup_steps <= self.merge_every, n, "rewarmup_steps",
               f"must be an integer in [0, merge_every={self.merge_every}], got {self.rewarmup_steps!r}")

    def prepare(self, model, total_steps=None):
        model = super().prepare(model, total_steps)
        setattr(model, _RELORA_MERGES, 0)
        return model

    def lr_multiplier(self, step):
        """1 until the first merge; after each, (k + 1) / rewarmup_steps on the k-th step since it."""
        if step < self.merge_every or self.rewarmup_steps == 0:
            return 1.0
        since = step % self.merge_every
        return min(1.0, (since + 1) / self.rewarmup_steps)

    @staticmethod
    def _lora_layers(model):
        from peft.tuners.lora import LoraLayer

        return [m for m in model.modules() if isinstance(m, LoraLayer)]

    def after_step(self, model, optimizer, step):
        if (step + 1) % self.merge_every == 0:
            self.merge_and_restart(model, optimizer)

    def merge_and_restart(self, model, optimizer) -> None:
        """W += B A * scaling for every LoRA layer, A re-initialised as peft does, B = 0, and the
        optimizer state of A and B magnitude-pruned. The merge writes the base weight directly,
        not through peft's merge(), which would mark the layer merged and stop its adapter."""
        with torch.no_grad():
            for layer in self._lora_layers(model):
                for adapter in layer.active_adapters:
                    if adapter not in layer.lora_A:
                        continue
                    base = layer.get_base_layer()
                    base.weight += layer.get_delta_weight(adapter).to(base.weight.dtype)
                    layer.reset_lora_parameters(adapter, True)  # kaiming-uniform A, zero B
        if optimizer is not None and self.optimizer_reset > 0:
            lora_params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
            for p in lora_params:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        _prune_by_magnitude_(value, self.optimizer_reset)
        setattr(model, _RELORA_MERGES, getattr(model, _RELORA_MERGES, 0) + 1)

    def summary(self, model):
        return {"merges": int(getattr(model, _RELORA_MERGES, 0))}

    def extra_state(self, model):
        return {"merges": int(getattr(model, _RELORA_MERGES, 0))}

    def load_extra_state(self, model, state):
        if state:
            setattr(model, _RELORA_MERGES, int(state["merges"]))

    def save(self, model, out_dir, tokenizer=None):
        """The merged model (trunk + current B A * scaling) as a plain HF model; training goes on
        with the unmerged one."""
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def save_state(self, model, ckpt_dir):
        """The adapted modules' trunk weights and live A, B (the merged model alone cannot give
        them back bit for bit)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                   if ".base_layer." in k or ".lora_" in k}
        save_file(tensors, str(Path(ckpt_dir) / RELORA_STATE))

    def load(self, base_dir, ckpt_dir, total_steps=None):
        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir)
        # the published model carries every weight ReLoRA never changes (embeddings, norms, ...)
        with torch.random.fork_rng(devices=[]):
            model = self.prepare(load_model(ckpt_dir / "model"), total_steps=total_steps)
        _load_tensors(model, load_file(str(ckpt_dir / RELORA_STATE)), "ReLoRA state")
        return model


def _prune_by_magnitude_(t: torch.Tensor, fraction: float) -> None:
    """Zero the ``fraction`` of entries of ``t`` with the smallest magnitude, in place."""
    n = t.numel()
    keep = n - int(round(fraction * n))
    if keep >= n:
        return
    if keep <= 0:
        t.zero_()
        return
    flat = t.view(-1)
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    kept = flat[idx].clone()
    flat.zero_()
    flat[idx] = kept
