"""Atomic file output: nothing half-written ever sits under a final name."""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it into place.

    Works for files and for directories (a directory is renamed as a whole; an existing
    directory at ``path`` is replaced only once the new one is complete).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a killed writer cannot clean up: its staging folder is removed by the next write of the
    # same output (one job owns an output at a time)
    for stale in final.parent.glob(f".{glob_escape(final.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / (final.name + suffix)
    try:
        yield target
        if target.is_file():
            with open(target, "rb") as fh:
                os.fsync(fh.fileno())
        _crash_point(final)
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(target, final)
            shutil.rmtree(old)
        elif target.exists():
            os.replace(target, final)
        else:
            raise FileNotFoundError(f"nothing was written to {target} for {final}")
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


#: Interruption tests: a process about to commit an output whose path matches this pattern
#: (fnmatch) kills itself with SIGKILL first, as a preempted job would at the worst moment.
CRASH_ENV = "LEARNFORGET_CRASH_BEFORE_COMMIT"


def _crash_point(final: Path) -> None:
    pattern = os.environ.get(CRASH_ENV)
    if pattern and fnmatch.fnmatch(str(final), pattern):
        os.kill(os.getpid(), signal.SIGKILL)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not valid JSON ({exc.msg})") from exc
    return out


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
