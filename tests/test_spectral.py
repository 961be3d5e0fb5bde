"""Spectral analysis: rank statistics on known matrices and on real tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from learnforget.analyze import spectral as S  # noqa: E402


# ----------------------------------------------------------------------------- statistics


def test_rank_for_variance_known_spectra():
    s = [3.0, 2.0, 1.0, 0.0]  # energies 9, 4, 1 of 14
    assert S.rank_for_variance(s, 0.9) == 2  # 9/14 = .64 < .9 <= 13/14 = .93
    assert S.rank_for_variance(s, 0.5) == 1
    assert S.rank_for_variance(s, 0.95) == 3
    assert S.rank_for_variance(s, 1.0) == 3  # zero singular values never count
    assert S.rank_for_variance([1.0, 0.0, 3.0, 2.0], 0.9) == 2  # unsorted input
    assert S.rank_for_variance(torch.tensor(s), 0.9) == 2  # torch input


def test_rank_for_variance_ties_zero_and_errors():
    # ten equal singular values: exactly 9 explain 90% (no off-by-one from rounding)
    assert S.rank_for_variance(np.ones(10), 0.9) == 9
    assert S.rank_for_variance(np.ones(10), 0.3) == 3
    assert S.rank_for_variance(np.zeros(5), 0.9) == 0
    assert S.rank_for_variance([], 0.9) == 0
    with pytest.raises(ValueError):
        S.rank_for_variance([1.0], 0.0)
    with pytest.raises(ValueError):
        S.rank_for_variance([1.0], 1.5)


def test_rank_of_diagonal_matrix_via_svd():
    d = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    s = torch.linalg.svdvals(torch.diag(d))
    # energies 100, 25, 4, 1, .25 (total 130.25); 90% = 117.2 -> 125 reached at k=2
    assert S.rank_for_variance(s, 0.9) == 2
    assert S.rank_for_variance(s, 0.99) == 3  # 129/130.25 = .9904
    assert S.rank_for_variance(s, 0.999) == 5


@pytest.mark.parametrize("k", [1, 5, 17])
def test_known_rank_product(k):
    g = torch.Generator().manual_seed(k)
    M = torch.randn(64, k, generator=g) @ torch.randn(k, 48, generator=g)
    s = torch.linalg.svdvals(M)
    assert S.rank_for_variance(s, 0.9999) == k
    assert S.rank_for_variance(s, 0.9) <= k


def test_effective_rank():
    assert S.effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert S.effective_rank([5.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert S.effective_rank(np.zeros(3)) == 0.0
    assert 1.0 < S.effective_rank([3.0, 1.0]) < 2.0


def test_gaussian_baseline_in_paper_ballpark():
    # paper: 4096x4096 Gaussian needs 2088/4096 = 51% for 90%; 4096x11008 needs 2917/4096 = 71%
    g = torch.Generator().manual_seed(0)
    sq = S.rank_for_variance(torch.linalg.svdvals(torch.randn(256, 256, generator=g)), 0.9)
    assert 0.47 * 256 <= sq <= 0.55 * 256
    rect = S.rank_for_variance(torch.linalg.svdvals(torch.randn(256, 688, generator=g)), 0.9)
    assert 0.67 * 256 <= rect <= 0.76 * 256
    # the seeded baseline used by analyze: deterministic and scale-free
    a = S._gaussian_svdvals((64, 64), seed=3, device="cpu")
    b = S._gaussian_svdvals((64, 64), seed=3, device="cpu")
    assert torch.equal(a, b)
    assert float(torch.linalg.vector_norm(a)) == pytest.approx(1.0, rel=1e-5)
    assert 0.45 * 64 <= S.rank_for_variance(a, 0.9) <= 0.58 * 64


def test_parse_param_name():
    assert S.parse_param_name("model.layers.3.self_attn.q_proj.weight") == (3, "q_proj")
    assert S.parse_param_name("model.layers.11.mlp.down_proj.weight") == (11, "down_proj")
    assert S.parse_param_name("model.embed_tokens.weight") == (-1, "embed_tokens")


# ----------------------------------------------------------------------------- checkpoints


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("spectral") / "base"
    LlamaForCausalLM(_tiny_config()).save_pretrained(d)
    return d


MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_adapter_rank_bounded_by_r(base_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    r = 4
    torch.manual_seed(1)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"],
                   init_lora_weights=False),
    )
    ckpt = tmp_path / "runs" / "lora" / "1"
    model.save_pretrained(ckpt / "model")

    # resolve runs/{run}/{duration}/ -> model/, and write the spectra
    df, spectra = S.analyze(base_dir, ckpt, fraction=0.9, spectra_path=tmp_path / "s.npz", return_spectra=True)
    assert list(df.columns) == S.COLUMNS
    assert set(df["module"]) == {"q_proj", "v_proj", "down_proj"}  # modules without adapter skipped
    assert sorted(df["layer"].unique()) == [0, 1]
    assert len(df) == 6
    assert (df["rank90"] <= r).all()
    assert (df["rank90"] >= 1).all()  # B != 0 with init_lora_weights=False
    assert (df["lora_rank"] == r).all()
    assert (df["rank90_gaussian"] > r).all()
    assert (df["max_rank"] == df["shape"].map(lambda s: min(int(x) for x in s.split(" x ")))).all()
    # a rank-r delta has at most r non-zero singular values
    for name in df["name"]:
        sd = spectra[f"{name}/delta"]
        assert (sd[r:] <= 1e-4 * sd[0]).all()
    saved = S.load_spectra(tmp_path / "s.npz")
    assert set(saved) == set(spectra) and len(saved) == 4 * len(df)

    # dW is peft's own delta: equals merged - base weight
    deltas = {dw.name: dw for dw in S.delta_weights(base_dir, ckpt / "model")}
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), ckpt / "model").merge_and_unload()
    msd = merged.state_dict()
    for name, dw in deltas.items():
        assert torch.allclose(dw.W_base + dw.dW, msd[name], atol=1e-5)
        name_, layer, module, W, dW = dw  # plain 5-tuple unpacking works
        assert layer in (0, 1) and module in MODULES


def test_full_finetune_perturbed_copy(base_dir, tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(2)
    dense = "model.layers.0.self_attn.q_proj.weight"
    lowrank = "model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():
        sd[dense].add_(0.05 * torch.randn(sd[dense].shape, generator=g))
        o, i = sd[lowrank].shape
        sd[lowrank].add_(0.1 * torch.randn(o, 3, generator=g) @ torch.randn(3, i, generator=g))
    model.save_pretrained(tmp_path / "full")

    df = S.analyze(base_dir, tmp_path / "full", fraction=0.9, seed=0)
    assert len(df) == 14 and set(df["module"]) == MODULES
    row = df.set_index("name")
    assert row.loc[dense, "rank90"] >= 0.4 * 64  # dense noise: Gaussian-like rank
    assert abs(row.loc[dense, "rank90"] - row.loc[dense, "rank90_gaussian"]) <= 6
    assert 1 <= row.loc[lowrank, "rank90"] <= 3
    untouched = df[~df["name"].isin([dense, lowrank])]
    assert (untouched["rank90"] == 0).all() and (untouched["frob_norm"] == 0).all()
    assert (untouched["rank90_base"] == untouched["rank90_finetuned"]).all()
    assert df["lora_rank"].isna().all()
    assert row.loc[lowrank, "frob_norm"] > 0
    # same seed -> same Gaussian baseline; fraction column follows the argument
    df99 = S.analyze(base_dir, tmp_path / "full", fraction=0.99, seed=0)
    assert (df99["fraction"] == 0.99).all()
    assert (df99["rank90_gaussian"] > df["rank90_gaussian"]).all()
    assert (df99.set_index("name").loc[lowrank, "rank90"]) <= 3


def test_resolve_checkpoint_rejects_non_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        S.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("variant", ["dora", "adalora"])
def test_dora_and_adalora_deltas_are_peft_merges(base_dir, tmp_path, variant):
    """DoRA's update is not B @ A (the magnitude rescales W + BA) and AdaLoRA's is P diag(λ) Q:
    both come from peft itself, so W + dW equals peft's merged weight; AdaLoRA's rank stays
    within its r."""
    from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    r = 4
    torch.manual_seed(2)
    if variant == "dora":
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "up_proj"], use_dora=True,
                         init_lora_weights=False)
    else:
        cfg = AdaLoraConfig(init_r=r, target_r=2, lora_alpha=2 * r, target_modules=["q_proj", "up_proj"],
                            total_step=10, init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # AdaLoRA starts with E = 0; make every update non-zero
                p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / "model"
    model.save_pretrained(ckpt)
    df, spectra = S.analyze(base_dir, ckpt, return_spectra=True)
    assert set(df["module"]) == {"q_proj", "up_proj"} and len(df) == 4
    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), ckpt).merge_and_unload()
    msd = merged.state_dict()
    for dw in S.delta_weights(base_dir, ckpt):
        assert torch.allclose(dw.W_base + dw.dW, msd[dw.name], atol=1e-5), dw.name
        assert dw.dW.abs().max() > 0
    tails = [spectra[f"{n}/delta"][r] / spectra[f"{n}/delta"][0] for n in df["name"]]
    if variant == "adalora":
        assert (df["rank90"] <= r).all() and max(tails) < 1e-4  # rank at most init_r
    else:  # the magnitude vector rescales W + BA: DoRA's dW is not rank r
        assert min(tails) > 1e-4
