"""Logging for pipeline jobs: everything to the job's log file, and to the console."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path


def setup(log_path: str | os.PathLike | None, name: str = "learnforget", *, offline: bool = True) -> logging.Logger:
    """Send ``learnforget`` log records to ``log_path`` (truncated) and to stderr.

    Also quiets the chatty third-party loggers and pins offline mode for the HF libraries:
    nothing in a job may fetch from a hub unless the user asked for it (``offline=False``: the
    jobs that download a configured pretrained model or hub dataset; the user's own offline
    variables still hold).
    """
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger(name)
    root.setLevel(logging.INFO)
    root.handlers.clear()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    root.addHandler(console)
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_path, mode="w", encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False
    for noisy in ("lm-eval", "lm_eval", "datasets", "transformers", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return root


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False
