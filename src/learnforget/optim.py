"""Optimizers: AdamW (torch) and decoupled Lion (the paper's), behind one constructor.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") keeps one momentum
buffer ``m`` per parameter and steps by the sign of an interpolation of ``m`` and the gradient::

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - weight_decay * lr / peak_lr) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

*Decoupled* weight decay (as in MosaicML's DecoupledLionW, which the paper used): the decay
follows the schedule (``lr / peak_lr``) but is not multiplied by the peak learning rate itself,
so ``weight_decay`` means the same fraction per step whatever the learning rate.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "lion")


class Lion(torch.optim.Optimizer):
    """Decoupled Lion. ``betas=(0.9, 0.99)`` in the Lion paper; the LoRA study used (0.9, 0.95)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be positive, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            decay = 1.0 - wd * lr / group["initial_lr"] if wd else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.mul(beta1).add_(p.grad, alpha=1.0 - beta1).sign_()
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)
        return loss


def make_optimizer(model: torch.nn.Module, name: str, *, lr: float, betas, eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW or Lion over the trainable parameters; weight decay on matrices only (nanoGPT's
    split: biases, norms and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)
    if name == "lion":
        return Lion(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
