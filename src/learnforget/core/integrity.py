"""Checkpoint integrity: a damaged checkpoint is found before use, named, and rebuilt, never loaded.

Every training job writes its folder (``runs/{run}/{duration}``, ``runs/{run}/trunk/{duration}``,
``base/model``) under a temporary name and renames it into place with a ``manifest.json`` whose
``"files"`` maps each file's path, relative to that folder, to its sha256. The rules:

* A checkpoint is intact when ``manifest.json`` is readable JSON with a non-empty ``"files"``
  mapping, and every listed file exists, is a regular file and has the listed sha256. Anything
  else makes :func:`verify` raise :class:`CorruptCheckpoint`, whose message is one line naming
  the folder, the first bad file and why (``missing``, ``sha256 mismatch``, ``unreadable``...).
  Missing files are looked for before anything is hashed, so they are reported first; then the
  files are hashed in sorted order and the first mismatch is reported. Files the manifest does
  not list (``.snakemake_timestamp``, the stamp below) are ignored.
* Hashing is cached by a stamp, ``.verified.json`` inside the folder, holding for each file its
  size, ``mtime_ns``, ``ctime_ns`` and sha256 when it last verified. A file whose size, mtime and
  ctime all still match its stamp entry, and whose stamped sha256 is the manifest's, is not
  hashed again. Any write through the filesystem changes the mtime or the ctime (and copying
  or restoring a folder gives new ctimes), so it is rehashed. Undetected by the cache: a file
  altered in place with the same size *and* its mtime restored (``touch -r``, ``os.utime``) -
  in practice ctime catches that too, except within the same ctime tick as the last
  verification - and damage below the filesystem (bit rot on the medium), which changes no
  timestamp. ``cache=False`` (``python -m learnforget.core.integrity --full``) rehashes everything.
* A file whose mtime lies within :data:`RACY_NS` of its verification is "racily clean" (a later
  write in the same coarse timestamp tick would leave size and mtime unchanged), so its entry is
  not trusted and the next verification hashes it again.
* The stamp is a cache, not part of the checkpoint: it is not in the manifest, a stamp that is
  unreadable or stale is ignored, it is written atomically (:func:`learnforget.core.io.write_json`)
  and only when it changes, the folder's mtime is put back after writing it (Snakemake dates a
  ``directory()`` output by its ``.snakemake_timestamp``, other tools may use the folder's
  mtime), and failing to write it (read-only results) only costs the cache.
* Nothing is deleted: :func:`quarantine` moves a corrupt folder to
  ``quarantine_root/<path relative to the results folder>/<UTC timestamp>/``. Its output then
  being missing, Snakemake rebuilds it.
* Files the keep policy dropped (:mod:`learnforget.train.keep`: the training state of a checkpoint
  that a longer one has continued from) are recorded in ``dropped.json`` inside the folder,
  each with the manifest's sha256, the reason and the policy. A listed file that is missing and
  recorded there with the same sha256 is intact ("dropped by policy"); a recorded file that is
  still present is verified as usual (a drop interrupted before its unlink). An unreadable
  ``dropped.json`` records nothing, so the missing file makes the checkpoint corrupt.
* :func:`scan` checks every checkpoint under a results folder. A checkpoint folder is one whose
  path fits a training output (``runs/<run>/<duration>``, ``runs/<run>/trunk/<duration>``,
  ``base/model``; a duration starts with a digit) or that holds a ``manifest.json`` at
  ``runs/*/*``, ``runs/*/trunk/*``. Names starting with ``.`` (the temporary and ``.old`` folders
  of an atomic write) are never checkpoints. A checkpoint folder without ``manifest.json`` is
  corrupt, even an empty one: training only ever renames a complete folder (manifest
  included) into place, and Snakemake would take any folder at that path as a finished output.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Callable

from learnforget.core.io import sha256_file, write_json

MANIFEST = "manifest.json"
STAMP = ".verified.json"
DROPPED = "dropped.json"
"""Sidecar of the files the keep policy removed from a finished checkpoint (learnforget.train.keep)."""
STAMP_VERSION = 1
RACY_NS = 2_000_000_000
"""A stamp entry is trusted only if the file's mtime is this much older than its verification."""

