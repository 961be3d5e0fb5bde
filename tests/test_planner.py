"""The GPU memory planner: exact parameter counts, the LLaMA-2-7B reference figures, and the
estimates against what the tiny model really allocates (on the CPU: saved tensors and the peak of
live tensor bytes over training steps, tracked op by op)."""

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from learnforget.train.methods import method_from_dict
from learnforget.train.modeling import build_model, count_parameters
from learnforget.cluster.planner import GiB, count_params, estimate, gpu_plan_for_job, plan_gpus, trainable_params
from learnforget.train.settings import TrainConfig
from learnforget.train.loop import make_optimizer

torch.set_num_threads(1)

VOCAB = 500
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)  # tied embeddings (the default)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA2_VOCAB = 32000
METHODS = {
    "full": {"type": "full"},
    "full-dropout": {"type": "full", "dropout": 0.1},
    "lora": {"type": "lora", "rank": 4},
    "lora-attention": {"type": "lora", "rank": 4, "target": "attention"},
    "lora-mlp": {"type": "lora", "rank": 4, "target": "mlp"},
    "lora-list": {"type": "lora", "rank": 3, "target": ["q_proj", "down_proj"]},
    "lora-dropout": {"type": "lora", "rank": 4, "dropout": 0.1},
    "dora": {"type": "dora", "rank": 4},
    "adalora": {"type": "adalora", "init_r": 4, "target_r": 2, "tinit": 0.0},
    "relora": {"type": "relora", "rank": 4, "merge_every": 5, "rewarmup_steps": 2},
}
B, S = 2, 64  # micro-batch and sequence length of the tiny measurements


