"""The `gpu-cluster` SLURM profile and the per-job resources (learnforget.cluster.resources): the profile
is found from the repository root as typed, its dry run shows the GPU plan, and a submission
through a fake `sbatch` asks for the planned GPUs, memory and time."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from learnforget.study import config as lfconfig
from learnforget.cluster import resources as lfres
from learnforget.cluster import planner
from workflow_utils import REPO

TINY = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
PROFILE = REPO / "profiles" / "gpu-cluster" / "config.v8+.yaml"
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False}
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
            "num_key_value_heads": 16, "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _config(model=None, resources=None, finetune=None, runs=None, durations=None) -> dict:
    raw = copy.deepcopy(TINY)
    if model is not None:
        raw["model"] = model
        raw["tokenizer"] = {"vocab_size": 32000}
        raw["methods"] = {"full": {"type": "full"}, "lora": {"type": "lora", "rank": 16, "alpha": 32, "target": "all"}}
        raw["finetune"] = {"batch_size": 16, "seq_len": 1024, "precision": "bf16", "lr": 1.0e-4}
    if finetune is not None:
        raw["finetune"] = {**raw["finetune"], **finetune}
    if runs is not None:
        raw["runs"] = runs
    if durations is not None:
        raw["durations"] = durations
    raw["resources"] = resources or {}
    return lfconfig.validate(raw)


def _runs(cfg) -> dict:
    return {r.name: r for r in lfconfig.expand_runs(cfg)}


# ----------------------------------------------------------------------------- the profile
def test_profile_file_holds_the_slurm_settings_and_one_site_block():
    text = PROFILE.read_text()
    prof = yaml.safe_load(text)
    assert prof["executor"] == "slurm"
    assert prof["software-deployment-method"] == "conda"
    assert prof["retries"] >= 1 and prof["latency-wait"] >= 10 and prof["jobs"] >= 1
    assert prof["rerun-incomplete"] is True and prof["printshellcmds"] is True
    # site-specific values in one place: the default resources, marked for editing
    assert prof["default-resources"]["slurm_partition"] == "gpu"
    assert "runtime" in prof["default-resources"]
    edit_lines = [line for line in text.splitlines() if "EDIT" in line]
    assert any("slurm_partition" in line for line in edit_lines)
    assert any("slurm_account" in line for line in edit_lines)
    # GPUs, memory and time are the workflow's, derived from the config, not fixed here
    assert not {"gpu", "mem_mb", "set-resources"} & (set(prof["default-resources"]) | set(prof))
    # every rule's conda environment exists
    env = yaml.safe_load((REPO / "envs" / "learnforget.yaml").read_text())
    assert "python=3.11" in env["dependencies"]


def test_profile_name_resolves_from_the_repository_root(monkeypatch):
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(REPO)
    found = get_profile_dir("gpu-cluster")
    assert found is not None, "snakemake --profile gpu-cluster does not find the profile from the repo root"
    folder, config_file = found
    assert Path(config_file).resolve() == PROFILE.resolve()
    # the root entry is a relative link (it still works in a copy of the repository)
    link = REPO / "gpu-cluster"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))


def _fake_bin(tmp_path: Path, record: Path) -> Path:
    """conda (what Snakemake asks before a dry run) and the SLURM commands the plugin calls:
    sbatch records its arguments (one JSON list per call) and prints a job id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "conda": """\
            #!/bin/sh
            case "$*" in
              "--version") echo "conda 24.11.0" ;;
              "info --json") echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}' ;;
              "config --get channel_priority --json") echo '{"get": {"channel_priority": "strict"}}' ;;
              *) echo "fake conda: $*" >&2; exit 1 ;;
            esac
            """,
        "sbatch": f"""\
            #!{sys.executable}
            import json, sys
            with open({str(record)!r}, "a") as f:
                f.write(json.dumps(sys.argv[1:]) + "\\n")
            print(4242)
            """,
    }
    for name in ("squeue", "sacct", "sinfo", "scancel", "scontrol", "sshare", "sacctmgr"):
        scripts[name] = "#!/bin/sh\nexit 0\n"
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(textwrap.dedent(body))
        path.chmod(0o755)
    return bin_dir


