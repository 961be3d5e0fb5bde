"""Math domain: generated grade-school word problems with GSM8K-style worked answers.

A problem is a short story about one person's collection of objects, changed by one to
``max_steps`` operations (add, subtract, multiply by a small number). The answer shows
every operation as ``a op b = c`` and ends in ``#### N``::

    question: Lina has 12 apples. Lina buys 7 more apples. How many apples does Lina have now?
    answer:   Lina has 12 + 7 = 19 apples. #### 19

``generic.jsonl`` holds bare arithmetic in the same notation (``12 + 7 = 19.``), mixed into
base pretraining so that the base model knows the tokens and the format.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learnforget.core import io

NAMES = (
    "Lina", "Omar", "Sara", "Ravi", "Mia", "Tom", "Ana", "Ben", "Yuki", "Leo", "Nora",
    "Ivan", "Zoe", "Sam", "Kim", "Hugo", "Ada", "Eli", "Maya", "Noah", "Priya", "Jon",
    "Lea", "Max",
)
OBJECTS = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "shells", "coins",
    "cards", "flowers", "eggs", "stamps", "beads", "balloons", "crayons", "buttons",
)
CONTAINERS = (("bag", "bags"), ("box", "boxes"), ("jar", "jars"), ("basket", "baskets"),
              ("pack", "packs"))

START = ("{P} has {a} {obj}.", "{P} starts with {a} {obj}.", "{P} owns {a} {obj}.")
START_MUL = (
    "{P} has {a} {cs} of {obj}. Each {c} holds {k} {obj}.",
    "{P} buys {a} {cs} with {k} {obj} in each {c}.",
)
ADD = (
    "{P} buys {b} more {obj}.",
    "{Q} gives {P} {b} more {obj}.",
    "{P} finds {b} more {obj}.",
    "{P} gets {b} more {obj} from {Q}.",
)
SUB = (
    "{P} gives {b} {obj} to {Q}.",
    "{P} sells {b} {obj}.",
    "{P} loses {b} {obj}.",
    "{P} uses {b} of the {obj}.",
)
MUL = {2: "{P} doubles the number of {obj}.", 3: "{P} triples the number of {obj}."}
ENDINGS = (
    "How many {obj} does {P} have now?",
    "How many {obj} does {P} have in the end?",
    "How many {obj} does {P} have after that?",
)

STEP_RE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
FINAL_RE = re.compile(r"#### (-?\d+)$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class MathConfig:
    n_train: int = 3000
    n_test: int = 200
    max_operand: int = 25
    min_steps: int = 1
    max_steps: int = 2
    max_multiplier: int = 5
    n_generic: int = 2000
    generic_answer_fraction: float = 0.25

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"MathConfig.{field}={getattr(self, field)!r}: {why}")

        for field, lo, hi in (
            ("n_train", 1, 1_000_000),
            ("n_test", 1, 100_000),
            ("max_operand", 2, 10_000),
            ("max_steps", 1, 6),
            ("max_multiplier", 2, 12),
            ("n_generic", 0, 1_000_000),
        ):
            v = getattr(self, field)
            if not _is_int(v) or not lo <= v <= hi:
                raise bad(field, f"must be an int in [{lo}, {hi}]")
        if not _is_int(self.min_steps) or not 1 <= self.min_steps <= self.max_steps:
            raise bad("min_steps", f"must be an int in [1, max_steps={self.max_steps}]")
        if not _is_num(self.generic_answer_fraction) or not (
            0.0 <= self.generic_answer_fraction <= 1.0
        ):
            raise bad("generic_answer_fraction", "must be a number in [0, 1]")


def _ops(rng: random.Random, cfg: MathConfig, n_steps: int) -> tuple[int, list[tuple[str, int]]]:
    """Start value and a list of (op, operand) with every intermediate result positive.

    The first op may be ``("*", k)`` applied to the start (the "bags of k" story form).
    """
    ops: list[tuple[str, int]] = []
    if rng.random() < 0.25:
        start = rng.randint(2, cfg.max_operand)
        ops.append(("*", rng.randint(2, cfg.max_multiplier)))
    else:
        start = rng.randint(2, cfg.max_operand)
    total = start * ops[0][1] if ops else start
    while len(ops) < n_steps:
        r = rng.random()
        if r < 0.12 and total <= cfg.max_operand:
            k = rng.choice((2, 3))
            ops.append(("*", k))
            total *= k
        elif r < 0.56 and total > 1:
            b = rng.randint(1, min(cfg.max_operand, total - 1))
            ops.append(("-", b))
            total -= b
        else:
            b = rng.randint(1, cfg.max_operand)
            ops.append(("+", b))
            total += b
    return start, ops


def make_problem(rng: random.Random, cfg: MathConfig) -> dict[str, Any]:
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    start, ops = _ops(rng, cfg, n_steps)
    p, q = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    story: list[str] = []
    steps: list[str] = []
    total = start
    for j, (op, b) in enumerate(ops):
        if j == 0 and op == "*":
            c, cs = rng.choice(CONTAINERS)
            story.append(rng.choice(START_MUL).format(P=p, a=start, cs=cs, c=c, k=b, obj=obj))
        else:
            if j == 0:
                story.append(rng.choice(START).format(P=p, a=start, obj=obj))
            pool = {"+": ADD, "-": SUB}.get(op)
            tpl = rng.choice(pool) if pool else MUL[b]
            story.append(tpl.format(P=p, Q=q, b=b, obj=obj))
        new = total + b if op == "+" else total - b if op == "-" else total * b
        lead = f"{p} has" if j == 0 else f"Then {p} has"
        steps.append(f"{lead} {total} {op} {b} = {new} {obj}.")
        total = new
    story.append(rng.choice(ENDINGS).format(P=p, obj=obj))
    question = " ".join(story)
    answer = " ".join(steps) + f" #### {total}"
    return {"question": question, "answer": answer, "value": total}


def make_generic(rng: random.Random, cfg: MathConfig) -> str:
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    start, ops = _ops(rng, cfg, n_steps)
    total = start
    parts = []
    for op, b in ops:
        new = total + b if op == "+" else total - b if op == "-" else total * b
        parts.append(f"{total} {op} {b} = {new}.")
        total = new
    line = " ".join(parts)
    if rng.random() < cfg.generic_answer_fraction:
        line += f" #### {total}"
    return line


def build_math_corpus(cfg: MathConfig, seed: int, out_dir: Path) -> dict[str, Any]:
    rng = random.Random(f"math-problems:{seed}")
    want = cfg.n_train + cfg.n_test
    seen: set[str] = set()
    problems: list[dict[str, Any]] = []
    attempts = 0
    while len(problems) < want:
        attempts += 1
        if attempts > 50 * want + 1000:
            raise ValueError(
                f"MathConfig: only {len(problems)} distinct problems found for "
                f"n_train + n_test = {want}; raise max_operand/max_steps or lower n_train"
            )
        prob = make_problem(rng, cfg)
        if prob["question"] in seen:
            continue
        seen.add(prob["question"])
        problems.append(prob)
    rng.shuffle(problems)

    def record(split: str, k: int, prob: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": f"math-{split}-{k:05d}",
            "question": prob["question"],
            "answer": prob["answer"],
            "text": f"Question: {prob['question']}\nAnswer: {prob['answer']}",
        }

    test = [record("test", k, p) for k, p in enumerate(problems[: cfg.n_test])]
    train = [record("train", k, p) for k, p in enumerate(problems[cfg.n_test :])]
    grng = random.Random(f"math-generic:{seed}")
    generic = [make_generic(grng, cfg) for _ in range(cfg.n_generic)]

    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_jsonl(out_dir / "train.jsonl", train)
    io.write_jsonl(out_dir / "test.jsonl", test)
    io.write_jsonl(out_dir / "generic.jsonl", ({"text": t} for t in generic))
    return {
        "config": dataclasses.asdict(cfg),
        "seed": seed,
        "train_records": len(train),
        "test_records": len(test),
        "generic_records": len(generic),
        "train_chars": sum(len(r["text"]) for r in train),
        "test_chars": sum(len(r["text"]) for r in test),
        "generic_chars": sum(len(t) for t in generic),
        "max_answer_value": max(p["value"] for p in problems),
    }
