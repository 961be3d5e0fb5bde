"""The jobs of a validated study, as the Snakemake rules ask for them: every job's input paths
and params, from the config and the job's wildcards (run, duration, dataset, composite).

``workflow/rules/common.smk`` builds one :class:`Jobs` and its input functions only pass the
wildcards on. Params are what Snakemake compares to decide reruns (their repr is stored with
each output), so each job gets only its own slice of the config, with keys sorted
(:func:`learnforget.study.config.as_hashable`): evaluation settings never retrain, threads and
resources are never params.
"""

from __future__ import annotations

from pathlib import Path

from learnforget.compose import lorahub
from learnforget.data import DATASETS, IFT_TEMPLATES, sources
from learnforget.evaluate import plan as evalplan
from learnforget.study.basics import format_duration, is_pretrained
from learnforget.study.config import Run, as_hashable, eval_params, score_params

#: The files the data rules write (study data under ``<output_dir>/data``): key -> path below it.
DATA_FILES = {
    "source_train": "source/train.jsonl",
    "source_quiz": "source/quiz.jsonl",
    "source_heldout": "source/heldout.jsonl",
    "math_train": "math/train.jsonl",
    "math_test": "math/test.jsonl",
    "math_generic": "math/generic.jsonl",
    "code_train": "code/train.jsonl",
    "code_test": "code/test.jsonl",
}

#: Suffixes of the files of the user's lm-eval task folders that an evaluation reads.
TASK_FILE_SUFFIXES = (".yaml", ".yml", ".py", ".jinja", ".txt", ".json")

#: The base model's row in the results (what the run metadata of a finetuned checkpoint holds).
BASE_META = {"run": "base", "method": "base", "method_type": "base", "domain": "", "regime": "", "seed": None,
             "rank": None, "series": "base", "lr": None, "duration": 0.0, "unit": ""}


