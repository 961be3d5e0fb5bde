"""Run the Snakemake workflow in a scratch directory and read its job plan."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, configfile: Path, *args: str, config: list[str] | None = None,
              check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(configfile), *args]
    if config:
        cmd += ["--config", *config]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from a dry run's 'Job stats' table ({} when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    counts: dict[str, int] = {}
    block = text.split("Job stats:", 1)
    if len(block) < 2:
        raise AssertionError(f"no job stats in the dry run:\n{text[-3000:]}")
    for line in block[1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
        elif line.strip().startswith("total"):
            break
    return counts


def planned_outputs(proc: subprocess.CompletedProcess, rule: str) -> list[str]:
    """Output paths of the planned jobs of one rule (from the dry run's job listing)."""
    text = proc.stdout + proc.stderr
    outs = []
    for block in re.split(r"\n(?=\[|rule |localrule )", text):
        if re.match(rf"^(local)?rule {rule}:", block.strip()):
            m = re.search(r"output: (.+)", block)
            if m:
                outs.append(m.group(1).strip())
    return outs


def load_bench(name: str):
    """Import bench/<name>.py (a script, not a package module) to test its pure helpers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
