"""Study configuration: load, fill defaults, validate, and expand into runs and jobs.

The JSON Schema (``schemas/config.schema.yaml``, also ``config/schema/``) fixes the shape of
the config; sections that configure a library component (data builders, model architecture,
training settings, methods) are then checked field by field by that component's dataclass.
Every error is a :class:`ConfigError` naming the key path and the offending value, raised
while Snakemake parses the workflow, so no job starts on a bad config.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_FILE = "config.schema.yaml"

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


class ConfigError(ValueError):
    """A configuration problem, with the key path that caused it."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"config error at '{path}': {message}" if path else f"config error: {message}")


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


def format_duration(value: float) -> str:
    """Canonical label of a duration: ``4`` for 4.0, ``0.5`` for 0.5, ``1000000`` for 1e6."""
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(value)


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
        from learnforget.train.methods import method_from_dict

        return method_from_dict(self.method)

    @property
    def train_config(self):
        from learnforget.train.settings import TrainConfig

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
        from learnforget.train.settings import RUNTIME_KEYS

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


#: How a component's error names its field: ``TrainConfig.lr: ...``, ``train_cfg.lr: ...``,
#: ``SourceConfig.n_entities=1: ...``, ``unknown key(s) learning_rate``, ``arch is missing: x``.
_FIELD_IN_MESSAGE = (re.compile(r"^[A-Za-z_]\w*\.([A-Za-z_]\w*)\s*[:=]"),
                     re.compile(r"unknown (?:[a-z]+ )?keys?(?:\(s\))?:? '?([A-Za-z_]\w*)'?"),
                     re.compile(r"\bis missing: '?([A-Za-z_]\w*)'?"))


def _check_component(path: str, fn, *args):
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


