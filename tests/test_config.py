"""Config loading: defaults, expansion into runs, and clear errors naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from learnforget.study import config as lfconfig
from learnforget.report import registry
from workflow_utils import REPO

DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TINY = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())


def test_default_and_tiny_configs_are_valid():
    for raw in (DEFAULT, TINY):
        cfg = lfconfig.validate(raw)
        assert cfg["analysis"]["fraction"] == 0.9
        assert cfg["evaluation"]["groups"]["forgetting"] == {"role": "forgetting", "tasks": ["lf_facts"],
                                                             "metric": "acc"}


def test_defaults_are_filled_for_a_minimal_config():
    cfg = lfconfig.validate({"runs": [{"name": "r", "domain": "math", "regime": "ift", "method": "lora"}],
                             "model": {"hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 2}})
    assert cfg["durations"] == {"unit": "epochs", "values": [1, 2, 4]}
    assert cfg["methods"]["lora"]["rank"] == 8
    assert cfg["threads"] == {"base": 2, "train": 1, "evaluate": 1, "analyze": 1}
    (run,) = lfconfig.expand_runs(cfg)
    assert run.labels == ("1", "2", "4") and run.dataset == "math_ift" and run.seed == 0


def test_runs_expand_with_overrides_and_continuation():
    cfg = lfconfig.validate(TINY)
    runs = {r.name: r for r in lfconfig.expand_runs(cfg)}
    assert runs["math-full"].train["lr"] == 1.0e-3 and runs["math-full"].train["seq_len"] == 64
    assert runs["code-lora"].dataset == "code_cpt"
    # constant schedule: each duration continues from the previous one
    assert runs["math-lora"].previous("1") is None and runs["math-lora"].previous("2") == "1"
    raw = copy.deepcopy(TINY)
    raw["finetune"]["schedule"] = "cosine"
    cosine = {r.name: r for r in lfconfig.expand_runs(lfconfig.validate(raw))}
    assert cosine["math-lora"].previous("2") is None


def test_train_params_hold_only_the_runs_own_settings():
    cfg = lfconfig.validate(TINY)
    run = lfconfig.expand_runs(cfg)[0]
    params = run.train_params("2")
    assert params["duration"] == 2.0 and params["previous"] == "1"
    assert "evaluation" not in params and "limit" not in str(params)


@pytest.mark.parametrize("duration,label", [(4, "4"), (4.0, "4"), (0.5, "0.5"), (1e6, "1000000"), (2.25, "2.25")])
def test_format_duration(duration, label):
    assert lfconfig.format_duration(duration) == label


def _with(path: str, value):
    raw = copy.deepcopy(TINY)
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    last = keys[-1]
    if value is DELETE:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return raw


DELETE = object()


def _with_all(*changes):
    raw = copy.deepcopy(TINY)
    for path, value in changes:
        raw = _apply(raw, path, value)
    return raw


def _apply(raw, path, value):
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return raw


BAD = [  # (what, config, the key path the error names, what its message must say: the offending value)
    ("unknown top-level key", _with("trainer", {}), "trainer", "unknown key 'trainer'"),
    ("unknown evaluation key", _with("evaluation.shots", 5), "evaluation.shots", "unknown key 'shots'"),
    ("run without a method", _with("runs.0.method", DELETE), "runs[0].method", "required key missing"),
    ("unknown method", _with("runs.0.method", "qlora"), "runs[0].method", "unknown method 'qlora'"),
    ("bad domain", _with("runs.0.domain", "biology"), "runs[0].domain", "'biology' is not one of"),
    ("bad regime", _with("runs.0.regime", "rlhf"), "runs[0].regime", "'rlhf' is not one of"),
    ("unsafe run name", _with("runs.0.name", "../escape"), "runs[0].name", "'../escape' does not match"),
    ("duplicate run name", _with("runs.1.name", "math-full"), "runs[1].name", "duplicate run name 'math-full'"),
    ("reserved run name", _with("runs.0.name", "base"), "runs[0].name", "'base' is reserved"),
    ("negative learning rate", _with("runs.0.train", {"lr": -1.0}), "runs[0].train.lr",
     "must be a positive number, got -1.0"),
    ("unknown train key", _with("finetune.learning_rate", 1e-3), "finetune.learning_rate",
     "unknown key(s) learning_rate"),
    ("durations not increasing", _with("durations.values", [2, 1]), "durations.values",
     "strictly increasing, got [2, 1]"),
    ("zero duration", _with("runs.0.durations", [0, 1]), "runs[0].durations[0]", "0 is less than or equal to"),
    ("bad duration unit", _with("durations.unit", "hours"), "durations.unit", "'hours' is not one of"),
    ("lora rank zero", _with("methods.lora.rank", 0), "methods.lora.rank", "must be a positive integer, got 0"),
    ("lora rank above width", _with("methods.lora.rank", 64), "methods.lora.rank",
     "rank 64 must be below the model width 64"),
    ("bad lora target", _with("methods.lora.target", "embeddings"), "methods.lora.target", "got 'embeddings'"),
    ("unknown method type", _with("methods.lora.type", "magic"), "methods.lora", "unknown method type 'magic'"),
    ("unknown task", _with("evaluation.groups", {"forgetting": {"role": "forgetting", "tasks": ["nope"],
                                                                "metric": "acc"}}),
     "evaluation.groups.forgetting.tasks[0]", "unknown task 'nope'"),
    ("no learning group for a run domain", _with("evaluation.groups", {"forgetting": {
        "role": "forgetting", "tasks": ["lf_facts"], "metric": "acc"}}), "evaluation.groups",
     "no learning group for the runs' domain 'code'"),
    ("unknown data key", _with("data.math.n_problems", 10), "data.math.n_problems", "unknown config key 'n_problems'"),
    ("bad data value", _with("data.source.n_entities", 1), "data.source.n_entities", "n_entities=1"),
    ("unknown base mix dataset", _with("base.mix", {"wikipedia": 1.0}), "base.mix.wikipedia",
     "unknown dataset 'wikipedia'"),
    ("no positive base mix weight", _with("base.mix", {"source": 0.0}), "base.mix", "positive weight"),
    ("zero analysis fraction", _with("analysis.fraction", 0), "analysis.fraction", "0 is less than or equal to"),
    ("model key missing", _with("model.hidden_size", DELETE), "model.hidden_size", "missing: hidden_size"),
    ("unknown model key", _with("model.n_layers", 2), "model.n_layers", "unknown arch keys: n_layers"),
    ("sequence longer than the context", _with("finetune.seq_len", 1024), "runs[0].train.seq_len",
     "1024 exceeds model.max_position_embeddings 256"),
    ("base sequence longer than the context", _with("base.train", {"seq_len": 512}), "base.train.seq_len",
     "512 exceeds"),
    ("threads zero", _with("threads.train", 0), "threads.train", "0 is less than the minimum of 1"),
    ("spectrum layer beyond the model", _with("analysis.spectrum", {"layer": 2}), "analysis.spectrum.layer",
     "layer 2 does not exist"),
    ("unknown spectrum module", _with("analysis.spectrum", {"module": "attn"}), "analysis.spectrum.module",
     "unknown module 'attn'"),
    ("bad analysis device", _with("analysis.device", "tpu"), "analysis.device", "'tpu' does not match"),
    ("negative swept learning rate", _with("runs.0.sweep", {"lr": [1e-3, -1e-3]}), "runs[0].sweep.lr[1]",
     "-0.001 is less than or equal to"),
    ("repeated seed", _with("runs.0.seeds", [1, 1]), "runs[0].seeds", "[1, 1] has non-unique elements"),
    ("a seed replicate's name taken", _with_all(("runs.0.seeds", [3]), ("runs.1.name", "math-full-s3")),
     "runs[1].name", "duplicate run name 'math-full-s3'"),
    ("fewshot for a task not in the group", _with("evaluation.groups", {
        "math": {"role": "learning", "domain": "math", "tasks": ["lf_math"], "metric": "exact_match",
                 "filter": "strict-match", "num_fewshot": {"gsm8k": 5}},
        "code": {"role": "learning", "domain": "code", "tasks": ["lf_code"], "metric": "bits_per_byte"},
        "forgetting": {"role": "forgetting", "tasks": ["lf_facts"], "metric": "acc"}}),
     "evaluation.groups.math.num_fewshot", "['gsm8k']"),
    ("packing a cpt run", _with("runs.2.packing", True), "runs[2].packing", "packing applies to ift runs"),
    ("grouping a cpt run by length", _with("runs.2.train.group_by_length", True), "runs[2].train.group_by_length",
     "group_by_length applies to ift runs without packing"),
    ("grouping the base by length", _with("base.train.group_by_length", True), "base.train.group_by_length",
     "packed text"),
    ("method name not filesystem-safe", _with("methods.lora/x", {"type": "lora"}), "methods.lora/x",
     "filesystem-safe"),
    ("bad keep policy", _with("keep.optimizer_state", "oldest"), "keep.optimizer_state", "'oldest' is not one of"),
    ("unknown keep key", _with("keep.checkpoints", "newest"), "keep.checkpoints", "unknown key 'checkpoints'"),
]


@pytest.mark.parametrize("what,raw,path,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key_path_and_the_value(what, raw, path, message):
    with pytest.raises(lfconfig.ConfigError) as err:
        lfconfig.validate(raw)
    assert err.value.path == path, str(err.value)
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith(f"config error at '{path}': ")


def test_the_bad_config_table_has_25_distinct_cases():
    assert len({b[0] for b in BAD}) == len(BAD) >= 25
    assert len({(b[2], b[3]) for b in BAD}) == len(BAD)


def test_load_reports_missing_and_malformed_files(tmp_path):
    with pytest.raises(lfconfig.ConfigError, match="not found"):
        lfconfig.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [\n")
    with pytest.raises(lfconfig.ConfigError, match="not valid YAML"):
        lfconfig.load(bad)


def test_cli_validate(capsys):
    from learnforget.cli import main

    assert main(["validate", str(REPO / "tests" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "3 runs" in out and "math-lora" in out and "continues" in out


def test_seeds_and_sweep_expand_into_series():
    raw = copy.deepcopy(TINY)
    raw["runs"][0]["seeds"] = [3, 4]
    raw["runs"][1]["sweep"] = {"lr": [1e-4, 2e-3]}
    raw["runs"][1]["seeds"] = [5, 6]
    cfg = lfconfig.validate(raw)
    runs = {r.name: r for r in lfconfig.expand_runs(cfg)}
    assert [n for n in runs if n.startswith("math-")] == [
        "math-full-s3", "math-full-s4", "math-lora-lr0.0001-s5", "math-lora-lr0.0001-s6",
        "math-lora-lr0.002-s5", "math-lora-lr0.002-s6"]
    assert runs["math-full-s4"].seed == 4 and runs["math-full-s4"].series == "math-full"
    lr = runs["math-lora-lr0.002-s6"]
    assert lr.series == "math-lora-lr0.002" and lr.train_config.lr == 2e-3 and lr.seed == 6
    assert lr.meta()["series"] == "math-lora-lr0.002" and lr.meta()["lr"] == 2e-3
    assert runs["code-lora"].series == "code-lora"  # untouched runs are their own series
    assert lfconfig.has_lr_sweep(list(runs.values()))
    assert "sensitivity" in registry.figure_names(cfg)
    # validating the expanded config again changes nothing (the report and scripts re-read it)
    again = lfconfig.validate(copy.deepcopy(cfg))
    assert [r["name"] for r in again["runs"]] == [r["name"] for r in cfg["runs"]]


def test_cli_plan_lists_every_run_and_names_what_does_not_fit(capsys, tmp_path):
    from learnforget.cli import main

    assert main(["plan", str(REPO / "tests" / "tiny.yaml"), "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for run in ("math-full", "math-lora", "code-lora"):
        assert f"  {run}: 1 GPU(s)" in out
    assert "trained" in out
    # a 7B-shaped model with full finetuning in fp32 does not fit one 24 GiB GPU without sharding
    raw = copy.deepcopy(TINY)
    raw["model"] = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
    raw["tokenizer"] = {"vocab_size": 32000}
    raw["methods"]["lora"]["rank"] = 16
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(big), "--gpu-memory", "24", "--max-gpus", "1"]) == 1
    out = capsys.readouterr().out
    assert "math-full: does not fit" in out
