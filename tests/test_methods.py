"""The method registry: validation, defaults, what each method makes trainable, extensibility."""

from dataclasses import dataclass

import pytest
import torch

from learnforget.train.methods import METHODS, TARGET_GROUPS, MethodConfig, method_from_dict, register
from learnforget.train.modeling import build_model, count_parameters

torch.set_num_threads(1)

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


class _Tok:
    """The attributes build_model reads from a tokenizer."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __len__(self):
        return 300


@pytest.fixture
def model():
    return build_model(ARCH, _Tok(), seed=0)


@pytest.mark.parametrize(
    "d, field",
    [
        ({"type": "lora", "rank": 0}, "rank"),
        ({"type": "lora", "rank": 2.5}, "rank"),
        ({"type": "lora", "alpha": -1}, "alpha"),
        ({"type": "lora", "dropout": 1.0}, "dropout"),
        ({"type": "lora", "target": "embeddings"}, "target"),
        ({"type": "lora", "target": []}, "target"),
        ({"type": "lora", "rslora": "yes"}, "rslora"),
        ({"type": "dora", "rank": -3}, "rank"),
        ({"type": "lora", "rnak": 8}, "rnak"),
        ({"type": "full", "rank": 8}, "rank"),
        ({"type": "full", "dropout": 1.0}, "dropout"),
        ({"type": "full", "dropout": -0.1}, "dropout"),
        ({"type": "full", "wd": -1}, "wd"),
        ({"type": "full", "wd": "0.1"}, "wd"),
        ({"type": "full", "weight_decay": 0.1}, "weight_decay"),
        ({"type": "adalora", "init_r": 0}, "init_r"),
        ({"type": "adalora", "init_r": 4.0}, "init_r"),
        ({"type": "adalora", "target_r": 12}, "target_r"),
        ({"type": "adalora", "target_r": 0}, "target_r"),
        ({"type": "adalora", "alpha": 0}, "alpha"),
        ({"type": "adalora", "dropout": 1.5}, "dropout"),
        ({"type": "adalora", "target": "embeddings"}, "target"),
        ({"type": "adalora", "target": []}, "target"),
        ({"type": "adalora", "tinit": 1.0}, "tinit"),
        ({"type": "adalora", "tinit": 10}, "tinit"),
        ({"type": "adalora", "tfinal": -0.1}, "tfinal"),
        ({"type": "adalora", "tinit": 0.5, "tfinal": 0.5}, "tfinal"),
        ({"type": "adalora", "deltaT": 0}, "deltaT"),
        ({"type": "adalora", "beta1": 1.0}, "beta1"),
        ({"type": "adalora", "beta2": 0}, "beta2"),
        ({"type": "adalora", "orth_reg_weight": -0.1}, "orth_reg_weight"),
        ({"type": "adalora", "rank": 8}, "rank"),
        ({"type": "relora", "rank": 0}, "rank"),
        ({"type": "relora", "alpha": -2}, "alpha"),
        ({"type": "relora", "dropout": 1.0}, "dropout"),
        ({"type": "relora", "target": ["q_proj", ""]}, "target"),
        ({"type": "relora", "merge_every": 0}, "merge_every"),
        ({"type": "relora", "merge_every": 2.5}, "merge_every"),
        ({"type": "relora", "optimizer_reset": 1.5}, "optimizer_reset"),
        ({"type": "relora", "optimizer_reset": -0.5}, "optimizer_reset"),
        ({"type": "relora", "rewarmup_steps": -1}, "rewarmup_steps"),
        ({"type": "relora", "merge_every": 5, "rewarmup_steps": 6}, "rewarmup_steps"),
        ({"type": "lorax"}, "lorax"),
        ({"rank": 8}, "type"),
    ],
)
def test_validation_errors_name_the_field(d, field):
    with pytest.raises(ValueError, match=field):
        method_from_dict(d)


def test_lora_defaults_follow_the_paper():
    m = method_from_dict({"type": "lora", "rank": 8})
    assert m.alpha == 16 and m.dropout == 0.0 and m.target == "all" and m.rslora is False
    assert m.is_adapter and not method_from_dict({"type": "full"}).is_adapter
    assert m.to_dict() == {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "target": "all", "rslora": False}
    assert method_from_dict(m.to_dict()) == m
    assert all(h for h in m.help().values())


def test_full_trains_everything(model):
    for p in model.parameters():
        p.requires_grad_(False)
    model = method_from_dict({"type": "full"}).prepare(model)
    trainable, total = count_parameters(model)
    assert trainable == total > 0


@pytest.mark.parametrize("target", ["attention", "mlp", "all", ["q_proj", "v_proj"]])
def test_lora_targets_and_trainable_count(model, target):
    base_total = count_parameters(model)[1]
    r = 4
    m = method_from_dict({"type": "lora", "rank": r, "target": target})
    pm = m.prepare(model)
    names = TARGET_GROUPS[target] if isinstance(target, str) else target
    adapted = {n.split(".")[-1] for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and n.split(".")[-1] in
               {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}
    assert adapted == set(names)
    expected = 0
    for n, mod in pm.get_base_model().named_modules():
        if n.split(".")[-1] in names:
            expected += r * (mod.in_features + mod.out_features)
    trainable, total = count_parameters(pm)
    assert trainable == expected
    assert total == base_total + expected
    assert all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_lora_scaling_and_rslora(model):
    pm = method_from_dict({"type": "lora", "rank": 4, "alpha": 6}).prepare(model)
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(6 / 4)
    pm2 = method_from_dict({"type": "lora", "rank": 4, "rslora": True}).prepare(build_model(ARCH, _Tok(), seed=0))
    layer2 = pm2.get_base_model().model.layers[0].self_attn.q_proj
    assert layer2.scaling["default"] == pytest.approx(8 / 2)


def test_dora_is_one_registry_entry(model):
    m = method_from_dict({"type": "dora", "rank": 4})
    assert m.peft_config().use_dora and m.alpha == 8
    pm = m.prepare(model)
    assert any("magnitude" in n for n, p in pm.named_parameters() if p.requires_grad)


def test_registering_a_method_is_one_entry(model):
    @register("freeze_embeddings_test")
    @dataclass
    class FreezeEmbeddings(MethodConfig):
        def prepare(self, model, total_steps=None):
            for n, p in model.named_parameters():
                p.requires_grad_("embed" not in n)
            return model

    try:
        m = method_from_dict({"type": "freeze_embeddings_test"})
        assert m.to_dict() == {"type": "freeze_embeddings_test"}
        trainable, total = count_parameters(m.prepare(model))
        assert trainable == total - 300 * 32
        with pytest.raises(ValueError, match="already registered"):
            register("freeze_embeddings_test")(FreezeEmbeddings)
    finally:
        METHODS.pop("freeze_embeddings_test")


# ----------------------------------------------------------------------------- shared helpers
def _batches(batch_size=4, seq_len=16):
    """A learnable CPT stream (a fixed arithmetic pattern of token ids)."""
    import numpy as np

    from learnforget.data.tokens import Batches, TokenData

    ids = (np.arange(3000) * 7 % 97 + 3).astype(np.int32)
    td = TokenData(ids, np.ones(len(ids), np.uint8), np.array([0, len(ids)]), {"regime": "cpt"})
    return Batches(td, "cpt", batch_size, seq_len, seed=0)


TRAIN_CFG = dict(lr=3e-3, batch_size=4, seq_len=16, threads=1, seed=0)
X = torch.arange(3, 23).view(2, 10)


def _run(m, model, end, start=0, state=None, total=None):
    from learnforget.train.loop import train

    return train(model, _batches(), TRAIN_CFG, start_step=start, end_step=end, state=state,
                 schedule_total=total, method=m, progress=False)


def _logits(model):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=X).logits
    model.train()
    return out


def _roundtrip(obj, tmp_path):
    """What finetune does with state.pt: torch.save, then a weights_only load."""
    torch.save(obj, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_field_has_a_help(name):
    helps = METHODS[name].help()
    assert all(h and h[-1] == "." for h in helps.values()), helps


# ----------------------------------------------------------------------------- full + regularisation
def test_full_options_default_off_and_round_trip():
    m = method_from_dict({"type": "full"})
    assert m.dropout == 0.0 and m.wd is None and m.weight_decay() is None
    assert m.to_dict() == {"type": "full"}  # existing runs keep their method dict
    m2 = method_from_dict({"type": "full", "dropout": 0.1, "wd": 0.05})
    assert m2.to_dict() == {"type": "full", "dropout": 0.1, "wd": 0.05}
    assert method_from_dict(m2.to_dict()) == m2 and method_from_dict(m.to_dict()) == m
    assert method_from_dict({"type": "full", "wd": 0}).to_dict() == {"type": "full", "wd": 0}


def test_full_weight_decay_overrides_the_run(model):
    from learnforget.train.settings import TrainConfig
    from learnforget.train.loop import make_optimizer

    cfg = TrainConfig(weight_decay=0.1)
    m = method_from_dict({"type": "full", "wd": 0.02})
    assert m.weight_decay() == 0.02
    groups = make_optimizer(m.prepare(model), cfg, m).param_groups
    assert groups[0]["weight_decay"] == 0.02 and groups[1]["weight_decay"] == 0.0
    assert make_optimizer(model, cfg, method_from_dict({"type": "full"})).param_groups[0]["weight_decay"] == 0.1
    assert make_optimizer(model, cfg, method_from_dict({"type": "full", "wd": 0.0})).param_groups[0][
        "weight_decay"] == 0.0


def _n_hooks(model):
    return sum(len(mod._forward_hooks) for mod in model.modules())


def test_full_dropout_only_in_training_and_not_saved(model, tmp_path):
    from transformers import AutoModelForCausalLM

    base_logits = _logits(build_model(ARCH, _Tok(), seed=0))
    m = method_from_dict({"type": "full", "dropout": 0.3})
    model = m.prepare(model)
    model = m.prepare(model)  # preparing again does not stack hooks
    assert _n_hooks(model) == 2 * ARCH["num_hidden_layers"]
    assert torch.equal(_logits(model), base_logits)  # eval: no dropout
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=X).logits, model(input_ids=X).logits
    assert not torch.allclose(a, base_logits, atol=1e-4) and not torch.allclose(a, b, atol=1e-4)
    plain = method_from_dict({"type": "full"}).prepare(build_model(ARCH, _Tok(), seed=0)).train()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=X).logits, base_logits)  # dropout 0: no hooks, train == eval
    assert _n_hooks(plain) == 0

    m.save(model, tmp_path / "model")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(reloaded).__name__ == "LlamaForCausalLM" and _n_hooks(reloaded) == 0
    saved_cfg = (tmp_path / "model" / "config.json").read_text()
    build_model(ARCH, _Tok(), seed=0).save_pretrained(tmp_path / "plain")
    assert saved_cfg == (tmp_path / "plain" / "config.json").read_text()
    reloaded.train()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=X).logits, base_logits)
    # resuming re-applies the dropout
    cont = m.load(None, tmp_path)
    assert _n_hooks(cont) == 2 * ARCH["num_hidden_layers"]


def test_full_dropout_trains_and_continues_bitwise(model, tmp_path):
    m = method_from_dict({"type": "full", "dropout": 0.1, "wd": 0.01})
    one, _ = _run(m, m.prepare(build_model(ARCH, _Tok(), seed=0)), end=6)
    half, state = _run(m, m.prepare(model), end=3)
    m.save(half, tmp_path / "model")
    state = _roundtrip(state, tmp_path)
    two, _ = _run(m, m.load(None, tmp_path), start=3, end=6, state=state)
    assert _same_state(one, two)


# ----------------------------------------------------------------------------- AdaLoRA
ADA = {"type": "adalora", "init_r": 4, "target_r": 2, "deltaT": 2}
ADA_T = 20  # tinit 2 steps, pruning on steps 3..16 (every 2nd), final ranks from step 17


def test_adalora_defaults_and_round_trip():
    m = method_from_dict({"type": "adalora"})
    assert (m.init_r, m.target_r, m.alpha, m.dropout, m.target) == (12, 8, 24, 0.0, "all")
    assert (m.tinit, m.tfinal, m.deltaT, m.beta1, m.beta2, m.orth_reg_weight) == (0.1, 0.2, 10, 0.85, 0.85, 0.1)
    assert m.is_adapter and m.needs_total_steps
    d = m.to_dict()
    assert d["type"] == "adalora" and d["init_r"] == 12 and d["alpha"] == 24 and len(d) == 12
    assert method_from_dict(d) == m
    m2 = method_from_dict({**ADA, "target": ["q_proj", "v_proj"], "alpha": 3})
    assert method_from_dict(m2.to_dict()) == m2 and m2.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("total", [1, 2, 3, 7, 10, 15, 20, 101, 5000])
def test_adalora_schedule_fits_any_run_length(total):
    for frac in [(0.1, 0.2), (0.0, 0.0), (0.5, 0.45), (0.0, 0.99)]:
        m = method_from_dict({"type": "adalora", "tinit": frac[0], "tfinal": frac[1]})
        tinit, tfinal = m.schedule_steps(total)
        assert 0 <= tinit < total - tfinal
        cfg = m.peft_config(total)  # peft's own check passes
        assert (cfg.tinit, cfg.tfinal, cfg.total_step) == (tinit, tfinal, total)
    assert method_from_dict({"type": "adalora"}).schedule_steps(20) == (2, 4)


def test_adalora_needs_total_steps(model):
    with pytest.raises(ValueError, match="total_steps"):
        method_from_dict(ADA).prepare(model)


def test_adalora_regularizer_is_the_orthogonality_penalty(model):
    m = method_from_dict(dict(ADA, orth_reg_weight=0.5))
    pm = m.prepare(model, total_steps=ADA_T)
    reg = m.regularizer(pm)
    assert reg.requires_grad and reg.dim() == 0
    expected = []
    for mod in pm.modules():
        if hasattr(mod, "lora_E") and "default" in mod.lora_E:
            A, B = mod.lora_A["default"].detach(), mod.lora_B["default"].detach()
            expected += [torch.dist(A @ A.T, torch.eye(4)), torch.dist(B.T @ B, torch.eye(4))]
    assert len(expected) == 2 * 7 * ARCH["num_hidden_layers"]
    assert float(reg) == pytest.approx(0.5 * float(torch.stack(expected).mean()), rel=1e-5)
    reg.backward()
    assert pm.get_base_model().model.layers[0].mlp.up_proj.lora_A["default"].grad is not None
    assert method_from_dict(dict(ADA, orth_reg_weight=0)).regularizer(pm) is None


def test_adalora_reallocates_ranks_saves_and_reloads(model, tmp_path):
    from peft import PeftModel

    m = method_from_dict(ADA)
    pm = m.prepare(model, total_steps=ADA_T)
    before = m.summary(pm)
    assert set(before["ranks"].values()) == {4} and before["total_rank"] == 4 * 14
    pm, _ = _run(m, pm, end=ADA_T)
    s = m.summary(pm)
    assert len(s["ranks"]) == 14 and "model.layers.0.self_attn.q_proj" in s["ranks"]
    assert s["total_rank"] == sum(s["ranks"].values()) == s["target_total_rank"] == 2 * 14
    assert len(set(s["ranks"].values())) > 1  # reallocated, not a uniform cut
    layer = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert int((layer.lora_E["default"] != 0).sum()) == s["ranks"]["model.layers.0.self_attn.q_proj"]

    m.save(pm, tmp_path / "model")
    reloaded = PeftModel.from_pretrained(build_model(ARCH, _Tok(), seed=0), tmp_path / "model")
    assert torch.allclose(_logits(pm), _logits(reloaded), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(pm), _logits(build_model(ARCH, _Tok(), seed=0)), atol=1e-3)
    for name, rank in s["ranks"].items():  # the published adapter holds only the kept triplets
        mod = reloaded.get_base_model().get_submodule(name)
        assert mod.lora_A["default"].shape[0] == rank
    # saving left the live allocator state alone (peft rewrites rank_pattern keys while saving)
    assert all(k.endswith(".default") for k in pm.peft_config["default"].rank_pattern)


def test_adalora_continues_bitwise(model, tmp_path):
    base_dir = tmp_path / "base"
    build_model(ARCH, _Tok(), seed=0).save_pretrained(base_dir)
    m = method_from_dict(ADA)
    torch.manual_seed(0)
    one, _ = _run(m, m.prepare(build_model(ARCH, _Tok(), seed=0), total_steps=ADA_T), end=ADA_T)
    for split in (9, 18):  # mid-pruning between two reallocations; in the final phase
        ckpt = tmp_path / f"ckpt{split}"
        ckpt.mkdir()
        torch.manual_seed(0)
        half, state = _run(m, m.prepare(build_model(ARCH, _Tok(), seed=0), total_steps=ADA_T), end=split,
                           total=ADA_T)
        m.save(half, ckpt / "model")
        m.save_state(half, ckpt)
        state = _roundtrip({**state, "method": m.extra_state(half)}, ckpt)
        if split == 9:  # the published adapter matches the model at any point of the run
            from peft import PeftModel

            pub = PeftModel.from_pretrained(build_model(ARCH, _Tok(), seed=0), ckpt / "model")
            assert torch.allclose(_logits(half), _logits(pub), atol=1e-5, rtol=0)
        cont = m.load(base_dir, ckpt, total_steps=ADA_T)
        assert _same_state(cont, half)
        m.load_extra_state(cont, state["method"])
        two, _ = _run(m, cont, start=split, end=ADA_T, state=state)
        assert _same_state(one, two), split
        assert m.summary(one) == m.summary(two)
    with pytest.raises(ValueError, match="20"):
        m.load(base_dir, ckpt, total_steps=40)


# ----------------------------------------------------------------------------- ReLoRA
RELORA = {"type": "relora", "rank": 4, "merge_every": 3, "rewarmup_steps": 2}


def test_relora_defaults_and_round_trip():
    m = method_from_dict({"type": "relora"})
    assert (m.rank, m.alpha, m.dropout, m.target) == (16, 32, 0.0, "all")
    assert (m.merge_every, m.optimizer_reset, m.rewarmup_steps) == (100, 0.99, 10)
    assert not m.is_adapter and not m.needs_total_steps
    assert method_from_dict(m.to_dict()) == m
    m2 = method_from_dict({**RELORA, "target": "mlp", "optimizer_reset": 0.5})
    assert m2.to_dict()["optimizer_reset"] == 0.5 and method_from_dict(m2.to_dict()) == m2


def test_relora_lr_multiplier_rewarms_after_each_merge():
    m = method_from_dict({"type": "relora", "merge_every": 5, "rewarmup_steps": 4})
    assert [m.lr_multiplier(s) for s in range(15)] == [1] * 5 + [0.25, 0.5, 0.75, 1, 1] * 2
    assert [method_from_dict({"type": "relora", "merge_every": 2, "rewarmup_steps": 0}).lr_multiplier(s)
            for s in range(5)] == [1] * 5


@pytest.mark.parametrize("opt_name", ["adamw", "lion"])
def test_relora_merge_restarts_the_adapter(model, opt_name):
    m = method_from_dict(RELORA)
    torch.manual_seed(0)
    pm = m.prepare(model)
    params = [p for p in pm.parameters() if p.requires_grad]
    from learnforget.train.optim import Lion

    opt = torch.optim.AdamW(params, lr=1e-2) if opt_name == "adamw" else Lion(params, lr=1e-2)
    batches = _batches()
    for _ in range(2):
        b = next(batches)
        loss = torch.nn.functional.cross_entropy(pm(input_ids=b.input_ids).logits.flatten(0, 1),
                                                 b.targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = pm.get_base_model().model.layers[1].mlp.down_proj
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight("default").detach().clone()
    a0 = layer.lora_A["default"].weight.detach().clone()
    assert delta.abs().max() > 0
    before = _logits(pm)
    m.after_step(pm, opt, 0)  # not a merge step
    assert torch.equal(layer.base_layer.weight, w0) and m.summary(pm) == {"merges": 0}
    m.after_step(pm, opt, 2)  # (2 + 1) % 3 == 0: merge
    assert m.summary(pm) == {"merges": 1}
    assert torch.allclose(layer.base_layer.weight, w0 + delta, atol=1e-7) and not torch.equal(
        layer.base_layer.weight, w0)
    assert not torch.equal(layer.lora_A["default"].weight, a0)
    for lyr in m._lora_layers(pm):
        assert not torch.any(lyr.lora_B["default"].weight) and not lyr.merged
    assert torch.allclose(_logits(pm), before, atol=1e-5)  # the merge keeps the function
    for n, p in pm.named_parameters():
        if p.requires_grad:
            st = opt.state[p]
            keys = ["exp_avg", "exp_avg_sq"] if opt_name == "adamw" else ["exp_avg"]
            for k in keys:
                zeros = float((st[k] == 0).float().mean())
                assert 0.98 <= zeros < 1.0, (n, k, zeros)
                assert int((st[k] != 0).sum()) == st[k].numel() - round(0.99 * st[k].numel())
    # the adapter still trains (peft does not consider it merged)
    b = next(batches)
    loss = torch.nn.functional.cross_entropy(pm(input_ids=b.input_ids).logits.flatten(0, 1), b.targets.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.any(layer.lora_B["default"].weight != 0)


def test_relora_publishes_a_merged_model_and_continues_bitwise(model, tmp_path):
    from transformers import AutoModelForCausalLM

    m = method_from_dict(RELORA)
    torch.manual_seed(0)
    one, _ = _run(m, m.prepare(build_model(ARCH, _Tok(), seed=0)), end=8)
    assert m.summary(one) == {"merges": 2}
    torch.manual_seed(0)
    half, state = _run(m, m.prepare(model), end=4)
    assert m.summary(half) == {"merges": 1}
    m.save(half, tmp_path / "model")
    m.save_state(half, tmp_path)
    pub = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert type(pub).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in pub.state_dict())
    assert torch.allclose(_logits(half), _logits(pub), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(pub), _logits(build_model(ARCH, _Tok(), seed=0)), atol=1e-3)
    state = _roundtrip({**state, "method": m.extra_state(half)}, tmp_path)
    cont = m.load(None, tmp_path)
    assert _same_state(cont, half)
    m.load_extra_state(cont, state["method"])
    two, _ = _run(m, cont, start=4, end=8, state=state)
    assert _same_state(one, two) and m.summary(two) == {"merges": 2}
