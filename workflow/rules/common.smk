# Validation first, then the input functions every rule uses (no lambdas in rules).
import os
import sys
import time
from pathlib import Path

from learnforget.study import config as lfconfig

try:
    _validated = lfconfig.validate(config)
except lfconfig.ConfigError as exc:
    sys.exit(f"learn-forget: {exc}")
# Keys sorted at every level: params reprs (which Snakemake compares to decide reruns) must
# not depend on the order keys were written in the YAML.
config.clear()
config.update(lfconfig.as_hashable(_validated))

from learnforget.evaluate import harness as lfeval
from learnforget.core import hub
from learnforget.data import sources

# Hub models and datasets (the pretrained model, data.hub datasets, lm-eval tasks' datasets)
# must be local, cached or reachable: otherwise stop before any job starts. A dry run runs no
# job, so it only warns (a study for a cluster can be planned on a laptop offline).
_DRY_RUN = lfconfig.dry_run_requested(sys.argv)
for _check in (
    lambda: sources.check_available(config, datasets=lfconfig.token_datasets(config)),
    lambda: hub.check_tasks(
        lfeval.hub_tasks(config["evaluation"]), config["evaluation"]["datasets"]
    ),
):
    try:
        _check()
    except (hub.DatasetUnavailable, sources.SourceUnavailable) as exc:
        if not _DRY_RUN:
            sys.exit(f"learn-forget: {exc}")
        if workflow.is_main_process:
            print(
                f"learn-forget: warning (a real run stops here): {exc}", file=sys.stderr
            )

R = config["output_dir"]
# With a pretrained model, its folder (rule base links it) holds the tokenizer too.
PRETRAINED = lfconfig.is_pretrained(config)
TOKENIZER = f"{R}/base/model" if PRETRAINED else f"{R}/tokenizer"
HUB_DATA = config["data"]["hub"]

if workflow.is_main_process:  # damaged checkpoints are moved aside (kept) and rebuilt
    from learnforget.core import integrity

    _corrupt = integrity.scan(
        R,
        quarantine_root=f"{R}/quarantine",
        log=lambda line: print(line, file=sys.stderr),
    )
    # A missing intermediate output alone does not make Snakemake rerun what depends on it
    # (that is how temp() files work), so the report, which every checkpoint feeds, is moved
    # aside too: remaking it remakes the checkpoints and everything downstream of them.
    if _corrupt and Path(f"{R}/report.md").exists():
        _stale = Path(
            f"{R}/quarantine/report-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.md"
        )
        _stale.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f"{R}/report.md", _stale)
RUNS = {run.name: run for run in lfconfig.expand_runs(config)}
ENV = "../../envs/learnforget.yaml"


wildcard_constraints:
    run="|".join(["base", *RUNS]),
    duration=r"[0-9][0-9.e+]*",
    dataset="|".join(lfconfig.DATASETS),
    domain="source|math|code",


def study_checkpoints():
    """Every (run, duration) pair the study evaluates, the base model first."""
    pairs = [("base", "0")]
    for r in RUNS.values():
        pairs += [(r.name, label) for label in r.labels]
    return pairs


def finetuned():
    return [(r, d) for r, d in study_checkpoints() if r != "base"]


def data_files():
    return {
        "source_train": f"{R}/data/source/train.jsonl",
        "source_quiz": f"{R}/data/source/quiz.jsonl",
        "source_heldout": f"{R}/data/source/heldout.jsonl",
        "math_train": f"{R}/data/math/train.jsonl",
        "math_test": f"{R}/data/math/test.jsonl",
        "math_generic": f"{R}/data/math/generic.jsonl",
        "code_train": f"{R}/data/code/train.jsonl",
        "code_test": f"{R}/data/code/test.jsonl",
    }


def tokenize_input(wildcards):
    if wildcards.dataset in HUB_DATA:
        data = f"{R}/data/hub/{wildcards.dataset}.jsonl"
    else:
        data = f"{R}/data/{lfconfig.DATASETS[wildcards.dataset][0]}"
    return {"tokenizer": TOKENIZER, "data": data}


