"""Pipeline overhead: building the DAG of a paper-sized grid, and a no-op rerun.

    python bench/dag.py [STUDY_DIR]

- DAG of the paper's grid: 4 settings (code/math x CPT/IFT) x 10 methods (full finetuning and
  LoRA ranks 16/64/256 x targets attention/mlp/all, alpha = 2r) x the paper's durations (8 for
  CPT, 5 for IFT), on the embedded study's data with a 7B-shaped model config (a dry run
  trains nothing, so the model's size only matters to the planner). Timed: `snakemake -n` in
  an empty folder, best of 2; the target is under 10 s.
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

from learnforget.io import write_text  # noqa: E402

CPT_DURATIONS = [0.25, 0.5, 1, 2, 4, 8, 16, 20]  # billions of tokens in the paper; epochs here
IFT_DURATIONS = [1, 2, 4, 8, 16]


def paper_grid_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["model"] = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096}
    methods = {"full": {"type": "full"}}
    for r in (16, 64, 256):
        for target in ("attention", "mlp", "all"):
            methods[f"lora-r{r}-{target}"] = {"type": "lora", "rank": r, "alpha": 2 * r, "target": target}
    cfg["methods"] = methods
    runs = []
    for domain in ("code", "math"):
        for regime in ("cpt", "ift"):
            for m in methods:
                runs.append({"name": f"{domain}-{regime}-{m}", "domain": domain, "regime": regime, "method": m,
                             "durations": CPT_DURATIONS if regime == "cpt" else IFT_DURATIONS})
    cfg["runs"] = runs
    return cfg


def timed(cmd, cwd, repeats: int) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
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
        config = Path(tmp) / "paper-grid.yaml"
        config.write_text(yaml.safe_dump(paper_grid_config()))
        print("building the DAG of the paper-sized grid...", file=sys.stderr)
        secs, out = timed([*snakemake, "--directory", tmp, "--configfile", str(config), "-n", "--quiet", "rules"],
                          tmp, 2)
        rows.append(("DAG of the paper-sized grid (`snakemake -n`, "
                     f"{job_count(out)} jobs, 40 runs, 260 checkpoints)", secs, 10.0))
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
