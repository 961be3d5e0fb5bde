"""Checks of a study config's ``data`` section (registered in :mod:`learnforget.study.sections`):
the offline corpora's settings, by their builders' dataclasses, and the templates of the
``data.hub`` datasets."""

from __future__ import annotations

from learnforget import data
from learnforget.data.sources import template_fields
from learnforget.study.basics import ConfigError, check_component

BUILDERS = (("source", data.SourceConfig), ("math", data.MathConfig), ("code", data.CodeConfig))


def check_builders(cfg: dict) -> None:
    """``data.source``, ``data.math``, ``data.code``: each a valid config of its builder."""
    for key, cls in BUILDERS:
        check_component(f"data.{key}", data.from_dict, cls, cfg["data"][key])


def check_hub(cfg: dict) -> None:
    """``data.hub``: a cpt dataset has a ``text`` template, an ift one ``prompt`` and
    ``response`` (and not the other kind's); every template's fields are well formed."""
    for name, spec in cfg["data"]["hub"].items():
        regime = data.DATASETS[name][1]
        for key in (("text",) if regime == "cpt" else ("prompt", "response")):
            if key not in spec:
                raise ConfigError(f"data.hub.{name}", f"a {regime} dataset needs a {key!r} template")
        other = ("prompt", "response") if regime == "cpt" else ("text",)
        for key in other:
            if key in spec:
                raise ConfigError(f"data.hub.{name}.{key}", f"a {regime} dataset has no {key!r} template")
        for key in ("text", "prompt", "response", "id"):
            if key in spec:
                check_component(f"data.hub.{name}.{key}", template_fields, spec[key])
