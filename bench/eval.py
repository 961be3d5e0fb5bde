"""Evaluation speed on the default study's base model; ratios against baselines of the same run.

    snakemake --cores 2            # the default study first (its base model, data and jobs)
    python bench/eval.py [STUDY]   # prints a markdown table and writes bench/eval-results.md

STUDY is a folder holding a finished default study's ``results/`` (default: this repository;
``BENCH_RESULTS`` names a results folder directly). Rows:

- ours vs lm-eval called directly, on the same checkpoint, task, batch size, limit, generation
  settings and seeds: ``learnforget.evaluate.harness.evaluate_checkpoint`` (its ``timing_s.evaluate``)
  against ``lm_eval.simple_evaluate`` on an HFLM of the same folder, with the task objects built
  before the clock starts on both sides (the baseline). Each pair is run alternately, best of
  ``BENCH_REPEATS``; the outputs column compares the two runs' per-sample records (their
  log-likelihoods, their completions) and metrics:
  - log-likelihood: examples/s on the fact quiz (lf_facts, 4 choices per question);
  - generation: new tokens/s (tokens of the completions as scored, after the cut at the stop
    sequence) for greedy math answers (lf_math) and for sampled code (lf_code_gen, 5 samples per
    problem at temperature 0.2, top-p 0.95);
- the glibc heap setting (``learnforget.core.perf.tune_allocator``, applied by ``evaluate_checkpoint``
  and process-wide, so the rows above have it on both sides): rolling log-likelihood of held-out
  source (lf_code, 32 x 512-token windows per batch) in two processes, with it and with
  ``LEARNFORGET_MALLOC=default``;
- fixed overhead per evaluation job: from the default study's own jobs (their Snakemake
  benchmark TSVs and the timings in their JSONs): process start, imports, task indexing and
  loading, model load, as a share of the job's wall time; and the evaluation stage's wall
  time (evaluate + score jobs) in the study. These come from when the study ran, not from this
  run's code.
Timings depend on the machine and its load; the table records both (load average at the start
and the end).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from learnforget.evaluate.harness import compact_sample, evaluate_checkpoint  # noqa: E402
from learnforget.evaluate.tasks import render_tasks  # noqa: E402
from learnforget.core.io import write_text  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "1"))  # the study's evaluate jobs use 1 thread
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
SEED = 1234  # evaluate_checkpoint's default seed, used by the baseline as well


def _sampled(task, samples, limit, max_gen_toks=96):
    return {"task": task, "group": "bench", "num_fewshot": None, "limit": limit, "batch_size": 32,
            "sampling": {"samples": samples, "temperature": 0.2, "top_p": 0.95, "max_gen_toks": max_gen_toks,
                         "scorer": "syntax"}}


def _plain(task, limit=None):
    return {"task": task, "group": "bench", "num_fewshot": None, "limit": limit, "batch_size": 32, "sampling": None}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ours(model, data, item, tmp) -> tuple[float, dict, list[dict]]:
    """Seconds of ``evaluate_checkpoint``'s evaluation (``timing_s.evaluate``), its results and
    its per-sample records."""
    out = evaluate_checkpoint(model, [item], data, tmp / "ours.json", tokenizer_dir=model,
                              log_samples_path=tmp / "ours.samples.jsonl", seed=SEED)
    return out["timing_s"]["evaluate"], out, _records(tmp / "ours.samples.jsonl")


def direct(model, data, item, tmp) -> tuple[float, dict, list[dict]]:
    """The baseline: seconds of ``lm_eval.simple_evaluate`` on the plan item's task, with an
    HFLM built directly from the same folder and the task objects built beforehand (as
    ``evaluate_checkpoint`` does), the same batch size, limit, seeds and generation settings;
    its results and its per-sample records in our format."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task, sampled = item["task"], item["sampling"] is not None
    render_tasks([task], data, tmp / "direct-tasks", cache_dir=str(tmp / "direct-cache"),
                 sampling={task: item["sampling"]} if sampled else None)
    tm = TaskManager(include_path=str(tmp / "direct-tasks"), include_defaults=False)
    objs = list(tm.load([task])["tasks"].values())
    lm = HFLM(pretrained=str(model), batch_size=item["batch_size"], device="cpu", dtype="float32")
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, limit=item["limit"], bootstrap_iters=0,
                                  log_samples=True, random_seed=SEED, numpy_random_seed=SEED,
                                  torch_random_seed=SEED, fewshot_random_seed=SEED)
    seconds = time.perf_counter() - t0
    output_type = out["configs"][task]["output_type"]
    return seconds, out, [compact_sample(task, s, output_type, sampled) for s in out["samples"][task]]


