"""Pipeline overhead: building the DAG of a paper-sized grid, and a no-op rerun.

    python bench/dag.py [STUDY_DIR]

- DAG of the paper's study, config/paper.yaml itself: Llama-2-7B, 4 settings (code/math x
  CPT/IFT) x 10 methods (full finetuning and LoRA ranks 16/64/256 x targets attention/mlp/all,
  alpha = 2r) x the paper's durations (8 for CPT, 5 for IFT). Timed: `snakemake -n` in an
  empty folder, offline with an empty Hugging Face cache (as when planning on a laptop),
  best of 2; the target is under 10 s.
- No-op rerun: `snakemake --cores 2` in STUDY_DIR (a finished default study, e.g. the
  repository root after its first command), best of 3; the target is under 5 s.
Both are printed and written to bench/dag-results.md with the machine they ran on.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from learnforget.core.io import write_text  # noqa: E402

PAPER = ROOT / "config" / "paper.yaml"


def paper_counts() -> tuple[int, int]:
    """(runs, checkpoints) of config/paper.yaml."""
    from learnforget.study import config as lfconfig

    runs = lfconfig.expand_runs(lfconfig.validate(yaml.safe_load(PAPER.read_text())))
    return len(runs), sum(len(r.labels) for r in runs)


def timed(cmd, cwd, repeats: int, env=None) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        best, out = min(best, dt), proc.stdout + proc.stderr
    return best, out


def job_count(text: str) -> int:
    m = re.search(r"^total\s+(\d+)\s*$", text, re.M)
    return int(m.group(1)) if m else 0


def main() -> None:
    snakemake = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # planned as on a laptop: offline, nothing downloaded (a dry run only warns about that)
        env = {**os.environ, "HF_HOME": str(Path(tmp) / "hf-home"), "HF_HUB_OFFLINE": "1"}
        print("building the DAG of config/paper.yaml...", file=sys.stderr)
        secs, out = timed([*snakemake, "--directory", tmp, "--configfile", str(PAPER), "-n", "--quiet", "rules"],
                          tmp, 2, env=env)
        n_runs, n_ckpt = paper_counts()
        rows.append(("DAG of config/paper.yaml (`snakemake -n`, offline, "
                     f"{job_count(out)} jobs, {n_runs} runs, {n_ckpt} checkpoints)", secs, 10.0))
    if len(sys.argv) > 1:
        study = Path(sys.argv[1]).resolve()
        print(f"no-op rerun in {study}...", file=sys.stderr)
        secs, out = timed([*snakemake, "--directory", str(study), "--cores", "2"], study, 3)
        if "Nothing to be done" not in out:
            raise SystemExit(f"{study}: the study is not complete (Snakemake had jobs to run)")
        rows.append(("no-op rerun of the default study (`snakemake --cores 2`, nothing to do)", secs, 5.0))
    load = os.getloadavg()[0]
    lines = ["# Pipeline overhead", "", "    python bench/dag.py [STUDY_DIR]", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"load average {load:.1f} at the end; {time.strftime('%Y-%m-%d')}. Best of 2 (DAG) / 3 (no-op).", "",
             "| measurement | seconds | target | ratio to target |", "|---|---:|---:|---:|"]
    for what, secs, target in rows:
        lines.append(f"| {what} | {secs:.2f} | {target:g} | {secs / target:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(ROOT / "bench" / "dag-results.md", text)


if __name__ == "__main__":
    main()
