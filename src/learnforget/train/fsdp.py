"""Fully sharded data parallel (FSDP2) for full finetuning: shard, optimise, clip, gather.

Full finetuning of a 7B Llama keeps float32 weights, gradients and AdamW's two moments: 16 bytes
per parameter, about 100 GiB before activations, more than one 80 GB GPU, and DDP replicates all
of it on every GPU. FSDP shards the four of them over the job's processes. This module is what
the trainer needs for that, on top of PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``,
parameters as dim-0 sharded ``DTensor``) and its distributed state-dict helpers
(``torch.distributed.checkpoint.state_dict``). It is used for ``type: full`` methods with more
than one process (:func:`wanted`); adapter methods keep DDP through accelerate.

Why FSDP2 directly, not accelerate's FSDP plugin: accelerate (1.15) only switches to FSDP for
GPU-like distributed types. On the CPU (``Accelerator(cpu=True)``, gloo) it silently ignores
``fsdp_plugin`` (also with ``ACCELERATE_USE_FSDP=true``) and wraps the model in DDP, so the plugin
path could not be tested without a GPU. ``fully_shard`` runs on a CPU device mesh over gloo
(torch 2.13), through the same code as on a CUDA mesh over nccl; ``tests/test_fsdp.py`` checks it
against one-process training on 2 CPU processes (nothing here has run on a GPU yet).

Functions, in the order a job calls them:

- :func:`wanted` - shard this job? (full finetuning and more than one process)
- :func:`device_mesh` - the 1-D mesh over all processes, on the job's device type
- :func:`shard_model` - ``fully_shard`` each decoder layer, then the root (embeddings, final norm,
  tied output head); float32 shards, optionally bf16 compute (:func:`mixed_precision`)
- the optimizer: :func:`learnforget.train.optim.make_optimizer` (or ``train.make_optimizer``) on the
  *sharded* model, unchanged: AdamW (``foreach=True``) and Lion work on ``DTensor`` parameters
  and keep sharded states
- :func:`clip_grad_norm` - the global gradient norm over all shards (clipping when max_norm > 0)
- :func:`load_full_model_state_dict` - rank 0's full weights into the sharded model (broadcast)
- :func:`full_model_state_dict` / :func:`unsharded_model` - the full weights on rank 0, as a
  state dict or as a plain ``LlamaForCausalLM`` for ``save_pretrained``
- :func:`full_optimizer_state_dict` / :func:`load_full_optimizer_state_dict` - the optimizer
  state, gathered to rank 0 / restored from rank 0, in the format of a plain
  ``optimizer.state_dict()`` (integer keys in parameter order), so a ``state.pt`` written by an
  FSDP job and one written by a one-process or DDP job are interchangeable.

Every function that gathers or scatters is a collective: all processes must call it, in the same
order; only rank 0 gets (or needs to pass) the full tensors.

How the trainer uses it
-----------------------
:class:`learnforget.train.loop.Dist` shards when :func:`wanted` says so (a method whose
``shards_with_fsdp`` is set, several processes): the model is sharded after it is built, the
optimizer built on the shards, gradients clipped by :func:`clip_grad_norm`, the autocast left to
FSDP's mixed-precision policy, and snapshots and the final save gather the plain model and a
plain ``optimizer.state_dict()`` on rank 0, so ``state.pt`` files are interchangeable between
one-process, DDP and FSDP jobs of the same run. ``tests/test_fsdp.py`` and
``tests/test_distributed.py`` check it on CPU processes; the memory planner
(:mod:`learnforget.cluster.planner`) models the same layout. Host memory: rank 0 holds the full
float32 weights and optimizer state at each snapshot (7B with AdamW: about 75 GiB more).
"""

from __future__ import annotations

from typing import Any

import torch

from learnforget.train.methods import MethodConfig, as_method

__all__ = ["wanted", "device_mesh", "mixed_precision", "shard_model", "is_sharded", "clip_grad_norm",
           "full_model_state_dict", "load_full_model_state_dict", "unsharded_model",
           "full_optimizer_state_dict", "load_full_optimizer_state_dict"]


def wanted(method: MethodConfig | dict, world: int) -> bool:
    """Shard with FSDP: a method that asks for it (``shards_with_fsdp``: full finetuning; a
    MethodConfig or its dict) over ``world`` > 1 processes."""
    return as_method(method).shards_with_fsdp and int(world) > 1


