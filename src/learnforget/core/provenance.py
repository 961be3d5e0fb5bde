"""What produced a study's numbers: versions, commit, hardware, and wall time per stage.

The one place that asks git and the package metadata: the study's provenance (:func:`collect`)
and every checkpoint manifest (:func:`code_version`, :func:`library_versions`) read them here.
"""

from __future__ import annotations

import csv
import importlib
import os
import platform
import subprocess
from collections import defaultdict
from importlib import metadata
from pathlib import Path

PACKAGES = ("learnforget", "torch", "transformers", "peft", "lm_eval", "tokenizers", "snakemake",
            "pandas", "numpy", "matplotlib")
#: The libraries a checkpoint manifest records: what computed the weights.
TRAINING_LIBRARIES = ("torch", "transformers", "peft")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def library_versions(names: tuple[str, ...] = TRAINING_LIBRARIES) -> dict[str, str]:
    """Python's version and each library's ``__version__`` as imported (the build that ran, e.g.
    torch's ``+cu121`` tag), for checkpoint manifests."""
    out = {"python": platform.python_version()}
    for name in names:
        out[name] = importlib.import_module(name).__version__
    return out


def _git_state(repo: str | os.PathLike) -> tuple[str, bool] | None:
    """(commit, uncommitted changes to tracked files) of the git checkout at ``repo``; None
    outside git or without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit, bool(dirty)) if commit else None


def git_commit(repo: str | os.PathLike) -> str:
    """The study's commit: ``HEAD``, marked ``(with uncommitted changes)``; "unknown" outside git."""
    state = _git_state(repo)
    if state is None:
        return "unknown"
    commit, dirty = state
    return commit + (" (with uncommitted changes)" if dirty else "")


def code_version() -> str | None:
    """The git commit of the learn-forget checkout this code runs from, ``+dirty`` with
    uncommitted changes (a checkpoint manifest's ``code_version``); None outside git."""
    state = _git_state(Path(__file__).parent)
    if state is None:
        return None
    commit, dirty = state
    return commit + ("+dirty" if dirty else "")


def hardware() -> dict[str, str]:
    info = {"machine": platform.machine(), "system": f"{platform.system()} {platform.release()}",
            "cpus": str(os.cpu_count())}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        else:
            info["gpu"] = "none"
    except ImportError:
        pass
    return info


def stage_times(benchmark_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Sum of Snakemake benchmark wall times (s) and max RSS (MiB) per stage (rule)."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"jobs": 0, "seconds": 0.0, "max_rss_mib": 0.0})
    root = Path(benchmark_dir)
    if not root.exists():
        return {}
    for tsv in sorted(root.rglob("*.tsv")):
        stage = tsv.relative_to(root).parts[0].removesuffix(".tsv")
        with open(tsv, newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                t = totals[stage]
                t["jobs"] += 1
                t["seconds"] += float(row.get("s") or 0)
                try:
                    t["max_rss_mib"] = max(t["max_rss_mib"], float(row.get("max_rss") or 0))
                except ValueError:
                    pass
    return {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in sorted(totals.items())}


def collect(repo: str | os.PathLike, results: str | os.PathLike, seeds: dict) -> dict:
    return {
        "git commit": git_commit(repo),
        "seeds": seeds,
        "versions": versions(),
        "hardware": hardware(),
        "wall time per stage (s, summed over jobs)": {k: v["seconds"] for k, v in stage_times(Path(results) / "benchmarks").items()},
        "jobs per stage": {k: int(v["jobs"]) for k, v in stage_times(Path(results) / "benchmarks").items()},
    }
