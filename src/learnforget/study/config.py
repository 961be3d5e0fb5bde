"""Study configuration: load, fill defaults, validate, and expand into runs and jobs.

The JSON Schema (``schemas/config.schema.yaml``, also ``config/schema/``) fixes the shape of
the config; sections that configure a library component (data builders, model architecture,
training settings, methods) are then checked field by field by that component's dataclass.
Every error is a :class:`ConfigError` naming the key path and the offending value, raised
while Snakemake parses the workflow, so no job starts on a bad config. The cross-field checks
after the schema belong to the stages that use each section: :func:`check` walks their
registry, :mod:`learnforget.study.sections`.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from learnforget.data import sources
from learnforget.evaluate.plan import plan
from learnforget.study.basics import ConfigError, expand_grid, format_duration, is_pretrained
from learnforget.study.sections import SECTION_CHECKS
from learnforget.train.methods import method_from_dict
from learnforget.train.settings import RUNTIME_KEYS, TrainConfig

SCHEMA_FILE = "config.schema.yaml"


def load_schema() -> dict:
    text = resources.files("learnforget.study").joinpath("schemas", SCHEMA_FILE).read_text()
    return yaml.safe_load(text)


def _extend_with_default(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFiller = _extend_with_default(jsonschema.Draft202012Validator)


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validate_schema(cfg: dict) -> dict:
    """Fill defaults and validate against the JSON Schema; returns the filled config."""
    cfg = copy.deepcopy(cfg) if cfg is not None else {}
    if not isinstance(cfg, dict):
        raise ConfigError("", f"the config must be a mapping, got {type(cfg).__name__}")
    validator = _DefaultFiller(load_schema())
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        parts = list(err.absolute_path)
        msg = err.message
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            # the error names the unknown key itself (the first, in the config's order)
            known = err.schema.get("properties", {})
            patterns = err.schema.get("patternProperties", {})
            extra = [k for k in err.instance if k not in known and not any(re.search(p, str(k)) for p in patterns)]
            if extra:
                parts.append(extra[0])
                msg = f"unknown key {extra[0]!r}" + (f" (also {', '.join(map(repr, extra[1:]))})" if extra[1:] else "")
                if known:
                    msg += f"; known: {', '.join(sorted(known))}"
        elif err.validator == "required":
            missing = re.match(r"^'(.+)' is a required property$", msg)
            if missing:
                parts.append(missing.group(1))
                msg = "required key missing"
        raise ConfigError(_path(parts), msg)
    return cfg


@dataclass(frozen=True)
class Run:
    """One finetuning run, fully resolved from the config."""

    name: str
    domain: str
    regime: str
    method_name: str
    method: dict
    train: dict
    seed: int
    durations: tuple[float, ...]
    unit: str
    dataset: str
    labels: tuple[str, ...] = field(default=())
    series: str = ""  # replicates (seeds) of one setting share it; default: the run's name

    def duration_value(self, label: str) -> float:
        return self.durations[self.labels.index(label)]

    packing: bool = False

    @property
    def method_config(self):
        return method_from_dict(self.method)

    @property
    def train_config(self):
        return TrainConfig.from_dict(self.train)

    @property
    def mode(self) -> str:
        """How the durations relate: continue, branch, longest or restart (learnforget.train.settings.MODES)."""
        return self.train_config.mode(self.method_config)

    @property
    def continues(self) -> bool:
        """Whether a duration builds on the previous one instead of starting from the base."""
        return self.mode != "restart"

    @property
    def trunk_labels(self) -> tuple[str, ...]:
        """Durations with a trunk checkpoint (mode branch: every one)."""
        return self.labels if self.mode == "branch" else ()

    def previous(self, label: str, part: str = "final") -> str | None:
        """The checkpoint a job continues from, as ``label`` or ``trunk/label``; None: the base."""
        i = self.labels.index(label)
        if part == "trunk" or self.mode in ("continue", "longest"):
            if i == 0:
                return None
            return ("trunk/" if part == "trunk" else "") + self.labels[i - 1]
        return f"trunk/{label}" if self.mode == "branch" else None

    @property
    def is_adapter(self) -> bool:
        return self.method_config.is_adapter

    def runtime(self) -> dict:
        """Settings that change how a job runs, not its result (never in Snakemake params)."""
        full = self.train_config.to_dict()
        return {k: full[k] for k in RUNTIME_KEYS}

    def train_params(self, label: str, part: str = "final") -> dict:
        """Everything a train job's result depends on (Snakemake reruns it when this changes)."""
        return {
            "run": self.name,
            "part": part,
            "domain": self.domain,
            "regime": self.regime,
            "packing": self.packing,
            "method": self.method,
            "train": self.train_config.result_dict(),
            "seed": self.seed,
            "unit": self.unit,
            "duration": self.duration_value(label),
            "previous": self.previous(label, part),
            # the schedule's length depends on every duration only when it spans the longest
            "durations": list(self.durations) if self.mode == "longest" else None,
        }

    def meta(self) -> dict:
        return {"run": self.name, "method": self.method_name, "method_type": self.method["type"],
                "domain": self.domain, "regime": self.regime, "seed": self.seed,
                "rank": self.method.get("rank"), "series": self.series or self.name,
                "lr": self.train_config.lr}


