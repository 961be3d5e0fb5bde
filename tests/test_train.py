"""The training engine: every method trains and reloads, continuation, determinism, schedules."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from learnforget.io import read_json, read_jsonl
from learnforget.methods import METHODS, method_from_dict
from learnforget.modeling import build_model, count_parameters, load_model
from learnforget.schedules import SCHEDULES, length_independent, make_schedule
from learnforget.tokens import Batches, load_tokens, save_tokens, tokenize_cpt, tokenize_ift
from learnforget.train import TrainConfig, duration_to_steps, finetune, pretrain_base, train

torch.set_num_threads(1)

PROMPTS = [f"what is {a} + {b}?" for a in range(8) for b in range(5)]
RESPONSES = [f" {a} + {b} = {a + b}. #### {a + b}" for a in range(8) for b in range(5)]
FACTS = [f"Person {i} lives in town {i % 7} and likes {['red', 'blue', 'green'][i % 3]}." for i in range(40)]
ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CFG = dict(lr=3e-3, batch_size=8, seq_len=24, threads=1, seed=0)
METHOD_CASES = {"full": {"type": "full"}, "lora": {"type": "lora", "rank": 4, "dropout": 0.1},
                "dora": {"type": "dora", "rank": 4, "target": "attention"}}


def make_tokenizer(texts, vocab=300):
    from learnforget.tokenizer import build_tokenizer

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
    ({"schedule_length": "forever"}, "schedule_length"), ({"learning_rate": 1e-3}, "learning_rate"),
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
    wsd = make_schedule("wsd", warmup_steps=2, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.0)
    assert wsd(1) == 1.0 and wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(80) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    assert length_independent("constant") and not length_independent("cosine") and not length_independent("wsd")
    assert set(SCHEDULES) >= {"constant", "cosine", "wsd"}
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("cosine")


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
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_and_reloads(world, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = method_from_dict(METHOD_CASES[name])
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    torch.manual_seed(0)
    model = method.prepare(load_model(world / "base"))
    batches = Batches(load_tokens(world / "math_ift"), "ift", 8, 24, seed=0)
    log = tmp_path / "log.jsonl"
    model, state = train(model, batches, CFG, end_step=15, log_path=log, progress=False)
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
    cont = method.load(world / "base", tmp_path)
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
    assert man["files"]["state.pt"] and man["method"]["type"] == name and man["peak_rss_mib"] > 0
    assert man["parameters"]["trainable"] < man["parameters"]["total"] or name == "full"


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