def _env(bin_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _snakemake(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--profile", "gpu-cluster", *args]


def test_profile_dry_run_of_the_tiny_study_is_quiet_on_cpus(tmp_path):
    bin_dir = _fake_bin(tmp_path, tmp_path / "sbatch.jsonl")
    proc = subprocess.run(_snakemake("-n", "--directory", str(tmp_path / "work"), "--configfile",
                                     str(REPO / "tests" / "tiny.yaml")),
                          cwd=REPO, env=_env(bin_dir), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Using profiles? gpu-cluster", out)  # with the workflow profile: "profiles gpu-cluster and ..."
    assert "learn-forget plan" not in out  # resources.gpu: 0 prints no plan
    train = [line for line in out.splitlines() if "resources:" in line and "cpus_per_task" in line]
    assert train and all("gpu=0" in line and "slurm_partition=gpu" in line for line in train)
    assert not (tmp_path / "sbatch.jsonl").exists()


def test_profile_dry_run_prints_each_runs_gpu_plan_once(tmp_path):
    bin_dir = _fake_bin(tmp_path, tmp_path / "sbatch.jsonl")
    raw = copy.deepcopy(TINY)
    raw["resources"] = {"gpu": "auto"}
    cfg = tmp_path / "auto.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(_snakemake("-n", "--directory", str(tmp_path / "work"), "--configfile", str(cfg)),
                          cwd=REPO, env=_env(bin_dir), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = [line for line in out.splitlines() if line.startswith("learn-forget plan: train ")]
    assert len(lines) == len(raw["runs"]), out[-4000:]
    for run in raw["runs"]:
        (line,) = [x for x in lines if x.startswith(f"learn-forget plan: train {run['name']}: ")]
        assert "1 GPU(s) (auto)" in line and "GiB/GPU x 1" in line and "host " in line and "runtime" in line
    assert "gpu=1" in out and "Job stats:" in out


# ----------------------------------------------------------------------------- submission
def _fake_checkpoint(folder: Path) -> None:
    """A base model folder that passes the integrity scan (a manifest with its files' hashes)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    digest = hashlib.sha256(b"{}").hexdigest()
    (folder / "manifest.json").write_text(json.dumps({"kind": "base", "files": {"config.json": digest}}))


def test_slurm_submission_asks_for_the_planned_gpus_memory_and_time(tmp_path):
    """A 7B-shaped LoRA run with gpu: auto, submitted through the profile to a fake sbatch: the
    train job's sbatch call carries the planner's GPUs, its host memory and the runtime estimated
    from the tokenized data (its meta.json), the partition from the profile."""
    record = tmp_path / "sbatch.jsonl"
    bin_dir = _fake_bin(tmp_path, record)
    raw = copy.deepcopy(TINY)
    raw.update(model=LLAMA_7B, tokenizer={"vocab_size": 32000},
               methods={"lora": {"type": "lora", "rank": 16, "alpha": 32, "target": "all"}},
               finetune={"batch_size": 16, "seq_len": 512, "precision": "bf16", "lr": 1.0e-4},
               resources={"gpu": "auto"})
    raw["runs"] = [r for r in raw["runs"] if r["method"] == "lora"]
    cfg_file = tmp_path / "big.yaml"
    cfg_file.write_text(yaml.safe_dump(raw))
    work = tmp_path / "work"
    _fake_checkpoint(work / "results" / "base" / "model")
    tokens = work / "results" / "tokens" / "math_ift"
    tokens.mkdir(parents=True)
    (tokens / "meta.json").write_text(json.dumps({"regime": "ift", "n_docs": 200_000, "n_tokens": 30_000_000}))

    cfg = lfconfig.validate(raw)
    run = _runs(cfg)["math-lora"]
    plan = lfres.train_plan(cfg, run)
    runtime = lfres.train_runtime(cfg, run, "1", gpus=plan["gpus"], token_dir=tokens)
    assert plan["gpus"] == 2 and plan["mem_mb"] == 55812
    assert runtime > cfg["resources"]["min_runtime"]  # from the tokens, not the floor

    # conda environments are built before submission: not here (no conda), so env-modules
    # (no rule has one) replaces the profile's deployment method
    cmd = _snakemake("results/runs/math-lora/1", "--directory", str(work), "--configfile", str(cfg_file),
                     "--sdm", "env-modules", "--allowed-rules", "train")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(bin_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 60
    try:
        while (time.time() < deadline and proc.poll() is None
               and not (record.exists() and record.read_text().endswith("\n"))):
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # it would now wait for the job: the submission is all we need
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert record.exists(), f"sbatch was not called:\n{out[-4000:]}"
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    args = calls[0]
    assert "--gpus=2" in args, args
    assert args[args.index("--mem") + 1] == "55812", args
    assert args[args.index("-t") + 1] == str(runtime), args
    assert "--cpus-per-task=2" in args  # 2 processes x 1 thread
    assert args[args.index("-p") + 1] == "gpu"
    assert any("rule_train_wildcards_math-lora_1" in a for a in args)
    assert "learn-forget plan: train math-lora: 2 GPU(s) (auto), host 55812 MiB" in out


# ----------------------------------------------------------------------------- resources
def test_7b_lora_gets_gpus_from_the_planner_and_full_finetuning_is_sharded():
    cfg = _config(LLAMA_7B, {"gpu": "auto"}, finetune={"seq_len": 512})
    runs = _runs(cfg)
    lora = lfres.train_plan(cfg, runs["math-lora"])
    assert lora["mode"] == "auto" and lora["gpus"] == 2 and lora["mem_mb"] == 55812
    assert lora["per_gpu_mb"] <= 0.9 * 80 * 1024
    assert "GiB/GPU x 2 DDP" in lora["summary"]
    # full finetuning shards its 16 bytes per parameter over the GPUs (FSDP): 3 of 80 GB; the
    # main process also gathers the float32 weights and AdamW's two states (48 bytes/param) to save
    full = lfres.train_plan(cfg, runs["math-full"])
    assert full["gpus"] == 3 and "GiB/GPU x 3 FSDP" in full["summary"]
    assert full["per_gpu_mb"] <= 0.9 * 80 * 1024 and full["mem_mb"] == 237490
    # replicated (DDP, as adapter methods are) no GPU count would fit it
    with pytest.raises(ValueError, match="does not fit on up to 8 GPU"):
        planner.plan_gpus(cfg["model"], {"type": "full"}, batch_size=16, seq_len=512, vocab_size=32000,
                          fsdp=False, optimizer="adamw")
    # on bigger GPUs LoRA needs fewer
    assert lfres.train_plan(_config(LLAMA_7B, {"gpu": "auto", "gpu_memory_gb": 141}, finetune={"seq_len": 512}),
                            runs["math-lora"])["gpus"] == 1


def test_full_finetuning_needs_more_gpus_and_memory_than_lora():
    cfg = _config(LLAMA_1B, {"gpu": "auto"})
    runs = _runs(cfg)
    full, lora = (lfres.train_plan(cfg, runs[name]) for name in ("math-full", "math-lora"))
    assert (full["gpus"], lora["gpus"]) == (2, 1)
    # a float32 model per process + 2 GiB, and for FSDP the main process's gather to save
    assert (full["mem_mb"], lora["mem_mb"]) == (40527, 7311)
    assert full["mem_mb"] > 2 * lora["mem_mb"] * 0.9
    # a fixed count is kept, and flagged when the plan exceeds a GPU
    fixed = lfres.train_plan(_config(LLAMA_1B, {"gpu": 1}), runs["math-full"])
    assert fixed["gpus"] == 1 and fixed["mode"] == "fixed" and not fixed["fits"]
    assert lfres.train_plan(_config(LLAMA_1B, {"gpu": 4}), runs["math-full"])["fits"]


def test_no_gpus_gives_cpu_jobs_with_the_cpu_estimate():
    cfg = _config()
    assert cfg["resources"]["gpu"] == 0 and not lfres.wants_gpus(cfg)
    plans = lfres.train_plans(cfg, _runs(cfg).values())
    assert set(plans) == {r["name"] for r in TINY["runs"]}
    for plan in plans.values():
        assert plan["gpus"] == 0 and plan["mode"] == "cpu"
        assert 2048 < plan["mem_mb"] < 4096  # 2 GiB process baseline + the tiny model's state
    assert lfres.train_cpus(cfg, 0, 1) == 1
    assert lfres.train_cpus(_config(resources={"cpu_processes": 3}), 0, 2) == 6
    assert lfres.wants_gpus(_config(resources={"gpu": "auto"})) and lfres.wants_gpus(_config(resources={"gpu": 2}))


def test_cpu_jobs_of_a_method_without_memory_model_are_sized_as_full_finetuning(monkeypatch):
    real = lfres.planner.gpu_plan_for_job

    def no_lora_model(arch, method, *args, **kwargs):
        if method["type"] == "lora":
            raise ValueError("no parameter model")
        return real(arch, method, *args, **kwargs)

    monkeypatch.setattr(lfres.planner, "gpu_plan_for_job", no_lora_model)
    cfg = _config()
    runs = _runs(cfg)
    lora, full = lfres.train_plan(cfg, runs["math-lora"]), lfres.train_plan(cfg, runs["math-full"])
    assert lora["mem_mb"] == full["mem_mb"] and "sized as full finetuning" in lora["summary"]
    with pytest.raises(ValueError):  # on GPUs it stops the workflow instead
        lfres.train_plan(_config(resources={"gpu": "auto"}), runs["math-lora"])


def test_runtime_grows_with_the_duration_and_shrinks_with_gpus(tmp_path):
    tokens = tmp_path / "math_ift"
    tokens.mkdir()
    (tokens / "meta.json").write_text(json.dumps({"regime": "ift", "n_docs": 100_000, "n_tokens": 9_000_000}))
    durations = {"unit": "epochs", "values": [0.5, 1, 2, 4]}
    # a cosine schedule restarts from the base for every duration: each job trains it all
    cfg = _config(LLAMA_7B, {"gpu": "auto", "min_runtime": 1}, finetune={"seq_len": 512, "schedule": "cosine"},
                  durations=durations)
    run = _runs(cfg)["math-lora"]
    assert run.mode == "restart"
    times = [lfres.train_runtime(cfg, run, lab, gpus=2, token_dir=tokens) for lab in run.labels]
    assert times == sorted(times) and times[-1] > 6 * times[0]
    # items per epoch from meta.json (IFT: documents), tokens = steps x batch x seq_len
    tok, exact = lfres.train_tokens(cfg, run, "1", token_dir=tokens)
    assert exact and tok == math.ceil(100_000 / 16) * 16 * 512
    # more GPUs: shorter; a retry: twice as long; the floor holds for tiny jobs
    assert lfres.train_runtime(cfg, run, "4", gpus=4, token_dir=tokens) < times[-1]
    assert lfres.train_runtime(cfg, run, "4", gpus=2, token_dir=tokens, attempt=2) == 2 * times[-1]
    assert lfres.train_runtime(_config(), _runs(_config())["math-lora"], "1", gpus=0) == 30
    # a constant schedule continues the previous checkpoint: each job trains only its part
    cont = _config(LLAMA_7B, {"gpu": "auto"}, finetune={"seq_len": 512}, durations=durations)
    crun = _runs(cont)["math-lora"]
    assert crun.mode == "continue"
    parts = [lfres.train_tokens(cont, crun, lab, token_dir=tokens)[0] for lab in crun.labels]
    whole = lfres.train_tokens(cfg, run, "4", token_dir=tokens)[0]
    assert sum(parts) == whole and parts[-1] == whole // 2
    # before tokenization items per epoch come from the config (each record one window)
    tok, exact = lfres.train_tokens(cfg, run, "1")
    assert not exact and tok == math.ceil(TINY["data"]["math"]["n_train"] / 16) * 16 * 512


def test_trunk_and_branch_jobs_split_the_steps():
    cfg = _config(resources={"gpu": 1})
    run = _runs(cfg)["code-lora"]  # wsd with a cool-down: trunks and branches
    assert run.mode == "branch"
    items, _ = lfres.items_per_epoch(cfg, run)
    trunk = lfres.job_steps(run, "2", "trunk", items)
    final = lfres.job_steps(run, "2", "final", items)
    assert trunk[0] == lfres.job_steps(run, "1", "trunk", items)[1]  # from the previous trunk
    assert final[0] == trunk[1] and final[1] > final[0]  # the cool-down branch off its own trunk


def test_stage_resources_and_config_overrides():
    cfg = _config(LLAMA_7B, {"gpu": "auto"})
    run = _runs(cfg)["math-lora"]
    params = 6_738_415_616
    assert lfres.evaluate_mem_mb(cfg) == math.ceil((8 * params + 4 * 2**30) / 2**20)
    assert lfres.evaluate_mem_mb(cfg, run) > lfres.evaluate_mem_mb(cfg)  # the adapter on top
    assert 2048 < lfres.analyze_mem_mb(cfg) < 8 * 1024
    assert lfres.base_mem_mb(_config()) > 2048 and lfres.base_runtime(_config()) >= 30
    fixed = _config(resources={"base": {"mem_mb": 1234, "runtime": 5}, "evaluate": {"mem_mb": 999},
                               "analyze": {"mem_mb": 777, "gpu": 1}})
    assert lfres.base_mem_mb(fixed) == 1234 and lfres.base_runtime(fixed, attempt=2) == 10
    assert lfres.evaluate_mem_mb(fixed) == 999 and lfres.analyze_mem_mb(fixed) == 777
    # base: exact token counts when the folders are there
    assert lfres.dataset_records(_config(), "math_ift") == TINY["data"]["math"]["n_train"]
    assert lfres.dataset_records(_config(), "code_cpt") == TINY["data"]["code"]["max_records_train"]


def test_resources_schema_and_no_effect_on_what_trains():
    assert _config(resources={"gpu": "auto"})["resources"]["gpu"] == "auto"
    for bad in ("many", -1, 1.5):
        with pytest.raises(lfconfig.ConfigError, match="resources.gpu"):
            _config(resources={"gpu": bad})
    with pytest.raises(lfconfig.ConfigError, match="resources.mfu"):
        _config(resources={"mfu": 1.5})
    filled = _config()["resources"]
    assert filled["gpu_memory_gb"] == 80 and filled["max_gpus"] == 8 and filled["gpu_tflops"]["bf16"] == 989
    # resources are not in a train job's params: changing them retrains nothing
    a, b = _config(), _config(resources={"gpu": "auto", "gpu_memory_gb": 24, "mfu": 0.5})
    for (name, ra), rb in zip(_runs(a).items(), _runs(b).values()):
        for label in ra.labels:
            assert ra.train_params(label) == rb.train_params(label), name


def test_max_runtime_buys_gpus_for_long_runs_and_flags_what_still_does_not_fit():
    """resources.max_runtime: with gpu: auto, a run whose longest job outlasts the limit on the
    GPUs its memory needs gets more (the runtime estimate falls with the count), up to max_gpus;
    a job still too long is flagged in its plan line."""
    durations = {"unit": "tokens", "values": [2.0e8, 1.0e9]}
    base = {"gpu": "auto", "gpu_memory_gb": 141}
    short = {"seq_len": 512}
    cfg = _config(LLAMA_7B, base, finetune=short, durations=durations)
    run = _runs(cfg)["math-lora"]
    by_memory = lfres.train_plan(cfg, run)
    minutes = lfres.longest_job_minutes(cfg, run, by_memory["gpus"])
    assert by_memory["gpus"] == 1 and "over_runtime" not in by_memory
    # a limit of half the single-GPU time needs 2 GPUs
    cfg2 = _config(LLAMA_7B, {**base, "max_runtime": minutes // 2 + 1}, finetune=short, durations=durations)
    two = lfres.train_plan(cfg2, run)
    assert two["gpus"] == 2 and two["over_runtime"] is False and "resources.max_runtime" in two["summary"]
    assert lfres.longest_job_minutes(cfg2, run, 2) <= minutes // 2 + 1 < lfres.longest_job_minutes(cfg2, run, 1)
    # a limit no GPU count meets: max_gpus, flagged in the dry-run line
    cfg3 = _config(LLAMA_7B, {**base, "max_runtime": 1, "max_gpus": 4}, finetune=short, durations=durations)
    plans = lfres.train_plans(cfg3, [run])
    assert plans[run.name]["gpus"] == 4 and plans[run.name]["over_runtime"] is True
    line = lfres.plan_lines(cfg3, [run], plans)[0]
    assert "longer than resources.max_runtime (1 min) even on 4 GPUs" in line
