"""ReLoRA (Lialin et al. 2023): LoRA merged into the weights and restarted every ``merge_every``
steps; it publishes a merged full model, and keeps the trunk and live adapter in
:data:`RELORA_STATE` to resume."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from learnforget.train.methods.lora import LoraMethodConfig
from learnforget.train.methods.registry import check, is_int, is_number, load_tensors, register, save_pretrained
from learnforget.train.modeling import load_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

RELORA_STATE = "relora_state.safetensors"
_RELORA_MERGES = "_learnforget_relora_merges"


@register("relora")
@dataclass
class ReLoraMethodConfig(LoraMethodConfig):
    """ReLoRA (Lialin et al. 2023): LoRA whose update is merged into the weights every merge_every
    steps, then restarted (A re-initialised, B = 0, optimizer state of A and B pruned by magnitude,
    a short LR re-warm-up); it reaches a high-rank total update. Publishes a merged full model."""

    is_adapter: ClassVar[bool] = False
    state_file: ClassVar[str | None] = RELORA_STATE

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
        check(is_int(self.merge_every) and self.merge_every >= 1, n, "merge_every",
               f"must be a positive integer, got {self.merge_every!r}")
        check(is_number(self.optimizer_reset) and 0.0 <= self.optimizer_reset <= 1.0, n, "optimizer_reset",
               f"must be a fraction in [0, 1], got {self.optimizer_reset!r}")
        check(is_int(self.rewarmup_steps) and 0 <= self.rewarmup_steps <= self.merge_every, n, "rewarmup_steps",
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
        import torch  # lazy: keeps torch out of config validation and the planner

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
        merged = copy.deepcopy(model).merge_and_unload()
        save_pretrained(merged, out_dir, tokenizer)

    def save_state(self, model, ckpt_dir):
        """The adapted modules' trunk weights and live A, B (the merged model alone cannot give
        them back bit for bit)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                   if ".base_layer." in k or ".lora_" in k}
        save_file(tensors, str(Path(ckpt_dir) / RELORA_STATE))

    def load(self, base_dir, ckpt_dir, total_steps=None):
        import torch  # lazy: keeps torch out of config validation and the planner
        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir)
        # the published model carries every weight ReLoRA never changes (embeddings, norms, ...)
        with torch.random.fork_rng(devices=[]):
            model = self.prepare(load_model(ckpt_dir / "model"), total_steps=total_steps)
        load_tensors(model, load_file(str(ckpt_dir / RELORA_STATE)), "ReLoRA state")
        return model


def _prune_by_magnitude_(t: torch.Tensor, fraction: float) -> None:
    """Zero the ``fraction`` of entries of ``t`` with the smallest magnitude, in place."""
    import torch  # lazy: keeps torch out of config validation and the planner

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

