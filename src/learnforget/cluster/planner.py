"""GPU memory planner: what a finetuning job needs per GPU, and how many GPUs to give it.

For a Llama ``arch`` dict (:mod:`learnforget.train.modeling`), a method from the registry
(:mod:`learnforget.train.methods`) and the training settings, :func:`estimate` adds up the bytes one GPU
holds at the peak of a training step, :func:`plan_gpus` picks the smallest GPU count that fits,
and :func:`gpu_plan_for_job` turns config dicts into the resources a Snakemake/SLURM rule needs
(``gpus``, ``mem_mb``) plus a one-line summary for dry runs.

Parameters (:func:`count_params`, :func:`trainable_params`) are exact: they equal what
``build_model`` and peft create. Full finetuning trains everything; LoRA (and ReLoRA) trains
``r * (d_in + d_out)`` per targeted matrix, DoRA adds a magnitude vector of ``d_out``, AdaLoRA
holds its initial rank ``init_r`` (P, Q) plus the singular values ``lambda`` (``init_r``).

**Precision conventions** (``precision``):

- ``"fp32"``: parameters, gradients, optimizer states and activations in float32.
- ``"bf16"``: what ``train.precision: bf16`` does in this project: float32 parameters (the model
  is loaded as float32), float32 gradients and optimizer states, the forward under
  ``torch.autocast(bfloat16)``. Autocast casts each linear weight to bf16 and autograd keeps that
  copy for the backward pass (``buffers``: 2 bytes per matrix weight), and it casts a float32
  linear input separately for every linear that reads it. So weights + gradients + AdamW cost
  16 bytes per trained parameter, as in plain fp32.
- ``"pure_bf16"``: parameters, gradients and optimizer states stored in bf16 (torch AdamW keeps its
  moments in the parameter's dtype): 8 bytes per trained parameter with AdamW. peft keeps adapter
  weights in float32 (``autocast_adapter_dtype``), so adapters cost 16 bytes per parameter and each
  adapter saves a float32 copy of its input. This convention reproduces the reference figures for
  LLaMA-2-7B (full ~60 GB, LoRA ~23 GB; optimizer states shrink by 2 x 2 bytes x 6.74e9 = 25.1 GiB,
  gradients by 2 bytes x 6.74e9 = 12.6 GiB, 13.5 GB): with AdamW, LoRA r=16 on all matrices and a
  micro-batch of 1 x 1024 tokens it gives 60.1 and 23.9 GiB (2 x 4096 tokens with activation
  checkpointing: 58.6 and 20.5 GiB). The alternatives do not: fp32 master weights with fp32 AdamW
  states (16 bytes per parameter, ZeRO's accounting) need 100 GiB for full finetuning before
  activations, bf16 parameters with fp32 AdamW states 75 GiB. Modelled for full finetuning and
  LoRA; DoRA and AdaLoRA under pure bf16 are rougher (peft's float32 adapter paths).

**Activations** are the tensors autograd holds for the backward pass at the end of the forward,
counted per token for a HF Llama decoder layer (derived op by op and checked against the saved
tensors of a tiny model, within 1%): RMSNorm keeps its float32 input (and its normalised output
when its weight trains); attention runs through SDPA's fused (flash / memory-efficient) kernel,
which saves q, k, v, the output and a log-sum-exp per head but no ``seq_len x seq_len`` score
matrix, so nothing grows with seq_len^2; the SwiGLU MLP keeps gate, silu(gate), up and (when
down_proj trains) their product; each linear whose weight trains keeps its input; each adapter
keeps its rank-r intermediate (DoRA also its base and adapter outputs); dropout keeps a mask. For
adapters the first layer counts only what lies downstream of an adapter (its input, the frozen
embeddings' output, needs no gradient). The output head adds the logits (the loop holds them) and
their float32 log-softmax (cross-entropy saves it). With ``gradient_checkpointing`` (HF's
non-reentrant checkpointing; the training loop does not use it yet) only each layer's input is
kept; one layer's activations come back while it is recomputed (``recompute``).

**The peak** of a step in :func:`learnforget.train.loop.train` comes at one of three moments
(:attr:`MemoryPlan.moments`): the end of the forward pass, when the previous step's gradients are
still allocated (the loop sets them to None only after the forward) and cross-entropy reads a
float32 copy of bf16 logits; the loss backward, when the gradients are gone but two float32
``tokens x vocab`` gradients exist (``workspace``); with checkpointing, the recomputation of the
first layer at the end of the backward, when nearly every gradient is written. ``allocated`` =
weights + buffers + optimizer states + the largest moment: the figure
``torch.cuda.max_memory_allocated`` would report (on the CPU the tests measure the same peak of
live tensor bytes op by op: within 1.5%; with checkpointing plus dropout or DoRA the
recomputed layer's backward transients make it 7-13% low). ``total`` adds ``overhead``: the CUDA context and
library workspaces (:data:`CUDA_CONTEXT_BYTES`) plus caching-allocator slack
(:data:`ALLOCATOR_SLACK` of ``allocated``), assumptions not measured here (no GPU).

**Several GPUs.** Each process trains ``ceil(batch_size / n)`` sequences (the loop splits the global
batch over processes; no gradient accumulation). Without FSDP every GPU holds a replica, and DDP
adds one copy of the trained gradients as communication buckets (accelerate's default,
``gradient_as_bucket_view=False``). With FSDP (full sharding, one unit per decoder layer) weights,
gradients and optimizer states are divided by n; the GPU also holds the gathered root unit
(embeddings, final norm, output head) and two gathered layers (the current one and the prefetched
one), plus one layer's unsharded gradients before their reduce-scatter; bf16 then means FSDP's
``MixedPrecision(param_dtype=bfloat16)``: float32 shards, bf16 compute, no autocast copies. The
FSDP figures follow FSDP's design (the trainer shards full finetuning over several processes
with FSDP2, learnforget.train.fsdp); they are checked against the design, not yet against GPU peaks.

Memory sizes are binary: ``GiB`` = 2**30 bytes (an "80 GB" H100 has 79.6 GiB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from learnforget.train.methods import AdapterShape, MethodConfig, as_method
from learnforget.train.modeling import validate_arch
from learnforget.train.settings import TrainConfig

GiB = 2**30
MiB = 2**20

PRECISIONS = ("fp32", "bf16", "pure_bf16")
# Optimizer states per trained parameter, each in the parameter's dtype: AdamW's exp_avg and
# exp_avg_sq, Lion's exp_avg, SGD's momentum buffer. AdamW's 0-d ``step`` counters live on the
# CPU (torch's default, neither fused nor capturable) and are not counted.
OPTIMIZER_STATES = {"adamw": 2, "lion": 1, "sgd": 1}

CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers (assumed)
ALLOCATOR_SLACK = 0.05        # caching-allocator fragmentation, fraction of the allocated peak (assumed)
HOST_BASELINE_BYTES = 2 * GiB  # host memory of one training process before the model (Python, torch, libs)

# The Llama linear modules adapters can target: name -> (d_in, d_out) as functions of
# (hidden, kv width, intermediate).
_LINEARS = {
    "q_proj": lambda h, kv, i: (h, h),
    "k_proj": lambda h, kv, i: (h, kv),
    "v_proj": lambda h, kv, i: (h, kv),
    "o_proj": lambda h, kv, i: (h, h),
    "gate_proj": lambda h, kv, i: (h, i),
    "up_proj": lambda h, kv, i: (h, i),
    "down_proj": lambda h, kv, i: (i, h),
}
# Which saved input each linear reads: q/k/v the attention norm's output, o the attention output,
# gate/up the MLP norm's output, down the SwiGLU product.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


# ----------------------------------------------------------------------------- parameters
def _arch(arch: dict, vocab_size: int | None) -> tuple[dict, int]:
    """The validated arch (defaults filled) and the vocabulary size (from ``vocab_size`` or an
    ``arch["vocab_size"]`` key; model arch dicts take it from the tokenizer)."""
    a = dict(arch)
    v = a.pop("vocab_size", None)
    if vocab_size is not None:
        v = vocab_size
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"the memory planner needs the vocabulary size (vocab_size=...), got {v!r}")
    return validate_arch(a), v


def _dims(a: dict) -> tuple[int, int, int]:
    h = a["hidden_size"]
    kv = a["num_key_value_heads"] * (h // a["num_attention_heads"])
    return h, kv, a["intermediate_size"]


def count_params(arch: dict, vocab_size: int | None = None) -> dict[str, Any]:
    """Parameter counts of the Llama ``build_model`` makes from ``arch`` (tied embeddings counted
    once): ``embeddings``, ``lm_head`` (0 when tied), ``final_norm``, per layer ``attention``,
    ``mlp``, ``norms`` and ``layer``, ``layers`` (all of them), ``modules`` (weights per linear of
    one layer), ``matrices`` (every linear weight incl. the output head: what autocast casts), and
    ``total``."""
    a, v = _arch(arch, vocab_size)
    h, kv, i = _dims(a)
    layers = a["num_hidden_layers"]
    modules = {name: f(h, kv, i)[0] * f(h, kv, i)[1] for name, f in _LINEARS.items()}
    attention = sum(modules[m] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(modules[m] for m in ("gate_proj", "up_proj", "down_proj"))
    norms = 2 * h
    layer = attention + mlp + norms
    embeddings = v * h
    lm_head = 0 if a["tie_word_embeddings"] else v * h
    total = embeddings + layers * layer + h + lm_head
    return {"embeddings": embeddings, "lm_head": lm_head, "final_norm": h, "attention": attention, "mlp": mlp,
            "norms": norms, "layer": layer, "layers": layers * layer, "modules": modules,
            "matrices": layers * (attention + mlp) + v * h, "vocab_size": v, "total": total}


def _adapter(m: MethodConfig) -> AdapterShape | None:
    """What a low-rank method trains (its :meth:`~learnforget.train.methods.MethodConfig.adapter_shape`);
    None for full finetuning; ValueError for a method that is neither (the planner has no model of it)."""
    if m.full_finetuning:
        return None
    ad = m.adapter_shape()
    if ad is None:
        raise ValueError(f"the memory planner has no parameter model for method type {m.type!r} "
                         f"(give it an adapter_shape(), learnforget.train.methods)")
    unknown = [t for t in ad.targets if t not in _LINEARS]
    if unknown:
        raise ValueError(f"the memory planner knows the Llama linears {', '.join(_LINEARS)}; "
                         f"cannot size target(s) {', '.join(unknown)}")
    return ad


def trainable_params(arch: dict, method: MethodConfig | dict, vocab_size: int | None = None) -> int:
    """Parameters ``method`` trains on ``arch``: all of them for full finetuning; per targeted
    matrix and layer ``r * (d_in + d_out)`` for LoRA/ReLoRA, plus ``d_out`` (magnitude) for DoRA,
    plus ``init_r`` (the singular values) for AdaLoRA at its initial rank."""
    m = as_method(method)
    counts = count_params(arch, vocab_size)
    ad = _adapter(m)
    if ad is None:
        return counts["total"]
    a, _ = _arch(arch, vocab_size)
    h, kv, i = _dims(a)
    per_layer = 0
    for t in ad.targets:
        d_in, d_out = _LINEARS[t](h, kv, i)
        per_layer += ad.rank * (d_in + d_out) + (d_out if ad.magnitude else 0) + (ad.rank if ad.singular_values else 0)
    return a["num_hidden_layers"] * per_layer


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Bytes one GPU holds at the peak of a training step (see the module docstring)."""

    name: str
    method: str
    n_gpus: int
    micro_batch: int
    seq_len: int
    precision: str
    optimizer: str
    fsdp: bool
    gradient_checkpointing: bool
    params: int
    trainable: int
    weights: int       # stored parameters (this GPU's shard under FSDP)
    buffers: int       # autocast bf16 weight copies, DDP gradient buckets, FSDP gathered units
    gradients: int     # .grad of the trained parameters (shard under FSDP)
    optimizer_states: int  # optimizer moments (+ AdaLoRA's importance scores)
    activations: int   # saved for backward at the end of the forward, incl. logits and log-softmax
    logits_copy: int   # the float32 copy of bf16 logits cross-entropy reads (end of the forward)
    workspace: int     # the loss backward's two float32 tokens x vocab gradients
    recompute: int     # checkpointing: one layer recomputed in the backward, net of what is freed by then
    overhead: int      # CUDA context + allocator slack (CPU: the process baseline)
    detail: dict = field(default_factory=dict)

    @property
    def moments(self) -> dict[str, int]:
        """What varies over a step, at its three candidate peaks: the end of the forward pass (the
        previous step's gradients are still allocated), the loss backward (gradients set to None),
        and with checkpointing the recomputation of the first layer at the end of the backward
        (nearly every gradient written)."""
        m = {"end_of_forward": self.gradients + self.activations + self.logits_copy,
             "loss_backward": self.activations + self.workspace}
        if self.gradient_checkpointing:
            m["checkpoint_recompute"] = self.gradients + self.activations + self.recompute
        return m

    @property
    def peak_at(self) -> str:
        moments = self.moments
        return max(moments, key=moments.get)

    @property
    def allocated(self) -> int:
        """Peak tensor bytes (what ``torch.cuda.max_memory_allocated`` would report):
        weights + buffers + optimizer states + the largest of :attr:`moments`."""
        return self.weights + self.buffers + self.optimizer_states + max(self.moments.values())

    @property
    def total(self) -> int:
        """Peak memory per GPU: ``allocated + overhead``."""
        return self.allocated + self.overhead

    @property
    def total_gb(self) -> float:
        return self.total / GiB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(moments=self.moments, peak_at=self.peak_at, allocated=self.allocated, total=self.total)
        return d

    def summary(self) -> str:
        """One line: total per GPU, GPU count and layout, the parts in GiB, the settings."""
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        how = "FSDP" if self.fsdp else ("DDP" if self.n_gpus > 1 else "single")
        moment = self.peak_at
        parts = f"grads {g(self.gradients)}, activations {g(self.activations)}, loss workspace {g(self.workspace)}"
        if self.logits_copy:
            parts += f", logits copy {g(self.logits_copy)}"
        if self.gradient_checkpointing:
            parts += f", recompute {g(self.recompute)}"
        return (f"{self.name}: {g(self.total)} GiB/GPU x {self.n_gpus} {how} = weights {g(self.weights)}"
                f" + buffers {g(self.buffers)} + optimizer {g(self.optimizer_states)}"
                f" + {moment.replace('_', ' ')} {g(self.moments[moment])} + overhead {g(self.overhead)}"
                f" ({parts}) [{self.method}: {self.trainable:,} of {self.params:,} params trained; {self.precision},"
                f" {self.optimizer}, micro-batch {self.micro_batch} x {self.seq_len} tokens"
                f"{', checkpointing' if self.gradient_checkpointing else ''}]")


