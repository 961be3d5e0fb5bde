"""Evaluation task groups: validation, per-checkpoint plans, group and diversity rows."""

from __future__ import annotations

import copy
import json
import re

import pandas as pd
import pytest

from learnforget.study import config as lfconfig
from learnforget.evaluate import plan as ev
from learnforget.report.metrics import collect, group_rows, tidy_rows

GROUPS = {
    "math": {"role": "learning", "domain": "math", "tasks": ["lf_math"], "metric": "exact_match",
             "filter": "strict-match", "num_fewshot": 2},
    "code": {"role": "learning", "domain": "code", "tasks": ["lf_code"], "metric": "bits_per_byte"},
    "forgetting": {"role": "forgetting", "tasks": ["lf_facts", "lf_source_heldout"],
                   "metric": {"lf_facts": "acc", "lf_source_heldout": "bits_per_byte"}},
    "samples": {"role": "other", "domain": "code", "tasks": ["lf_humaneval"], "samples": 4, "limit": 5,
                "batch_size": 2},
}
EV = {"batch_size": 16, "limit": None, "task_dirs": [], "datasets": {}, "groups": GROUPS}


def builtin(name):
    return name in {"gsm8k", "hellaswag", "winogrande", "arc_challenge"}


def test_plan_per_checkpoint():
    base = ev.plan(EV, None)
    assert [i["task"] for i in base] == ["lf_math", "lf_code", "lf_facts", "lf_source_heldout", "lf_humaneval"]
    math = ev.plan(EV, "math")
    assert [i["task"] for i in math] == ["lf_math", "lf_facts", "lf_source_heldout"]  # code groups skipped
    assert math[0] == {"task": "lf_math", "group": "math", "num_fewshot": 2, "limit": None, "batch_size": 16,
                       "sampling": None}
    code = {i["task"]: i for i in ev.plan(EV, "code")}
    assert set(code) == {"lf_code", "lf_facts", "lf_source_heldout", "lf_humaneval"}
    he = code["lf_humaneval"]
    assert he["limit"] == 5 and he["batch_size"] == 2
    assert he["sampling"] == {"samples": 4, "temperature": 0.2, "top_p": 0.95, "max_gen_toks": 256, "k": [1, 10],
                              "timeout_s": 10.0, "scorer": "humaneval"}


def test_headline_and_hub_tasks():
    groups = ev.check_groups(EV, ["math", "code"], builtin=builtin)
    assert ev.headline(groups) == {"learning": {"math": ["math", "exact_match_strict-match"],
                                                "code": ["code", "bits_per_byte"]},
                                   "forgetting": ["forgetting", "score"]}
    paper = copy.deepcopy(EV)
    paper["groups"]["forgetting"] = {"role": "forgetting", "tasks": ["hellaswag", "winogrande", "arc_challenge"],
                                     "metric": {"hellaswag": "acc_norm", "winogrande": "acc",
                                                "arc_challenge": "acc_norm"}}
    assert ev.hub_tasks(paper) == ["arc_challenge", "hellaswag", "winogrande"]
    assert ev.hub_tasks(EV) == []


def _bad(path, value):
    cfg = copy.deepcopy(EV)
    node = cfg
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return cfg


