"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024) through peft: a published adapter on the
frozen base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from learnforget.train.methods.registry import (TARGET_HELP, AdapterShape, MethodConfig, check,
                                                check_adapter_fields, register, resolve_targets, save_pretrained)
from learnforget.train.modeling import load_model


@register("lora")
@dataclass
class LoraMethodConfig(MethodConfig):
    """LoRA (Hu et al. 2021) through peft: W + (alpha / rank) * B @ A on the target modules."""

    is_adapter: ClassVar[bool] = True
    rank_field: ClassVar[str | None] = "rank"
    #: A trained magnitude vector per adapted module (DoRA).
    magnitude_vector: ClassVar[bool] = False

    rank: int = field(default=16, metadata={"help": "LoRA rank r (the paper: 16, 64, 256)."})
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA scaling numerator; default 2 * rank (the paper's choice)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target: str | list[str] = field(default="all", metadata={"help": TARGET_HELP})
    rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(rank)."})

    def __post_init__(self):
        check_adapter_fields(self, "rank")
        check(isinstance(self.rslora, bool), type(self).__name__, "rslora",
              f"must be true or false, got {self.rslora!r}")

    @property
    def target_modules(self) -> list[str]:
        return resolve_targets(self.target)

    def adapter_shape(self) -> AdapterShape:
        return AdapterShape(rank=self.rank, targets=tuple(self.target_modules), magnitude=self.magnitude_vector)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_rslora=self.rslora,
            use_dora=self.magnitude_vector,
            bias="none",
        )

    def prepare(self, model, total_steps=None):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config())

    def save(self, model, out_dir, tokenizer=None):
        save_pretrained(model, out_dir, tokenizer)

    def load(self, base_dir, ckpt_dir, total_steps=None):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base_dir), str(Path(ckpt_dir) / "model"), is_trainable=True)


@register("dora")
@dataclass
class DoraMethodConfig(LoraMethodConfig):
    """DoRA (Liu et al. 2024): LoRA on the direction of W plus a trained magnitude vector."""

    magnitude_vector: ClassVar[bool] = True
