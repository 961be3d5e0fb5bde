"""The Snakemake workflow: lint, dry runs, a tiny end-to-end study, and rerun behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from learnforget.core.io import read_json
from workflow_utils import REPO, planned_jobs, planned_outputs, snakemake

TINY = REPO / "tests" / "tiny.yaml"
DEFAULT = REPO / "config" / "config.yaml"


def test_lint_is_clean(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out


def test_snakefmt_is_clean():
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_default_dry_run_plans_every_stage(tmp_path):
    proc = snakemake(tmp_path, DEFAULT, "-n", "--cores", "2")
    jobs = planned_jobs(proc)
    cfg = yaml.safe_load(DEFAULT.read_text())
    n_runs = len(cfg["runs"])
    n_ckpt = sum(len(r.get("durations", cfg["durations"]["values"])) for r in cfg["runs"])
    assert jobs["data_source"] == jobs["data_math"] == jobs["data_code"] == 1
    assert jobs["tokenizer"] == 1 and jobs["base"] == 1 and jobs["report"] == 1
    assert jobs["train"] == n_ckpt and n_runs >= 4
    assert jobs["evaluate"] == n_ckpt + 1  # the base model is evaluated too
    assert jobs["analyze"] == n_ckpt
    # HumanEval and code samples are generated and scored on the base and the code runs
    n_code = sum(len(r.get("durations", cfg["durations"]["values"])) for r in cfg["runs"] if r["domain"] == "code")
    assert jobs["score"] == n_code + 1


def test_uncached_hub_dataset_stops_before_any_job_with_one_line(tmp_path, monkeypatch):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["evaluation"]["groups"]["math"] = {"role": "learning", "domain": "math", "tasks": ["gsm8k"],
                                           "metric": "exact_match", "filter": "strict-match", "num_fewshot": 5}
    paper = tmp_path / "hub.yaml"
    paper.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = snakemake(tmp_path, paper, "--cores", "1", check=False)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("learn-forget:")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "'gsm8k'" in lines[0] and "openai/gsm8k" in lines[0] and "evaluation.datasets" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
    # a dry run starts no job: it plans the study and only warns
    dry = snakemake(tmp_path, paper, "-n", check=False)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "learn-forget: warning (a real run stops here): evaluation task 'gsm8k'" in dry.stderr
    assert planned_jobs(dry)["evaluate"] > 0


def test_bad_config_stops_before_any_job(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["runs"][0]["method"] = "no-such-method"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, bad, "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "runs[0].method" in out and "no-such-method" in out


@pytest.mark.e2e
def test_tiny_study_artefacts(tiny_study):
    res = tiny_study / "results"
    metrics = pd.read_csv(res / "metrics.csv")
    for col in ["run", "method", "domain", "regime", "duration", "task", "metric", "value", "role"]:
        assert col in metrics.columns
    assert set(metrics["role"]) >= {"learning", "forgetting"}
    base = metrics[metrics["run"] == "base"]
    assert not base.empty and set(base["method"]) == {"base"} and set(base["duration"]) == {0}
    assert set(metrics["run"]) == {"base", "math-full", "math-lora", "code-lora"}
    assert metrics["value"].notna().all()
    spectral = pd.read_csv(res / "spectral.csv")
    for col in ["run", "duration", "layer", "module", "shape", "rank90", "rank90_base", "rank90_gaussian"]:
        assert col in spectral.columns
    lora = spectral[spectral["run"].str.endswith("lora")]
    assert not lora.empty and (lora["rank90"] <= 4).all()
    for fig in ["tradeoff", "learning", "forgetting", "spectral_ranks"]:
        assert (res / "figures" / f"{fig}.png").stat().st_size > 10_000
    report = (res / "report.md").read_text()
    for run in ["math-full", "math-lora", "code-lora"]:
        assert run in report
    assert "## Evaluation protocol" in report and "Generation diversity, lf_humaneval" in report
    assert "**Disk used per run (MiB)**" in report and "| math-full |" in report
    # the keep policy: superseded checkpoints dropped their training state, the newest kept it
    for dropped in ("math-full/1", "math-lora/1", "code-lora/trunk/1", "code-lora/1"):
        assert not (res / "runs" / dropped / "state.pt").exists(), dropped
        assert "state.pt" in read_json(res / "runs" / dropped / "dropped.json")["files"], dropped
    for kept in ("math-full/2", "math-lora/2", "code-lora/trunk/2", "code-lora/2"):
        assert (res / "runs" / kept / "state.pt").exists(), kept
    # sampled generations: HumanEval executed in the sandbox, code samples parsed; diversity rows
    div = metrics[metrics["role"] == "diversity"]
    assert set(div["task"]) == {"lf_humaneval", "lf_code_gen"}
    assert set(div["run"]) == {"base", "code-lora"} and len(div) == 2 * 3 * 3  # tasks x checkpoints x metrics
    passk = metrics[(metrics["task"] == "lf_humaneval") & (metrics["metric"] == "pass@1")]
    assert len(passk) == 3 and passk["value"].between(0, 1).all()
    ex = [json.loads(line) for line in (res / "evals" / "code-lora" / "2.executions.jsonl").read_text().splitlines()]
    assert len([e for e in ex if e["task"] == "lf_humaneval"]) == 3 * 2  # limit 3 problems x 2 samples
    assert all(e["status"] in ("passed", "failed", "timeout", "error") for e in ex if e["task"] == "lf_humaneval")
    groups = metrics[metrics["role"].isin(["learning", "forgetting"])]
    assert set(groups["task"]) == {"math", "code", "forgetting"}
    assert set(metrics[(metrics["run"] == "math-full")]["task"]) & {"code", "lf_code", "lf_humaneval"} == set()
    # checkpoints: full finetuning as an HF model, LoRA as a peft adapter
    assert (res / "runs" / "math-full" / "2" / "model" / "model.safetensors").exists()
    assert (res / "runs" / "math-lora" / "2" / "model" / "adapter_config.json").exists()
    # code-lora (wsd): a trunk per duration plus its cool-down branch
    trunk = read_json(res / "runs" / "code-lora" / "trunk" / "2" / "manifest.json")
    branch = read_json(res / "runs" / "code-lora" / "2" / "manifest.json")
    assert trunk["continued_from"].endswith("code-lora/trunk/1") and branch["continued_from"].endswith("trunk/2")
    assert branch["mode"] == "branch" and branch["start_step"] == trunk["step"] < branch["step"]
    assert not (res / "resume").exists() or not any((res / "resume").rglob("state.pt"))
    training = pd.read_csv(res / "training.csv")
    assert {"run", "part", "duration", "tokens_per_s", "mfu", "peak_memory_mib", "trainable_parameters",
            "total_parameters", "job_wall_seconds"} <= set(training.columns)
    assert len(training) == 6 + 2 + 1  # 3 runs x 2 durations, 2 trunks, the base
    assert (training["tokens_per_s"] > 0).all() and training["mfu"].between(0, 1, inclusive="neither").all()


@pytest.mark.e2e
def test_rerun_with_nothing_changed_does_nothing(tiny_study):
    proc = snakemake(tiny_study, TINY, "-n", "--cores", "2")
    assert planned_jobs(proc) == {}


@pytest.mark.e2e
def test_evaluation_setting_change_retrains_nothing(tiny_study, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["evaluation"]["limit"] = 10
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tiny_study, changed, "-n", "--cores", "2"))
    assert jobs.get("evaluate", 0) == 7  # base + 3 runs x 2 durations
    assert jobs.get("score", 0) == 3  # the base and code-lora's checkpoints: new samples logs
    assert "train" not in jobs and "base" not in jobs and "tokenize" not in jobs


@pytest.mark.e2e
def test_scoring_setting_change_regenerates_nothing(tiny_study, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["evaluation"]["groups"]["samples"]["k"] = [1, 2]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tiny_study, changed, "-n", "--cores", "2"))
    assert jobs == {"score": 3, "cards": 1, "report": 1, "all": 1}, jobs  # cards carry the scores


@pytest.mark.e2e
def test_adding_a_duration_trains_only_what_is_new(tiny_study, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["durations"]["values"] = [1, 2, 3]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tiny_study, changed, "-n", "--cores", "2")
    jobs = planned_jobs(proc)
    # constant runs continue from 2 epochs; the wsd run extends its trunk and branches a cool-down
    assert jobs.get("train") == 3 and jobs.get("train_trunk") == 1, jobs
    assert all(o.endswith("/3") for o in planned_outputs(proc, "train") + planned_outputs(proc, "train_trunk"))
    assert jobs.get("evaluate") == 3 and "base" not in jobs and "tokenize" not in jobs


@pytest.mark.e2e
def test_runtime_settings_retrain_nothing(tiny_study, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["finetune"].update(save_every_steps=5, save_every_minutes=1.0)
    cfg["threads"]["train"] = 2
    cfg["resources"] = {"cpu_processes": 2}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tiny_study, changed, "-n", "--cores", "2"))
    assert set(jobs) <= {"report", "cards", "all"}, jobs  # the report states the config, so it is redrawn


@pytest.mark.e2e
def test_learning_rate_change_retrains_that_run_only(tiny_study, tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["runs"][1]["train"] = {"lr": 5.0e-3}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tiny_study, changed, "-n", "--cores", "2")
    jobs = planned_jobs(proc)
    assert jobs.get("train") == 2, jobs
    outs = planned_outputs(proc, "train")
    assert outs and all("runs/math-lora/" in o for o in outs), outs
    assert "base" not in jobs


@pytest.mark.e2e
def test_same_seed_same_metrics_bytes_another_seed_other_numbers(tiny_study, tmp_path):
    """Determinism on CPU: a second run of the tiny study in another folder writes a
    byte-identical metrics.csv; another seed changes the numbers (checked on the base model)."""
    again = tmp_path / "again"
    again.mkdir()
    snakemake(again, TINY, "--cores", "2")
    assert (again / "results" / "metrics.csv").read_bytes() == (tiny_study / "results" / "metrics.csv").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    snakemake(other, TINY, "--cores", "2", "results/evals/base/0.json", config=["seed=8"])
    ours = read_json(tiny_study / "results" / "evals" / "base" / "0.json")["results"]
    theirs = read_json(other / "results" / "evals" / "base" / "0.json")["results"]
    assert ours["lf_facts"] != theirs["lf_facts"] and ours["lf_code"] != theirs["lf_code"]


@pytest.mark.e2e
def test_corrupt_checkpoint_is_quarantined_and_rebuilt(tiny_study, tmp_path):
    """A truncated checkpoint is found by its manifest checksum before the DAG is built, moved
    aside (nothing deleted) and planned again with what depends on it."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(tiny_study, work, symlinks=True)
    weights = work / "results" / "runs" / "math-full" / "1" / "model" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as fh:
        fh.truncate(size // 2)
    proc = snakemake(work, TINY, "-n", "--cores", "2")
    out = proc.stdout + proc.stderr
    assert "runs/math-full/1 is corrupt (model/model.safetensors" in out, out[-3000:]
    jobs = planned_jobs(proc)
    # math-full 1, and 2 which continues from it; their evaluations and analyses; the report
    assert jobs == {"train": 2, "evaluate": 2, "analyze": 2, "cards": 1, "report": 1, "all": 1}, jobs
    assert sorted(planned_outputs(proc, "train")) == ["results/runs/math-full/1", "results/runs/math-full/2"]
    kept = list((work / "results" / "quarantine" / "runs" / "math-full" / "1").glob("*/model/model.safetensors"))
    assert len(kept) == 1 and kept[0].stat().st_size == size // 2
    assert len(list((work / "results" / "quarantine").glob("report-*.md"))) == 1  # the stale report, kept


BROWSER = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _rendered_figures(html, names):
    """Open a `snakemake --report` HTML file in headless Chromium, show each figure through the
    report's own interface and return {name: (width, height, caption shown)} as rendered."""
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(html.as_uri())
        for name in names:
            page.get_by_text("Figures", exact=True).first.click()
            row = page.locator("tr", has_text=name).filter(has=page.get_by_text(name, exact=True))
            row.locator("a[iconname=eye]").click()
            img = page.locator(f"img[src*='filename={name}.png']")
            img.wait_for(timeout=10_000)
            size = img.evaluate("i => i.complete ? [i.naturalWidth, i.naturalHeight] : [0, 0]")
            page.get_by_text("Figures", exact=True).first.click()
            page.locator("tr", has_text=name).filter(has=page.get_by_text(name, exact=True)).locator(
                "a[iconname=information-circle]").click()
            caption = page.inner_text("body")
            out[name] = (size[0], size[1], caption)
            page.goto(html.as_uri())
        browser.close()
    assert not errors, errors
    return out


@pytest.mark.e2e
def test_seeds_sweep_report_and_html_report_in_a_browser(tiny_study, tmp_path):
    """Seeds and a learning-rate sweep on top of the tiny study: only the new runs train; the
    tables and figures aggregate the seeds; the report names every run; `snakemake --report`
    writes an HTML report whose every figure renders in headless Chromium with its caption."""
    import os
    import shutil

    work = tmp_path / "seeds"
    shutil.copytree(tiny_study, work, symlinks=True)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["runs"].append({"name": "sweep", "domain": "math", "regime": "ift", "method": "lora", "durations": [1],
                        "seeds": [1, 2], "sweep": {"lr": [1.0e-3, 3.0e-3]}})
    config = tmp_path / "seeds.yaml"
    config.write_text(yaml.safe_dump(cfg))
    names = ["sweep-lr0.001-s1", "sweep-lr0.001-s2", "sweep-lr0.003-s1", "sweep-lr0.003-s2"]
    proc = snakemake(work, config, "-n", "--cores", "2")
    assert sorted(planned_outputs(proc, "train")) == [f"results/runs/{n}/1" for n in names]
    snakemake(work, config, "--cores", "2")
    res = work / "results"
    metrics = pd.read_csv(res / "metrics.csv")
    sweep = metrics[metrics["run"].isin(names)]
    assert set(sweep["series"]) == {"sweep-lr0.001", "sweep-lr0.003"}
    assert set(sweep["seed"]) == {1, 2} and set(sweep["lr"]) == {1e-3, 3e-3}
    report = (res / "report.md").read_text()
    for run in ["math-full", "math-lora", "code-lora", *names]:
        assert f"| {run} |" in report, run
    assert "Learning-rate sensitivity" in report and "mean ± the 95% confidence interval" in report
    figures = ["tradeoff", "learning", "forgetting", "sensitivity", "diversity", "spectral_ranks",
               "spectral_modules", "spectrum"]
    for fig in figures:
        assert (res / "figures" / f"{fig}.png").stat().st_size > 10_000 and (res / "figures" / f"{fig}.pdf").exists()
    snakemake(work, config, "--report", "results/report.html")
    html = res / "report.html"
    assert html.stat().st_size > 100_000
    if not os.path.exists(BROWSER):
        if os.environ.get("LF_REQUIRE_BROWSER"):
            pytest.fail(f"{BROWSER} is missing (apt-get install chromium; .ci/run installs it)")
        pytest.skip(f"{BROWSER} is not installed: the HTML report was written but not opened")
    rendered = _rendered_figures(html, figures)
    for fig in figures:
        width, height, caption = rendered[fig]
        assert width > 300 and height > 200, (fig, width, height)
        caption_first = (REPO / "workflow" / "report" / f"{fig}.rst").read_text().split()[:4]
        assert " ".join(caption_first) in " ".join(caption.split()), (fig, caption[:500])


KILLS = [  # (rule, the output deleted so that one job of the rule reruns)
    ("train", "results/runs/math-lora/2"),
    ("evaluate", "results/evals/math-full/1.json"),
    ("score", "results/evals/code-lora/2.scored.json"),
    ("analyze", "results/spectral/math-full/2.csv"),
    ("report", "results/report.md"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("rule, output", KILLS, ids=[k[0] for k in KILLS])
def test_killed_job_then_plain_rerun_gives_identical_results(tiny_study, tmp_path, rule, output):
    """A job SIGKILLed at the worst moment (its output complete under a temporary name, not yet
    renamed) leaves nothing under the final name; a plain rerun ends with byte-identical tables."""
    import os
    import shutil

    from learnforget.core.io import CRASH_ENV

    work = tmp_path / "copy"
    shutil.copytree(tiny_study, work, symlinks=True)
    target = work / output
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    # a missing intermediate alone is not rebuilt while what depends on it is present (as with
    # temp() files), so the report goes too, as the integrity check's quarantine does
    (work / "results" / "report.md").unlink(missing_ok=True)
    env = {**os.environ, CRASH_ENV: f"*{output}"}  # jobs write relative paths
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                           str(work), "--configfile", str(TINY), "--cores", "2"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert f"Error in rule {rule}" in proc.stdout + proc.stderr
    assert not target.exists()  # nothing half-written under the final name
    assert list(target.parent.glob(f".{target.name}.*.tmp"))  # the killed job's staging folder
    snakemake(work, TINY, "--cores", "2")
    for table in ("metrics.csv", "spectral.csv"):
        assert (work / "results" / table).read_bytes() == (tiny_study / "results" / table).read_bytes(), table
    assert target.exists() and not list(target.parent.glob(f".{target.name}.*.tmp"))  # cleaned up
