"""AdaLoRA (Zhang et al. 2023) through peft: SVD-shaped adapters whose ranks are pruned over the
run by an importance score. Its rank allocator's state travels through ``state.pt`` and the
full-size adapter tensors through :data:`ADALORA_STATE`, so a job resumes bit for bit."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from learnforget.train.methods.registry import (TARGET_HELP, AdapterShape, MethodConfig, check,
                                                check_adapter_fields, is_int, is_number, load_tensors, register,
                                                resolve_targets)
from learnforget.train.modeling import load_model

ADALORA_STATE = "adalora_state.safetensors"


@register("adalora")
@dataclass
class AdaLoraMethodConfig(MethodConfig):
    """AdaLoRA (Zhang et al. 2023) through peft: SVD-shaped adapters P diag(E) Q whose ranks are
    pruned from init_r towards an average of target_r by an importance score, on a cubic budget
    schedule over the run (warm-up tinit, pruning, then tfinal steps with the final ranks)."""

    is_adapter: ClassVar[bool] = True
    needs_total_steps: ClassVar[bool] = True
    state_file: ClassVar[str | None] = ADALORA_STATE
    rank_field: ClassVar[str | None] = "init_r"

    init_r: int = field(default=12, metadata={"help": "Initial rank of every adapted module."})
    target_r: int = field(
        default=8, metadata={"help": "Average rank per module after pruning (total budget target_r x modules), "
                                     "below init_r."})
    alpha: float | None = field(
        default=None, metadata={"help": "Scaling numerator (scale alpha / init_r); default 2 * init_r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    target: str | list[str] = field(default="all", metadata={"help": TARGET_HELP})
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
        check_adapter_fields(self, "init_r")
        check(is_int(self.target_r) and 1 <= self.target_r < self.init_r, n, "target_r",
               f"must be an integer in [1, init_r={self.init_r}), got {self.target_r!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            check(is_number(v) and 0.0 <= v < 1.0, n, name, f"must be a fraction in [0, 1), got {v!r}")
        check(self.tinit + self.tfinal < 1.0, n, "tfinal",
               f"tinit + tfinal must be below 1 to leave steps for pruning, got {self.tinit!r} + {self.tfinal!r}")
        check(is_int(self.deltaT) and self.deltaT >= 1, n, "deltaT",
               f"must be a positive integer, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check(is_number(v) and 0.0 < v < 1.0, n, name, f"must be in (0, 1), got {v!r}")
        check(is_number(self.orth_reg_weight) and self.orth_reg_weight >= 0, n, "orth_reg_weight",
               f"must be a number >= 0, got {self.orth_reg_weight!r}")

    @property
    def target_modules(self) -> list[str]:
        return resolve_targets(self.target)

    def adapter_shape(self) -> AdapterShape:
        # the tensors keep their init_r size while pruning masks triplets; the rank allocator
        # scores every adapter parameter three times (ipt, exp_avg_ipt, exp_avg_unc)
        return AdapterShape(rank=self.init_r, targets=tuple(self.target_modules), singular_values=True,
                            importance_scores=3)

    def schedule_steps(self, total_steps: int) -> tuple[int, int]:
        """(tinit, tfinal) in steps for a run of ``total_steps``: floors of the fractions, so that
        tinit < total_steps - tfinal (at least one pruning step) for any run length."""
        return int(math.floor(self.tinit * total_steps)), int(math.floor(self.tfinal * total_steps))

    def peft_config(self, total_steps: int | None):
        from peft import AdaLoraConfig

        if total_steps is None or not is_int(total_steps) or total_steps < 1:
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
        import torch  # lazy: keeps torch out of config validation and the planner

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
        import torch  # lazy: keeps torch out of config validation and the planner
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
        load_tensors(model, load_file(str(ckpt_dir / ADALORA_STATE)), "AdaLoRA state")
        return model

