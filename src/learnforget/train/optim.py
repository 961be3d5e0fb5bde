"""Optimizers: AdamW (torch) and decoupled Lion (the paper's), behind one constructor.

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") keeps one momentum
buffer ``m`` per parameter and steps by the sign of an interpolation of ``m`` and the gradient::

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - weight_decay * lr / peak_lr) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

*Decoupled* weight decay (as in MosaicML's DecoupledLionW, which the paper used): the decay
follows the schedule (``lr / peak_lr``) but is not multiplied by the peak learning rate itself,
so ``weight_decay`` means the same fraction per step whatever the learning rate.

Both update all parameters of a group at once where they can: AdamW with torch's fused kernel
(``fused=True``, CPU and CUDA) and Lion with ``torch._foreach_*`` ops, instead of one small op
per tensor per step (bench/train.py measures the step). Sharded (FSDP ``DTensor``) parameters
take AdamW's multi-tensor ``foreach`` path. The fused AdamW rounds differently from the
per-tensor loop (parameters agree to within 1e-5 of their largest value after 30 steps,
tests/test_train.py); Lion's multi-tensor step is bitwise the per-tensor one.
"""

from __future__ import annotations

import torch

from learnforget.train.settings import OPTIMIZERS


class Lion(torch.optim.Optimizer):
    """Decoupled Lion. ``betas=(0.9, 0.99)`` in the Lion paper; the LoRA study used (0.9, 0.95)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                 weight_decay: float = 0.0, foreach: bool = True):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be positive, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas!r}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.foreach = bool(foreach)
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
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            if not params:
                continue
            grads = [p.grad for p in params]
            moms = [self.state[p]["exp_avg"] for p in params]
            if self.foreach and _plain(params):
                update = torch._foreach_mul(moms, beta1)
                torch._foreach_add_(update, grads, alpha=1.0 - beta1)
                torch._foreach_sign_(update)
                if decay != 1.0:
                    torch._foreach_mul_(params, decay)
                torch._foreach_add_(params, update, alpha=-lr)
                torch._foreach_mul_(moms, beta2)
                torch._foreach_add_(moms, grads, alpha=1.0 - beta2)
                continue
            for p, g, m in zip(params, grads, moms):
                update = m.mul(beta1).add_(g, alpha=1.0 - beta1).sign_()
                if decay != 1.0:
                    p.mul_(decay)
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        return loss


def _plain(params) -> bool:
    """Whether every parameter is a plain dense tensor (not a sharded ``DTensor``)."""
    return all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)


def _portable(opt: torch.optim.Optimizer, impl: dict) -> torch.optim.Optimizer:
    """``opt`` whose saved state does not record how it was computed (``fused``/``foreach``) and
    which keeps its own implementation when it loads a state: torch's ``load_state_dict`` would
    otherwise take those flags from the saved groups, so a job continuing from a checkpoint
    written with another implementation (an older version, or an FSDP job's multi-tensor
    AdamW) would switch to it."""

    def saving(_opt, state: dict) -> dict:
        for group in state["param_groups"]:
            group.update(dict.fromkeys(impl, None))
        return state

    def loaded(o: torch.optim.Optimizer) -> None:
        for group in o.param_groups:
            group.update(impl)
            if impl.get("fused"):  # the fused kernel wants its step counters on the parameters' device
                for p in group["params"]:
                    st = o.state.get(p, {})
                    if torch.is_tensor(st.get("step")):
                        st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    opt.register_state_dict_post_hook(saving)
    opt.register_load_state_dict_post_hook(loaded)
    return opt


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
        fused = _plain(params) and all(p.device.type in ("cpu", "cuda") for p in params)
        impl = {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
        return _portable(torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **impl), impl)
    if name == "lion":
        return Lion(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