class _Tok:
    """The attributes build_model reads from a tokenizer."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self):
        return VOCAB


def _tiny(name, precision="fp32", arch=TINY, checkpointing=False):
    spec = METHODS[name]
    model = build_model(arch, _Tok(), seed=0)
    if precision == "pure_bf16":
        model = model.to(torch.bfloat16)
    method = method_from_dict(spec)
    model = method.prepare(model, total_steps=10)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, method


def _rel(estimated, measured):
    return estimated / measured - 1


# ----------------------------------------------------------------------------- parameters
def test_one_matrix_lora_r4_trains_60416_instead_of_45088768():
    one_layer = {**LLAMA2_7B, "num_hidden_layers": 1}
    counts = count_params(one_layer, LLAMA2_VOCAB)
    assert counts["modules"]["up_proj"] == counts["modules"]["down_proj"] == 4096 * 11008 == 45_088_768
    for module in ("gate_proj", "up_proj", "down_proj"):
        assert trainable_params(one_layer, {"type": "lora", "rank": 4, "target": [module]}, LLAMA2_VOCAB) == 60_416


def test_llama2_7b_parameter_counts():
    assert count_params(LLAMA2_7B, LLAMA2_VOCAB)["total"] == 6_738_415_616  # LLaMA-2-7B's published count
    # r=16 on all seven matrices of 32 layers: 32 * 16 * (4 * 8192 + 3 * 15104)
    assert trainable_params(LLAMA2_7B, {"type": "lora", "rank": 16}, LLAMA2_VOCAB) == 39_976_960
    assert trainable_params({**LLAMA2_7B, "vocab_size": LLAMA2_VOCAB}, {"type": "full"}) == 6_738_415_616


@pytest.mark.parametrize("tied", [True, False])
def test_counts_match_build_model(tied):
    arch = {**TINY, "tie_word_embeddings": tied}
    model = build_model(arch, _Tok(), seed=0)
    trainable, total = count_parameters(model)
    counts = count_params(arch, VOCAB)
    assert counts["total"] == total == trainable
    assert counts["lm_head"] == (0 if tied else VOCAB * 64)
    assert trainable_params(arch, {"type": "full"}, VOCAB) == total


@pytest.mark.parametrize("name", [n for n in METHODS if n != "full-dropout"])
def test_trainable_matches_the_prepared_model(name):
    model, _ = _tiny(name)
    trainable, total = count_parameters(model)
    assert trainable_params(TINY, METHODS[name], VOCAB) == trainable
    if METHODS[name]["type"] != "full":
        # the adapters come on top of the frozen base; AdaLoRA adds a frozen rank counter per module
        n_modules = sum(1 for n, _ in model.named_parameters() if ".ranknum." in n)
        assert total == count_params(TINY, VOCAB)["total"] + trainable + n_modules


# ----------------------------------------------------------------------------- the reference
# LLaMA-2-7B (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000, untied): full
# finetuning about 60 GB, LoRA about 23 GB; "optimiser states and gradients shrink by about 25 GB
# and 14 GB". Convention that reproduces them: pure bf16 (weights, gradients and both AdamW
# moments in bf16: 2 + 2 + 4 bytes per parameter; fp32 AdamW states would give 81 GB before
# activations). Settings: AdamW, LoRA r=16 on all seven matrices, and either
#   - micro-batch 1 x 1024 tokens, no activation checkpointing (lands within 1 GiB of both), or
#   - micro-batch 2 x 4096 tokens (LLaMA-2's context) with activation checkpointing.
# Figures in GiB; tolerance +-20% on the totals, +-15% on the shrinkage.
REFERENCE_SETTINGS = {
    "1x1024": dict(micro_batch=1, seq_len=1024),
    "2x4096-checkpointing": dict(micro_batch=2, seq_len=4096, gradient_checkpointing=True),
}


@pytest.mark.parametrize("setting", sorted(REFERENCE_SETTINGS))
def test_llama2_7b_reference_figures(setting):
    kw = dict(vocab_size=LLAMA2_VOCAB, precision="pure_bf16", optimizer="adamw", **REFERENCE_SETTINGS[setting])
    full = estimate(LLAMA2_7B, {"type": "full"}, **kw)
    lora = estimate(LLAMA2_7B, {"type": "lora", "rank": 16, "target": "all"}, **kw)
    assert abs(_rel(full.total / GiB, 60)) <= 0.20, full.summary()
    assert abs(_rel(lora.total / GiB, 23)) <= 0.20, lora.summary()
    assert abs(_rel((full.optimizer_states - lora.optimizer_states) / GiB, 25)) <= 0.15
    assert abs(_rel((full.gradients - lora.gradients) / GiB, 14)) <= 0.15
    assert full.weights == 2 * 6_738_415_616 and full.optimizer_states == 2 * full.weights


# ----------------------------------------------------------------------------- tiny-model measurements
@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
@pytest.mark.parametrize("name", ["full", "lora", "dora", "adalora"])
def test_optimizer_states_match_torch(name, optimizer):
    model, method = _tiny(name)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer), method)
    ids = torch.randint(0, VOCAB, (B, S))
    loss = F.cross_entropy(model(input_ids=ids, use_cache=False).logits.reshape(-1, VOCAB), ids.reshape(-1))
    loss.backward()
    opt.step()
    method.after_step(model, opt, 0)
    # the moments (AdamW's 0-d step counters live on the CPU on a GPU too, and are not planned)
    real = sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    plan = estimate(TINY, METHODS[name], micro_batch=B, seq_len=S, vocab_size=VOCAB, precision="fp32",
                    optimizer=optimizer, device="cpu")
    importance = plan.detail.get("adalora_importance", 0)
    assert plan.optimizer_states - importance == real
    if name == "adalora":
        alloc = model.base_model.rankallocator
        assert importance == sum(t.nbytes for d in (alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc)
                                 for t in d.values())


def _saved_tensor_bytes(model, precision):
    """Bytes of the distinct storages autograd still holds for backward after one forward and the
    loss (parameters excluded), plus the logits the training loop holds."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    ids = torch.randint(0, VOCAB, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids.reshape(-1))
    live = {}
    for r in refs + [weakref.ref(logits)]:
        t = r()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(live.values())


# The activation model is derived op by op (module docstring); measured deviation is under 1%.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["full", "full-dropout", "lora", "lora-attention", "lora-mlp", "lora-list",
                                  "lora-dropout", "dora", "adalora"])
