"""Evaluation speed on the default study's base model; ratios against baselines of the same run.

    snakemake --cores 2            # the default study first (its base model, data and jobs)
    python bench/eval.py           # prints a markdown table and writes bench/eval-results.md

- log-likelihood: examples/s on the fact quiz (lf_facts, 4 choices per question) through
  ``learnforget.evaluation.evaluate_checkpoint`` vs ``lm_eval.simple_evaluate`` called
  directly on the same model object and task (the baseline);
- generation: new tokens/s for greedy math answers (lf_math) and for sampled code (lf_code_gen,
  5 samples per problem), and sampled vs greedy;
- fixed overhead per evaluation job: from the default study's own jobs (their Snakemake
  benchmark TSVs and the timings in their JSONs): process start, imports, task indexing and
  loading, model load, as a share of the job's wall time; and the evaluation stage's wall
  time (evaluate + score jobs) in the study.
Timings depend on the machine and its load; the table records both.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from learnforget.evaluation import evaluate_checkpoint, render_tasks  # noqa: E402
from learnforget.io import write_text  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "1"))  # the study's evaluate jobs use 1 thread
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "results"))


def _sampled(task, samples, limit, max_gen_toks=96):
    return {"task": task, "group": "bench", "num_fewshot": None, "limit": limit, "batch_size": 32,
            "sampling": {"samples": samples, "temperature": 0.2, "top_p": 0.95, "max_gen_toks": max_gen_toks,
                         "scorer": "syntax"}}


def _plain(task, limit=None):
    return {"task": task, "group": "bench", "num_fewshot": None, "limit": limit, "batch_size": 32, "sampling": None}


def ours(model, data, plan, tmp, name):
    out = evaluate_checkpoint(model, plan, data, tmp / f"{name}.json", tokenizer_dir=model,
                              log_samples_path=tmp / f"{name}.samples.jsonl")
    recs = [json.loads(line) for line in (tmp / f"{name}.samples.jsonl").read_text().splitlines()]
    return out, recs


def direct_lm_eval(model, data, task, tmp) -> float:
    """Seconds of lm_eval.simple_evaluate on ``task`` with a model built directly (baseline)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    render_tasks([task], data, tmp / "direct-tasks", cache_dir=str(tmp / "direct-cache"))
    tm = TaskManager(include_path=str(tmp / "direct-tasks"), include_defaults=False)
    lm = HFLM(pretrained=str(model), batch_size=32, device="cpu", dtype="float32")
    t0 = time.perf_counter()
    lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, bootstrap_iters=0, random_seed=0,
                            numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return time.perf_counter() - t0


def new_tokens(model, recs, key) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [r for rec in recs for r in (rec[key] if isinstance(rec[key], list) else [rec[key]])]
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts if t)


def study_jobs(results: Path) -> dict:
    """Wall seconds of the study's evaluate and score jobs (benchmark TSVs) and the evaluate
    jobs' lm-eval time (their JSONs' timing_s.evaluate)."""
    out = {"evaluate_s": [], "evaluating_s": [], "score_s": [], "timing": []}
    for tsv in sorted((results / "benchmarks" / "evaluate").rglob("*.tsv")):
        with open(tsv) as fh:
            out["evaluate_s"].append(float(next(csv.DictReader(fh, delimiter="\t"))["s"]))
        js = results / "evals" / tsv.parent.name / (tsv.stem + ".json")
        timing = json.loads(js.read_text())["timing_s"]
        out["evaluating_s"].append(timing["evaluate"])
        out["timing"].append(timing)
    for tsv in sorted((results / "benchmarks" / "score").rglob("*.tsv")):
        with open(tsv) as fh:
            out["score_s"].append(float(next(csv.DictReader(fh, delimiter="\t"))["s"]))
    return out


def main() -> None:
    model, data = RESULTS / "base" / "model", RESULTS / "data"
    if not (model / "config.json").is_file():
        sys.exit(f"bench/eval.py needs the default study's base model in {model}: run `snakemake --cores 2` first")
    torch.set_num_threads(THREADS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours(model, data, [_plain("lf_facts")], tmp, "warm-up")  # imports, dataset caches
        ours_s, base_s = float("inf"), float("inf")
        for i in range(REPEATS):  # alternated, best of each: a 2-core machine's noise is ~20%
            base_s = min(base_s, direct_lm_eval(model, data, "lf_facts", tmp))
            out, _ = ours(model, data, [_plain("lf_facts")], tmp, f"facts{i}")
            ours_s = min(ours_s, out["timing_s"]["evaluate"])
        n_quiz = out["n-samples"]["lf_facts"]["effective"]
        rows.append(("log-likelihood: fact quiz examples/s (4 choices each)", f"{n_quiz / ours_s:.1f}",
                     f"{n_quiz / base_s:.1f} (lm-eval directly)", f"{base_s / ours_s:.2f}x"))

        out, recs = ours(model, data, [_plain("lf_math", limit=100)], tmp, "math")
        greedy_tps = new_tokens(model, recs, "response") / out["timing_s"]["evaluate"]
        out, recs = ours(model, data, [_sampled("lf_code_gen", 5, 20)], tmp, "code")
        sampled_tps = new_tokens(model, recs, "responses") / out["timing_s"]["evaluate"]
        rows.append(("generation: new tokens/s, greedy math answers (100 problems)", f"{greedy_tps:.0f}", "", ""))
        rows.append(("generation: new tokens/s, sampled code (20 functions x 5 samples, 96 tokens max)",
                     f"{sampled_tps:.0f}", f"{greedy_tps:.0f} (greedy math)", f"{sampled_tps / greedy_tps:.2f}x"))

    jobs = study_jobs(RESULTS)
    if jobs["evaluate_s"]:
        n = len(jobs["evaluate_s"])
        parts = {k: sum(t[k] for t in jobs["timing"]) / n for k in ("import", "task_index", "task_load", "model_load")}
        start = sum(w - t["total"] for w, t in zip(jobs["evaluate_s"], jobs["timing"])) / n
        rows.append(("study: fixed cost per evaluate job, s (process start and Snakemake script set-up "
                     f"{start:.1f}, imports {parts['import']:.1f}, task index {parts['task_index']:.2f}, "
                     f"task load {parts['task_load']:.1f}, model load {parts['model_load']:.2f})",
                     f"{start + sum(parts.values()):.1f}", f"{sum(jobs['evaluate_s']) / n:.1f} (mean job)",
                     f"{(start + sum(parts.values())) * n / sum(jobs['evaluate_s']):.0%}"))
        wall, evaluating = sum(jobs["evaluate_s"]), sum(jobs["evaluating_s"])
        rows.append((f"study: evaluate jobs ({len(jobs['evaluate_s'])}), wall s in all",
                     f"{wall:.0f}", f"{evaluating:.0f} (lm-eval evaluating)",
                     f"{(wall - evaluating) / wall:.0%} fixed overhead"))
        rows.append((f"study: score jobs ({len(jobs['score_s'])}: sandboxed HumanEval, parsing, diversity), wall s",
                     f"{sum(jobs['score_s']):.0f}", "", ""))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {THREADS} thread(s)"
    lines = ["| measurement | ours | baseline | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    table = "\n".join(lines)
    text = f"# Evaluation benchmark\n\nMachine: {machine}; {time.strftime('%Y-%m-%d')}.\n\n{table}\n"
    print(text)
    write_text(ROOT / "bench" / "eval-results.md", text)


if __name__ == "__main__":
    main()
