"""Checks of the training sections of a study config (registered in
:mod:`learnforget.study.sections`): the model architecture, the base model's pretraining
(``base``), the finetuning defaults (``finetune``), the methods and the runs, each by the
dataclass or function that later uses it, plus the cross-field rules between them (a sequence
fits the model's context, a rank stays below its width, durations increase)."""

from __future__ import annotations

import math
import re

from learnforget.data import DATASETS
from learnforget.study.basics import ConfigError, check_component, expand_grid, format_duration, is_pretrained
from learnforget.train.methods import method_from_dict
from learnforget.train.modeling import validate_arch
from learnforget.train.settings import TrainConfig


def model_arch(cfg: dict) -> dict:
    """The model's architecture with defaults filled in (a ConfigError at ``model`` otherwise)."""
    return check_component("model", validate_arch, cfg["model"])


def check_model(cfg: dict) -> None:
    model_arch(cfg)


def check_base_train(cfg: dict) -> None:
    """``base.train``: valid settings for pretraining on packed text, within the context."""
    context = model_arch(cfg)["max_position_embeddings"]
    base_train = check_component("base.train", TrainConfig.from_dict, cfg["base"]["train"])
    if base_train.group_by_length:
        raise ConfigError("base.train.group_by_length", "the base is pretrained on packed text: no padding to group")
    if base_train.seq_len > context and not is_pretrained(cfg):
        raise ConfigError("base.train.seq_len", f"{base_train.seq_len} exceeds model.max_position_embeddings {context}")


def check_finetune(cfg: dict) -> None:
    check_component("finetune", TrainConfig.from_dict, cfg["finetune"])


def check_base_mix(cfg: dict) -> None:
    """``base.mix``: known token datasets, at least one with a positive weight."""
    for name in cfg["base"]["mix"]:
        if name not in DATASETS:
            raise ConfigError(f"base.mix.{name}", f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if not any(w > 0 for w in cfg["base"]["mix"].values()):
        raise ConfigError("base.mix", "at least one dataset needs a positive weight")


def check_methods(cfg: dict) -> None:
    """``methods``: filesystem-safe names, valid method configs, ranks below the model width."""
    hidden = model_arch(cfg)["hidden_size"]
    for name, m in cfg["methods"].items():
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ConfigError(f"methods.{name}", "method names must be filesystem-safe")
        method = check_component(f"methods.{name}", method_from_dict, m)
        key, rank = method.rank_field, method.adapter_rank  # the method names its rank field
        if rank is not None and rank >= hidden:
            raise ConfigError(f"methods.{name}.{key}", f"{key} {rank} must be below the model width {hidden}")


def check_runs(cfg: dict) -> None:
    """``runs``: each run's names, method and regime, training settings and durations."""
    context = model_arch(cfg)["max_position_embeddings"]
    seen: dict[str, int] = {}  # run name (seeds and sweeps expanded) -> index of its entry
    for i, r in enumerate(cfg["runs"]):
        _check_run_identity(cfg, i, r, seen)
        _check_run_training(cfg, i, r, context)
        _check_run_durations(cfg, i, r)


def _check_run_identity(cfg: dict, i: int, r: dict, seen: dict[str, int]) -> None:
    """Names free and not reserved (every seed and learning rate of the run), a series that is
    no other run's name, a defined method, a supported regime."""
    where = f"runs[{i}]"
    if r["name"] == "base":
        raise ConfigError(f"{where}.name", "'base' is reserved for the base model")
    for name in (e["name"] for e in expand_grid([r])):
        if name in seen:
            other = f"runs[{seen[name]}]" if seen[name] != i else "another seed or learning rate of this run"
            raise ConfigError(f"{where}.name", f"duplicate run name {name!r} (also {other})")
        seen[name] = i
    if r.get("series") and r["series"] in seen and seen[r["series"]] != i and r["series"] != r["name"]:
        raise ConfigError(f"{where}.series", f"series {r['series']!r} is also the name of runs[{seen[r['series']]}]")
    if r["method"] not in cfg["methods"]:
        raise ConfigError(f"{where}.method", f"unknown method {r['method']!r}; defined: {sorted(cfg['methods'])}")
    if r["domain"] == "math" and r["regime"] not in ("ift", "cpt"):
        raise ConfigError(f"{where}.regime", f"unsupported regime {r['regime']!r}")


def _check_run_training(cfg: dict, i: int, r: dict, context: int) -> None:
    """The run's training settings (``finetune`` with its own ``train`` on top, at every swept
    learning rate), packing and length grouping where they apply, a sequence within the context."""
    where = f"runs[{i}]"
    tc = check_component(f"{where}.train", TrainConfig.from_dict, {**cfg["finetune"], **r.get("train", {})})
    for lr in (r.get("sweep") or {}).get("lr", []):
        check_component(f"{where}.sweep.lr", TrainConfig.from_dict, {**cfg["finetune"], **r.get("train", {}), "lr": lr})
    if r.get("packing") and r["regime"] != "ift":
        raise ConfigError(f"{where}.packing", "packing applies to ift runs (cpt text is always packed)")
    if tc.group_by_length and (r["regime"] != "ift" or r.get("packing")):
        key = f"{where}.train.group_by_length" if "group_by_length" in r.get("train", {}) else \
            "finetune.group_by_length"
        raise ConfigError(key, f"group_by_length applies to ift runs without packing ({r['name']} is "
                               f"{'packed ift' if r.get('packing') else r['regime']})")
    if tc.seq_len > context:
        raise ConfigError(f"{where}.train.seq_len", f"{tc.seq_len} exceeds model.max_position_embeddings {context}")


def _check_run_durations(cfg: dict, i: int, r: dict) -> None:
    """Positive, strictly increasing durations whose labels stay distinct."""
    durations = r.get("durations", cfg["durations"]["values"])
    key = f"runs[{i}].durations" if "durations" in r else "durations.values"
    if any(not math.isfinite(d) or d <= 0 for d in durations):
        raise ConfigError(key, f"durations must be positive, got {durations}")
    if any(b <= a for a, b in zip(durations, durations[1:])):
        raise ConfigError(key, f"durations must be strictly increasing, got {durations}")
    labels = [format_duration(d) for d in durations]
    if len(set(labels)) != len(labels):
        raise ConfigError(key, f"durations collide after formatting: {labels}")
