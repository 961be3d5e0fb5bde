"""Check of a study config's ``compose`` section (registered in
:mod:`learnforget.study.sections`): the adapters :mod:`learnforget.compose.lorahub` combines
exist, can be combined, and their composites' names are free."""

from __future__ import annotations

from typing import Mapping

from learnforget.study.basics import ConfigError, expand_grid, format_duration
from learnforget.train.methods import method_from_dict

#: Method types whose adapters add_weighted_adapter combines exactly (DoRA's magnitude vectors
#: and AdaLoRA's SVD triplets are not combined by it).
COMPOSABLE = ("lora",)


def check_compose(cfg: Mapping) -> None:
    """Cross-field checks of ``compose`` (after the schema): the runs exist and have lora
    adapters, at least two, the duration is one of each, ``linear`` gets equal ranks, the
    composites' names are free; raises :class:`learnforget.study.basics.ConfigError`."""
    c = cfg.get("compose") or {}
    if not c.get("enabled"):
        return
    runs = {}
    for r in cfg["runs"]:
        for e in expand_grid([r]):
            runs[e["name"]] = e
    composable = [n for n, r in runs.items() if cfg["methods"][r["method"]]["type"] in COMPOSABLE]
    names = list(c["adapters"]) or composable
    for i, name in enumerate(c["adapters"]):
        where = f"compose.adapters[{i}]"
        if name not in runs:
            raise ConfigError(where, f"no run named {name!r}; runs: {', '.join(sorted(runs))}")
        mtype = cfg["methods"][runs[name]["method"]]["type"]
        if mtype not in COMPOSABLE:
            raise ConfigError(where, f"run {name!r} has method type {mtype!r}; only {', '.join(COMPOSABLE)} adapters "
                                     "can be combined (peft's add_weighted_adapter)")
        if name in c["adapters"][:i]:
            raise ConfigError(where, f"run {name!r} is listed twice")
    if len(names) < 2:
        raise ConfigError("compose.adapters", f"composing needs at least two adapter runs, got {names or 'none'}"
                          + ("" if c["adapters"] else f" (the runs with a {', '.join(COMPOSABLE)} method)"))
    if c["duration"] is not None:
        label = format_duration(c["duration"])
        for name in names:
            r = runs[name]
            have = [format_duration(d) for d in r.get("durations", cfg["durations"]["values"])]
            if label not in have:
                raise ConfigError("compose.duration", f"run {name!r} has no checkpoint at duration {label} "
                                                      f"(its durations: {', '.join(have)})")
    ranks = {name: method_from_dict(cfg["methods"][runs[name]["method"]]).rank for name in names}
    if c["combination"] == "linear" and len(set(ranks.values())) > 1:
        raise ConfigError("compose.combination", "linear needs adapters of equal rank, got "
                          + ", ".join(f"{n}: {r}" for n, r in ranks.items()) + "; use combination: cat")
    taken = {"base", *runs}
    for name in [c["name"], f"{c['name']}-uniform", *(f"{c['name']}-{n}" for n in names)]:
        if name in taken:
            raise ConfigError("compose.name", f"composite {name!r} would have the name of a run")
    seq_len = c["target"]["seq_len"]
    context = (cfg.get("model") or {}).get("max_position_embeddings")
    if seq_len is not None and context and seq_len > context:
        raise ConfigError("compose.target.seq_len", f"{seq_len} exceeds model.max_position_embeddings {context}")