def test_activations_match_saved_tensors(name, precision):
    model, _ = _tiny(name)
    measured = _saved_tensor_bytes(model, precision)
    plan = estimate(TINY, METHODS[name], micro_batch=B, seq_len=S, vocab_size=VOCAB, precision=precision,
                    device="cpu")
    # under autocast the bf16 weight copies are saved tensors too (the plan's buffers)
    estimated = plan.activations + plan.detail.get("autocast_weight_copies", 0)
    assert abs(_rel(estimated, measured)) <= 0.05, (estimated, measured)


class _LiveBytes(TorchDispatchMode):
    """The peak of live tensor bytes: every storage an op creates counts until it is freed (a
    CPU stand-in for torch.cuda.max_memory_allocated); ``add`` registers existing tensors."""

    def __init__(self):
        super().__init__()
        self.sizes, self.now, self.peak = {}, 0, 0

    def add(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.sizes:
            self.sizes[key] = storage.nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def _peak_of_training(name, precision, checkpointing):
    """Two steps in the order of learnforget.train.loop.train: forward (autocast for bf16), float32
    cross-entropy, zero_grad(set_to_none=True), backward, step, the method's after_step."""
    model, method = _tiny(name, precision, checkpointing=checkpointing)
    opt = make_optimizer(model, TrainConfig(), method)
    ids, targets = torch.randint(0, VOCAB, (B, S)), torch.randint(0, VOCAB, (B, S))
    tracker = _LiveBytes()
    for p in model.parameters():
        tracker.add(p)
    with tracker:
        for step in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.after_step(model, opt, step)
            del logits, loss
    return tracker.peak


# Measured deviation: under 1.5% (checkpointing included); the tolerance leaves room for library
# changes. With checkpointing plus dropout or DoRA the estimate undershoots by 7-13% on this model
# (the recomputed layer's backward transients), so those are not asserted here.
# Pure bf16 is modelled for full finetuning and LoRA (the reference's setting), not DoRA/AdaLoRA.
PEAK_CASES = [(name, ckpt, precision)
              for name, ckpt in [("full", False), ("lora", False), ("lora-dropout", False), ("dora", False),
                                 ("adalora", False), ("full", True), ("lora", True)]
              for precision in ("fp32", "bf16", "pure_bf16")
              if not (precision == "pure_bf16" and name in ("dora", "adalora"))]


@pytest.mark.parametrize("name, checkpointing, precision", PEAK_CASES)
def test_peak_of_a_training_step(name, checkpointing, precision):
    measured = _peak_of_training(name, precision, checkpointing)
    plan = estimate(TINY, METHODS[name], micro_batch=B, seq_len=S, vocab_size=VOCAB, precision=precision,
                    device="cpu", gradient_checkpointing=checkpointing)
    assert abs(_rel(plan.allocated, measured)) <= 0.05, (plan.allocated, measured, plan.moments)


# ----------------------------------------------------------------------------- planning
def test_plan_gpus_picks_the_smallest_count_that_fits():
    kw = dict(batch_size=16, seq_len=512, vocab_size=LLAMA2_VOCAB, precision="bf16", gpu_memory_gb=80)
    n_full, full = plan_gpus(LLAMA2_7B, {"type": "full"}, name="7b-full", **kw)
    n_lora, lora = plan_gpus(LLAMA2_7B, {"type": "lora", "rank": 16}, name="7b-lora", **kw)
    assert n_full > n_lora >= 1
    assert full.fsdp and not lora.fsdp  # full finetuning shards; LoRA replicates the frozen weights
    for n, plan, method in ((n_full, full, {"type": "full"}), (n_lora, lora, {"type": "lora", "rank": 16})):
        assert plan.n_gpus == n and plan.micro_batch == math.ceil(16 / n)
        assert plan.total <= 0.9 * 80 * GiB
        if n > 1:  # one GPU fewer does not fit
            with pytest.raises(ValueError, match=plan.name):
                plan_gpus(LLAMA2_7B, method, name=plan.name, max_gpus=n - 1, **kw)
    # the training loop's DDP (no FSDP): every GPU holds 16 bytes per parameter, which no 80 GiB GPU has
    with pytest.raises(ValueError, match="7b-full does not fit on up to 8 GPU"):
        plan_gpus(LLAMA2_7B, {"type": "full"}, name="7b-full", fsdp=False, **kw)


def test_gpu_plan_for_job_from_the_default_config():
    from learnforget.study import config as lfconfig

    cfg = lfconfig.load(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    vocab = cfg["tokenizer"]["vocab_size"]
    for run in lfconfig.expand_runs(cfg):
        res = gpu_plan_for_job(cfg["model"], run.method, run.train, 80, vocab_size=vocab, name=run.name)
        assert res["gpus"] == 1 and isinstance(res["mem_mb"], int) and res["mem_mb"] > 2048
        assert res["summary"].startswith(run.name) and "\n" not in res["summary"]
        assert 0 < res["per_gpu_mb"] < 4096
        json.dumps(res)
        cpu = gpu_plan_for_job(cfg["model"], run.method, run.train, None, vocab_size=vocab, name=run.name)
        assert cpu["gpus"] == 0 and cpu["mem_mb"] > 2048 and cpu["summary"].startswith(run.name)


@pytest.mark.parametrize("kw, match", [
    ({"precision": "fp16"}, "precision"),
    ({"optimizer": "adam"}, "optimizer"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"vocab_size": None}, "vocab"),
    ({"method": {"type": "lora", "target": ["lm_head"]}}, "lm_head"),
    ({"device": "tpu"}, "device"),
])
def test_bad_inputs_are_named(kw, match):
    args = dict(method={"type": "full"}, micro_batch=1, seq_len=8, vocab_size=VOCAB)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        estimate(TINY, args.pop("method"), **args)


# ----------------------------------------------------------------------------- behaviour comes from the method type
@pytest.mark.parametrize("gpu", [0, "auto", 2])
def test_plans_follow_the_method_type_not_the_users_method_name(gpu):
    """A full-finetuning method the study names ``baseline`` and a LoRA method it names ``fullish``
    get exactly the plans of ``full`` and ``lora`` with the same settings: GPU count, FSDP or DDP,
    host memory, memory per GPU and every part of the plan."""
    import yaml

    from learnforget.cluster import resources as lfres
    from learnforget.study import config as lfconfig

    raw = yaml.safe_load((Path(__file__).resolve().parent / "tiny.yaml").read_text())
    lora = {"type": "lora", "rank": 16, "alpha": 32, "target": "all"}
    raw.update(model=dict(LLAMA2_7B, max_position_embeddings=4096), tokenizer={"vocab_size": 32000},
               methods={"full": {"type": "full"}, "lora": lora, "baseline": {"type": "full"}, "fullish": dict(lora)},
               finetune={"batch_size": 16, "seq_len": 512, "precision": "bf16", "lr": 1.0e-4},
               runs=[{"name": f"math-{m}", "domain": "math", "regime": "ift", "method": m}
                     for m in ("full", "lora", "baseline", "fullish")],
               resources={"gpu": gpu})
    cfg = lfconfig.validate(raw)
    runs = {r.method_name: r for r in lfconfig.expand_runs(cfg)}
    plans = {name: lfres.train_plan(cfg, run) for name, run in runs.items()}
    for named, reference in (("baseline", "full"), ("fullish", "lora")):
        got, want = dict(plans[named]), dict(plans[reference])
        assert got.pop("summary").replace(f"math-{named}", "") == want.pop("summary").replace(f"math-{reference}", "")
        assert got == want
        job = {k: v for k, v in gpu_plan_for_job(cfg["model"], runs[named].method, runs[named].train, 80,
                                                 vocab_size=32000).items() if k != "plan"}
        assert job == {k: v for k, v in gpu_plan_for_job(cfg["model"], runs[reference].method, runs[reference].train,
                                                          80, vocab_size=32000).items() if k != "plan"}
    if gpu != 0:  # on several GPUs full finetuning is sharded (FSDP), LoRA replicated (DDP)
        assert "FSDP" in plans["baseline"]["summary"] and "DDP" in plans["fullish"]["summary"]
    if gpu == "auto":  # and needs more of them
        assert plans["baseline"]["gpus"] > plans["fullish"]["gpus"]