def tokenize_params(wildcards):
    path, regime = lfconfig.DATASETS[wildcards.dataset]
    domain = wildcards.dataset.split("_")[0]
    if regime == "cpt":
        template = None
    elif wildcards.dataset in HUB_DATA:  # rendered by its data.hub templates already
        template = ("{prompt}", "{response}")
    else:
        template = lfconfig.IFT_TEMPLATES.get(domain)
    return {"regime": regime, "template": template}


def hub_data_params(wildcards):
    return {
        "spec": lfconfig.as_hashable(HUB_DATA[wildcards.dataset]),
        "regime": lfconfig.DATASETS[wildcards.dataset][1],
    }


def base_fetch_params(wildcards):
    return lfconfig.as_hashable(sources.model_source(config["model"]))


def base_tokens(wildcards):
    return [
        f"{R}/tokens/{name}"
        for name, w in sorted(config["base"]["mix"].items())
        if w > 0
    ]


def base_params(wildcards):
    return lfconfig.as_hashable(
        {"model": config["model"], "base": config["base"], "seed": config["seed"]}
    )


def train_input(wildcards, part="final"):
    run = RUNS[wildcards.run]
    inputs = {"base": f"{R}/base/model", "tokens": f"{R}/tokens/{run.dataset}"}
    previous = run.previous(wildcards.duration, part)
    if previous is not None:
        inputs["previous"] = f"{R}/runs/{run.name}/{previous}"
    return inputs


def trunk_input(wildcards):
    return train_input(wildcards, part="trunk")


def train_params(wildcards, part="final"):
    return lfconfig.as_hashable(
        RUNS[wildcards.run].train_params(wildcards.duration, part)
    )


def trunk_params(wildcards):
    return train_params(wildcards, part="trunk")


def train_gpus(wildcards):
    """GPUs of a finetuning job: resources.gpu, or the memory planner's count (gpu: auto)."""
    return TRAIN_PLANS[wildcards.run]["gpus"]


def checkpoint_input(wildcards):
    inputs = {"base": f"{R}/base/model"}
    if wildcards.run != "base":
        inputs["checkpoint"] = f"{R}/runs/{wildcards.run}/{wildcards.duration}"
    return inputs


def evaluate_input(wildcards):
    return {
        **checkpoint_input(wildcards),
        **data_files(),
        "task_files": task_dir_files(),
    }


def run_meta(wildcards):
    if wildcards.run == "base":
        return {
            "run": "base",
            "method": "base",
            "method_type": "base",
            "domain": "",
            "regime": "",
            "seed": config["seed"],
            "rank": None,
            "series": "base",
            "lr": None,
            "duration": 0.0,
            "unit": "",
        }
    run = RUNS[wildcards.run]
    return lfconfig.as_hashable(
        {
            **run.meta(),
            "duration": run.duration_value(wildcards.duration),
            "unit": run.unit,
        }
    )


def _run_domain(wildcards):
    return None if wildcards.run == "base" else RUNS[wildcards.run].domain


def eval_params(wildcards):
    return lfconfig.as_hashable(lfconfig.eval_params(config, _run_domain(wildcards)))


def score_plan(wildcards):
    """The sampled tasks' plan items (a change to other groups does not rescore)."""
    return lfconfig.as_hashable(lfconfig.score_params(config, _run_domain(wildcards)))


def task_dir_files(wildcards=None):
    """The user's lm-eval task files (a change reruns the evaluations)."""
    return sorted(
        str(p)
        for d in config["evaluation"]["task_dirs"]
        for p in Path(d).rglob("*")
        if p.is_file()
        and p.suffix in (".yaml", ".yml", ".py", ".jinja", ".txt", ".json")
    )


def scored(run, duration):
    """Whether a checkpoint's evaluation has sampled tasks (then a score job follows it)."""
    domain = None if run == "base" else RUNS[run].domain
    return any(i["sampling"] for i in lfeval.plan(config["evaluation"], domain))


def analysis_params(wildcards):
    # the device changes how, not what, is computed; the chosen matrix only the figure
    return lfconfig.as_hashable(
        {k: v for k, v in config["analysis"].items() if k not in ("device", "spectrum")}
    )


def all_evaluations(wildcards=None):
    paths = []
    for r, d in study_checkpoints():
        paths.append(f"{R}/evals/{r}/{d}.json")
        if scored(r, d):
            paths.append(f"{R}/evals/{r}/{d}.scored.json")
    return paths + compose_evaluations()  # composites (compose.enabled) too


