# Validation first, then the input functions every rule uses (no lambdas in rules). What the
# jobs read and their params come from the library (learnforget.study.jobs); the checks before
# any job starts (hub sources, damaged checkpoints, GPU plans) from learnforget.study.preflight.
import sys
from pathlib import Path

from learnforget.cluster import resources as lfresources
from learnforget.compose import lorahub as lfcompose
from learnforget.data import DATASETS
from learnforget.report import registry as lfreport
from learnforget.study import config as lfconfig
from learnforget.study import preflight

try:
    _validated = lfconfig.validate(config)
except lfconfig.ConfigError as exc:
    sys.exit(f"learn-forget: {exc}")
# Keys sorted at every level: params reprs (which Snakemake compares to decide reruns) must
# not depend on the order keys were written in the YAML.
config.clear()
config.update(lfconfig.as_hashable(_validated))

# A dry run runs no job, so there the checks only warn (a study for a cluster can be planned
# on a laptop offline). Snakemake decides it after parsing, so it is read off the command line.
try:
    STUDY = preflight.open_study(
        config,
        dry_run=lfconfig.dry_run_requested(sys.argv),
        main_process=workflow.is_main_process,
    )
except preflight.StudyStop as exc:
    sys.exit(f"learn-forget: {exc}")

R = STUDY.out
PRETRAINED = STUDY.pretrained
TOKENIZER = STUDY.tokenizer
RUNS = STUDY.runs
COMPOSITES = STUDY.composites
ENV = "../../envs/learnforget.yaml"


wildcard_constraints:
    run="|".join(["base", *RUNS]),
    duration=r"[0-9][0-9.e+]*",
    dataset="|".join(DATASETS),
    domain="source|math|code",


# ----------------------------------------------------------------------------- data, base
def tokenize_input(wildcards):
    return STUDY.tokenize_input(wildcards.dataset)


def tokenize_params(wildcards):
    return STUDY.tokenize_params(wildcards.dataset)


def hub_data_params(wildcards):
    return STUDY.hub_data_params(wildcards.dataset)


def base_fetch_params(wildcards):
    return STUDY.base_fetch_params()


def base_tokens(wildcards):
    return STUDY.base_tokens()


def base_params(wildcards):
    return STUDY.base_params()


# ----------------------------------------------------------------------------- train
def train_input(wildcards):
    return STUDY.train_input(wildcards.run, wildcards.duration)


def trunk_input(wildcards):
    return STUDY.train_input(wildcards.run, wildcards.duration, part="trunk")


def train_params(wildcards):
    return STUDY.train_params(wildcards.run, wildcards.duration)


def trunk_params(wildcards):
    return STUDY.train_params(wildcards.run, wildcards.duration, part="trunk")


# ----------------------------------------------------------------------------- evaluate, analyze
def checkpoint_input(wildcards):
    return STUDY.checkpoint_input(wildcards.run, wildcards.duration)


def evaluate_input(wildcards):
    return STUDY.evaluate_input(wildcards.run, wildcards.duration)


def run_meta(wildcards):
    return STUDY.run_meta(wildcards.run, wildcards.duration)


def eval_params(wildcards):
    return STUDY.eval_params(wildcards.run)


def score_plan(wildcards):
    return STUDY.score_plan(wildcards.run)


def analysis_params(wildcards):
    return STUDY.analysis_params()


# ----------------------------------------------------------------------------- report
def all_evaluations(wildcards):
    return STUDY.evaluations()


def all_training_jobs(wildcards):
    return STUDY.training_jobs()


def all_spectral(wildcards):
    return STUDY.spectral_tables()


def all_spectra(wildcards):
    return STUDY.spectra()


def report_params(wildcards):
    return STUDY.report_params()


# Figures of the report: only those the config provides data for (learnforget.report.registry).
FIGURES = lfreport.figure_names(config)


def figure_outputs():
    return {
        name: report(
            f"{R}/figures/{name}.png",
            caption=f"../{lfreport.BY_NAME[name].caption}",
            category="Figures",
            labels={"figure": name},
        )
        for name in FIGURES
    }


# ----------------------------------------------------------------------------- compose, cards
# Composites of the study's LoRA adapters (learnforget.compose.lorahub, config `compose`), and
# the model cards with scores of every adapter checkpoint (learnforget.core.modelcard).
def compose_input(wildcards):
    return STUDY.compose_input()


def compose_params(wildcards):
    return STUDY.compose_params()


def compose_template(wildcards):
    return STUDY.compose_template()


def composite_evaluate_input(wildcards):
    return STUDY.composite_evaluate_input(wildcards.composite)


def composite_eval_params(wildcards):
    return STUDY.composite_eval_params()


def composite_meta(wildcards):
    return STUDY.composite_meta(wildcards.composite)


def compose_report_input(wildcards):
    return STUDY.compose_report_input()


def cards_input(wildcards):
    return STUDY.cards_input()


def cards_params(wildcards):
    return STUDY.cards_params()


# ----------------------------------------------------------------------------- resources
# Cluster resources of the jobs (learnforget.cluster.resources): GPUs, host memory (MiB) and
# runtime (minutes) derived from the model, the method and the durations. Resources are not
# params: changing them retrains nothing.
def train_gpus(wildcards):
    """GPUs of a finetuning job: resources.gpu, or the memory planner's count (gpu: auto)."""
    return STUDY.train_plans[wildcards.run]["gpus"]


def train_mem_mb(wildcards):
    return STUDY.train_plans[wildcards.run]["mem_mb"]


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


def composite_mem_mb(wildcards):
    return lfresources.evaluate_mem_mb(config, STUDY.composite_run())


def analyze_gpus(wildcards):
    return config["resources"]["analyze"]["gpu"]


def analyze_mem_mb(wildcards):
    return lfresources.analyze_mem_mb(config)


def analyze_runtime(wildcards, attempt):
    return config["resources"]["analyze"]["runtime"] * attempt
