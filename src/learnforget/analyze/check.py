"""Check of a study config's ``analysis`` section (registered in
:mod:`learnforget.study.sections`): the matrix whose spectrum the report draws exists in the
model."""

from __future__ import annotations

from learnforget.study.basics import ConfigError
from learnforget.train.check import model_arch
from learnforget.train.methods import TARGET_GROUPS


def check_analysis(cfg: dict) -> None:
    """``analysis.spectrum``: a layer the model has and a module a method can target."""
    layers = model_arch(cfg)["num_hidden_layers"]
    layer = cfg["analysis"]["spectrum"]["layer"]
    if layer is not None and layer >= layers:
        raise ConfigError("analysis.spectrum.layer", f"layer {layer} does not exist: the model has {layers} layers")
    modules = TARGET_GROUPS["all"]
    if cfg["analysis"]["spectrum"]["module"] not in modules:
        raise ConfigError("analysis.spectrum.module",
                          f"unknown module {cfg['analysis']['spectrum']['module']!r}; one of {', '.join(modules)}")
