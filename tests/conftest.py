import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """The tiny study (tests/tiny.yaml) run once, end to end, shared by the end-to-end tests of
    every module; tests copy it before changing anything."""
    from workflow_utils import REPO, snakemake

    work = tmp_path_factory.mktemp("tiny")
    snakemake(work, REPO / "tests" / "tiny.yaml", "--cores", "2")
    return work
