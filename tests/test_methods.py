"""The method registry: validation, defaults, what each method makes trainable, extensibility."""

from dataclasses import dataclass

import pytest
import torch

from learnforget.methods import METHODS, TARGET_GROUPS, MethodConfig, method_from_dict, register
from learnforget.modeling import build_model, count_parameters

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