def all_training_jobs(wildcards=None):
    """Every training job's output folder (each holds a manifest.json)."""
    paths = [f"{R}/base/model"]
    for run in RUNS.values():
        paths += [f"{R}/runs/{run.name}/trunk/{d}" for d in run.trunk_labels]
        paths += [f"{R}/runs/{run.name}/{d}" for d in run.labels]
    return paths


def all_spectral(wildcards=None):
    return [f"{R}/spectral/{r}/{d}.csv" for r, d in finetuned()]


def all_spectra(wildcards=None):
    return [f"{R}/spectral/{r}/{d}.npz" for r, d in finetuned()]


def report_params(wildcards):
    return lfconfig.as_hashable(
        {
            "study": config["study"],
            **lfeval.headline(lfeval.parse_groups(config["evaluation"]["groups"])),
            "groups": config["evaluation"]["groups"],
            "runs": {name: r.meta() for name, r in RUNS.items()},
            "config": config,
        }
    )


# Figures of the report: only those the config provides data for (learnforget.study.config).
FIGURES = lfconfig.figure_names(config)


def figure_outputs():
    return {
        name: report(
            f"{R}/figures/{name}.png",
            caption=f"../report/{name}.rst",
            category="Figures",
            labels={"figure": name},
        )
        for name in FIGURES
    }


# Cluster resources of the jobs (learnforget.cluster.resources): GPUs, host memory (MiB) and runtime
# (minutes) derived from the model, the method and the durations. Resources are not params:
# changing them retrains nothing. With GPUs, each run's memory plan is printed once (so a dry
# run shows it); a job that fits on no GPU count (gpu: auto) stops the workflow here.
from learnforget.cluster import resources as lfresources

try:
    TRAIN_PLANS = lfresources.train_plans(config, RUNS.values())
except ValueError as exc:
    _error = lfconfig.ConfigError("resources.gpu", " ".join(str(exc).split()))
    if not _DRY_RUN:
        sys.exit(f"learn-forget: {_error}")
    if workflow.is_main_process:
        print(
            f"learn-forget: warning (a real run stops here): {_error}", file=sys.stderr
        )
    TRAIN_PLANS = lfresources.train_plans(
        config, RUNS.values(), fallback_gpus=config["resources"]["max_gpus"]
    )
if workflow.is_main_process and lfresources.wants_gpus(config):
    for _line in lfresources.plan_lines(config, RUNS.values(), TRAIN_PLANS, R):
        print(_line, file=sys.stderr)


def train_mem_mb(wildcards):
    return TRAIN_PLANS[wildcards.run]["mem_mb"]


def train_runtime(wildcards, input, attempt, part="final"):
    """Minutes: exact once the job's token folder exists, estimated from the config before."""
    return lfresources.train_runtime(
        config,
        RUNS[wildcards.run],
        wildcards.duration,
        part,
        gpus=train_gpus(wildcards),
        token_dir=input.tokens,
        attempt=attempt,
    )


def trunk_runtime(wildcards, input, attempt):
    return train_runtime(wildcards, input, attempt, part="trunk")


def train_cpus(wildcards, threads):
    return lfresources.train_cpus(config, train_gpus(wildcards), threads)


def base_mem_mb(wildcards):
    return lfresources.base_mem_mb(config)


def base_runtime(wildcards, input, attempt):
    tokens = [input.tokens] if isinstance(input.tokens, str) else input.tokens
    return lfresources.base_runtime(config, {Path(d).name: d for d in tokens}, attempt)


def evaluate_mem_mb(wildcards):
    run = None if wildcards.run == "base" else RUNS[wildcards.run]
    return lfresources.evaluate_mem_mb(config, run)


def evaluate_runtime(wildcards, attempt):
    return config["resources"]["evaluate"]["runtime"] * attempt


def analyze_gpus(wildcards):
    return config["resources"]["analyze"]["gpu"]


def analyze_mem_mb(wildcards):
    return lfresources.analyze_mem_mb(config)


def analyze_runtime(wildcards, attempt):
    return config["resources"]["analyze"]["runtime"] * attempt


# ----------------------------------------------------------------------------- compose, cards
# Composites of the study's LoRA adapters (learnforget.compose.lorahub, config `compose`), and the
# model cards with scores of every adapter checkpoint (learnforget.core.modelcard).
from types import SimpleNamespace

