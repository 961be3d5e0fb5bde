"""Code domain: documented functions from the installed Python standard library.

Files are the stdlib's top-level modules and (sub)packages, minus tests, idlelib, lib2to3,
site-packages and oversized or undecodable files. The train/test split is by a sha256 hash
of the path relative to the stdlib root, so it never depends on the seed (the seed only
picks which records are sampled).

Each record is one top-level function or method (of a top-level class, nested classes
included) that has a docstring and a body after it:

- ``text``: the function's full source, dedented (CPT form);
- ``prompt``: decorators, signature and docstring (the source up to the docstring's end);
- ``response``: the rest of the body. ``prompt + response == text``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from learnforget.core import io

SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class CodeConfig:
    max_records_train: int = 1500
    max_records_test: int = 150
    test_fraction: float = 0.1
    min_chars: int = 200
    max_chars: int = 1500
    max_file_bytes: int = 200_000
    stdlib_dir: str | None = None  # None: sysconfig.get_paths()["stdlib"]

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"CodeConfig.{field}={getattr(self, field)!r}: {why}")

        for field, lo, hi in (
            ("max_records_train", 1, 1_000_000),
            ("max_records_test", 1, 1_000_000),
            ("min_chars", 1, 1_000_000),
            ("max_file_bytes", 1, 100_000_000),
        ):
            v = getattr(self, field)
            if not _is_int(v) or not lo <= v <= hi:
                raise bad(field, f"must be an int in [{lo}, {hi}]")
        if not _is_int(self.max_chars) or self.max_chars < self.min_chars:
            raise bad("max_chars", f"must be an int >= min_chars={self.min_chars}")
        if not _is_num(self.test_fraction) or not 0.0 < self.test_fraction < 1.0:
            raise bad("test_fraction", "must be a number in (0, 1)")
        if self.stdlib_dir is not None and (
            not isinstance(self.stdlib_dir, str) or not self.stdlib_dir
        ):
            raise bad("stdlib_dir", "must be null or a folder path")


def stdlib_root(cfg: CodeConfig | None = None) -> Path:
    if cfg is not None and cfg.stdlib_dir is not None:
        root = Path(cfg.stdlib_dir)
        if not root.is_dir():
            raise ValueError(f"CodeConfig.stdlib_dir={cfg.stdlib_dir!r}: not a folder")
        return root
    return Path(sysconfig.get_paths()["stdlib"])


def is_test_path(rel: str, test_fraction: float) -> bool:
    """Stable split: sha256 of the relative POSIX path, independent of any seed."""
    h = int(hashlib.sha256(rel.encode("utf-8")).hexdigest()[:16], 16)
    return h / 2.0**64 < test_fraction


def source_files(root: Path, max_file_bytes: int) -> list[str]:
    """Relative POSIX paths of top-level modules and package files, sorted."""
    out: list[str] = []
    for entry in sorted(os.listdir(root)):
        full = root / entry
        if entry.endswith(".py") and full.is_file():
            out.append(entry)
        elif full.is_dir() and entry not in SKIP_DIRS and (full / "__init__.py").is_file():
            for dirpath, dirnames, filenames in os.walk(full):
                dirnames[:] = sorted(
                    d for d in dirnames
                    if d not in SKIP_DIRS and (Path(dirpath, d) / "__init__.py").is_file()
                )
                for f in sorted(filenames):
                    if f.endswith(".py"):
                        out.append(Path(dirpath, f).relative_to(root).as_posix())
    return sorted(p for p in out if (root / p).stat().st_size <= max_file_bytes)


def _defs(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, ast.AST]]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from _defs(node.body, f"{prefix}{node.name}.")


def _leading_ws(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def extract_functions(source: str) -> list[dict[str, Any]]:
    """Documented functions of one module: ``qualname, lineno, prompt, response``."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    out = []
    for qualname, node in _defs(tree.body, ""):
        body = node.body
        if not (
            body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            continue
        doc = body[0]
        if len(body) < 2 or body[1].lineno <= doc.end_lineno:
            continue  # nothing after the docstring, or code on the docstring's line
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        seg = lines[start - 1 : node.end_lineno]
        if not seg[-1].endswith("\n"):
            seg[-1] += "\n"
        indent = _leading_ws(seg[0])
        dedented = []
        for line in seg:
            if not line.strip():
                dedented.append(line.lstrip(" \t"))
            elif line.startswith(indent):
                dedented.append(line[len(indent) :])
            else:
                break  # a string literal less indented than the def: cannot dedent
        else:
            split = doc.end_lineno - start + 1
            prompt = "".join(dedented[:split])
            response = "".join(dedented[split:])
            if response.strip():
                out.append({"qualname": qualname, "lineno": start, "prompt": prompt,
                            "response": response})
    return out


@functools.lru_cache(maxsize=4)
def scan(root: str, max_file_bytes: int) -> tuple[tuple[str, tuple[dict[str, Any], ...]], ...]:
    """All documented functions per file (cached: parsing the stdlib takes ~2 s)."""
    out = []
    for rel in source_files(Path(root), max_file_bytes):
        try:
            source = (Path(root) / rel).read_bytes().decode("utf-8")
            funcs = extract_functions(source)
        except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue
        out.append((rel, tuple(funcs)))
    return tuple(out)


def build_code_corpus(cfg: CodeConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    root = stdlib_root(cfg)
    files = scan(str(root), cfg.max_file_bytes)
    pools: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    n_files = {"train": 0, "test": 0}
    for rel, funcs in files:
        split = "test" if is_test_path(rel, cfg.test_fraction) else "train"
        n_files[split] += 1
        seen_ids: set[str] = set()
        for f in funcs:
            text = f["prompt"] + f["response"]
            if not cfg.min_chars <= len(text) <= cfg.max_chars:
                continue
            rid = f"{rel}:{f['qualname']}"
            if rid in seen_ids:
                rid = f"{rid}@{f['lineno']}"
            seen_ids.add(rid)
            pools[split].append(
                {"id": rid, "path": rel, "text": text, "prompt": f["prompt"],
                 "response": f["response"]}
            )
    # A function copied verbatim into a test file must not leak: drop it from test.
    train_texts = {r["text"] for r in pools["train"]}
    n_candidates_test = len(pools["test"])
    pools["test"] = [r for r in pools["test"] if r["text"] not in train_texts]

    rng = random.Random(f"code-sample:{seed}")
    train = rng.sample(pools["train"], min(cfg.max_records_train, len(pools["train"])))
    test = rng.sample(pools["test"], min(cfg.max_records_test, len(pools["test"])))
    if not train or not test:
        raise ValueError(
            f"code corpus is empty (train {len(train)}, test {len(test)} records) under {root}; "
            "check stdlib_dir, min_chars/max_chars and test_fraction"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_jsonl(out_dir / "train.jsonl", train)
    io.write_jsonl(out_dir / "test.jsonl", test)
    return {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "stdlib_root": str(root),
        "files_train": n_files["train"],
        "files_test": n_files["test"],
        "candidates_train": len(pools["train"]),
        "candidates_test": n_candidates_test,
        "train_records": len(train),
        "test_records": len(test),
        "train_chars": sum(len(r["text"]) for r in train),
        "test_chars": sum(len(r["text"]) for r in test),
    }
