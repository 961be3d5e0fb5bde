"""The training engine: every method trains and reloads, continuation, determinism, schedules."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from learnforget.core.io import read_json, read_jsonl
from learnforget.train.methods import METHODS, method_from_dict
from learnforget.train.modeling import build_model, count_parameters, load_model
from learnforget.train.optim import Lion
from learnforget.train.schedules import SCHEDULES, cooldown_start, length_independent, make_schedule
from learnforget.data.tokens import Batches, load_tokens, save_tokens, tokenize_cpt, tokenize_ift
from learnforget.train.settings import TrainConfig
from learnforget.train.loop import duration_to_steps, finetune, pretrain_base, train
from learnforget.train.settings import plan_segment

torch.set_num_threads(1)

PROMPTS = [f"what is {a} + {b}?" for a in range(8) for b in range(5)]
RESPONSES = [f" {a} + {b} = {a + b}. #### {a + b}" for a in range(8) for b in range(5)]
FACTS = [f"Person {i} lives in town {i % 7} and likes {['red', 'blue', 'green'][i % 3]}." for i in range(40)]
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CFG = dict(lr=3e-3, batch_size=8, seq_len=24, threads=1, seed=0)
METHOD_CASES = {"full": {"type": "full"}, "lora": {"type": "lora", "rank": 4, "dropout": 0.1},
                "dora": {"type": "dora", "rank": 4, "target": "attention"},
                "full-dropout": {"type": "full", "dropout": 0.1}, "full-wd": {"type": "full", "wd": 0.1},
                "adalora": {"type": "adalora", "init_r": 4, "target_r": 2, "deltaT": 2},
                "relora": {"type": "relora", "rank": 4, "merge_every": 7, "rewarmup_steps": 2}}


def make_tokenizer(texts, vocab=300):
    from learnforget.data.tokenizer import build_tokenizer

    return build_tokenizer(texts, vocab_size=vocab, min_frequency=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer dir, CPT and IFT token dirs, and a (randomly initialised) base model dir."""
    root = tmp_path_factory.mktemp("world")
    tok = make_tokenizer(FACTS + PROMPTS + RESPONSES)
    tok.save_pretrained(root / "tokenizer")
    save_tokens(tokenize_cpt(FACTS, tok), root / "facts")
    save_tokens(tokenize_cpt([p + r for p, r in zip(PROMPTS, RESPONSES)], tok), root / "math_cpt")
    save_tokens(tokenize_ift(PROMPTS, RESPONSES, tok, template="Q: {prompt}\nA:{response}"), root / "math_ift")
    base = build_model(ARCH, tok, seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


def _weights(ckpt):
    model_dir = ckpt / "model"
    f = model_dir / ("adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").exists()
                     else "model.safetensors")
    return load_file(str(f))


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad, field", [
    ({"lr": 0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"betas": [0.9]}, "betas"),
    ({"schedule": "linear"}, "schedule"), ({"grad_clip": -1}, "grad_clip"), ({"optimizer": "sgd"}, "optimizer"),
    ({"warmup_fraction": 0.1, "warmup_steps": 3}, "warmup_fraction"), ({"min_lr_ratio": 2}, "min_lr_ratio"),
    ({"schedule_length": "forever"}, "schedule_length"), ({"compile": "yes"}, "compile"), ({"learning_rate": 1e-3}, "learning_rate"),
    ({"cooldown_fraction": 1.0}, "cooldown_fraction"), ({"precision": "fp8"}, "precision"),
    ({"save_every_steps": -1}, "save_every_steps"), ({"tensorboard": "yes"}, "tensorboard"),
])
def test_train_config_errors_name_the_key(bad, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(bad)


def test_duration_to_steps(world):
    b = Batches(load_tokens(world / "math_ift"), "ift", batch_size=8, seq_len=24)  # 40 examples
    assert duration_to_steps(1, "epochs", b) == 5
    assert duration_to_steps(0.5, "epochs", b) == 3
    assert duration_to_steps(8 * 24 * 2 + 1, "tokens", b) == 3
    assert duration_to_steps(7, "steps", b) == 7
    with pytest.raises(ValueError, match="unit"):
        duration_to_steps(1, "hours", b)


# ----------------------------------------------------------------------------- schedules
def test_schedule_shapes():
    const = make_schedule("constant", warmup_steps=4)
    assert [const(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = make_schedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.01)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.505)  # half-way: mean of peak and floor
    assert cos(110) == pytest.approx(0.01) and cos(500) == pytest.approx(0.01)
    assert all(cos(s) > cos(s + 1) for s in range(10, 109))
    wsd = make_schedule("wsd", warmup_steps=2, total_steps=100, cooldown_fraction=0.2, min_lr_ratio=0.0)
    assert wsd(1) == 1.0 and wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(80) == pytest.approx(0.95) and wsd(89) == pytest.approx(0.5) and wsd(99) == pytest.approx(0.0)
    inv = make_schedule("inverse_sqrt", warmup_steps=4, total_steps=100, cooldown_fraction=0.1, min_lr_ratio=0.01)
    assert [inv(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert inv(15) == pytest.approx(0.5) and inv(63) == pytest.approx(0.25)  # sqrt(4 / (step + 1))
    assert inv(90) < inv(89) and inv(99) == pytest.approx(0.01)
    assert all(inv(s) >= inv(s + 1) for s in range(3, 99))
    # the trunk (no total) is the same curve without the cool-down
    trunk = make_schedule("inverse_sqrt", warmup_steps=4, cooldown_fraction=0.1)
    assert all(trunk(s) == inv(s) for s in range(90)) and trunk(99) == pytest.approx(0.2)
    assert length_independent("constant") and length_independent("wsd") and length_independent("inverse_sqrt")
    assert not length_independent("cosine")
    assert set(SCHEDULES) >= {"constant", "cosine", "wsd", "inverse_sqrt"}
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("cosine")
    assert cooldown_start("wsd", 100, 0.2) == 80 and cooldown_start("constant", 100, 0.2) == 100
    assert cooldown_start("wsd", 3, 0.1) == 2  # at least one cool-down step


@pytest.mark.parametrize("train, method, part, expected", [
    ({}, {"type": "lora"}, "final", ("continue", 10, None, "previous")),
    ({"schedule": "wsd"}, {"type": "full"}, "final", ("branch", 10, 10, "trunk")),
    ({"schedule": "inverse_sqrt", "cooldown_fraction": 0.2}, {"type": "full"}, "trunk", ("branch", 8, None, "previous")),
    ({"schedule": "wsd", "cooldown_fraction": 0}, {"type": "full"}, "final", ("continue", 10, None, "previous")),
    ({"schedule": "cosine"}, {"type": "full"}, "final", ("restart", 10, 10, "base")),
    ({"schedule": "cosine", "schedule_length": "longest"}, {"type": "full"}, "final", ("longest", 10, 40, "previous")),
    ({"warmup_fraction": 0.1}, {"type": "full"}, "final", ("restart", 10, 10, "base")),
])
def test_plan_segment(train, method, part, expected):
    plan = plan_segment(TrainConfig.from_dict(train), method_from_dict(method), part, 10, 40)
    assert (plan["mode"], plan["end_step"], plan["schedule_total"], plan["from"]) == expected


def test_lion_steps_by_the_sign_and_decays_with_the_schedule():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([3.0, -0.001, 0.0])
    opt.step()
    # first step: m = 0, update = sign(0.1 * g); p <- p * (1 - 0.5) - 0.1 * sign
    assert torch.allclose(p.detach(), torch.tensor([0.5 - 0.1, -1.0 + 0.1, 0.25]))
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([3.0, -0.001, 0.0]))
    opt.param_groups[0]["lr"] = 0.05  # half the peak: half the decay
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, -1.0, 0.0])  # sign(0.9 * m + 0.1 * g) = [1, -1, 0]
    opt.step()
    assert torch.allclose(p.detach(), before * 0.75 - 0.05 * torch.tensor([1.0, -1.0, 0.0]))