from learnforget.compose import lorahub as lfcompose

COMPOSE = lfcompose.plan(config)
COMPOSITES = list(COMPOSE["composites"]) if COMPOSE else []


def _compose_dataset():
    t = COMPOSE["target"]
    return SimpleNamespace(dataset=f"{t['domain']}_{t['regime']}")


def compose_input(wildcards):
    """The base, the combined checkpoints and the target examples' data file."""
    t = COMPOSE["target"]
    if t["split"] == "train":  # the data the runs of that domain and regime train on
        data = tokenize_input(_compose_dataset())["data"]
    else:
        data = data_files()[f"{t['domain']}_{t['split']}"]
    return {
        "base": checkpoint_input(SimpleNamespace(run="base", duration="0"))["base"],
        "adapters": [f"{R}/runs/{r}/{COMPOSE['adapters'][r]}" for r in COMPOSE["runs"]],
        "data": data,
    }


def compose_params(wildcards):
    return lfconfig.as_hashable(COMPOSE)


def compose_template(wildcards):
    """The instruction template of the target examples (as the runs' data is tokenized)."""
    if COMPOSE["target"]["regime"] != "ift":
        return None
    if COMPOSE["target"]["split"] == "train":
        return tokenize_params(_compose_dataset())["template"]
    return lfconfig.IFT_TEMPLATES.get(COMPOSE["target"]["domain"])


def compose_adapter_dirs():
    return [f"{R}/compose/adapters/{c}" for c in COMPOSITES]


def composite_evaluate_input(wildcards):
    return {
        "base": checkpoint_input(SimpleNamespace(run="base", duration="0"))["base"],
        "checkpoint": f"{R}/compose/adapters/{wildcards.composite}",
        **data_files(),
        "task_files": task_dir_files(),
    }


def composite_eval_params(wildcards):
    """The base's evaluation plan (every learning group and the forgetting group) without the
    sampled tasks, which would need a scoring job."""
    settings = lfconfig.eval_params(config, None)
    settings["plan"] = [item for item in settings["plan"] if not item["sampling"]]
    return lfconfig.as_hashable(settings)


def composite_meta(wildcards):
    t = COMPOSE["target"]
    return lfconfig.as_hashable(
        {
            "run": wildcards.composite,
            "method": lfcompose.METHOD,
            "method_type": lfcompose.METHOD,
            "kind": COMPOSE["composites"][wildcards.composite]["kind"],
            "domain": t["domain"],
            "regime": t["regime"],
            "seed": t["seed"],
            "rank": None,
            "series": wildcards.composite,
            "lr": None,
            "duration": max(COMPOSE["durations"].values()),
            "unit": COMPOSE["unit"],
        }
    )


def composite_mem_mb(wildcards):
    return lfresources.evaluate_mem_mb(config, RUNS[next(iter(COMPOSE["adapters"]))])


def compose_evaluations(wildcards=None):
    return [f"{R}/compose/evals/{c}.json" for c in COMPOSITES]


def compose_report_input(wildcards=None):
    """What the report reads of the compose stage: the search's record (nothing when it is off)."""
    return [f"{R}/compose/{lfcompose.SEARCH_JSON}"] if COMPOSE else []


def adapter_checkpoints():
    """(run, duration label) of every adapter checkpoint of the study, composites included."""
    pairs = [(r.name, d) for r in RUNS.values() if r.is_adapter for d in r.labels]
    if COMPOSE:
        label = lfconfig.format_duration(max(COMPOSE["durations"].values()))
        pairs += [(c, label) for c in COMPOSITES]
    return pairs


def cards_input(wildcards):
    dirs = [
        f"{R}/compose/adapters/{r}" if r in COMPOSITES else f"{R}/runs/{r}/{d}"
        for r, d in adapter_checkpoints()
    ]
    return {"metrics": f"{R}/metrics.csv", "checkpoints": dirs}


def cards_params(wildcards):
    return [[r, d] for r, d in adapter_checkpoints()]


def compose_outputs():
    """The scored model cards, when the study has adapter checkpoints (the composites
    reach the default target through the report's evaluations)."""
    return [f"{R}/cards"] if adapter_checkpoints() else []