def _needs_grad(ad: AdapterShape | None, first: bool) -> dict[str, bool]:
    """Which linear inputs of a layer need a gradient: all of them for full finetuning and for every
    adapter layer but the first; in the first, only those downstream of an adapter."""
    targets = set() if ad is None else set(ad.targets)
    grad_in = ad is None or not first
    qkv_grad = grad_in or bool(targets & {"q_proj", "k_proj", "v_proj"})
    grad_mid = qkv_grad or "o_proj" in targets  # the residual stream after attention
    down_grad = grad_mid or bool(targets & {"gate_proj", "up_proj"})
    return {"attn_in": grad_in, "o_in": qkv_grad, "mlp_in": grad_mid, "down_in": down_grad}


def _layer_activation_bytes(h: int, kv: int, i: int, heads: int, *, ad: AdapterShape | None, compute: str,
                            device: str,
                            adapter_dropout: float = 0.0, full_dropout: float = 0.0,
                            first: bool = False) -> dict[str, float]:
    """Bytes per token one decoder layer saves for backward, by part.

    ``ad``: the method's :class:`AdapterShape` (None: full finetuning, every weight trains).
    ``compute``: "fp32", "autocast" (float32 storage, bf16 matmuls) or "bf16" (bf16 storage, or FSDP
    mixed precision). Under "bf16" with adapters, peft's float32 adapter weights make each adapter
    cast its input to float32 and save that copy. ``first``: the first layer of an adapter method,
    whose input (the frozen embeddings' output) needs no gradient, so the norms, attention and MLP
    save only what the adapters' own gradients need. ``device``: dropout keeps a 1-byte mask on
    CUDA (fused native_dropout), a mask in the input's dtype on the CPU.
    """
    full = ad is None
    targets = set() if full else set(ad.targets)
    act = 4 if compute == "fp32" else 2
    norm_out = 2 if compute == "bf16" else 4  # RMSNorm's normalised output (weight trains), input dtype
    norm = 4 * h + 4 + (norm_out * h if full else 0)  # float32 input (pow and mul save it) and rsqrt
    needs_grad = _needs_grad(ad, first)
    grad_in, qkv_grad, grad_mid = needs_grad["attn_in"], needs_grad["o_in"], needs_grad["mlp_in"]
    gate_grad = grad_mid or "gate_proj" in targets
    up_grad = grad_mid or "up_proj" in targets

    parts: dict[str, float] = {}
    parts["norms"] = norm * (grad_in + grad_mid)
    # SDPA (flash / memory-efficient kernel): q, k, v, the output, a float32 log-sum-exp per head
    parts["attention"] = (act * (2 * h + 2 * kv) + 4 * heads) if qkv_grad else 0
    # SwiGLU: silu saves gate; the product saves silu(gate) (for up's gradient) and up (for gate's)
    parts["mlp"] = act * i * (gate_grad + up_grad + gate_grad)

    # the inputs saved by the linears whose weights train (full) or by the adapters
    dims = {"attn_in": h, "o_in": h, "mlp_in": h, "down_in": i}
    consumers = {g: 0 for g in dims}
    for name in (_LINEARS if full else targets):
        consumers[_INPUT_GROUP[name]] += 1
    inputs = 0.0
    for g, n in consumers.items():
        if n == 0:
            continue
        d = dims[g]
        if not full and adapter_dropout > 0:
            # each adapter's own dropout, applied after peft's cast to the (float32) adapter dtype:
            # its mask (when its input needs a gradient) and its dropped-out input, cast again to
            # bf16 under autocast
            mask = (1 if device == "cuda" else 4) if needs_grad[g] else 0
            inputs += n * ({"fp32": 4, "autocast": 2, "bf16": 4}[compute] + mask) * d
        elif compute == "fp32":
            # one shared tensor; o_in is SDPA's output, already counted when SDPA saved it
            inputs += 0 if (g == "o_in" and qkv_grad) else 4 * d
        elif full:
            if g in ("attn_in", "mlp_in"):  # the float32 norm output: autocast casts it per linear
                inputs += (n if compute == "autocast" else 1) * 2 * d
            elif g == "down_in":
                inputs += 2 * d
        else:
            # adapters: peft casts the input to the adapter's dtype (float32); autocast then makes a
            # bf16 copy per adapter, under pure bf16 the float32 copy is what is saved
            inputs += n * (2 if compute == "autocast" else 4) * d
    parts["linear_inputs"] = inputs
    if not full:
        a_act = 2 if compute == "autocast" else 4
        extra = 0.0
        for t in targets:
            d_out = _LINEARS[t](h, kv, i)[1]
            extra += a_act * ad.rank  # the rank-r intermediate (lora_B's input)
            if ad.magnitude:
                extra += 2 * a_act * d_out  # base output and scaled adapter output (magnitude's gradient)
        parts["adapters"] = extra
    if full and full_dropout > 0:  # residual dropout on the attention and MLP outputs
        parts["dropout"] = 2 * h * (1 if device == "cuda" else act)
    return parts


