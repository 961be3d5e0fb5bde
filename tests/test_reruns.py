"""A finished study is not rerun by edits that cannot change its results.

Snakemake's `code` rerun trigger reruns a `script:` rule whenever its script file is newer than
the rule's outputs. Our scripts are thin adapters, and `git pull` gives every changed script a
new mtime, so with that trigger an update of the code (such as moving the library into
subpackages) would retrain a finished study from scratch. The workflow profile
(profiles/default/config.yaml) keeps every trigger but `code`; these tests check that it is
picked up, and that the trigger it drops would have fired.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from workflow_utils import REPO, planned_jobs


def _workflow_with_newer_scripts(dest):
    """A copy of the workflow whose scripts are an hour newer than any output (as after a pull)."""
    shutil.copy(REPO / "Snakefile", dest / "Snakefile")
    for part in ("workflow", "profiles", "config", "envs"):
        shutil.copytree(REPO / part, dest / part, symlinks=True)
    later = time.time() + 3600
    scripts = sorted((dest / "workflow" / "scripts").glob("*.py"))
    for script in scripts:
        os.utime(script, (later, later))
    return dest / "Snakefile", scripts


def _dry_run(snakefile, work, *args):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(work),
           "--configfile", str(REPO / "tests" / "tiny.yaml"), "-n", "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_the_workflow_profile_drops_only_the_code_trigger():
    profile = yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text())
    assert sorted(profile["rerun-triggers"]) == ["input", "mtime", "params", "software-env"]


@pytest.mark.e2e
def test_newer_scripts_do_not_rerun_a_finished_study(tiny_study, tmp_path):
    work = tmp_path / "study"
    shutil.copytree(tiny_study, work, symlinks=True)
    (tmp_path / "wf").mkdir()
    snakefile, scripts = _workflow_with_newer_scripts(tmp_path / "wf")
    assert len(scripts) >= 10

    quiet = _dry_run(snakefile, work)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "workflow specific profile" in quiet.stdout + quiet.stderr
    assert planned_jobs(quiet) == {}

    # The control: with Snakemake's default triggers the same newer scripts rerun the study.
    default = _dry_run(snakefile, work, "--rerun-triggers", "mtime", "params", "input", "software-env", "code")
    assert default.returncode == 0, default.stderr[-3000:]
    jobs = planned_jobs(default)
    assert jobs.get("train", 0) > 0 and jobs.get("evaluate", 0) > 0, jobs