DURATION = re.compile(r"[0-9][0-9.e+]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CorruptCheckpoint(Exception):
    """A checkpoint folder that must not be used; ``str()`` is one line naming folder, file and why."""

    def __init__(self, ckpt_dir: str | os.PathLike, file: str, reason: str):
        self.ckpt_dir = Path(ckpt_dir)
        self.file = file
        self.reason = " ".join(str(reason).split())
        super().__init__(str(self))

    @property
    def detail(self) -> str:
        """``"<file>: <why>"``, e.g. ``"model/model.safetensors: sha256 mismatch (...)"``."""
        return f"{self.file}: {self.reason}"

    def __str__(self) -> str:
        return f"checkpoint {self.ckpt_dir} is corrupt ({self.detail})"

    def __reduce__(self):
        return (type(self), (self.ckpt_dir, self.file, self.reason))


# ----------------------------------------------------------------------------- verification
def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def read_manifest_files(ckpt_dir: str | os.PathLike) -> dict[str, str]:
    """The manifest's ``"files"`` (path -> lower-case sha256), or :class:`CorruptCheckpoint`."""
    ckpt = Path(ckpt_dir)
    try:
        text = (ckpt / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpoint(ckpt, MANIFEST, "missing") from None
    except OSError as exc:
        raise CorruptCheckpoint(ckpt, MANIFEST, f"unreadable ({_why(exc)})") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptCheckpoint(ckpt, MANIFEST, f"unreadable, not valid JSON ({exc.msg} at byte {exc.pos})") from None
    except UnicodeDecodeError:
        raise CorruptCheckpoint(ckpt, MANIFEST, "unreadable, not UTF-8 text") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpoint(ckpt, MANIFEST, 'unreadable, no "files" listed')
    out = {}
    for rel, digest in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise CorruptCheckpoint(ckpt, MANIFEST, f"unreadable, lists a path outside the checkpoint: {rel!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
            raise CorruptCheckpoint(ckpt, MANIFEST, f"unreadable, {rel!r} has no sha256 digest")
        out[rel] = digest.lower()
    return out


def dropped_by_policy(ckpt_dir: str | os.PathLike) -> dict[str, dict]:
    """Files the keep policy dropped from a checkpoint: ``{path: {"sha256", "size", "reason", ...}}``
    from its ``dropped.json`` (empty when there is none or it is unreadable)."""
    try:
        with open(Path(ckpt_dir) / DROPPED, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return {}
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items()
            if isinstance(v, dict) and isinstance(v.get("sha256"), str) and _SHA256.fullmatch(v["sha256"].lower())}


def _dropped_as_listed(ckpt: Path, rel: str, digest: str) -> bool:
    entry = dropped_by_policy(ckpt).get(rel)
    return entry is not None and entry["sha256"].lower() == digest


def _load_stamp(ckpt: Path) -> dict[str, dict]:
    try:
        with open(ckpt / STAMP, encoding="utf-8") as fh:
            stamp = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("version") != STAMP_VERSION or not isinstance(stamp.get("files"), dict):
        return {}
    return {k: v for k, v in stamp["files"].items() if isinstance(v, dict)}


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _trusted(entry: dict | None, st: os.stat_result, digest: str) -> bool:
    if not entry:
        return False
    try:
        same = (entry["size"], entry["mtime_ns"], entry["ctime_ns"]) == _key(st) and entry["sha256"] == digest
        return same and int(entry["mtime_ns"]) + RACY_NS < int(entry["verified_ns"])
    except (KeyError, TypeError, ValueError):
        return False


def _write_stamp(ckpt: Path, files: dict[str, dict]) -> None:
    """Write the stamp atomically, leaving the folder's mtime as it was; a failure only costs the cache."""
    try:
        before = os.stat(ckpt)
        write_json(ckpt / STAMP, {"version": STAMP_VERSION, "files": files,
                                  "note": "learn-forget verification cache (learnforget.core.integrity); safe to delete"})
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))
    except OSError:
        pass


def verify(ckpt_dir: str | os.PathLike, *, cache: bool = True) -> None:
    """Check a checkpoint folder against its manifest; raise :class:`CorruptCheckpoint` if it fails.

    With ``cache`` (the default) files unchanged since their last verification (stamp
    ``.verified.json``) are not hashed again and the stamp is refreshed; ``cache=False`` hashes
    every file and neither reads nor writes the stamp (safe on a read-only tree). A folder that
    does not exist raises :class:`FileNotFoundError` (absent, not corrupt).
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no checkpoint folder", str(ckpt))
    files = read_manifest_files(ckpt)
    stats = {}
    for rel in sorted(files):
        try:
            st = os.stat(ckpt / rel)
        except FileNotFoundError:
            if _dropped_as_listed(ckpt, rel, files[rel]):  # removed by the keep policy: intact
                continue
            raise CorruptCheckpoint(ckpt, rel, "missing") from None
        except OSError as exc:
            raise CorruptCheckpoint(ckpt, rel, f"unreadable ({_why(exc)})") from exc
        if not stat.S_ISREG(st.st_mode):
            raise CorruptCheckpoint(ckpt, rel, "not a regular file")
        stats[rel] = st
    old = _load_stamp(ckpt) if cache else {}
    new = {}
    for rel in sorted(stats):
        st, want, entry = stats[rel], files[rel], old.get(rel)
        if cache and _trusted(entry, st, want):
            new[rel] = entry
            continue
        started = time.time_ns()
        try:
            got = sha256_file(ckpt / rel)
            after = os.stat(ckpt / rel)
        except FileNotFoundError:
            if _dropped_as_listed(ckpt, rel, want):  # dropped by the keep policy meanwhile
                continue
            raise CorruptCheckpoint(ckpt, rel, "missing") from None
        except OSError as exc:
            raise CorruptCheckpoint(ckpt, rel, f"unreadable ({_why(exc)})") from exc
        if got != want:
            why = f"sha256 mismatch: {got[:12]}..., manifest {want[:12]}..., {after.st_size} bytes"
            if entry and entry.get("sha256") == want and entry.get("size") != after.st_size:
                why += f", {entry.get('size')} when last verified"
            raise CorruptCheckpoint(ckpt, rel, why)
        if _key(after) == _key(st):  # not changed while it was read
            new[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                        "sha256": got, "verified_ns": started}
    if cache and new != old:
        _write_stamp(ckpt, new)


def verify_managed(path: str | os.PathLike, *, cache: bool = True) -> bool:
    """:func:`verify` a folder this pipeline wrote (it has a ``manifest.json``); a model folder
    from elsewhere (a user's Hugging Face model, no manifest) is left alone. Returns whether
    it was verified."""
    if not (Path(path) / MANIFEST).is_file():
        return False
    verify(path, cache=cache)
    return True


def is_intact(ckpt_dir: str | os.PathLike, *, cache: bool = True) -> bool:
    """Whether :func:`verify` passes (a missing folder is not intact)."""
    try:
        verify(ckpt_dir, cache=cache)
    except (CorruptCheckpoint, FileNotFoundError):
        return False
    return True


# ----------------------------------------------------------------------------- quarantine
def _utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def quarantine(ckpt_dir: str | os.PathLike, quarantine_root: str | os.PathLike, *,
               results_dir: str | os.PathLike | None = None) -> Path:
    """Move a checkpoint folder, untouched, to ``quarantine_root/<relative path>/<UTC timestamp>/``.

    The relative path is taken from ``results_dir`` if given, else from the quarantine root's
    parent (``results/quarantine`` for ``results/...``), else the folder's absolute path. Nothing
    is deleted; across filesystems the folder is copied in full before the original is removed.
    Returns the new location.
    """
    ckpt = Path(ckpt_dir)
    root = Path(quarantine_root)
    if not ckpt.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no checkpoint folder", str(ckpt))
    rel = None
    for base in ([Path(results_dir)] if results_dir is not None else []) + [root.parent]:
        try:
            rel = ckpt.resolve().relative_to(base.resolve())
            break
        except ValueError:
            continue
    if rel is None:
        rel = Path(*ckpt.resolve().parts[1:])
    parent = root / rel
    parent.mkdir(parents=True, exist_ok=True)
    dest = parent / _utc_stamp()
    n = 1
    while dest.exists():
        dest, n = parent / f"{_utc_stamp()}-{n}", n + 1
    try:
        os.rename(ckpt, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        partial = parent / f".{dest.name}.partial"
        shutil.copytree(ckpt, partial, symlinks=True)
        os.rename(partial, dest)
        shutil.rmtree(ckpt)
    return dest


# ----------------------------------------------------------------------------- scan
def _visible_dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_dir() and not p.is_symlink())
    except (FileNotFoundError, NotADirectoryError):
        return []


def checkpoint_dirs(results_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint folder under a results folder (see the module's rules), base first."""
    results = Path(results_dir)
    found = [results / "base" / "model"] if (results / "base" / "model").is_dir() else []
    for run in _visible_dirs(results / "runs"):
        for sub in _visible_dirs(run):
            if sub.name == "trunk" and not (sub / MANIFEST).exists():
                found += [d for d in _visible_dirs(sub) if DURATION.fullmatch(d.name) or (d / MANIFEST).exists()]
            elif DURATION.fullmatch(sub.name) or (sub / MANIFEST).exists():
                found.append(sub)
    return found


def scan(results_dir: str | os.PathLike, *, quarantine_root: str | os.PathLike | None = None,
         log: Callable[[str], object] | None = print, cache: bool = True) -> list[tuple[Path, str]]:
    """Verify every checkpoint under ``results_dir``; quarantine the corrupt ones if a root is given.

    Logs one line per corrupt checkpoint and returns ``[(folder, reason), ...]`` (empty when all
    are intact). Folders are named as ``results_dir`` joined with their relative path.
    """
    bad = []
    for ckpt in checkpoint_dirs(results_dir):
        try:
            verify(ckpt, cache=cache)
            continue
        except FileNotFoundError:  # removed meanwhile
            continue
        except CorruptCheckpoint as exc:
            reason = exc.detail
        bad.append((ckpt, reason))
        line = f"learn-forget: checkpoint {ckpt} is corrupt ({reason})"
        if quarantine_root is not None:
            try:
                dest = quarantine(ckpt, quarantine_root, results_dir=results_dir)
                line += f"; moved to {dest}; it will be rebuilt"
            except FileNotFoundError:
                if ckpt.exists():
                    raise
                line += "; it has been removed meanwhile"
        if log is not None:
            log(line)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learnforget.core.integrity",
                                 description="Verify every checkpoint under a results folder against its manifest.")
    ap.add_argument("results", nargs="?", default="results")
    ap.add_argument("--quarantine", metavar="DIR", help="move corrupt checkpoints here (they are then rebuilt)")
    ap.add_argument("--full", action="store_true", help="hash every file, ignoring and not writing the stamps")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n = len(checkpoint_dirs(args.results))
    bad = scan(args.results, quarantine_root=args.quarantine, cache=not args.full,
               log=lambda line: print(line, file=sys.stderr))
    print(f"{n} checkpoints, {len(bad)} corrupt ({time.perf_counter() - t0:.2f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