def check(cfg: dict) -> None:
    """Cross-field checks and component validation (after the schema)."""
    from learnforget import data as data_mod
    from learnforget.train.methods import method_from_dict
    from learnforget.train.settings import TrainConfig

    for key, cls in (("source", data_mod.SourceConfig), ("math", data_mod.MathConfig), ("code", data_mod.CodeConfig)):
        _check_component(f"data.{key}", data_mod.from_dict, cls, cfg["data"][key])
    from learnforget.train.modeling import validate_arch

    arch = _check_component("model", validate_arch, cfg["model"])
    context = arch["max_position_embeddings"]
    base_train = _check_component("base.train", TrainConfig.from_dict, cfg["base"]["train"])
    if base_train.group_by_length:
        raise ConfigError("base.train.group_by_length", "the base is pretrained on packed text: no padding to group")
    if base_train.seq_len > context and not is_pretrained(cfg):
        raise ConfigError("base.train.seq_len", f"{base_train.seq_len} exceeds model.max_position_embeddings {context}")
    for name, spec in cfg["data"]["hub"].items():
        regime = DATASETS[name][1]
        for key in (("text",) if regime == "cpt" else ("prompt", "response")):
            if key not in spec:
                raise ConfigError(f"data.hub.{name}", f"a {regime} dataset needs a {key!r} template")
        other = ("prompt", "response") if regime == "cpt" else ("text",)
        for key in other:
            if key in spec:
                raise ConfigError(f"data.hub.{name}.{key}", f"a {regime} dataset has no {key!r} template")
        from learnforget.data.sources import template_fields

        for key in ("text", "prompt", "response", "id"):
            if key in spec:
                _check_component(f"data.hub.{name}.{key}", template_fields, spec[key])
    _check_component("finetune", TrainConfig.from_dict, cfg["finetune"])
    for name in cfg["base"]["mix"]:
        if name not in DATASETS:
            raise ConfigError(f"base.mix.{name}", f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if not any(w > 0 for w in cfg["base"]["mix"].values()):
        raise ConfigError("base.mix", "at least one dataset needs a positive weight")

    layer = cfg["analysis"]["spectrum"]["layer"]
    if layer is not None and layer >= arch["num_hidden_layers"]:
        raise ConfigError("analysis.spectrum.layer",
                          f"layer {layer} does not exist: the model has {arch['num_hidden_layers']} layers")
    from learnforget.train.methods import TARGET_GROUPS

    modules = TARGET_GROUPS["all"]
    if cfg["analysis"]["spectrum"]["module"] not in modules:
        raise ConfigError("analysis.spectrum.module",
                          f"unknown module {cfg['analysis']['spectrum']['module']!r}; one of {', '.join(modules)}")
    hidden = arch["hidden_size"]
    for name, m in cfg["methods"].items():
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ConfigError(f"methods.{name}", "method names must be filesystem-safe")
        method = _check_component(f"methods.{name}", method_from_dict, m)
        for key in ("rank", "init_r"):
            rank = getattr(method, key, None)
            if rank is not None and rank >= hidden:
                raise ConfigError(f"methods.{name}.{key}", f"{key} {rank} must be below the model width {hidden}")

    seen: dict[str, int] = {}
    for i, r in enumerate(cfg["runs"]):
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
        tc = _check_component(f"{where}.train", TrainConfig.from_dict, {**cfg["finetune"], **r.get("train", {})})
        for lr in (r.get("sweep") or {}).get("lr", []):
            _check_component(f"{where}.sweep.lr", TrainConfig.from_dict, {**cfg["finetune"], **r.get("train", {}), "lr": lr})
        if r.get("packing") and r["regime"] != "ift":
            raise ConfigError(f"{where}.packing", "packing applies to ift runs (cpt text is always packed)")
        if tc.group_by_length and (r["regime"] != "ift" or r.get("packing")):
            key = f"{where}.train.group_by_length" if "group_by_length" in r.get("train", {}) else \
                "finetune.group_by_length"
            raise ConfigError(key, f"group_by_length applies to ift runs without packing ({r['name']} is "
                                   f"{'packed ift' if r.get('packing') else r['regime']})")
        if tc.seq_len > context:
            raise ConfigError(f"{where}.train.seq_len", f"{tc.seq_len} exceeds model.max_position_embeddings {context}")
        durations = r.get("durations", cfg["durations"]["values"])
        key = f"{where}.durations" if "durations" in r else "durations.values"
        if any(not math.isfinite(d) or d <= 0 for d in durations):
            raise ConfigError(key, f"durations must be positive, got {durations}")
        if any(b <= a for a, b in zip(durations, durations[1:])):
            raise ConfigError(key, f"durations must be strictly increasing, got {durations}")
        labels = [format_duration(d) for d in durations]
        if len(set(labels)) != len(labels):
            raise ConfigError(key, f"durations collide after formatting: {labels}")

    from learnforget.evaluate.harness import check_groups

    try:
        check_groups(cfg["evaluation"], {r["domain"] for r in cfg["runs"]})
    except ValueError as exc:
        path, _, msg = str(exc).partition(": ")
        raise ConfigError(path, msg) from None
    for dataset_id, folder in cfg["evaluation"]["datasets"].items():
        if not Path(folder).is_dir():
            raise ConfigError(f"evaluation.datasets.{dataset_id}", f"{folder} is not a folder")
    from learnforget.compose.lorahub import check_config as check_compose

    check_compose(cfg)  # the runs it combines exist and are lora adapters of compatible ranks


def dry_run_requested(argv: list[str]) -> bool:
    """Whether a Snakemake command line asks for a dry run (``-n``, ``--dry-run``, ``--dryrun``,
    or ``n`` among combined short flags such as ``-pn``). Snakemake decides it only after the
    workflow is parsed, so the Snakefile reads its own command line."""
    import os

    if os.environ.get("LEARNFORGET_DRY_RUN", "").strip().lower() in ("1", "true", "yes"):
        return True
    for arg in argv[1:]:
        if arg in ("--dry-run", "--dryrun", "--dry_run"):
            return True
        if re.fullmatch(r"-[A-Za-z]*n[A-Za-z]*", arg) and not re.fullmatch(r"-[cjs].*", arg):
            return True
    return False


def is_pretrained(cfg: dict) -> bool:
    """Whether the study starts from a pretrained model (``model.pretrained``)."""
    return bool(cfg.get("model", {}).get("pretrained"))


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
    from learnforget.data import sources

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
FIGURES = ("tradeoff", "learning", "forgetting", "sensitivity", "diversity", "spectral_ranks",
           "spectral_modules", "spectrum")


def has_lr_sweep(runs: list[Run]) -> bool:
    """Whether some (domain, regime, method) is trained at two or more learning rates."""
    lrs: dict[tuple, set] = {}
    for r in runs:
        lrs.setdefault((r.domain, r.regime, r.method_name), set()).add(r.train_config.lr)
    return any(len(v) > 1 for v in lrs.values())


def figure_names(cfg: dict) -> list[str]:
    """The figures a validated config provides data for (a figure is drawn only then): the
    sensitivity figure needs a learning-rate sweep, the diversity figure sampled tasks on a
    finetuned run; the rest every study has."""
    from learnforget.evaluate.harness import plan

    runs = expand_runs(cfg)
    sampled = any(item["sampling"] for r in runs for item in plan(cfg["evaluation"], r.domain))
    skip = {"sensitivity"} if not has_lr_sweep(runs) else set()
    if not sampled:
        skip.add("diversity")
    return [f for f in FIGURES if f not in skip]


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
    from learnforget.evaluate.harness import plan

    ev = cfg["evaluation"]
    items = plan(ev, run_domain)
    for item in items:  # settings of the scoring job only: changing them does not regenerate
        if item["sampling"]:
            item["sampling"] = {k: v for k, v in item["sampling"].items() if k not in SCORING_ONLY}
    return {"plan": items, "task_dirs": list(ev["task_dirs"]), "datasets": dict(ev["datasets"])}


def score_params(cfg: dict, run_domain: str | None) -> list[dict]:
    """The sampled tasks' plan items of a checkpoint, for its scoring job."""
    from learnforget.evaluate.harness import plan

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
