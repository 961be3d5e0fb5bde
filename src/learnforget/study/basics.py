"""What every stage's config check shares: the error type, the translation of a component's
own error into one at its key path, how runs and durations are named, and whether the study
starts from a pretrained model.

It sits below :mod:`learnforget.study.config`, which calls the stages' section checks
(:mod:`learnforget.study.sections`): a stage imports these helpers from here, never from
``study.config``, so no import circle runs through the config.
"""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A configuration problem, with the key path that caused it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"config error at '{path}': {message}" if path else f"config error: {message}")


#: How a component's error names its field: ``TrainConfig.lr: ...``, ``train_cfg.lr: ...``,
#: ``SourceConfig.n_entities=1: ...``, ``unknown key(s) learning_rate``, ``arch is missing: x``.
_FIELD_IN_MESSAGE = (re.compile(r"^[A-Za-z_]\w*\.([A-Za-z_]\w*)\s*[:=]"),
                     re.compile(r"unknown (?:[a-z]+ )?keys?(?:\(s\))?:? '?([A-Za-z_]\w*)'?"),
                     re.compile(r"\bis missing: '?([A-Za-z_]\w*)'?"))


def check_component(path: str, fn, *args):
    """Run a component's validation; its error becomes a ConfigError at the key it names."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        for pattern in _FIELD_IN_MESSAGE:
            m = pattern.search(str(msg))
            if m:
                path = f"{path}.{m.group(1)}"
                break
        raise ConfigError(path, str(msg)) from exc


def format_duration(value: float) -> str:
    """Canonical label of a duration: ``4`` for 4.0, ``0.5`` for 0.5, ``1000000`` for 1e6."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def format_lr(lr: float) -> str:
    """A learning rate as it appears in run names: 0.0001 -> ``0.0001``, 2e-05 -> ``2e-05``."""
    return f"{lr:g}"


def expand_grid(runs: list[dict]) -> list[dict]:
    """Runs with ``seeds`` and ``sweep`` lists -> one concrete run per (learning rate, seed).

    ``{name: math-lora, seeds: [1, 2], sweep: {lr: [1e-4, 2e-4]}}`` gives ``math-lora-lr0.0001-s1``,
    ``math-lora-lr0.0001-s2``, ``math-lora-lr0.0002-s1``, ``math-lora-lr0.0002-s2``. The seeds of
    one learning rate share a ``series`` (``math-lora-lr0.0001``): figures and tables show their
    mean and confidence interval. Runs without the lists are returned unchanged.
    """
    out = []
    for r in runs:
        if "seeds" not in r and "sweep" not in r:
            out.append(dict(r))
            continue
        seeds = r.get("seeds") or [r.get("seed", 0)]
        lrs = (r.get("sweep") or {}).get("lr") or [None]
        for lr in lrs:
            series = r["name"] if lr is None else f"{r['name']}-lr{format_lr(lr)}"
            for seed in seeds:
                new = {k: v for k, v in r.items() if k not in ("seeds", "sweep")}
                new["name"] = series + (f"-s{seed}" if "seeds" in r else "")
                new["seed"] = seed
                new["series"] = r.get("series") or series
                if lr is not None:
                    new["train"] = {**r.get("train", {}), "lr": lr}
                out.append(new)
    return out


def is_pretrained(cfg: dict) -> bool:
    """Whether the study starts from a pretrained model (``model.pretrained``)."""
    return bool(cfg.get("model", {}).get("pretrained"))