def device_mesh(device: torch.device | str):
    """The 1-D device mesh over every process of the default process group (which must exist)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("FSDP needs an initialised process group (accelerate / torchrun)")
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def mixed_precision(precision: str):
    """FSDP's mixed-precision policy for ``train.precision``: None for fp32.

    bf16: ``param_dtype=bfloat16`` (each unit is all-gathered and computed in bf16; the float32
    shards stay the master weights the optimizer updates) and ``reduce_dtype=float32``
    (gradients are averaged in float32). The same on CPU and GPU (the tests run it on the CPU).
    It replaces ``torch.autocast``, and is not bit-for-bit the DDP path's autocast: every
    parameter, the norms' included, is cast, and the residual stream between layers is bf16.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a (possibly peft-wrapped) HF Llama."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected .model.layers)")
    return list(layers)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, mesh, *, precision: str = "fp32",
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` in place with ``fully_shard``: one unit per decoder layer, then the root
    (embeddings, final norm and the tied or untied output head, all in one unit, so a tied
    ``lm_head.weight`` stays the same parameter as ``embed_tokens.weight``). Returns ``model``.

    Parameters must be float32 (the master weights) and identical on every rank (same seed or
    same checkpoint; each rank keeps its dim-0 shard and moves it to ``mesh``'s device) — or
    call :func:`load_full_model_state_dict` afterwards to take rank 0's values. The layers are
    resharded after their forward (``reshard_after_forward``; False keeps them gathered until
    the backward: faster, more memory); the root never is (it is needed right away in the
    backward). ``precision``: see :func:`mixed_precision`. Forward hooks on submodules (the
    residual dropout of ``FullConfig.dropout``) are left in place and work (a 2-process
    smoke run; not in the tests); :func:`unsharded_model` does not copy them.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:  # torch < 2.6
        raise RuntimeError(f"FSDP needs torch >= 2.6 (torch.distributed.fsdp.fully_shard), "
                           f"this is {torch.__version__}") from exc

    if is_sharded(model):
        raise ValueError("the model is already sharded")
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"FSDP master weights must be float32, found {', '.join(bad)}")
    kw: dict[str, Any] = {"mesh": mesh}
    policy = mixed_precision(precision)
    if policy is not None:
        kw["mp_policy"] = policy
    for layer in _layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def _value(t: torch.Tensor) -> float:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return float(t)


def clip_grad_norm(params, max_norm: float) -> float:
    """The global L2 norm of the gradients of ``params`` (sharded ``DTensor`` or plain), before
    clipping; with ``max_norm`` > 0 the gradients are scaled to at most that norm, as
    ``torch.nn.utils.clip_grad_norm_``. Every rank gets the same value."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return _value(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
    return _value(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=False))


def _local_ptrs(tensors) -> set[int]:
    from torch.distributed.tensor import DTensor

    return {(t.to_local() if isinstance(t, DTensor) else t).data_ptr() for t in tensors if torch.is_tensor(t)}


def _unalias(tree, live: set[int]):
    """``tree`` with every tensor that shares memory with a live one (``live``: data pointers)
    cloned. The distributed state-dict helpers return tensors that need no gathering (AdamW's
    0-dim ``step``, unsharded buffers) as they are when they already are on the CPU, so a
    gathered state would otherwise change as training goes on, and an optimizer loaded from it
    would share its step counter with the one it was gathered from."""
    if torch.is_tensor(tree):
        return tree.clone() if tree.data_ptr() in live else tree
    if isinstance(tree, dict):
        return {k: _unalias(v, live) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unalias(v, live) for v in tree)
    return tree


def _agree(error: str | None) -> None:
    """Raise ValueError(rank 0's ``error``) on every rank, or nothing: a check only rank 0 can
    make must not leave the other ranks waiting in the collective that follows."""
    import torch.distributed as dist

    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ValueError(box[0])


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) float32 weights, on rank 0 in CPU memory (gathered one tensor at a
    time); None on the other ranks. A collective. A tied output head appears under both names
    (as ``model.state_dict()`` has it), as separate copies."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return _unalias(sd, _local_ptrs([*model.parameters(), *model.buffers()]))


def load_full_model_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None,
                               strict: bool = True) -> None:
    """Load a full state dict held by rank 0 into the sharded ``model`` (broadcast and resharded;
    the other ranks pass None). A collective. Lets only rank 0 read a checkpoint from disk while
    the others build the model from the config (same shapes, any values)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    _agree("rank 0 must pass the full state dict" if dist.get_rank() == 0 and state_dict is None else None)
    # (a copy: the broadcast replaces the values of the dict it gets by the local shards)
    set_model_state_dict(model, dict(state_dict) if dist.get_rank() == 0 else {},
                         options=_options(broadcast_from_rank0=True, strict=strict))


def _plain_class(model: torch.nn.Module) -> type:
    """The class ``fully_shard`` subclassed (``FSDPLlamaForCausalLM`` -> ``LlamaForCausalLM``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if not issubclass(cls, FSDPModule):
        return cls
    return next(b for b in cls.__bases__ if not issubclass(b, FSDPModule))


def unsharded_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """On rank 0, a plain (unsharded, CPU, float32) copy of a sharded HF model, e.g. for
    ``save_pretrained``; None on the other ranks. A collective.

    The copy is built on the meta device and takes the gathered tensors without another copy
    (``assign=True``); its non-persistent buffers (RoPE's ``inv_freq``) come from ``model``,
    whose buffers FSDP does not shard; tied weights are tied again. Forward hooks (residual
    dropout) are not copied, as ``save_pretrained`` would not save them either.
    """
    import copy

    sd = full_model_state_dict(model)
    if sd is None:
        return None
    cls = _plain_class(model)
    with torch.device("meta"):
        plain = cls(copy.deepcopy(model.config))
    plain.load_state_dict(sd, strict=True, assign=True)
    for name, buf in model.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner) if owner else plain
        persistent = leaf not in module._non_persistent_buffers_set
        module.register_buffer(leaf, buf.detach().to("cpu", copy=True), persistent=persistent)
    if getattr(plain.config, "tie_word_embeddings", False) and hasattr(plain, "tie_weights"):
        plain.tie_weights()
    plain.train(model.training)
    return plain


def _param_names(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The fully qualified name of each optimizer parameter, in the order of its param groups
    (the order of a plain ``opt.state_dict()``'s integer keys). A tied parameter has the first
    name ``named_parameters`` gives it, as torch's distributed state dict uses."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    try:
        return [names[id(p)] for g in opt.param_groups for p in g["params"]]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not the model's") from None


def full_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """The optimizer state with full (unsharded) tensors, on rank 0 in CPU memory, in the
    format of a plain ``opt.state_dict()`` (``state`` keyed by parameter index, ``param_groups``
    with index lists), so it loads into an unsharded optimizer over the same model with
    ``load_state_dict``; None on the other ranks. A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    by_name = _unalias(by_name, _local_ptrs(v for s in opt.state.values() for v in s.values()))
    order = {n: i for i, n in enumerate(_param_names(model, opt))}
    groups = []
    for g in by_name["param_groups"]:
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [order[n] for n in g["params"]]})
    state = {order[n]: s for n, s in by_name["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_full_optimizer_state_dict(model: torch.nn.Module, opt: torch.optim.Optimizer,
                                   state_dict: dict | None) -> None:
    """Restore the state written by :func:`full_optimizer_state_dict` (or by a plain
    ``opt.state_dict()`` over the same model and param groups) into ``opt`` over the sharded
    ``model``: rank 0 passes it, the other ranks None; rank 0 broadcasts, each rank keeps its
    shard. Hyperparameters of the groups (lr, betas, weight_decay, Lion's initial_lr) are
    restored too, as ``load_state_dict`` does. A collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tuples = [{k for k, v in g.items() if isinstance(v, tuple)} for g in opt.param_groups]
    error = None
    if dist.get_rank() == 0:
        sizes = [len(g["params"]) for g in opt.param_groups]
        saved = None if state_dict is None else [len(g["params"]) for g in state_dict["param_groups"]]
        if saved is None:
            error = "rank 0 must pass the full optimizer state dict"
        elif saved != sizes:
            error = f"the optimizer state has param groups of {saved} parameters, the optimizer {sizes}"
    _agree(error)
    if dist.get_rank() != 0:
        set_optimizer_state_dict(model, opt, {}, options=_options(broadcast_from_rank0=True))
    else:
        _load_on_rank0(model, opt, state_dict)
    for g, keys in zip(opt.param_groups, tuples):  # the broadcast turns tuples (betas) into lists
        for k in keys:
            if isinstance(g.get(k), list):
                g[k] = tuple(g[k])


def _load_on_rank0(model, opt, state_dict: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, opt)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[int(i)] for i in g["params"]]}
              for g in state_dict["param_groups"]]
    # 0-dim tensors (AdamW's step) are taken over as they are: copy them, so that the caller's
    # state dict and the optimizer do not share a counter
    state = {names[int(i)]: {k: v.clone() if torch.is_tensor(v) and v.dim() == 0 else v for k, v in s.items()}
             for i, s in state_dict["state"].items()}
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                             options=_options(broadcast_from_rank0=True))
