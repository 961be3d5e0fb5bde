"""The model: a small Llama built from an ``arch`` dict, plus parameter and FLOP counts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

# torch and transformers are imported where a model is built or loaded: validating a config
# (every Snakemake start, `learnforget validate`) and the memory planner need only
# validate_arch and the counts, and stay fast.

# arch keys and their defaults (None: required)
ARCH_DEFAULTS = {
    "hidden_size": None,
    "intermediate_size": None,
    "num_hidden_layers": None,
    "num_attention_heads": None,
    "num_key_value_heads": None,  # default: num_attention_heads (no grouped-query attention)
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.02,
}


#: ``model`` keys that say where a pretrained model comes from (learnforget.data.sources), not its shape.
SOURCE_KEYS = ("pretrained", "revision", "vocab_size")


def validate_arch(arch: dict) -> dict:
    """The arch dict with defaults filled in; ValueError naming the bad key otherwise."""
    arch = {k: v for k, v in arch.items() if k not in SOURCE_KEYS}
    unknown = sorted(set(arch) - set(ARCH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown arch keys: {', '.join(unknown)} (known: {', '.join(ARCH_DEFAULTS)})")
    a = {k: arch.get(k, v) for k, v in ARCH_DEFAULTS.items()}
    if a["num_key_value_heads"] is None:
        a["num_key_value_heads"] = a["num_attention_heads"]
    missing = [k for k, v in a.items() if v is None]
    if missing:
        raise ValueError(f"arch is missing: {', '.join(missing)}")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings"):
        if not isinstance(a[k], int) or a[k] < 1:
            raise ValueError(f"arch.{k} must be a positive integer, got {a[k]!r}")
    if a["hidden_size"] % a["num_attention_heads"]:
        raise ValueError("arch.hidden_size must be divisible by arch.num_attention_heads")
    if a["num_attention_heads"] % a["num_key_value_heads"]:
        raise ValueError("arch.num_attention_heads must be divisible by arch.num_key_value_heads")
    return a


def llama_config(arch: dict, tokenizer) -> LlamaConfig:
    from transformers import LlamaConfig

    a = validate_arch(arch)
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if ids["eos"] is None:
        raise ValueError("the tokenizer has no eos_token")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"],
        num_key_value_heads=a["num_key_value_heads"],
        max_position_embeddings=a["max_position_embeddings"],
        rope_theta=float(a["rope_theta"]),
        tie_word_embeddings=bool(a["tie_word_embeddings"]),
        rms_norm_eps=float(a["rms_norm_eps"]),
        initializer_range=float(a["initializer_range"]),
        bos_token_id=ids["bos"] if ids["bos"] is not None else ids["eos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"] if ids["pad"] is not None else ids["eos"],
        attn_implementation="sdpa",
    )


def build_model(arch: dict, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised float32 Llama; the init depends only on ``seed`` (global RNG untouched)."""
    import torch  # lazy: keeps torch out of config validation and the planner
    from transformers import LlamaForCausalLM

    config = llama_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def load_model(path: str | Path) -> LlamaForCausalLM:
    """Load an HF model dir as float32 with SDPA attention."""
    import torch  # lazy: keeps torch out of config validation and the planner
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def flops_per_token(config, seq_len: int) -> float:
    """Approximate full-training FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu).

    6 * (matmul weights incl. the output head) + 6 * L * T * d for attention scores. With
    adapters the frozen matrices' weight gradients are skipped (about 2/3 of this), so for LoRA
    the figure overstates the work; it is a rough guide for comparing speeds, not a measurement.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * config.intermediate_size
    n = layers * per_layer + config.vocab_size * h  # matmul weights incl. the output head
    attn = 2 * layers * seq_len * h
    return 6 * n + 6 * attn
