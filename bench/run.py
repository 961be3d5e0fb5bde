"""The whole benchmark suite in one command: every figure a ratio against a baseline of the same run.

    python bench/run.py                    # everything, about 30 min on 2 cores; writes bench/results.md
                                           # and the table of bench/README.md
    python bench/run.py pipeline train     # some parts only (pipeline, train, eval, spectral, dag)
    python bench/run.py --gather           # no part: only gather the parts' latest tables

Parts (each also writes its own table, ``bench/<part>-results.md``; this file gathers them):

- pipeline: the default study (config/config.yaml) run cold in a copy of this tree
  (``snakemake --cores 2`` with an empty ``results/``), then again with nothing to do (best of
  3); and the fixed cost per job: for train jobs the Snakemake wall time less the training
  loop's own seconds (``job_train_seconds`` in the checkpoint manifest), for evaluate jobs the
  wall time less lm-eval's evaluating seconds (``timing_s.evaluate`` in the results JSON). The
  rest (process start, imports, model loads and saves, task set-up) is per-job overhead; its
  share of the jobs' wall time is the figure. The eval and dag parts reuse this finished study.
- train: ``bench/train.py`` (ours vs the Hugging Face Trainer, MFU, LoRA vs full, settings).
- eval: ``bench/eval.py STUDY`` (ours vs lm-eval called directly).
- spectral: ``bench/spectral.py`` (ours vs numpy.linalg.svd on the 7B shapes).
- dag: ``bench/dag.py STUDY`` (DAG of config/paper.yaml, no-op rerun).

``BENCH_STUDY_DIR``: where the pipeline part runs the study (an empty or new folder, kept
afterwards, e.g. to take the README's figures from); default a temporary folder.

The headline table (every part's key rows) goes into ``bench/results.md`` and replaces the table
of ``bench/README.md``; the prose around it there (machine, dates, what the numbers led to) is
written by hand.

Each part runs in its own process, one after the other; timings depend on the machine and its
load, which every table records. Progress goes to stderr.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from learnforget.core.io import write_text  # noqa: E402

PARTS = ("pipeline", "train", "eval", "spectral", "dag")
README = ROOT / "bench" / "README.md"
TABLE_HEAD = "| measurement | ours | baseline | ratio |"
# headline rows: (part, start of the measurement cell in that part's table)
HEADLINES = (
    ("train", "tokens/s, full finetuning, math IFT"), ("train", "tokens/s, LoRA r8, math IFT"),
    ("train", "tokens/s, full finetuning, code CPT"), ("train", "tokens/s, LoRA r8, code CPT"),
    ("train", "MFU, full, code CPT: "), ("train", "MFU, full, code CPT, train.compile"),
    ("train", "MFU, LoRA r8, code CPT"), ("train", "MFU, full, math IFT"),
    ("train", "ours, code CPT: LoRA r8 vs full, seconds per step"),
    ("train", "ours, code CPT: LoRA r8 vs full, peak RSS"),
    ("train", "tokens/s, full, code CPT: ours vs ours with glibc"),
    ("train", "tokens/s, full, code CPT: torch.compile"), ("train", "tokens/s, full, math IFT: train.group_by_length"),
    ("train", "tokens/s, full, code CPT: 2 jobs"),
    ("eval", "log-likelihood"), ("eval", "generation: new tokens/s, greedy"),
    ("eval", "generation: new tokens/s, sampled code"), ("eval", "rolling log-likelihood"),
    ("spectral", "| 4096x4096"),
)


def log(msg: str) -> None:
    print(f"[bench/run] {msg}", file=sys.stderr, flush=True)


def copy_tree(dest: Path) -> None:
    """The repository's files (tracked, and untracked ones git does not ignore) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(("results/", ".snakemake/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def snakemake(study: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=study,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"snakemake in {study} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0, proc.stdout + proc.stderr


def bench_wall(tsv: Path) -> float:
    with open(tsv, newline="") as f:
        return float(next(csv.DictReader(f, delimiter="\t"))["s"])


def job_overheads(results: Path) -> dict:
    """Per rule: jobs, wall seconds summed (Snakemake's benchmark files), and for train and
    evaluate jobs the seconds of the work itself (see the module doc)."""
    out: dict[str, dict] = {}
    bench = results / "benchmarks"
    for tsv in sorted(bench.rglob("*.tsv")):
        rel = tsv.relative_to(bench)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if rule == "compose":
            rule = "compose/" + rel.parts[1]
        wall = bench_wall(tsv)
        work = None
        if rule == "train" and len(rel.parts) == 3:
            manifest = results / "runs" / rel.parts[1] / rel.stem / "manifest.json"
            if manifest.exists():
                work = float(json.loads(manifest.read_text())["job_train_seconds"])
        elif rule == "evaluate" and len(rel.parts) == 3:
            res = results / "evals" / rel.parts[1] / f"{rel.stem}.json"
            if res.exists():
                work = float(json.loads(res.read_text())["timing_s"]["evaluate"])
        r = out.setdefault(rule, {"jobs": 0, "wall": 0.0, "work": 0.0, "timed": 0})
        r["jobs"] += 1
        r["wall"] += wall
        if work is not None:
            r["work"] += work
            r["timed"] += 1
    return out