def compare(ours_out, ours_recs, base_out, base_recs, task) -> str:
    """The outputs cell: how many documents' per-sample records agree (completions equal, all n
    of a sampled task; log-likelihoods within 1e-5, with the largest difference) and whether
    the metrics are equal."""
    base = {(r["doc_id"], r["filter"]): r for r in base_recs}
    loglik = any("loglikelihood" in r for r in ours_recs)
    same, worst = 0, 0.0
    for rec in ours_recs:
        other = base.get((rec["doc_id"], rec["filter"]))
        if other is None:
            continue
        if loglik:
            diff = max(abs(a - b) for a, b in zip(rec["loglikelihood"], other["loglikelihood"], strict=True))
            worst = max(worst, diff)
            same += diff <= 1e-5
        else:
            key = "responses" if "responses" in rec else "response"
            same += rec[key] == other[key]
    if loglik:
        cell = f"{same}/{len(base_recs)} documents' log-likelihoods within 1e-5 (max diff {worst:.1g})"
    else:
        n = len(ours_recs[0]["responses"]) if "responses" in ours_recs[0] else 1
        cell = f"{same}/{len(base_recs)} documents' completions identical" + (f" (all {n})" if n > 1 else "")

    def metrics(out):
        return {k: v for k, v in out["results"][task].items() if "," in k and "_stderr" not in k}

    equal = metrics(ours_out) == metrics(base_out)
    return cell + ("; metrics equal" if equal else f"; metrics differ: {metrics(ours_out)} vs {metrics(base_out)}")


