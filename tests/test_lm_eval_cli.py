"""The study's task files reproduce its scores with lm-eval's own command line.

A reader who wants to check a number in ``metrics.csv`` without our code runs the stock
``lm_eval`` on the study's model and the task files of ``results/tasks``
(:func:`learnforget.evaluate.tasks.write_task_files`); the score must be the study's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from learnforget.evaluate.tasks import write_task_files

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_stock_lm_eval_cli_reproduces_the_base_quiz_score(tiny_study, tmp_path):
    res = tiny_study / "results"
    tasks_dir = res / "tasks"
    if not (tasks_dir / "lf_facts.yaml").is_file():  # until the workflow writes them (common.smk)
        evaluation = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())["evaluation"]
        tasks_dir = tmp_path / "tasks"
        written = write_task_files(evaluation, res / "data", tasks_dir)
        assert tasks_dir / "lf_facts.yaml" in written
    base_eval = json.loads((res / "evals" / "base" / "0.json").read_text())
    item = next(i for i in base_eval["plan"] if i["task"] == "lf_facts")  # as the study ran it
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={res / 'base' / 'model'},dtype=float32",
           "--tasks", "lf_facts", "--include_path", str(tasks_dir), "--device", "cpu",
           "--batch_size", str(item["batch_size"]), "--seed", "1234", "--output_path", str(tmp_path / "out")]
    if item["limit"] is not None:
        cmd += ["--limit", str(item["limit"])]
    if item["num_fewshot"] is not None:
        cmd += ["--num_fewshot", str(item["num_fewshot"])]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"), "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out_file,) = (tmp_path / "out").rglob("results*.json")
    theirs = json.loads(out_file.read_text())["results"]["lf_facts"]["acc,none"]
    metrics = pd.read_csv(res / "metrics.csv")
    ours = metrics[(metrics["run"] == "base") & (metrics["task"] == "lf_facts") & (metrics["metric"] == "acc")
                   & (metrics["role"] == "task")]["value"]
    assert len(ours) == 1
    assert theirs == pytest.approx(float(ours.iloc[0]), abs=1e-6)


def test_write_task_files_renders_the_study_tasks_and_rewrites_only_what_changed(tmp_path):
    evaluation = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())["evaluation"]
    out = tmp_path / "tasks"
    written = write_task_files(evaluation, tmp_path / "data", out)
    assert sorted(p.name for p in written) == ["lf_code.yaml", "lf_code_gen.yaml", "lf_facts.yaml",
                                               "lf_humaneval.yaml", "lf_math.yaml"]
    facts = yaml.safe_load((out / "lf_facts.yaml").read_text())
    assert facts["dataset_kwargs"] == {"data_files": {"test": str((tmp_path / "data").resolve() / "source/quiz.jsonl")}}
    gen = yaml.safe_load((out / "lf_code_gen.yaml").read_text())
    assert gen["repeats"] == 2 and gen["generation_kwargs"]["max_gen_toks"] == 16  # the group's settings
    for path in written:
        os.utime(path, ns=(1, 1))
    evaluation["limit"] = 7  # not in any task file
    evaluation["groups"]["samples"]["samples"] = 3
    write_task_files(evaluation, tmp_path / "data", out)
    rewritten = sorted(p.name for p in written if p.stat().st_mtime_ns != 1)
    assert rewritten == ["lf_code_gen.yaml", "lf_humaneval.yaml"]
    assert yaml.safe_load((out / "lf_humaneval.yaml").read_text())["repeats"] == 3