def _check_settings(*, precision: str, optimizer: str, micro_batch: int, seq_len: int, n_gpus: int) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    for key, val in (("micro_batch", micro_batch), ("seq_len", seq_len), ("n_gpus", n_gpus)):
        if not (isinstance(val, int) and not isinstance(val, bool) and val >= 1):
            raise ValueError(f"{key} must be a positive integer, got {val!r}")


def _storage(precision: str, fsdp: bool, full: bool) -> tuple[int, int, str]:
    """(bytes per frozen weight, bytes per trained weight (its gradient and optimizer states share
    its dtype), how the forward computes: "fp32", "autocast" or "bf16")."""
    if precision == "pure_bf16":
        return 2, (2 if full else 4), "bf16"  # peft keeps adapters in float32
    return 4, 4, "fp32" if precision == "fp32" else ("bf16" if fsdp else "autocast")


def _training_state(ad: AdapterShape | None, *, n_frozen: int, n_train: int, frozen_b: int, train_b: int,
                    shard: int, optimizer: str, detail: dict) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes on one GPU (its shard under FSDP)."""
    weights = (n_frozen * frozen_b + n_train * train_b) / shard
    gradients = n_train * train_b / shard
    states = OPTIMIZER_STATES[optimizer] * n_train * train_b / shard
    if ad is not None and ad.importance_scores:
        # AdaLoRA's rank allocator: ipt, exp_avg_ipt and exp_avg_unc for every adapter parameter
        detail["adalora_importance"] = ad.importance_scores * n_train * train_b / shard
        states += detail["adalora_importance"]
    return weights, gradients, states


def _buffers(ad: AdapterShape | None, a: dict, v: int, counts: dict, *, n_train: int, train_b: int, compute: str,
             n_gpus: int, fsdp: bool, gradient_checkpointing: bool, detail: dict) -> tuple[float, int]:
    """(buffers, layer_casts): autocast's bf16 weight copies, DDP's gradient buckets and FSDP's
    gathered units in bytes; the copies one recomputed layer makes under checkpointing."""
    full = ad is None
    h, layers = a["hidden_size"], a["num_hidden_layers"]
    buffers = 0.0
    layer_casts = 0
    if compute == "autocast":
        # the bf16 copy of each linear weight whose input needs a gradient, saved for backward
        # (adapter matrices included); with checkpointing a layer's copies exist only while it is
        # recomputed (counted in `recompute`)
        per_layer_matrices = counts["attention"] + counts["mlp"]
        first_unsaved = sum(counts["modules"][n] for n in _LINEARS if not _needs_grad(ad, True)[_INPUT_GROUP[n]])
        kept = 0 if gradient_checkpointing else layers * per_layer_matrices - first_unsaved
        layer_casts = 2 * per_layer_matrices if gradient_checkpointing else 0
        detail["autocast_weight_copies"] = 2 * (kept + v * h + (n_train if not full else 0))
        buffers += detail["autocast_weight_copies"]
    if n_gpus > 1 and not fsdp:
        detail["ddp_buckets"] = n_train * train_b
        buffers += detail["ddp_buckets"]
    if fsdp and n_gpus > 1:
        unit_b = 4 if compute == "fp32" else 2
        root = counts["embeddings"] + counts["lm_head"] + counts["final_norm"]
        layer_params = counts["layer"] + (n_train // layers if not full else 0)
        detail["fsdp_gathered"] = (root + 2 * layer_params) * unit_b
        detail["fsdp_unsharded_grads"] = (counts["layer"] if full else n_train // layers) * train_b
        buffers += detail["fsdp_gathered"] + detail["fsdp_unsharded_grads"]
    return buffers, layer_casts


def _activations(m: MethodConfig, ad: AdapterShape | None, a: dict, v: int, *, micro_batch: int, seq_len: int,
                 compute: str, device: str, gradient_checkpointing: bool, layer_casts: int,
                 detail: dict) -> tuple[float, float, float, float, dict[str, float]]:
    """(activations, logits_copy, workspace, recompute, one layer's activations per token by part)
    in bytes (see the module docstring)."""
    full = ad is None
    h, kv, i = _dims(a)
    layers, heads = a["num_hidden_layers"], a["num_attention_heads"]
    tokens = micro_batch * seq_len
    act = 4 if compute == "fp32" else 2
    dropouts = {"adapter_dropout": 0.0 if full else float(getattr(m, "dropout", 0.0)),
                "full_dropout": float(getattr(m, "dropout", 0.0)) if full else 0.0}
    layer_parts = _layer_activation_bytes(h, kv, i, heads, ad=ad, compute=compute, device=device, **dropouts)
    per_layer = sum(layer_parts.values())
    first_layer = sum(_layer_activation_bytes(h, kv, i, heads, ad=ad, compute=compute, device=device,
                                              first=True, **dropouts).values())
    resid = 2 if compute == "bf16" else 4  # the residual stream's dtype (a checkpointed layer's input)
    if gradient_checkpointing:  # the layers' inputs; one layer's activations come back in `recompute`
        layer_acts = tokens * layers * resid * h
    else:
        layer_acts = tokens * (first_layer + (layers - 1) * per_layer)
    head_in = (4 if compute == "fp32" else 2) * h if full else 0  # lm_head's input when it trains
    final = tokens * (4 * h + 4 + ((2 if compute == "bf16" else 4) * h if full else 0) + head_in)
    logits = tokens * v * (act + 4)  # the logits the loop holds + their float32 log-softmax
    # RoPE's cos and sin (one per position, in the hidden states' dtype), token ids and targets
    rope_ids = seq_len * 2 * (h // heads) * (2 if compute == "bf16" else 4) + tokens * 16
    activations = layer_acts + final + logits + rope_ids
    logits_copy = tokens * v * 4 if act == 2 else 0
    workspace = tokens * v * 8
    # checkpointing: at the end of the backward the first layer is recomputed while the head's
    # saved tensors (final norm, lm_head input, log-softmax) are already freed
    recompute = max(0, tokens * per_layer + layer_casts - final - tokens * v * 4) if gradient_checkpointing else 0
    detail.update({"activations_per_layer_per_token": layer_parts, "layer_activations": layer_acts,
                   "final_norm_and_head": final, "logits": logits})
    return activations, logits_copy, workspace, recompute, layer_parts


def estimate(arch: dict, method: MethodConfig | dict, *, micro_batch: int, seq_len: int,
             vocab_size: int | None = None, precision: str = "bf16", optimizer: str = "adamw",
             n_gpus: int = 1, fsdp: bool = False, gradient_checkpointing: bool = False,
             device: str = "cuda", name: str | None = None) -> MemoryPlan:
    """Peak memory per GPU of one training step (see the module docstring for the conventions).

    ``micro_batch``: sequences per GPU per forward pass; ``seq_len``: tokens per sequence (an
    upper bound for padded instruction batches); ``vocab_size``: the tokenizer's (or an
    ``arch["vocab_size"]``); ``precision``: one of :data:`PRECISIONS`; ``optimizer``: one of
    :data:`OPTIMIZER_STATES`; ``n_gpus`` > 1 without ``fsdp``: DDP replicas; ``device``:
    "cuda" (overhead: CUDA context and allocator slack) or "cpu" (a CPU job: dropout masks in
    the input's dtype, overhead :data:`HOST_BASELINE_BYTES` per process).
    """
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    m = as_method(method)
    a, v = _arch(arch, vocab_size)
    _check_settings(precision=precision, optimizer=optimizer, micro_batch=micro_batch,
                    seq_len=seq_len, n_gpus=n_gpus)
    counts = count_params(a | {"vocab_size": v})
    ad = _adapter(m)
    full = ad is None
    n_params = counts["total"]
    n_train = trainable_params(a | {"vocab_size": v}, m)
    n_frozen = n_params if not full else 0  # the adapters come on top of the base model
    frozen_b, train_b, compute = _storage(precision, fsdp, full)
    detail: dict[str, Any] = {"compute": compute}

    weights, gradients, states = _training_state(ad, n_frozen=n_frozen, n_train=n_train, frozen_b=frozen_b,
                                                 train_b=train_b, shard=n_gpus if fsdp else 1,
                                                 optimizer=optimizer, detail=detail)
    buffers, layer_casts = _buffers(ad, a, v, counts, n_train=n_train, train_b=train_b, compute=compute, n_gpus=n_gpus,
                                    fsdp=fsdp, gradient_checkpointing=gradient_checkpointing, detail=detail)
    activations, logits_copy, workspace, recompute, layer_parts = _activations(
        m, ad, a, v, micro_batch=micro_batch, seq_len=seq_len, compute=compute, device=device,
        gradient_checkpointing=gradient_checkpointing, layer_casts=layer_casts, detail=detail)

    h, layers = a["hidden_size"], a["num_hidden_layers"]
    plan = MemoryPlan(
        name=name or f"{m.type} h{h} L{layers}", method=m.type, n_gpus=n_gpus, micro_batch=micro_batch,
        seq_len=seq_len, precision=precision, optimizer=optimizer, fsdp=fsdp,
        gradient_checkpointing=gradient_checkpointing, params=n_params + (n_train if not full else 0),
        trainable=n_train, weights=int(weights), buffers=int(buffers), gradients=int(gradients),
        optimizer_states=int(states), activations=int(activations), logits_copy=int(logits_copy),
        workspace=int(workspace), recompute=int(recompute), overhead=0,
        detail={k: (int(x) if isinstance(x, float) else x) for k, x in detail.items()})
    plan.detail["activations_per_layer_per_token"] = {k: round(x, 1) for k, x in layer_parts.items()}
    plan.overhead = int(CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK * plan.allocated) if device == "cuda" \
        else HOST_BASELINE_BYTES
    return plan


def plan_gpus(arch: dict, method: MethodConfig | dict, *, batch_size: int, seq_len: int,
              micro_batch: int | None = None, vocab_size: int | None = None, precision: str = "bf16",
              optimizer: str = "adamw", gradient_checkpointing: bool = False, fsdp: bool | None = None,
              gpu_memory_gb: float = 80, max_gpus: int = 8, margin: float = 0.1,
              name: str | None = None) -> tuple[int, MemoryPlan]:
    """The smallest GPU count n <= ``max_gpus`` whose plan fits ``(1 - margin) * gpu_memory_gb``
    GiB per GPU, and that plan.

    Each GPU trains ``micro_batch`` sequences per pass, by default ``ceil(batch_size / n)`` (the
    loop splits the global batch over processes), so n never exceeds ``batch_size``. ``fsdp``:
    None shards full finetuning with FSDP over n > 1 GPUs and replicates adapter methods (their
    frozen weights too) with DDP; True/False force it. ValueError naming the job when nothing fits.
    """
    m = as_method(method)
    if not (0 <= margin < 1):
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if not (isinstance(max_gpus, int) and max_gpus >= 1):
        raise ValueError(f"max_gpus must be a positive integer, got {max_gpus!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    budget = (1 - margin) * gpu_memory_gb * GiB
    label = name or f"{m.type} job"
    last = None
    for n in range(1, min(max_gpus, batch_size) + 1):
        shard = (m.shards_with_fsdp and n > 1) if fsdp is None else (bool(fsdp) and n > 1)
        mb = math.ceil(batch_size / n) if micro_batch is None else min(micro_batch, math.ceil(batch_size / n))
        plan = estimate(arch, m, micro_batch=mb, seq_len=seq_len, vocab_size=vocab_size, precision=precision,
                        optimizer=optimizer, n_gpus=n, fsdp=shard, gradient_checkpointing=gradient_checkpointing,
                        name=label)
        if plan.total <= budget:
            return n, plan
        last = plan
    raise ValueError(f"{label} does not fit on up to {min(max_gpus, batch_size)} GPU(s) of {gpu_memory_gb:g} GiB "
                     f"(usable {budget / GiB:.1f} GiB with margin {margin:g}); at {last.n_gpus} GPU(s) it needs "
                     f"{last.total_gb:.1f} GiB per GPU: {last.summary()}")


def host_memory_bytes(arch: dict, method: MethodConfig | dict, *, vocab_size: int | None = None,
                      processes: int = 1, optimizer: str = "adamw") -> int:
    """Host (CPU) memory of a GPU training job: per process the float32 base model that
    ``load_model`` reads into host memory before it moves to the GPU, plus
    :data:`HOST_BASELINE_BYTES`; under FSDP (full finetuning over several processes) the main
    process also gathers the full float32 weights and optimizer states to save them."""
    counts = count_params(arch, vocab_size)
    per_process = 4 * (counts["total"] + trainable_params(arch, method, vocab_size)) + HOST_BASELINE_BYTES
    gather = 0
    if as_method(method).shards_with_fsdp and processes > 1:
        gather = 4 * (1 + OPTIMIZER_STATES.get(optimizer, 2)) * counts["total"]
    return processes * per_process + gather


def gpu_plan_for_job(arch: dict, method: MethodConfig | dict, train: dict | None, gpu_memory_gb: float | None,
                     *, vocab_size: int, max_gpus: int = 8, margin: float = 0.1, fsdp: bool | None = None,
                     gradient_checkpointing: bool = False, micro_batch: int | None = None,
                     cpu_processes: int = 1, name: str | None = None) -> dict[str, Any]:
    """Resources of one finetuning job from config dicts: ``arch`` (config ``model``), ``method``
    (``Run.method``), ``train`` (``Run.train``: ``batch_size``, ``seq_len``, ``optimizer`` and
    ``precision`` are read, defaults as :class:`learnforget.train.settings.TrainConfig`), the memory of one
    GPU in GiB (None or 0: a CPU job) and the tokenizer's vocabulary size (config
    ``tokenizer.vocab_size`` is its upper bound). The other keywords go to :func:`plan_gpus`.

    Returns ``{"gpus": n, "mem_mb": host MiB, "per_gpu_mb": planned MiB per GPU (0 on CPU),
    "summary": one line, "plan": MemoryPlan.to_dict()}``; ValueError naming the job when it does
    not fit ``max_gpus`` GPUs. A CPU job runs ``cpu_processes`` processes (DDP over gloo), each
    holding the whole training state: ``mem_mb`` is then the CPU plan's total (training state plus
    :data:`HOST_BASELINE_BYTES`) times the processes.
    """
    m = as_method(method)
    tc = TrainConfig.from_dict(train)
    label = name or f"{m.type} job"
    micro_batch = micro_batch or tc.micro_batch_size  # gradient accumulation over passes of this size
    if not gpu_memory_gb:
        procs = max(1, int(cpu_processes))
        mb = math.ceil(tc.batch_size / procs)
        plan = estimate(arch, m, micro_batch=min(micro_batch, mb) if micro_batch else mb, seq_len=tc.seq_len,
                        vocab_size=vocab_size, precision=tc.precision, optimizer=tc.optimizer, n_gpus=procs,
                        gradient_checkpointing=gradient_checkpointing, device="cpu", name=label)
        mem = procs * plan.total
        return {"gpus": 0, "mem_mb": int(math.ceil(mem / MiB)), "per_gpu_mb": 0,
                "summary": f"{label}: CPU x {procs} process(es), {mem / GiB:.2f} GiB host = {procs} x (training "
                           f"state {plan.allocated / GiB:.2f} + process {plan.overhead / GiB:.2f}) [{m.type}: "
                           f"{plan.trainable:,} of {plan.params:,} params trained; {tc.precision}, {tc.optimizer}, "
                           f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens]",
                "plan": plan.to_dict()}
    n, plan = plan_gpus(arch, m, batch_size=tc.batch_size, seq_len=tc.seq_len, micro_batch=micro_batch,
                        vocab_size=vocab_size, precision=tc.precision, optimizer=tc.optimizer,
                        gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, gpu_memory_gb=gpu_memory_gb,
                        max_gpus=max_gpus, margin=margin, name=label)
    mem = host_memory_bytes(arch, m, vocab_size=vocab_size, processes=n, optimizer=tc.optimizer)
    return {"gpus": n, "mem_mb": int(math.ceil(mem / MiB)), "per_gpu_mb": int(math.ceil(plan.total / MiB)),
            "summary": plan.summary(), "plan": plan.to_dict()}