def _two_models(world, seed=0):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    return [build_model(ARCH, tok, seed=seed) for _ in range(2)]


def _steps(model, opt, n=30, clip=1.0, foreach=True):
    """``n`` optimizer steps on the same fixed random gradients; the clipped norms."""
    gen, norms = torch.Generator().manual_seed(1), []
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach)))
        opt.step()
    return norms


def test_lion_multi_tensor_step_is_bitwise_the_per_tensor_one(world):
    a, b = _two_models(world)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    _steps(a, Lion(a.parameters(), **kw, foreach=True), foreach=False)
    _steps(b, Lion(b.parameters(), **kw, foreach=False), foreach=False)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_fused_adamw_and_multi_tensor_clipping_stay_within_1e_5_of_the_per_tensor_loop(world):
    """The stated tolerance of the fused optimizer step (learnforget.train.optim): after 30 steps
    the weights agree to 1e-5 (relative to their largest value); clipped norms to 1e-6."""
    from learnforget.train.loop import make_optimizer

    a, b = _two_models(world)
    cfg = TrainConfig.from_dict({**CFG, "weight_decay": 0.1})
    opt = make_optimizer(a, cfg)
    assert opt.param_groups[0]["fused"] is True
    ref = torch.optim.AdamW([{"params": [p for p in b.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in b.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    na, nb = _steps(a, opt, foreach=True), _steps(b, ref, foreach=False)
    assert max(abs(x - y) / y for x, y in zip(na, nb)) < 1e-6
    diffs = [float((x - y).abs().max() / y.abs().max()) for x, y in zip(a.parameters(), b.parameters())]
    assert 0 < max(diffs) < 1e-5  # not bitwise (different rounding), and close


def test_optimizer_state_does_not_carry_its_implementation(world):
    """A job continuing from a state saved by another implementation (an older for-loop AdamW,
    an FSDP job's foreach one) keeps the fused step; saved states name no implementation."""
    from learnforget.train.loop import make_optimizer

    a, b = _two_models(world)
    loop = torch.optim.AdamW([{"params": [p for p in a.parameters() if p.dim() >= 2]},
                              {"params": [p for p in a.parameters() if p.dim() < 2]}], lr=3e-3, foreach=False)
    _steps(a, loop, n=2)
    saved = loop.state_dict()
    assert saved["param_groups"][0]["foreach"] is False
    opt = make_optimizer(b, TrainConfig.from_dict(CFG))
    opt.load_state_dict(saved)
    assert all(g["fused"] is True and g["foreach"] is None for g in opt.param_groups)
    assert all(torch.equal(opt.state[p]["exp_avg"], loop.state[q]["exp_avg"])
               for p, q in zip(b.parameters(), a.parameters()))
    _steps(b, opt, n=1)
    assert all(g["fused"] is None and g["foreach"] is None for g in opt.state_dict()["param_groups"])


def test_allocator_setting_changes_no_number(world, tmp_path):
    """learnforget.core.perf.tune_allocator (glibc heap thresholds) only changes where memory comes
    from: a training run with it off (LEARNFORGET_MALLOC=default, another process) gives
    bitwise the same losses."""
    import subprocess
    import sys

    from learnforget.core import perf

    code = f"""
import json, sys, torch
from transformers import AutoTokenizer
from learnforget.core import perf
from learnforget.train.modeling import build_model
from learnforget.data.tokens import Batches, load_tokens
from learnforget.train.loop import train
tok = AutoTokenizer.from_pretrained({str(world / "tokenizer")!r})
batches = Batches(load_tokens({str(world / "facts")!r}), "cpt", 8, 24, seed=0)
model, state = train(build_model({ARCH!r}, tok, seed=0), batches, {CFG!r}, end_step=6,
                     log_path=sys.argv[1], progress=False)
print(json.dumps(perf._applied))
"""
    runs = {}
    for mode in ("", "default"):
        log = tmp_path / f"log{mode}.jsonl"
        out = subprocess.run([sys.executable, "-c", code, str(log)], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "LEARNFORGET_MALLOC": mode})
        runs[mode] = (out.stdout.strip().splitlines()[-1], [r["loss"] for r in read_jsonl(log)])
    assert runs["default"][0] == "false"
    assert runs[""][0] == json.dumps(perf.tune_allocator())  # applied where glibc is (this machine)
    assert runs[""][1] == runs["default"][1] and len(runs[""][1]) == 6


def test_compiled_training_matches_eager_within_1e_4(world, tmp_path):
    """train.compile (a runtime key: it does not change what a run is) gives the eager losses
    within float rounding (stated tolerance 1e-4 relative over 4 steps)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    losses = {}
    for compiled in (False, True):
        batches = Batches(load_tokens(world / "facts"), "cpt", 8, 24, seed=0)
        train(build_model(ARCH, tok, seed=0), batches, {**CFG, "compile": compiled}, end_step=4,
              log_path=tmp_path / f"{compiled}.jsonl", progress=False)
        losses[compiled] = [r["loss"] for r in read_jsonl(tmp_path / f"{compiled}.jsonl")]
    assert max(abs(a - b) / a for a, b in zip(losses[True], losses[False])) < 1e-4
    assert "compile" not in TrainConfig.from_dict({**CFG, "compile": True}).result_dict()


# ----------------------------------------------------------------------------- base
def test_pretrain_base_writes_a_loadable_hf_dir(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    man = pretrain_base(world / "tokenizer", [(world / "facts", 1.0), (world / "math_cpt", 0.5)], ARCH, CFG,
                        tmp_path / "base", log_path=tmp_path / "base.log.jsonl", duration=6, unit="steps",
                        progress=False)
    assert man["step"] == 6 and man["tokens"] == 6 * 8 * 24 and man["tokens_per_s"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    assert man["parameters"]["total"] == count_parameters(model)[1]
    log = read_jsonl(tmp_path / "base" / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7)) and read_jsonl(tmp_path / "base.log.jsonl") == log
    assert set(man["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "train_log.jsonl"}


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("name", sorted(set(METHODS) | set(METHOD_CASES)))  # every method has a case
def test_every_method_trains_and_reloads(world, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = method_from_dict(METHOD_CASES[name])
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    torch.manual_seed(0)
    model = method.prepare(load_model(world / "base"), total_steps=15)
    batches = Batches(load_tokens(world / "math_ift"), "ift", 8, 24, seed=0)
    log = tmp_path / "log.jsonl"
    # AdaLoRA starts from E = 0 and P, Q of std 0.02 (peft's init): it needs a larger step to move in 15 steps
    cfg = dict(CFG, lr=2e-2) if method.type == "adalora" else CFG
    model, state = train(model, batches, cfg, end_step=15, log_path=log, progress=False, method=method)
    losses = [r["loss"] for r in read_jsonl(log)]
    assert len(losses) == 15 and state["step"] == 15
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1

    method.save(model, tmp_path / "model", tok)
    if method.is_adapter:
        assert (tmp_path / "model" / "adapter_config.json").exists()
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), tmp_path / "model")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    x = batches.make_batch([0, 1, 2]).input_ids
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        a, b = model(input_ids=x).logits, reloaded(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    base = load_model(world / "base").eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=x).logits, a, atol=1e-3)  # training changed something
    # the loader used to continue training gives the same model, trainable
    method.save_state(model, tmp_path)
    cont = method.load(world / "base", tmp_path, total_steps=15)
    assert count_parameters(cont)[0] == count_parameters(model)[0] > 0


# ----------------------------------------------------------------------------- continuation
@pytest.mark.parametrize("name", ["full", "lora"])
@pytest.mark.parametrize("regime", ["ift", "cpt"])
def test_continuing_equals_training_in_one_go(world, tmp_path, name, regime):
    tokens = world / ("math_ift" if regime == "ift" else "math_cpt")
    kw = dict(method=METHOD_CASES[name], train_cfg=dict(CFG, warmup_steps=2), durations=[1, 2], progress=False)
    one = finetune(world / "base", tokens, regime, duration=2, out_dir=tmp_path / "one" / "2", **kw)
    finetune(world / "base", tokens, regime, duration=1, out_dir=tmp_path / "two" / "1", **kw)
    two = finetune(world / "base", tokens, regime, duration=2, prev_checkpoint_dir=tmp_path / "two" / "1",
                   out_dir=tmp_path / "two" / "2", **kw)
    assert two["continued_from"] and two["start_step"] > 0 and two["step"] == one["step"] > two["start_step"]
    assert _same_weights(_weights(tmp_path / "one" / "2"), _weights(tmp_path / "two" / "2"))
    log_one = read_jsonl(tmp_path / "one" / "2" / "train_log.jsonl")
    log_two = read_jsonl(tmp_path / "two" / "2" / "train_log.jsonl")
    strip = lambda log: [{k: v for k, v in r.items() if k != "elapsed"} for r in log]  # noqa: E731
    assert strip(log_one) == strip(log_two) and len(log_one) == one["step"]
    assert one["tokens"] == two["tokens"]
    man = read_json(tmp_path / "two" / "2" / "manifest.json")
    assert man["files"]["state.pt"] and man["method"]["type"] == name and man["peak_memory_mib"] > 0
    assert man["mode"] == "continue" and 0 < man["mfu"] < 1 and man["peak_gflops_per_s"] > 0
    assert man["parameters"]["trainable"] < man["parameters"]["total"] or name == "full"


def test_length_grouped_ift_continues_exactly_and_changes_the_batches(world, tmp_path):
    """train.group_by_length: a longer duration continuing a shorter one equals training in one
    go (the grouped order is a function of seed and epoch), and it is another run than the
    plain shuffled order (other batches: other weights, and its config fingerprint differs)."""
    kw = dict(method=METHOD_CASES["full"], durations=[1, 2], progress=False)
    grouped = dict(CFG, batch_size=2, group_by_length=True)
    one = finetune(world / "base", world / "math_ift", "ift", train_cfg=grouped, duration=2,
                   out_dir=tmp_path / "one" / "2", **kw)
    finetune(world / "base", world / "math_ift", "ift", train_cfg=grouped, duration=1, out_dir=tmp_path / "two" / "1",
             **kw)
    finetune(world / "base", world / "math_ift", "ift", train_cfg=grouped, duration=2,
             prev_checkpoint_dir=tmp_path / "two" / "1", out_dir=tmp_path / "two" / "2", **kw)
    assert _same_weights(_weights(tmp_path / "one" / "2"), _weights(tmp_path / "two" / "2"))
    plain = finetune(world / "base", world / "math_ift", "ift", train_cfg=dict(grouped, group_by_length=False),
                     duration=2, out_dir=tmp_path / "plain" / "2", **kw)
    assert plain["step"] == one["step"]
    assert not _same_weights(_weights(tmp_path / "one" / "2"), _weights(tmp_path / "plain" / "2"))
    assert one["run_cfg"]["train_cfg"]["group_by_length"] is True
    # off, it is not part of a run's identity: checkpoints and Snakemake params from before it existed match
    assert "group_by_length" not in plain["run_cfg"]["train_cfg"]


def test_length_dependent_schedule_restarts_unless_shared(world, tmp_path):
    kw = dict(method={"type": "full"}, durations=[1, 2], progress=False)
    cfg = dict(CFG, schedule="cosine", warmup_fraction=0.2)
    finetune(world / "base", world / "math_ift", "ift", train_cfg=cfg, duration=1, out_dir=tmp_path / "c1", **kw)
    restarted = finetune(world / "base", world / "math_ift", "ift", train_cfg=cfg, duration=2,
                         prev_checkpoint_dir=tmp_path / "c1", out_dir=tmp_path / "c2", **kw)
    assert restarted["continued_from"] is None and "not continued" in restarted["note"]
    assert restarted["start_step"] == 0 and restarted["schedule_total"] == restarted["step"] == 10
    log = read_jsonl(tmp_path / "c2" / "train_log.jsonl")
    assert log[-1]["lr"] == pytest.approx(3e-3 * make_schedule(
        "cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.01)(9))
    # one schedule over the longest duration: continuing is allowed and exact
    shared = dict(cfg, schedule_length="longest")
    short = finetune(world / "base", world / "math_ift", "ift", train_cfg=shared, duration=1,
                     out_dir=tmp_path / "s1", **kw)
    assert short["schedule_total"] == 10 and short["step"] == 5
    finetune(world / "base", world / "math_ift", "ift", train_cfg=shared, duration=2,
             prev_checkpoint_dir=tmp_path / "s1", out_dir=tmp_path / "s2", **kw)
    finetune(world / "base", world / "math_ift", "ift", train_cfg=shared, duration=2, out_dir=tmp_path / "s2b", **kw)
    assert _same_weights(_weights(tmp_path / "s2"), _weights(tmp_path / "s2b"))


def test_continuing_a_different_run_is_refused(world, tmp_path):
    kw = dict(method={"type": "lora", "rank": 4}, durations=[1, 2], progress=False)
    finetune(world / "base", world / "math_ift", "ift", train_cfg=CFG, duration=1, out_dir=tmp_path / "a1", **kw)
    with pytest.raises(ValueError, match="train_cfg"):
        finetune(world / "base", world / "math_ift", "ift", train_cfg=dict(CFG, lr=1e-3), duration=2,
                 prev_checkpoint_dir=tmp_path / "a1", out_dir=tmp_path / "a2", **kw)
    assert not (tmp_path / "a2").exists()


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_weights_other_seed_differs(world, tmp_path):
    kw = dict(method={"type": "lora", "rank": 4, "dropout": 0.1}, train_cfg=CFG, duration=6, unit="steps",
              progress=False)
    finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "a", seed=1, **kw)
    finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "b", seed=1, **kw)
    finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "c", seed=2, **kw)
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["run_cfg"]["train_cfg"]["seed"] == 1 and man["step"] == 6
    assert math.isfinite(man["final_loss"])


# ----------------------------------------------------------------------------- trunk and cool-down branches
def test_cooldown_branches_share_one_trunk(world, tmp_path):
    """wsd: trunk to each duration's cool-down start, one branch per duration. Adding the longer
    duration continues the trunk; its branch equals training that duration alone."""
    cfg = dict(CFG, schedule="wsd", cooldown_fraction=0.4, warmup_steps=2, min_lr_ratio=0.0)
    kw = dict(method={"type": "lora", "rank": 4}, train_cfg=cfg, progress=False)
    b, t = tmp_path / "chain", tmp_path / "alone"
    finetune(world / "base", world / "math_ift", "ift", duration=1, durations=[1, 2], part="trunk",
             out_dir=b / "trunk" / "1", **kw)
    one = finetune(world / "base", world / "math_ift", "ift", duration=1, durations=[1, 2],
                   prev_checkpoint_dir=b / "trunk" / "1", out_dir=b / "1", **kw)
    trunk2 = finetune(world / "base", world / "math_ift", "ift", duration=2, durations=[1, 2], part="trunk",
                      prev_checkpoint_dir=b / "trunk" / "1", out_dir=b / "trunk" / "2", **kw)
    two = finetune(world / "base", world / "math_ift", "ift", duration=2, durations=[1, 2],
                   prev_checkpoint_dir=b / "trunk" / "2", out_dir=b / "2", **kw)
    assert (one["mode"], one["start_step"], one["step"]) == ("branch", 3, 5)  # 5 steps, 2 of cool-down
    assert (trunk2["start_step"], trunk2["step"], two["start_step"], two["step"]) == (3, 6, 6, 10)
    lrs = [r["lr"] for r in read_jsonl(b / "2" / "train_log.jsonl")]
    assert lrs[2:6] == [3e-3] * 4 and lrs[-1] == pytest.approx(0.0) and lrs[6] < 3e-3
    # the same duration trained on its own (a trunk from the base, then its branch)
    finetune(world / "base", world / "math_ift", "ift", duration=2, durations=[2], part="trunk",
             out_dir=t / "trunk" / "2", **kw)
    finetune(world / "base", world / "math_ift", "ift", duration=2, durations=[2],
             prev_checkpoint_dir=t / "trunk" / "2", out_dir=t / "2", **kw)
    assert _same_weights(_weights(b / "2"), _weights(t / "2"))
    assert not _same_weights(_weights(b / "2"), _weights(b / "trunk" / "2"))
    with pytest.raises(ValueError, match="trunk"):
        finetune(world / "base", world / "math_ift", "ift", duration=2, durations=[2], out_dir=t / "x", **kw)


# ----------------------------------------------------------------------------- resume after a kill
KILL_SCRIPT = """
import sys, torch
from learnforget.train.loop import finetune
torch.set_num_threads(1)
finetune(sys.argv[1] + "/base", sys.argv[1] + "/math_cpt", "cpt", method={"type": "full", "dropout": 0.1},
         train_cfg=dict(lr=3e-3, batch_size=8, seq_len=24, threads=1, seed=0, save_every_steps=4,
                        warmup_steps=3),
         duration=400, unit="steps", out_dir=sys.argv[2], resume_dir=sys.argv[3], progress=False)
"""


def test_a_killed_job_resumes_from_its_snapshot_and_matches(world, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out, snap = tmp_path / "killed", tmp_path / "resume"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(world), str(out), str(snap)])
    deadline = time.time() + 120
    while not (snap / "job.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # let it run on past the first snapshot
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the job finished before it could be killed"
    assert not out.exists() and (snap / "state.pt").exists()
    killed_at = torch.load(snap / "state.pt", weights_only=True)["step"]
    assert 0 < killed_at < 400 and killed_at % 4 == 0

    kw = dict(method={"type": "full", "dropout": 0.1}, duration=400, unit="steps", progress=False,
              train_cfg=dict(CFG, save_every_steps=4, warmup_steps=3))
    resumed = finetune(world / "base", world / "math_cpt", "cpt", out_dir=out, resume_dir=snap, **kw)
    assert resumed["resumed_from_step"] == killed_at and resumed["start_step"] == 0 and not snap.exists()
    plain = finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "plain", **kw)
    assert plain["resumed_from_step"] is None
    assert _same_weights(_weights(out), _weights(tmp_path / "plain"))
    strip = lambda log: [{k: v for k, v in r.items() if k != "elapsed"} for r in log]  # noqa: E731
    assert strip(read_jsonl(out / "train_log.jsonl")) == strip(read_jsonl(tmp_path / "plain" / "train_log.jsonl"))
    assert resumed["final_loss"] == plain["final_loss"] and resumed["tokens"] == plain["tokens"]


def test_a_snapshot_of_another_configuration_is_not_used(world, tmp_path):
    kw = dict(method={"type": "lora", "rank": 4}, duration=8, unit="steps", progress=False)
    finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "a", resume_dir=tmp_path / "snap",
             train_cfg=dict(CFG, save_every_steps=3), **kw)
    assert not (tmp_path / "snap").exists()  # removed once the checkpoint is complete
    # a stale snapshot (another lr) sitting where this job would resume from is ignored
    import shutil

    stale = tmp_path / "stale"
    finetune(world / "base", world / "math_cpt", "cpt", out_dir=stale, train_cfg=dict(CFG, lr=1e-2), **kw)
    (tmp_path / "snap").mkdir()
    shutil.copy(stale / "state.pt", tmp_path / "snap" / "state.pt")
    shutil.copytree(stale / "model", tmp_path / "snap" / "model")
    (tmp_path / "snap" / "job.json").write_text(json.dumps({"run_cfg": {"other": 1}, "job": {}}))
    man = finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "b", resume_dir=tmp_path / "snap",
                   train_cfg=CFG, **kw)
    assert man["resumed_from_step"] is None and _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_ift_packing_packs_examples_into_full_windows(world):
    td = load_tokens(world / "math_ift")
    padded = Batches(td, "ift", 4, 24, seed=0)
    packed = Batches(td, "ift", 4, 24, seed=0, packing=True)
    assert packed.n_items == (td.n_tokens - 1) // 24 < padded.n_items
    b = next(packed)
    assert b.input_ids.shape == (4, 24) and b.n_tokens == 96
    # the loss counts responses only: fewer loss tokens than inputs, more than none
    assert 0 < b.n_loss_tokens < b.n_tokens
    y = b.targets.numpy()
    assert ((y == -100) | (y >= 0)).all()


def test_tensorboard_is_optional_with_a_clear_error(world, tmp_path):
    import importlib.util

    kw = dict(method={"type": "lora", "rank": 4}, duration=3, unit="steps", progress=False,
              train_cfg=dict(CFG, tensorboard=True))
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "tb", **kw)
        assert not (tmp_path / "tb").exists()
    else:
        finetune(world / "base", world / "math_cpt", "cpt", out_dir=tmp_path / "tb", **kw)
        assert any((tmp_path / "tb" / "tensorboard").iterdir())