def pipeline(study: Path) -> str:
    log(f"copying the tree to {study} ...")
    copy_tree(study)
    log("the default study, cold (snakemake --cores 2; about 8-10 min on 2 cores) ...")
    cold, out = snakemake(study)
    jobs = next((ln.split()[-1] for ln in out.splitlines() if ln.startswith("total ")), "?")
    log(f"cold: {cold:.0f} s; no-op reruns ...")
    noop = min(snakemake(study)[0] for _ in range(3))
    rules = job_overheads(study / "results")
    wall_all = sum(r["wall"] for r in rules.values())
    fixed = {k: r["wall"] - r["work"] for k, r in rules.items() if r["timed"] == r["jobs"] and r["timed"]}
    lines = ["# Pipeline: the default study", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"load average {os.getloadavg()[0]:.1f} at the end; {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| measurement | ours | baseline | ratio |", "|---|---:|---:|---:|",
             f"| default study, cold (`snakemake --cores 2`, {jobs} jobs), s; baseline: the jobs' wall times summed "
             f"(serial) | {cold:.0f} | {wall_all:.0f} | {wall_all / cold:.2f}x parallel |",
             f"| default study, nothing to do (best of 3), s; baseline: cold | {noop:.2f} | {cold:.0f} | "
             f"{noop / cold:.2%} |"]
    for rule in ("train", "evaluate"):
        if rule in fixed:
            r = rules[rule]
            lines.append(f"| {rule} jobs ({r['jobs']}): fixed cost (process start, imports, model load and save) "
                         f"vs the jobs' wall time, s | {fixed[rule]:.0f} | {r['wall']:.0f} | "
                         f"{fixed[rule] / r['wall']:.0%} |")
    if fixed:
        lines.append(f"| train + evaluate fixed cost vs every job's wall time, s | {sum(fixed.values()):.0f} | "
                     f"{wall_all:.0f} | {sum(fixed.values()) / wall_all:.0%} |")
    lines += ["", "Wall time per rule (Snakemake benchmark files):", "",
              "| rule | jobs | wall s | share |", "|---|---:|---:|---:|"]
    for rule, r in sorted(rules.items(), key=lambda kv: -kv[1]["wall"]):
        lines.append(f"| {rule} | {r['jobs']} | {r['wall']:.0f} | {r['wall'] / wall_all:.0%} |")
    text = "\n".join(lines) + "\n"
    write_text(ROOT / "bench" / "pipeline-results.md", text)
    return text


def run_part(part: str, study: Path | None) -> None:
    script = ROOT / "bench" / f"{part}.py"
    args = [str(study)] if part in ("eval", "dag") and study is not None else []
    if part == "eval" and study is None:
        raise SystemExit("bench/eval.py needs the default study: run the pipeline part too")
    log(f"{script.name} {' '.join(args)} ...")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), *args], check=True, stdout=subprocess.DEVNULL)
    log(f"{script.name}: {time.perf_counter() - t0:.0f} s")


def first_table(text: str) -> list[list[str]]:
    """The cells of the body rows of the first markdown table in ``text`` (header and rule left out)."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), len(lines))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip().strip("|").split("|")])
    return body


def table_row(text: str, start: str) -> list[str] | None:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and (line.startswith(start) or cells[0].startswith(start)):
            return cells
    return None


def update_readme_table(rows: list[str], readme: Path = README) -> None:
    """Replace the body of the table headed ``TABLE_HEAD`` in ``readme`` by ``rows`` (markdown rows)."""
    lines = readme.read_text().splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == TABLE_HEAD), None)
    if start is None:
        raise SystemExit(f"{readme} has no table headed {TABLE_HEAD!r}")
    end = start + 2
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    write_text(readme, "".join(lines[:start + 2] + [r + "\n" for r in rows] + lines[end:]))


def main(parts: list[str]) -> None:
    parts = [] if parts == ["--gather"] else parts or list(PARTS)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown part(s) {', '.join(bad)}; known: {', '.join(PARTS)}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        study = Path(os.environ.get("BENCH_STUDY_DIR") or Path(tmp) / "study") if "pipeline" in parts else None
        if study is not None:
            study.mkdir(parents=True, exist_ok=True)
            if any(study.iterdir()):
                raise SystemExit(f"BENCH_STUDY_DIR {study} is not empty: the pipeline part times a cold study")
            pipeline(study)
        for part in (p for p in PARTS if p in parts and p != "pipeline"):
            run_part(part, study)
    files = {p: ROOT / "bench" / f"{p}-results.md" for p in PARTS}
    texts = {p: f.read_text() if f.exists() else "" for p, f in files.items()}
    rows = []
    rows += ["| " + " | ".join(c) + " |" for c in first_table(texts["pipeline"])]
    for part, start in HEADLINES:
        cells = table_row(texts[part], start)
        if cells is not None:
            rows.append("| " + " | ".join(cells[:4]) + " |" if part != "spectral" else
                        f"| spectral: singular values of one 4096 x 4096 matrix ({cells[1]}), s: ours vs "
                        f"numpy.linalg.svd | {cells[2]} | {cells[3]} | {cells[4]} faster |")
    rows += [f"| {c[0]}, s vs target | {c[1]} | {c[2]} | {c[3]} |" for c in first_table(texts["dag"])]
    stamp = {p: (time.strftime("%Y-%m-%d %H:%M", time.localtime(f.stat().st_mtime)) if f.exists() else "never")
             for p, f in files.items()}
    text = ("# Benchmarks\n\n    python bench/run.py\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"parts run now: {', '.join(parts) or 'none'} ({time.perf_counter() - t0:.0f} s); each part's table below "
            "names its own machine, load and date. Every ratio is against a baseline measured in the same run.\n\n"
            f"{TABLE_HEAD}\n|---|---:|---:|---:|\n" + "\n".join(rows) + "\n")
    for p in (p for p in PARTS if texts[p]):
        body = "#" + texts[p] if texts[p].startswith("# ") else texts[p]  # its title one level down
        text += f"\n---\n\n(`bench/{p}-results.md`, written {stamp[p]})\n\n{body}"
    print(text)
    write_text(ROOT / "bench" / "results.md", text)
    update_readme_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
