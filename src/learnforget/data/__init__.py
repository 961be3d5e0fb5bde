"""Offline, seed-deterministic corpora for the toy study.

- ``build_source``: a synthetic world of fictional people (the source domain the base model
  is pretrained on, and the forgetting probe).
- ``build_math``: generated grade-school word problems with GSM8K-style worked answers.
- ``build_code``: functions from the installed Python standard library.

Each builder takes a plain config dict (validated through a frozen dataclass), a seed and an
output folder, writes its JSONL files through :mod:`learnforget.core.io` and returns stats.
Record formats: ``docs/architecture.md`` ("Data"). :data:`DATASETS` names the token datasets
built from them and :data:`IFT_TEMPLATES` how instruction records are rendered;
:mod:`learnforget.data.check` validates the ``data`` section of a study config.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, TypeVar

T = TypeVar("T")

#: Token datasets the pipeline can build: name -> (data file under results/data, regime).
#: IFT datasets use the record's ``prompt`` and ``response``; CPT ones its ``text``.
DATASETS: dict[str, tuple[str, str]] = {
    "source": ("source/train.jsonl", "cpt"),
    "math_generic": ("math/generic.jsonl", "cpt"),
    "math_cpt": ("math/train.jsonl", "cpt"),
    "math_ift": ("math/train.jsonl", "ift"),
    "code_cpt": ("code/train.jsonl", "cpt"),
    "code_ift": ("code/train.jsonl", "ift"),
}

#: The prompt/response rendering of each domain's IFT records. It must match the
#: evaluation tasks' ``doc_to_text`` / ``doc_to_target`` (see learnforget/evaluate/tasks/).
IFT_TEMPLATES: dict[str, tuple[str, str]] = {
    "math": ("Question: {question}\nAnswer:", " {answer}"),
    "code": ("{prompt}", "{response}"),
}


def from_dict(cls: type[T], d: Mapping[str, Any] | None) -> T:
    """Build config dataclass ``cls`` from a dict; unknown keys raise ``ValueError``.

    Missing keys take the dataclass defaults; lists become tuples (configs are frozen).
    """
    if d is None:
        d = {}
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}: config must be a mapping, got {type(d).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in d:
        if key not in known:
            raise ValueError(
                f"{cls.__name__}: unknown config key {key!r} (known keys: {', '.join(known)})"
            )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


from .arithmetic import MathConfig, build_math_corpus  # noqa: E402
from .stdlib_code import CodeConfig, build_code_corpus  # noqa: E402
from .world import SourceConfig, build_world_corpus  # noqa: E402


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def build_source(cfg: Mapping[str, Any] | None, seed: int, out_dir: str | os.PathLike) -> dict:
    """Write ``train.jsonl``, ``quiz.jsonl``, ``heldout.jsonl`` under ``out_dir``; return stats."""
    return build_world_corpus(from_dict(SourceConfig, cfg), _check_seed(seed), Path(out_dir))


def build_math(cfg: Mapping[str, Any] | None, seed: int, out_dir: str | os.PathLike) -> dict:
    """Write ``train.jsonl``, ``test.jsonl``, ``generic.jsonl`` under ``out_dir``; return stats."""
    return build_math_corpus(from_dict(MathConfig, cfg), _check_seed(seed), Path(out_dir))


def build_code(cfg: Mapping[str, Any] | None, seed: int, out_dir: str | os.PathLike) -> dict:
    """Write ``train.jsonl``, ``test.jsonl`` under ``out_dir``; return stats."""
    return build_code_corpus(from_dict(CodeConfig, cfg), _check_seed(seed), Path(out_dir))


__all__ = [
    "CodeConfig",
    "MathConfig",
    "SourceConfig",
    "build_code",
    "build_math",
    "build_source",
    "from_dict",
]
