"""The README's config reference, generated from the schema and the component dataclasses."""

from __future__ import annotations

import dataclasses

from learnforget.study import config as lfconfig


def _default(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value}`"


def _schema_rows(schema: dict, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        kind = sub.get("type", "enum" if "enum" in sub else "")
        if "enum" in sub:
            kind = " / ".join(map(str, sub["enum"]))
        desc = " ".join(str(sub.get("description", "")).split())
        default = _default(sub["default"]) if "default" in sub else ""
        rows.append((path, f"{kind}{', default ' + default if default else ''}", desc))
        if sub.get("type") == "object" and "properties" in sub:
            rows += _schema_rows(sub, path + ".")
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict) and "properties" in sub["items"]:
            rows += _schema_rows(sub["items"], path + "[].")
        extra = sub.get("additionalProperties")
        if isinstance(extra, dict) and len(extra.get("properties", {})) > 1:  # e.g. data.hub.<name>.path
            rows += _schema_rows(extra, path + ".<name>.")
    return rows


def _dataclass_rows(cls) -> list[tuple[str, str, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        rows.append((f.name, _default(default), f.metadata.get("help", "")))
    return rows


def _table(rows, headers) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown() -> str:
    from learnforget import data
    from learnforget.train.methods import METHODS
    from learnforget.train.modeling import ARCH_DEFAULTS
    from learnforget.train.settings import TrainConfig

    parts = ["### Top level (`config/schema/config.schema.yaml`)", "",
             _table([(f"`{p}`", t, d) for p, t, d in _schema_rows(lfconfig.load_schema())],
                    ["key", "type, default", "meaning"])]
    from learnforget.evaluate.harness import TASKS, GroupSpec

    parts += ["", "### `evaluation.groups.*` (task groups)", "",
              " ".join((GroupSpec.__doc__ or "").split()) + " The registry's tasks:", "",
              _table([(f"`{n}`", t.domain, t.description + (" (sampled)" if t.sampled else ""))
                      for n, t in TASKS.items()], ["task", "domain", "what it measures"]), "",
              _table([(f"`{n}`", d, h) for n, d, h in _dataclass_rows(GroupSpec)], ["key", "default", "meaning"])]
    parts += ["", "### `finetune`, `runs[].train`, `base.train` (training settings)", "",
              _table([(f"`{n}`", d, h) for n, d, h in _dataclass_rows(TrainConfig)], ["key", "default", "meaning"])]
    for name, cls in METHODS.items():
        doc = " ".join((cls.__doc__ or "").split())
        parts += ["", f"### `methods.*` with `type: {name}`", "", doc, ""]
        rows = [(f"`{n}`", d, h) for n, d, h in _dataclass_rows(cls)]
        parts.append(_table(rows, ["key", "default", "meaning"]) if rows else "(no settings)")
    parts += ["", "### `model` (Llama architecture of the base)", "",
              _table([(f"`{k}`", _default(dataclasses.MISSING if v is None else v), "")
                      for k, v in ARCH_DEFAULTS.items()], ["key", "default", ""])]
    for key, cls in (("source", data.SourceConfig), ("math", data.MathConfig), ("code", data.CodeConfig)):
        parts += ["", f"### `data.{key}`", "",
                  _table([(f"`{n}`", d, h) for n, d, h in _dataclass_rows(cls)], ["key", "default", "meaning"])]
    return "\n".join(parts).rstrip() + "\n"