def expand_runs(cfg: dict) -> list[Run]:
    runs = []
    for i, r in enumerate(cfg["runs"]):
        durations = r.get("durations", cfg["durations"]["values"])
        unit = r.get("unit", cfg["durations"]["unit"])
        train = {**cfg.get("finetune", {}), **r.get("train", {})}
        labels = tuple(format_duration(d) for d in durations)
        runs.append(
            Run(
                name=r["name"], domain=r["domain"], regime=r["regime"], method_name=r["method"],
                method=dict(cfg["methods"].get(r["method"], {})), train=train, seed=r["seed"],
                durations=tuple(float(d) for d in durations), unit=unit,
                dataset=f"{r['domain']}_{r['regime']}", labels=labels, packing=bool(r.get("packing", False)),
                series=r.get("series") or r["name"],
            )
        )
    return runs


def check(cfg: dict) -> None:
    """Cross-field checks and component validation (after the schema): each section by the
    check its stage registered (:data:`learnforget.study.sections.SECTION_CHECKS`)."""
    for check_section in SECTION_CHECKS.values():
        check_section(cfg)


def dry_run_requested(argv: list[str]) -> bool:
    """Whether a Snakemake command line asks for a dry run (``-n``, ``--dry-run``, ``--dryrun``,
    or ``n`` among combined short flags such as ``-pn``). Snakemake decides it only after the
    workflow is parsed, so the Snakefile reads its own command line."""
    if os.environ.get("LEARNFORGET_DRY_RUN", "").strip().lower() in ("1", "true", "yes"):
        return True
    for arg in argv[1:]:
        if arg in ("--dry-run", "--dryrun", "--dry_run"):
            return True
        if re.fullmatch(r"-[A-Za-z]*n[A-Za-z]*", arg) and not re.fullmatch(r"-[cjs].*", arg):
            return True
    return False


def resolve_pretrained(cfg: dict, raw: dict) -> dict:
    """With ``model.pretrained``: fill ``model`` with the model's architecture (its config.json
    where available, see :func:`learnforget.data.sources.resolve_arch`) and ``tokenizer.vocab_size``
    with its vocabulary size, which plan the jobs. ``raw``: the config as written."""
    if not is_pretrained(cfg):
        for key in ("revision", "vocab_size"):
            if key in cfg["model"]:
                raise ConfigError(f"model.{key}", "only applies with model.pretrained")
        return cfg
    if (raw or {}).get("tokenizer"):
        raise ConfigError("tokenizer", "a pretrained model brings its own tokenizer: leave out the tokenizer section")
    try:
        arch = sources.resolve_arch(cfg["model"])
    except (ValueError, sources.SourceUnavailable) as exc:
        path, _, msg = str(exc).partition(": ")
        raise ConfigError(path, msg) from None
    cfg["model"] = {**{k: cfg["model"][k] for k in ("pretrained", "revision") if k in cfg["model"]}, **arch}
    cfg["tokenizer"]["vocab_size"] = arch["vocab_size"]
    return cfg


def validate(cfg: dict) -> dict:
    """Schema, defaults and cross-field checks; returns the filled config with every run
    concrete (``seeds`` and ``sweep`` expanded by :func:`expand_grid`)."""
    raw = cfg
    cfg = validate_schema(cfg)
    cfg = resolve_pretrained(cfg, raw)
    check(cfg)
    cfg["runs"] = expand_grid(cfg["runs"])
    return cfg


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError("", f"config file {path} not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    return validate(raw or {})


#: Every figure of the report, in report order (name -> what it needs from the config).
def has_lr_sweep(runs: list[Run]) -> bool:
    """Whether some (domain, regime, method) is trained at two or more learning rates."""
    lrs: dict[tuple, set] = {}
    for r in runs:
        lrs.setdefault((r.domain, r.regime, r.method_name), set()).add(r.train_config.lr)
    return any(len(v) > 1 for v in lrs.values())


def token_datasets(cfg: dict) -> list[str]:
    """The token datasets the study needs: the base mix plus each run's (domain, regime)."""
    names = set() if is_pretrained(cfg) else {n for n, w in cfg["base"]["mix"].items() if w > 0}
    names |= {r.dataset for r in expand_runs(cfg)}
    return sorted(names)


#: Sampling settings that only the scoring job reads (see learnforget.score.samples).
SCORING_ONLY = ("k", "timeout_s")


def eval_params(cfg: dict, run_domain: str | None) -> dict:
    """The evaluation settings of a checkpoint of a run of ``run_domain`` (None: the base);
    a change reruns those evaluations only."""
    ev = cfg["evaluation"]
    items = plan(ev, run_domain)
    for item in items:  # settings of the scoring job only: changing them does not regenerate
        if item["sampling"]:
            item["sampling"] = {k: v for k, v in item["sampling"].items() if k not in SCORING_ONLY}
    return {"plan": items, "task_dirs": list(ev["task_dirs"]), "datasets": dict(ev["datasets"])}


def score_params(cfg: dict, run_domain: str | None) -> list[dict]:
    """The sampled tasks' plan items of a checkpoint, for its scoring job."""
    return [item for item in plan(cfg["evaluation"], run_domain) if item["sampling"]]


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def as_hashable(obj: Any) -> Any:
    """Sorted, plain representation (stable params reprs for Snakemake)."""
    if isinstance(obj, dict):
        return {k: as_hashable(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_hashable(x) for x in obj]
    return obj
