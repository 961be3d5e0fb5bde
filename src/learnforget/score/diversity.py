"""Diversity of generated solutions (paper section 4.4: LoRA keeps generations more varied
than full finetuning).

For the samples of one problem we count distinct solutions and measure how alike they are,
after normalising away what does not change the program:

* :func:`normalise_code` parses the code with :mod:`ast` (a completion is usually an indented
  function body: it is dedented first, and ``return`` at top level parses fine), drops
  comments (the parser does) and docstrings / bare string statements, renames every name the
  code itself binds (assignment targets, loop and comprehension variables, arguments of inner
  functions, inner function and class names, ``except ... as``, ``with ... as``) to ``v0``,
  ``v1``, ... in order of first appearance, and prints it back with :func:`ast.unparse`
  (which also normalises whitespace, quotes and parentheses). Names it does not bind (the
  function's parameters, globals, builtins, attributes, imported modules) are kept. Code that
  does not parse falls back to its text with comments removed where the tokenizer can, and
  whitespace collapsed to single spaces.
* :func:`distinct_solutions` counts distinct normalised texts (an empty completion is one
  solution like any other).
* :func:`mean_pairwise_similarity` is the mean, over unordered pairs, of
  :class:`difflib.SequenceMatcher` ratio (``2 * matches / total length``, 1.0 = identical,
  0.0 = nothing in common) on the *token* sequences of the normalised texts (identifiers,
  numbers, operators: a renamed variable or one extra character weighs one token, not its
  length), with ``autojunk=False`` (its popularity heuristic would otherwise ignore common
  tokens in long sequences). With fewer than two texts there is no pair and the value is
  ``nan`` (undefined, not "all alike"); means over problems skip nan.
"""

from __future__ import annotations

import ast
import difflib
import io
import math
import re
import textwrap
import tokenize
from itertools import combinations
from typing import Iterable, Mapping, Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")


class _Binders(ast.NodeVisitor):
    """Collect the names that a piece of code binds itself."""

    def __init__(self) -> None:
        self.bound: set[str] = set()

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bound.add(node.id)

    def visit_arg(self, node: ast.arg) -> None:
        self.bound.add(node.arg)
        self.generic_visit(node)

    def _define(self, node) -> None:
        self.bound.add(node.name)
        self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _define

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.bound.add(node.name)
        self.generic_visit(node)


class _Renamer(ast.NodeTransformer):
    """Rename bound names to v0, v1, ... in order of first appearance; drop docstrings."""

    def __init__(self, bound: set[str]) -> None:
        self.bound = bound
        self.names: dict[str, str] = {}

    def _new(self, name: str) -> str:
        if name not in self.bound:
            return name
        if name not in self.names:
            self.names[name] = f"v{len(self.names)}"
        return self.names[name]

    def _strip_strings(self, body: list) -> list:
        return [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                        and isinstance(s.value.value, str))]

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                stripped = self._strip_strings(body)
                if not stripped and field == "body" and not isinstance(node, ast.Module):
                    stripped = [ast.Pass()]
                setattr(node, field, stripped)
        return super().generic_visit(node)

    def visit_Name(self, node: ast.Name):
        node.id = self._new(node.id)
        return node

    def visit_arg(self, node: ast.arg):
        node.arg = self._new(node.arg)
        return self.generic_visit(node)

    def _define(self, node):
        node.name = self._new(node.name)
        return self.generic_visit(node)

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _define

    def visit_ExceptHandler(self, node: ast.ExceptHandler):
        if node.name:
            node.name = self._new(node.name)
        return self.generic_visit(node)

    def visit_Global(self, node):
        node.names = [self._new(n) for n in node.names]
        return node

    visit_Nonlocal = visit_Global


def _strip_comments(text: str) -> str:
    """Remove the comments that the tokenizer finds before it gives up (broken code)."""
    lines = text.splitlines(keepends=True)
    spans = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                spans.append((tok.start, tok.end))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    for (row, start), (_, end) in reversed(spans):
        lines[row - 1] = lines[row - 1][:start] + lines[row - 1][end:]
    return "".join(lines)


def normalise_code(text: str) -> str:
    """A canonical form of ``text`` (see the module docstring)."""
    source = textwrap.dedent(text.expandtabs(8))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return " ".join(_strip_comments(source).split())
    binders = _Binders()
    binders.visit(tree)
    tree = _Renamer(binders.bound).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def distinct_solutions(texts: Iterable[str]) -> int:
    """How many different solutions there are after :func:`normalise_code`."""
    return len({normalise_code(t) for t in texts})


def _similarity(a: list[str], b: list[str]) -> float:
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _mean_similarity(normalised: Sequence[str]) -> float:
    tokens = [_TOKEN.findall(t) for t in normalised]
    if len(tokens) < 2:
        return math.nan
    pairs = list(combinations(tokens, 2))
    return sum(_similarity(a, b) for a, b in pairs) / len(pairs)


def mean_pairwise_similarity(texts: Sequence[str]) -> float:
    """Mean token-level SequenceMatcher ratio over all pairs of normalised texts, in [0, 1];
    ``nan`` for fewer than two texts."""
    return _mean_similarity([normalise_code(t) for t in texts])


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def diversity(samples: Sequence[Mapping]) -> dict:
    """Diversity of ``[{"task_id", "completion"}, ...]`` grouped by problem.

    Returns ``{"per_problem": {task_id: {"n_samples", "distinct", "distinct_fraction",
    "mean_pairwise_similarity"}}, "mean": {"distinct", "distinct_fraction",
    "mean_pairwise_similarity"}, "n_problems": int}``; the means are over problems (nan values
    skipped; nan when there is nothing to average).
    """
    groups: dict[str, list[str]] = {}
    for i, s in enumerate(samples):
        if not isinstance(s, Mapping) or not isinstance(s.get("task_id"), str) \
                or not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i}: needs a string 'task_id' and a string 'completion'")
        groups.setdefault(s["task_id"], []).append(s["completion"])
    per_problem = {}
    for task_id, texts in groups.items():
        normalised = [normalise_code(t) for t in texts]
        distinct = len(set(normalised))
        per_problem[task_id] = {
            "n_samples": len(texts),
            "distinct": distinct,
            "distinct_fraction": distinct / len(texts),
            "mean_pairwise_similarity": _mean_similarity(normalised),
        }
    mean = {key: _mean(p[key] for p in per_problem.values())
            for key in ("distinct", "distinct_fraction", "mean_pairwise_similarity")}
    return {"per_problem": per_problem, "mean": mean, "n_problems": len(per_problem)}


__all__ = ["normalise_code", "distinct_solutions", "mean_pairwise_similarity", "diversity"]
