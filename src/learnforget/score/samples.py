"""Scoring of sampled generations (the pipeline's ``score`` job, after ``evaluate``).

lm-eval generates the n completions per problem of the sampled tasks (``lf_humaneval``,
``lf_code_gen``; metric ``bypass``) and logs them in the evaluation's per-sample JSONL. This
module scores them outside lm-eval and outside the pipeline's own process where code runs:

- ``humaneval``: every completion is executed against the problem's tests only in
  :mod:`learnforget.score.sandbox` (time, memory, file-size and process limits, no network, a
  throwaway directory, a clean environment); each sample's outcome (passed, failed, timeout,
  error) is kept; pass@k by the unbiased estimator (:mod:`learnforget.score.humaneval`);
- ``syntax``: the share of completions for which prompt + completion parses as Python
  (``ast.parse`` only: nothing is executed);
- both: diversity (paper section 4.4) of each problem's samples: distinct normalised
  solutions and mean pairwise similarity (:mod:`learnforget.score.diversity`), averaged over problems.

A completion is cut at the stop sequences of its task's YAML (lm-eval already stops there;
cutting again is a no-op then).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from learnforget.core import io
from learnforget.evaluate.registry import DIVERSITY_METRICS, TASKS, data_path, stop_sequences
from learnforget.score import diversity, humaneval

log = logging.getLogger(__name__)



def sampled_items(plan: Iterable[Mapping]) -> list[Mapping]:
    """The plan items (see :func:`learnforget.evaluate.plan.plan`) of sampled tasks."""
    return [i for i in plan if i.get("sampling")]


def _read_generations(samples_path: str | os.PathLike, tasks: set[str]) -> dict[str, dict[int, list[str]]]:
    """task -> doc_id -> responses, from the evaluation's per-sample log."""
    out: dict[str, dict[int, list[str]]] = {t: {} for t in tasks}
    with open(samples_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            task = rec.get("task")
            if task not in tasks:
                continue
            responses = rec.get("responses")
            if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"{samples_path}:{lineno}: task {task!r} record has no list of responses")
            out[task][int(rec["doc_id"])] = responses
    empty = sorted(t for t, docs in out.items() if not docs)
    if empty:
        raise ValueError(f"{samples_path}: no generations for sampled task(s) {empty}")
    return out


def parses(prompt: str, completion: str) -> bool:
    """Whether ``prompt + completion`` is syntactically valid Python (compiled to an AST only)."""
    try:
        ast.parse(prompt + completion)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def _score_humaneval(docs: Mapping[int, list[str]], settings: Mapping, workers: int | None,
                     progress: bool) -> tuple[dict, list[dict]]:
    problems = humaneval.load_problems()
    ids = list(problems)
    samples = []
    stops = stop_sequences("lf_humaneval")
    for doc_id in sorted(docs):
        if not 0 <= doc_id < len(ids):
            raise ValueError(f"lf_humaneval: doc_id {doc_id} outside the {len(ids)} problems")
        samples += [{"task_id": ids[doc_id], "completion": humaneval.truncate_completion(r, stops)}
                    for r in docs[doc_id]]
    records = humaneval.score_samples(samples, problems, timeout_s=float(settings["timeout_s"]),
                                      workers=workers, progress=progress)
    summary = humaneval.summarise(records, settings["k"])
    scores = {key: summary[key] for key in summary if key.startswith("pass@")}
    details = {k: summary[k] for k in ("n_problems", "n_samples", "samples_per_problem", "status_counts", "notes")
               if k in summary}
    return {"scores": scores, "details": details, "samples": samples}, records


def _score_syntax(docs: Mapping[int, list[str]], data_root: Path) -> tuple[dict, list[dict]]:
    rows = io.read_jsonl(data_path(TASKS["lf_code_gen"].data["test"], data_root))
    samples, records = [], []
    stops = stop_sequences("lf_code_gen")
    for doc_id in sorted(docs):
        if not 0 <= doc_id < len(rows):
            raise ValueError(f"lf_code_gen: doc_id {doc_id} outside the {len(rows)} test functions")
        row = rows[doc_id]
        for r in docs[doc_id]:
            completion = humaneval.truncate_completion(r, stops)
            ok = parses(row["prompt"], completion)
            samples.append({"task_id": row["id"], "completion": completion})
            records.append({"task_id": row["id"], "completion": completion, "status": "parses" if ok else "invalid",
                            "passed": ok})
    share = sum(r["passed"] for r in records) / len(records)
    return ({"scores": {"parses": share}, "details": {"n_problems": len(docs), "n_samples": len(records)},
             "samples": samples}, records)


def score_generations(
    samples_path: str | os.PathLike,
    plan: Iterable[Mapping],
    data_root: str | os.PathLike,
    out_json: str | os.PathLike,
    executions_path: str | os.PathLike,
    *,
    meta: Mapping | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Score the sampled tasks of ``plan`` from the per-sample log ``samples_path``.

    Writes ``out_json`` (atomically): ``learnforget`` (``meta``), ``results`` (task ->
    ``{"pass@k,none" | "parses,none": value}``), ``diversity`` (task -> the means of
    :data:`learnforget.evaluate.registry.DIVERSITY_METRICS`), ``higher_is_better``, ``details``
    (counts, outcome counts, notes) and ``timing_s``; and ``executions_path``: one JSONL record
    per sample (task, task_id, sample index, completion, status, passed, ...).
    """
    t0 = time.perf_counter()
    items = {i["task"]: i for i in sampled_items(plan)}
    if not items:
        raise ValueError("the plan has no sampled tasks to score")
    generations = _read_generations(samples_path, set(items))
    results: dict[str, dict] = {}
    div: dict[str, dict] = {}
    hib: dict[str, dict] = {}
    details: dict[str, dict] = {}
    executions: list[dict] = []
    for task in sorted(items):
        scorer = items[task]["sampling"]["scorer"]
        t = time.perf_counter()
        if scorer == "humaneval":
            scored, records = _score_humaneval(generations[task], items[task]["sampling"], workers, progress)
        elif scorer == "syntax":
            scored, records = _score_syntax(generations[task], Path(data_root))
        else:
            raise ValueError(f"task {task!r}: unknown scorer {scorer!r}")
        d = diversity.diversity(scored["samples"])
        results[task] = {f"{k},none": float(v) for k, v in scored["scores"].items()}
        div[task] = {k: d["mean"][k] for k in DIVERSITY_METRICS}
        hib[task] = {k: True for k in scored["scores"]}
        details[task] = {**scored["details"], "seconds": round(time.perf_counter() - t, 3)}
        per_problem: dict[str, int] = {}
        for rec in records:
            i = per_problem[rec["task_id"]] = per_problem.get(rec["task_id"], -1) + 1
            executions.append({"task": task, "task_id": rec["task_id"], "sample": i, **{
                k: v for k, v in rec.items() if k != "task_id"}})
        log.info("%s: %s; diversity %s (%d samples, %.1f s)", task,
                 ", ".join(f"{k}={v:.4g}" for k, v in scored["scores"].items()),
                 ", ".join(f"{k}={v:.3g}" for k, v in div[task].items()), len(records), details[task]["seconds"])
    io.write_jsonl(executions_path, executions)
    out: dict[str, Any] = {"learnforget": dict(meta or {}), "results": results, "diversity": div,
                           "higher_is_better": hib, "details": details,
                           "timing_s": {"total": round(time.perf_counter() - t0, 3)}}
    io.write_json(out_json, out)
    return out
