"""Full finetuning: every weight of the base trains (the paper's baseline), optionally with
residual dropout or its own weight decay (the regularised full-finetuning baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from learnforget.train.methods.registry import MethodConfig, check, is_number, register, save_pretrained
from learnforget.train.modeling import load_model

if TYPE_CHECKING:  # pragma: no cover
    import torch


@register("full")
@dataclass
class FullConfig(MethodConfig):
    """Full finetuning: every parameter of the base model is trained; optionally with residual
    dropout or its own weight decay (the paper's regularised full-finetuning baselines)."""

    full_finetuning: ClassVar[bool] = True
    # FSDP2 shards the plain HF model; peft's adapter models are replicated with DDP instead
    shards_with_fsdp: ClassVar[bool] = True

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
        check(is_number(self.dropout) and 0.0 <= self.dropout < 1.0, n, "dropout",
              f"must be in [0, 1), got {self.dropout!r}")
        check(self.wd is None or (is_number(self.wd) and self.wd >= 0), n,
              "wd", f"must be a number >= 0 or null, got {self.wd!r}")

    def prepare(self, model, total_steps=None):
        for p in model.parameters():
            p.requires_grad_(True)
        if self.dropout > 0:
            add_residual_dropout(model, self.dropout)
        return model

    def weight_decay(self) -> float | None:
        return None if self.wd is None else float(self.wd)

    def save(self, model, out_dir, tokenizer=None):
        save_pretrained(model, out_dir, tokenizer)

    def load(self, base_dir, ckpt_dir, total_steps=None):
        return self.prepare(load_model(Path(ckpt_dir) / "model"))


_DROPOUT_HANDLES = "_learnforget_residual_dropout"


def add_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Forward hooks that apply dropout (train mode only) to the outputs of each decoder layer's
    ``self_attn`` and ``mlp``, i.e. to what is added to the residual stream. Hooks are not part of
    the state dict or the config, so ``save_pretrained`` writes a plain model."""
    import torch  # lazy: keeps torch out of config validation and the planner

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