BAD = [
    ("no tasks", _bad("groups.code.tasks", KeyError), "evaluation.groups.code.tasks"),
    ("empty tasks", _bad("groups.code.tasks", []), "evaluation.groups.code.tasks"),
    ("bad role", _bad("groups.code.role", "teaching"), "evaluation.groups.code.role"),
    ("learning without domain", _bad("groups.code.domain", KeyError), "evaluation.groups.code.domain"),
    ("forgetting with domain", _bad("groups.forgetting.domain", "math"), "evaluation.groups.forgetting.domain"),
    ("learning without metric", _bad("groups.code.metric", KeyError), "evaluation.groups.code.metric"),
    ("unknown group key", _bad("groups.code.shots", 3), "unknown key(s) ['shots']"),
    ("metric map misses a task", _bad("groups.forgetting.metric", {"lf_facts": "acc"}),
     "evaluation.groups.forgetting.metric"),
    ("metric the task lacks", _bad("groups.code.metric", "acc"), "task 'lf_code' has no metric 'acc,none'"),
    ("negative shots", _bad("groups.math.num_fewshot", -1), "evaluation.groups.math.num_fewshot"),
    ("zero samples", _bad("groups.samples.samples", 0), "evaluation.groups.samples.samples"),
    ("top_p above 1", _bad("groups.samples.top_p", 1.5), "evaluation.groups.samples.top_p"),
    ("bad k", _bad("groups.samples.k", [0]), "evaluation.groups.samples.k"),
    ("sampling on loglikelihood tasks", _bad("groups.code.samples", 5), "only for sampled tasks"),
    ("pass@k not scored", _bad("groups.samples.metric", "pass@100"), "scores"),
    ("unknown task", _bad("groups.code.tasks", ["lf_code", "no_such_task"]),
     "evaluation.groups.code.tasks[1]: unknown task 'no_such_task'"),
    ("task in two groups", _bad("groups.samples.tasks", ["lf_humaneval", "lf_math"]), "already in group 'math'"),
    ("group named like a task", _bad("groups.lf_math_answer", {"tasks": ["lf_math_answer"]}),
     "cannot be named like a task"),
    ("no forgetting group", _bad("groups.forgetting.role", "other"), "exactly one group needs role forgetting"),
    ("second learning group of a domain", _bad("groups.samples", {"role": "learning", "domain": "code",
                                                                  "tasks": ["lf_code_gen"], "metric": "parses"}),
     "domain 'code' already has the learning group"),
    ("missing task dir", _bad("task_dirs", ["/no/such/dir"]), "evaluation.task_dirs"),
]


@pytest.mark.parametrize("what,cfg,message", BAD, ids=[b[0] for b in BAD])
def test_bad_groups(what, cfg, message):
    with pytest.raises(ValueError, match=lambda_escape(message)):
        ev.check_groups(cfg, ["math", "code"], builtin=builtin)


def lambda_escape(text):
    return re.escape(text)


def test_learning_group_required_per_run_domain():
    cfg = _bad("groups.code", KeyError)
    cfg["groups"]["samples"].pop("domain")
    with pytest.raises(ValueError, match="no learning group for the runs' domain 'code'"):
        ev.check_groups(cfg, ["math", "code"], builtin=builtin)
    ev.check_groups(cfg, ["math"], builtin=builtin)  # no code runs: fine


def test_config_errors_name_the_key(tmp_path):
    raw = lfconfig.load("config/config.yaml")
    raw["evaluation"]["groups"]["math"]["role"] = "teaching"
    with pytest.raises(lfconfig.ConfigError, match=r"evaluation\.groups\.math\.role"):
        lfconfig.validate(raw)
    raw = lfconfig.load("config/config.yaml")
    raw["evaluation"]["datasets"] = {"openai/gsm8k": str(tmp_path / "missing")}
    with pytest.raises(lfconfig.ConfigError, match=r"evaluation\.datasets\.openai/gsm8k"):
        lfconfig.validate(raw)
    raw = lfconfig.load("config/config.yaml")
    raw["evaluation"]["learning"] = {"math": ["lf_math", "acc"]}  # the old format: a clear error
    with pytest.raises(lfconfig.ConfigError, match="learning"):
        lfconfig.validate(raw)


def test_task_dir_index(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.yaml").write_text("task: my_task\ndataset_path: json\n")
    (tmp_path / "a" / "u.yaml").write_text("task: 'other_task'\n")
    assert ev.task_dir_index([tmp_path / "a"]) == {"my_task": tmp_path / "a/t.yaml",
                                                    "other_task": tmp_path / "a/u.yaml"}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "t.yaml").write_text("task: my_task\n")
    with pytest.raises(ValueError, match="defined in both"):
        ev.task_dir_index([tmp_path / "a", tmp_path / "b"])
    cfg = _bad("task_dirs", [str(tmp_path / "a")])
    cfg["groups"]["probe"] = {"tasks": ["my_task"]}
    ev.check_groups(cfg, ["math", "code"], builtin=builtin)


def _eval_json(run, method, domain, duration, results, diversity=None):
    out = {"learnforget": {"run": run, "method": method, "domain": domain, "regime": "ift", "duration": duration},
           "results": results, "higher_is_better": {t: {k.split(",")[0]: not k.startswith("bits") for k in r}
                                                 for t, r in results.items()}}
    if diversity is not None:
        out["diversity"] = diversity
    return out