class Jobs:
    """Paths and params of every job of the study ``config`` (validated, keys sorted), whose
    runs are ``runs`` (:func:`learnforget.study.config.expand_runs`); ``train_plans``: each
    run's GPUs and host memory (:func:`learnforget.cluster.resources.train_plans`), resources
    of its jobs, never params."""

    def __init__(self, config: dict, runs: list[Run], *, train_plans: dict | None = None):
        self.config = config
        self.train_plans = train_plans or {}
        self.out = config["output_dir"]
        self.runs = {run.name: run for run in runs}
        self.pretrained = is_pretrained(config)
        # With a pretrained model, its folder (rule base links it) holds the tokenizer too.
        self.tokenizer = f"{self.out}/base/model" if self.pretrained else f"{self.out}/tokenizer"
        self.hub_data = config["data"]["hub"]
        self.compose = lorahub.plan(config)
        self.composites = list(self.compose["composites"]) if self.compose else []

    # ------------------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[tuple[str, str]]:
        """Every (run, duration) pair the study evaluates, the base model first."""
        pairs = [("base", "0")]
        for r in self.runs.values():
            pairs += [(r.name, label) for label in r.labels]
        return pairs

    def finetuned(self) -> list[tuple[str, str]]:
        return [(r, d) for r, d in self.checkpoints() if r != "base"]

    def domain(self, run: str) -> str | None:
        """The domain of a run's learning group (None: the base model, which has none)."""
        return None if run == "base" else self.runs[run].domain

    # ------------------------------------------------------------------------- data
    def data_files(self) -> dict[str, str]:
        return {key: f"{self.out}/data/{path}" for key, path in DATA_FILES.items()}

    def tokenize_input(self, dataset: str) -> dict:
        if dataset in self.hub_data:
            data = f"{self.out}/data/hub/{dataset}.jsonl"
        else:
            data = f"{self.out}/data/{DATASETS[dataset][0]}"
        return {"tokenizer": self.tokenizer, "data": data}

    def tokenize_params(self, dataset: str) -> dict:
        regime = DATASETS[dataset][1]
        if regime == "cpt":
            template = None
        elif dataset in self.hub_data:  # rendered by its data.hub templates already
            template = ("{prompt}", "{response}")
        else:
            template = IFT_TEMPLATES.get(dataset.split("_")[0])
        return {"regime": regime, "template": template}

    def hub_data_params(self, dataset: str) -> dict:
        return {"spec": as_hashable(self.hub_data[dataset]), "regime": DATASETS[dataset][1]}

    # ------------------------------------------------------------------------- base and training
    def base_fetch_params(self):
        return as_hashable(sources.model_source(self.config["model"]))

    def base_tokens(self) -> list[str]:
        return [f"{self.out}/tokens/{name}" for name, w in sorted(self.config["base"]["mix"].items()) if w > 0]

    def base_params(self) -> dict:
        return as_hashable({"model": self.config["model"], "base": self.config["base"], "seed": self.config["seed"]})

    def train_input(self, run: str, duration: str, part: str = "final") -> dict:
        """The base, the run's tokens and the checkpoint the job continues from, if any."""
        r = self.runs[run]
        inputs = {"base": f"{self.out}/base/model", "tokens": f"{self.out}/tokens/{r.dataset}"}
        previous = r.previous(duration, part)
        if previous is not None:
            inputs["previous"] = f"{self.out}/runs/{r.name}/{previous}"
        return inputs

    def train_params(self, run: str, duration: str, part: str = "final") -> dict:
        return as_hashable(self.runs[run].train_params(duration, part))

    def training_jobs(self) -> list[str]:
        """Every training job's output folder (each holds a manifest.json)."""
        paths = [f"{self.out}/base/model"]
        for run in self.runs.values():
            paths += [f"{self.out}/runs/{run.name}/trunk/{d}" for d in run.trunk_labels]
            paths += [f"{self.out}/runs/{run.name}/{d}" for d in run.labels]
        return paths

    # ------------------------------------------------------------------------- evaluation
    def checkpoint_input(self, run: str, duration: str) -> dict:
        inputs = {"base": f"{self.out}/base/model"}
        if run != "base":
            inputs["checkpoint"] = f"{self.out}/runs/{run}/{duration}"
        return inputs

    def task_files(self) -> list[str]:
        """The user's lm-eval task files (a change reruns the evaluations)."""
        return sorted(str(p) for d in self.config["evaluation"]["task_dirs"] for p in Path(d).rglob("*")
                      if p.is_file() and p.suffix in TASK_FILE_SUFFIXES)

    def evaluate_input(self, run: str, duration: str) -> dict:
        return {**self.checkpoint_input(run, duration), **self.data_files(), "task_files": self.task_files()}

    def run_meta(self, run: str, duration: str) -> dict:
        """The checkpoint's row of the results: the run's facts and the duration."""
        if run == "base":
            return {**BASE_META, "seed": self.config["seed"]}
        r = self.runs[run]
        return as_hashable({**r.meta(), "duration": r.duration_value(duration), "unit": r.unit})

    def eval_params(self, run: str) -> dict:
        return as_hashable(eval_params(self.config, self.domain(run)))

    def score_plan(self, run: str) -> list:
        """The sampled tasks' plan items (a change to other groups does not rescore)."""
        return as_hashable(score_params(self.config, self.domain(run)))

    def scored(self, run: str) -> bool:
        """Whether a checkpoint's evaluation has sampled tasks (then a score job follows it)."""
        return any(item["sampling"] for item in evalplan.plan(self.config["evaluation"], self.domain(run)))

    def evaluations(self) -> list[str]:
        """Every evaluation's results, scored ones too, and the composites' (compose.enabled)."""
        paths = []
        for r, d in self.checkpoints():
            paths.append(f"{self.out}/evals/{r}/{d}.json")
            if self.scored(r):
                paths.append(f"{self.out}/evals/{r}/{d}.scored.json")
        return paths + self.compose_evaluations()

    # ------------------------------------------------------------------------- analysis and report
    def analysis_params(self) -> dict:
        # the device changes how, not what, is computed; the chosen matrix only the figure
        return as_hashable({k: v for k, v in self.config["analysis"].items() if k not in ("device", "spectrum")})

    def spectral_tables(self) -> list[str]:
        return [f"{self.out}/spectral/{r}/{d}.csv" for r, d in self.finetuned()]

    def spectra(self) -> list[str]:
        return [f"{self.out}/spectral/{r}/{d}.npz" for r, d in self.finetuned()]

    def report_params(self) -> dict:
        groups = self.config["evaluation"]["groups"]
        return as_hashable({
            "study": self.config["study"],
            **evalplan.headline(evalplan.parse_groups(groups)),
            "groups": groups,
            "runs": {name: r.meta() for name, r in self.runs.items()},
            "config": self.config,
        })

    # ------------------------------------------------------------------------- compose and cards
    def compose_data(self) -> str:
        """The data file the compose stage draws its target examples from."""
        t = self.compose["target"]
        if t["split"] == "train":  # the data the runs of that domain and regime train on
            return self.tokenize_input(f"{t['domain']}_{t['regime']}")["data"]
        return self.data_files()[f"{t['domain']}_{t['split']}"]

    def compose_input(self) -> dict:
        """The base, the combined checkpoints and the target examples' data file."""
        return {
            "base": f"{self.out}/base/model",
            "adapters": [f"{self.out}/runs/{r}/{self.compose['adapters'][r]}" for r in self.compose["runs"]],
            "data": self.compose_data(),
        }

    def compose_params(self) -> dict:
        return as_hashable(self.compose)

    def compose_template(self):
        """The instruction template of the target examples (as the runs' data is tokenized)."""
        t = self.compose["target"]
        if t["regime"] != "ift":
            return None
        if t["split"] == "train":
            return self.tokenize_params(f"{t['domain']}_{t['regime']}")["template"]
        return IFT_TEMPLATES.get(t["domain"])

    def compose_adapter_dirs(self) -> list[str]:
        return [f"{self.out}/compose/adapters/{c}" for c in self.composites]

    def composite_evaluate_input(self, composite: str) -> dict:
        return {
            "base": f"{self.out}/base/model",
            "checkpoint": f"{self.out}/compose/adapters/{composite}",
            **self.data_files(),
            "task_files": self.task_files(),
        }

    def composite_eval_params(self) -> dict:
        """The base's evaluation plan (every learning group and the forgetting group) without
        the sampled tasks, which would need a scoring job."""
        settings = eval_params(self.config, None)
        settings["plan"] = [item for item in settings["plan"] if not item["sampling"]]
        return as_hashable(settings)

    def composite_meta(self, composite: str) -> dict:
        t = self.compose["target"]
        return as_hashable({
            "run": composite, "method": lorahub.METHOD, "method_type": lorahub.METHOD,
            "kind": self.compose["composites"][composite]["kind"],
            "domain": t["domain"], "regime": t["regime"], "seed": t["seed"], "rank": None,
            "series": composite, "lr": None,
            "duration": max(self.compose["durations"].values()), "unit": self.compose["unit"],
        })

    def composite_run(self) -> Run:
        """A run whose adapters the composites combine (they share its model and method)."""
        return self.runs[next(iter(self.compose["adapters"]))]

    def compose_evaluations(self) -> list[str]:
        return [f"{self.out}/compose/evals/{c}.json" for c in self.composites]

    def compose_report_input(self) -> list[str]:
        """What the report reads of the compose stage: the search's record (nothing when it is off)."""
        return [f"{self.out}/compose/{lorahub.SEARCH_JSON}"] if self.compose else []

    def adapter_checkpoints(self) -> list[tuple[str, str]]:
        """(run, duration label) of every adapter checkpoint of the study, composites included."""
        pairs = [(r.name, d) for r in self.runs.values() if r.is_adapter for d in r.labels]
        if self.compose:
            label = format_duration(max(self.compose["durations"].values()))
            pairs += [(c, label) for c in self.composites]
        return pairs

    def cards_input(self) -> dict:
        dirs = [f"{self.out}/compose/adapters/{r}" if r in self.composites else f"{self.out}/runs/{r}/{d}"
                for r, d in self.adapter_checkpoints()]
        return {"metrics": f"{self.out}/metrics.csv", "checkpoints": dirs}

    def cards_params(self) -> list[list[str]]:
        return [[r, d] for r, d in self.adapter_checkpoints()]

    def cards_outputs(self) -> list[str]:
        """The scored model cards, when the study has adapter checkpoints (the composites
        reach the default target through the report's evaluations)."""
        return [f"{self.out}/cards"] if self.adapter_checkpoints() else []