def new_tokens(model, recs) -> int:
    """Tokens of the completions as scored (after the cut at the first stop sequence)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [t for rec in recs for t in (rec["responses"] if "responses" in rec else [rec["response"]])]
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts if t)


def versus(model, data, item, tmp) -> tuple[float, float, dict, list[dict], str]:
    """(ours s, baseline s, our results, our records, outputs cell): alternated, best of REPEATS
    each (a 2-core machine's noise is ~20%)."""
    ours_s = base_s = float("inf")
    for _ in range(REPEATS):
        seconds, base_out, base_recs = direct(model, data, item, tmp)
        base_s = min(base_s, seconds)
        seconds, out, recs = ours(model, data, item, tmp)
        ours_s = min(ours_s, seconds)
    return ours_s, base_s, out, recs, compare(out, recs, base_out, base_recs, item["task"])


_HEAP_CHILD = """
import importlib.util, json, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("bench_eval", sys.argv[1])
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import torch
from learnforget.core import perf
torch.set_num_threads(int(sys.argv[4]))
tmp = Path(sys.argv[5])
runs = [bench.ours(Path(sys.argv[2]), Path(sys.argv[3]), bench._plain("lf_code"), tmp) for _ in range(3)]
print(json.dumps({"seconds": min(r[0] for r in runs), "applied": perf._applied,
                  "n": runs[0][1]["n-samples"]["lf_code"]["effective"]}))
"""


def heap_seconds(model, data, tmp, default: bool) -> tuple[float, int]:
    """(seconds, files): best of 3 lf_code evaluations in a fresh process, with
    ``LEARNFORGET_MALLOC=default`` (glibc's own heap thresholds) or without (ours)."""
    env = {**os.environ, "LEARNFORGET_MALLOC": "default" if default else ""}
    args = [str(Path(__file__).resolve()), str(model), str(data), str(THREADS), str(tmp)]
    proc = subprocess.run([sys.executable, "-c", _HEAP_CHILD, *args], env=env, capture_output=True, text=True,
                          check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["applied"] is not default, res  # the setting took (or stayed off) as asked
    return res["seconds"], res["n"]


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


def main(argv: list[str]) -> None:
    results = Path(argv[0]) / "results" if argv else Path(os.environ.get("BENCH_RESULTS", ROOT / "results"))
    model, data = results / "base" / "model", results / "data"
    if not (model / "config.json").is_file():
        sys.exit(f"bench/eval.py needs the default study's base model in {model}: run `snakemake --cores 2` first")
    torch.set_num_threads(THREADS)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours(model, data, _plain("lf_facts"), tmp)  # imports, dataset caches

        ours_s, base_s, out, _, same = versus(model, data, _plain("lf_facts"), tmp)
        n_quiz = out["n-samples"]["lf_facts"]["effective"]
        rows.append(("log-likelihood: fact quiz examples/s (4 choices each), ours vs lm-eval directly",
                     f"{n_quiz / ours_s:.1f}", f"{n_quiz / base_s:.1f}", f"{base_s / ours_s:.2f}x", same))

        ours_s, base_s, _, recs, same = versus(model, data, _plain("lf_math", limit=100), tmp)
        toks = new_tokens(model, recs)
        greedy_tps = toks / ours_s
        rows.append((f"generation: new tokens/s, greedy math answers (100 problems, {toks} tokens), "
                     "ours vs lm-eval directly", f"{greedy_tps:.0f}", f"{toks / base_s:.0f}",
                     f"{base_s / ours_s:.2f}x", same))

        ours_s, base_s, _, recs, same = versus(model, data, _sampled("lf_code_gen", 5, 20), tmp)
        toks = new_tokens(model, recs)
        sampled_tps = toks / ours_s
        rows.append((f"generation: new tokens/s, sampled code (20 functions x 5 samples, 96 tokens max, {toks} "
                     "tokens), ours vs lm-eval directly", f"{sampled_tps:.0f}", f"{toks / base_s:.0f}",
                     f"{base_s / ours_s:.2f}x", same))
        rows.append(("generation: new tokens/s, ours: sampled code vs greedy math", f"{sampled_tps:.0f}",
                     f"{greedy_tps:.0f}", f"{sampled_tps / greedy_tps:.2f}x", ""))

        heap = {False: float("inf"), True: float("inf")}
        for _ in range(2):  # alternated processes, best of each
            for default in (True, False):
                seconds, n_code = heap_seconds(model, data, tmp, default)
                heap[default] = min(heap[default], seconds)
        rows.append(("rolling log-likelihood: held-out source files/s (lf_code), ours vs ours with glibc's "
                     "default heap thresholds (LEARNFORGET_MALLOC=default)", f"{n_code / heap[False]:.1f}",
                     f"{n_code / heap[True]:.1f}", f"{heap[True] / heap[False]:.2f}x", ""))

    jobs = study_jobs(results)
    if jobs["evaluate_s"]:
        n = len(jobs["evaluate_s"])
        parts = {k: sum(t[k] for t in jobs["timing"]) / n for k in ("import", "task_index", "task_load", "model_load")}
        start = sum(w - t["total"] for w, t in zip(jobs["evaluate_s"], jobs["timing"])) / n
        rows.append(("study: fixed cost per evaluate job, s (process start and Snakemake script set-up "
                     f"{start:.1f}, imports {parts['import']:.1f}, task index {parts['task_index']:.2f}, "
                     f"task load {parts['task_load']:.1f}, model load {parts['model_load']:.2f})",
                     f"{start + sum(parts.values()):.1f}", f"{sum(jobs['evaluate_s']) / n:.1f} (mean job)",
                     f"{(start + sum(parts.values())) * n / sum(jobs['evaluate_s']):.0%}", ""))
        wall, evaluating = sum(jobs["evaluate_s"]), sum(jobs["evaluating_s"])
        rows.append((f"study: evaluate jobs ({len(jobs['evaluate_s'])}), wall s in all",
                     f"{wall:.0f}", f"{evaluating:.0f} (lm-eval evaluating)",
                     f"{(wall - evaluating) / wall:.0%} fixed overhead", ""))
        rows.append((f"study: score jobs ({len(jobs['score_s'])}: sandboxed HumanEval, parsing, diversity), wall s",
                     f"{sum(jobs['score_s']):.0f}", "", "", ""))
    load1 = os.getloadavg()
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {THREADS} thread(s)"
    load = f"load average (1/5/15 min) {' '.join(f'{x:.1f}' for x in load0)} at the start, " \
           f"{' '.join(f'{x:.1f}' for x in load1)} at the end"
    lines = ["| measurement | ours | baseline | ratio | outputs |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    text = (f"# Evaluation benchmark\n\nMachine: {machine}; {load}; {time.strftime('%Y-%m-%d %H:%M')}. "
            f"Best of {REPEATS}, alternated. Study rows: the jobs in {results} as they ran.\n\n{table}\n")
    print(text)
    write_text(ROOT / "bench" / "eval-results.md", text)


if __name__ == "__main__":
    main(sys.argv[1:])