def test_group_rows_are_means_and_roles(tmp_path):
    files = {
        "base.json": _eval_json("base", "base", "", 0, {"lf_facts": {"acc,none": 0.5, "acc_norm,none": 0.4},
                                                       "lf_source_heldout": {"bits_per_byte,none": 2.0},
                                                       "lf_math": {"exact_match,strict-match": 0.1}}),
        "r.json": _eval_json("r", "lora", "math", 1, {"lf_facts": {"acc,none": 0.3},
                                                      "lf_source_heldout": {"bits_per_byte,none": 3.0},
                                                      "lf_math": {"exact_match,strict-match": 0.2}}),
        "r.scored.json": _eval_json("r", "lora", "math", 1, {"lf_humaneval": {"pass@1,none": 0.25, "pass@10,none": 0.5}},
                                    diversity={"lf_humaneval": {"distinct": 3.0, "distinct_fraction": 0.75,
                                                                "mean_pairwise_similarity": 0.6}}),
    }
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    groups = {"math": GROUPS["math"], "forgetting": GROUPS["forgetting"],
              "he": {"role": "other", "tasks": ["lf_humaneval"], "metric": "pass@1"}}
    df = collect(sorted(tmp_path.glob("*.json")), groups=groups)
    got = {(r.run, r.task, r.metric): (r.value, r.role, r.domain) for r in df.itertuples()}
    assert got[("base", "forgetting", "score")] == (pytest.approx(1.25), "forgetting", "source")
    assert got[("r", "forgetting", "score")] == (pytest.approx(1.65), "forgetting", "math")
    assert got[("base", "math", "exact_match_strict-match")] == (pytest.approx(0.1), "learning", "math")
    assert got[("r", "he", "pass@1")] == (0.25, "other", "math")
    assert got[("r", "lf_humaneval", "pass@10")] == (0.5, "task", "math")
    assert got[("r", "lf_humaneval", "distinct_fraction")] == (0.75, "diversity", "math")
    assert ("base", "he", "pass@1") not in got  # the base has no HumanEval rows: no group row
    assert got[("base", "lf_facts", "acc")] == (0.5, "task", "")
    # a group with mixed directions has no single higher_is_better
    row = df[(df.run == "r") & (df.task == "forgetting")].iloc[0]
    assert pd.isna(row["higher_is_better"]) or row["higher_is_better"] is None
    assert group_rows(pd.DataFrame(tidy_rows(files["r.json"])), {"x": {"tasks": ["lf_facts"]}}) == []


def test_paper_protocol_validates_and_needs_its_four_datasets(tmp_path, monkeypatch):
    import yaml

    from learnforget.core import hub

    raw = lfconfig.load("config/config.yaml")
    raw["evaluation"] = yaml.safe_load(open("config/protocols/paper-eval.yaml"))["evaluation"]
    cfg = lfconfig.validate(raw)
    groups = ev.parse_groups(cfg["evaluation"]["groups"])
    assert groups["math"].shots("gsm8k") == 5 and groups["math"].metric_key("gsm8k") == "exact_match,strict-match"
    assert groups["code"].samples == 50 and groups["code"].temperature == 0.2 and groups["code"].top_p == 0.95
    assert ev.headline(groups) == {"learning": {"math": ["math", "exact_match_strict-match"],
                                                "code": ["code", "pass@1"]}, "forgetting": ["forgetting", "score"]}
    tasks = ev.hub_tasks(cfg["evaluation"])
    assert tasks == ["arc_challenge", "gsm8k", "hellaswag", "winogrande"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DatasetUnavailable, match="allenai/ai2_arc"):
        hub.check_tasks(tasks, {})
    copies = {}
    for dataset, config in {"openai/gsm8k": "main", "Rowan/hellaswag": "default",
                            "allenai/winogrande": "winogrande_xl", "allenai/ai2_arc": "ARC-Challenge"}.items():
        copies[dataset] = str(hub.write_local_dataset(tmp_path / dataset.replace("/", "_"), config, {"test": [{}]}))
    found = hub.check_tasks(tasks, copies)
    assert {t: f["source"] for t, f in found.items()} == {t: "local" for t in tasks}
    cfg["evaluation"]["datasets"] = copies
    lfconfig.validate(cfg)


def test_validate_cli_lists_groups_and_names_an_unavailable_dataset(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    raw = yaml.safe_load(open("config/config.yaml"))
    raw["evaluation"] = yaml.safe_load(open("config/protocols/paper-eval.yaml"))["evaluation"]
    path = tmp_path / "paper-eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "learnforget.cli", "validate", str(path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "evaluation group forgetting: forgetting, hellaswag, winogrande, arc_challenge" in proc.stdout
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("learn-forget: evaluation task") and "evaluation.datasets" in err[0]
