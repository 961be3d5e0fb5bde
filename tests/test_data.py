"""Tests for the offline corpora (learnforget.data)."""

from __future__ import annotations

import ast
import collections
import re
from pathlib import Path

import pytest

from learnforget.core import io
from learnforget.data import (
    CodeConfig,
    MathConfig,
    SourceConfig,
    build_code,
    build_math,
    build_source,
    from_dict,
)
from learnforget.data import arithmetic, stdlib_code, world

SMALL_CODE = {"max_records_train": 200, "max_records_test": 40}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.jsonl"))}


# --- source world -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source")
    stats = build_source({}, 7, out)
    return {
        "stats": stats,
        "train": [r["text"] for r in io.read_jsonl(out / "train.jsonl")],
        "quiz": io.read_jsonl(out / "quiz.jsonl"),
        "heldout": [r["text"] for r in io.read_jsonl(out / "heldout.jsonl")],
        "world": world.build_world(SourceConfig(), 7),
    }


def test_source_deterministic_and_seed_dependent(tmp_path):
    cfg = {"n_entities": 30, "english_fraction": 0.2}
    build_source(cfg, 3, tmp_path / "a")
    build_source(cfg, 3, tmp_path / "b")
    build_source(cfg, 4, tmp_path / "c")
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert set(a) == {"train.jsonl", "quiz.jsonl", "heldout.jsonl"}
    assert a == b
    assert a["train.jsonl"] != c["train.jsonl"]
    names3 = {p["name"] for p in world.build_world(SourceConfig(n_entities=30), 3)["people"]}
    names4 = {p["name"] for p in world.build_world(SourceConfig(n_entities=30), 4)["people"]}
    assert names3 != names4


def test_source_record_formats_and_sizes(source):
    st = source["stats"]
    cfg = SourceConfig()
    n_facts = cfg.n_entities * len(cfg.attributes)
    assert st["n_facts"] == n_facts == len(source["heldout"]) == len(source["quiz"])
    assert st["train_fact_sentences"] == n_facts * cfg.n_train_templates
    assert st["train_biographies"] == cfg.n_entities
    assert len(source["train"]) == st["train_records"]
    assert 1000 <= len(source["train"]) <= 6000  # small enough to memorise on CPU
    for q in source["quiz"]:
        assert set(q) == {"id", "question", "choices", "label"}


def test_names_unique_and_invented(source):
    people = source["world"]["people"]
    names = [p["name"] for p in people]
    firsts = [n.split()[0] for n in names]
    lasts = [n.split()[1] for n in names]
    assert len(set(firsts)) == len(firsts) and len(set(lasts)) == len(lasts)
    assert not set(firsts) & set(lasts)
    english = world._english_words()
    for part in firsts + lasts:
        assert part.isalpha() and part[0].isupper()
        assert part.lower() not in english


def test_attribute_values_balanced(source):
    people = source["world"]["people"]
    for attr in SourceConfig().attributes:
        counts = collections.Counter(p[attr] for p in people)
        assert set(counts) <= set(world.ATTRIBUTES[attr]["values"])
        assert max(counts.values()) - min(counts.values()) <= 1


def test_quiz_structure(source):
    people = {p["name"]: p for p in source["world"]["people"]}
    quiz = source["quiz"]
    labels = collections.Counter()
    for q in quiz:
        attr = q["id"].rsplit("-", 1)[1]
        spec = world.ATTRIBUTES[attr]
        name = next(n for n in people if n in q["question"])
        assert q["question"] == world.render(spec["quiz"], name, people[name][attr])
        assert q["question"].startswith("Question: ") and q["question"].endswith("\nAnswer:")
        ch = q["choices"]
        assert len(ch) == 4 and len(set(ch)) == 4
        assert all(c.startswith(" ") for c in ch)
        assert all(c[1:] in spec["values"] for c in ch)
        assert 0 <= q["label"] < 4
        assert ch[q["label"]] == " " + people[name][attr]
        labels[q["label"]] += 1
    assert max(labels.values()) - min(labels.values()) <= 1
    assert sorted(labels) == [0, 1, 2, 3]
    # Knowing only which values are common gives chance: the prior-argmax choice is ~25%.
    prior = collections.Counter(p[a] for p in people.values() for a in SourceConfig().attributes)
    hits = sum(max(range(4), key=lambda k: prior[q["choices"][k][1:]]) == q["label"] for q in quiz)
    assert hits / len(quiz) < 0.35


def test_quiz_and_heldout_absent_from_train(source):
    blob = "\x00".join(source["train"])
    for q in source["quiz"]:
        assert q["question"] not in blob
        assert q["question"].split("\n")[0] not in blob
    for h in source["heldout"]:
        assert h not in blob
    for spec in world.ATTRIBUTES.values():
        assert spec["heldout"] not in spec["train"]
        assert spec["quiz"] not in spec["train"]
        # the fixed wording of the held-out template never appears in training
        middle = max(re.split(r"\{[a-z_]+\}", spec["heldout"]), key=len)
        assert len(middle) > 5 and middle not in blob


def test_every_fact_in_train(source):
    train = source["train"]
    by_name = collections.defaultdict(list)
    people = source["world"]["people"]
    names = [p["name"] for p in people]
    for t in train:
        for n in names:
            if n in t and len(t) < 120:
                by_name[n].append(t)
    for p in people[:40]:
        for attr in SourceConfig().attributes:
            hits = [t for t in by_name[p["name"]] if p[attr] in t]
            assert len(hits) >= SourceConfig().n_train_templates


def test_source_options(tmp_path):
    st = build_source(
        {"n_entities": 20, "attributes": ["pet", "colour"], "n_train_templates": 2,
         "qa_fraction": 0.0, "biography": False, "n_quiz": 10, "english_fraction": 0.5},
        1, tmp_path,
    )
    assert st["train_qa"] == 0 and st["train_biographies"] == 0
    assert st["train_fact_sentences"] == 20 * 2 * 2
    assert len(io.read_jsonl(tmp_path / "quiz.jsonl")) == 10
    texts = [r["text"] for r in io.read_jsonl(tmp_path / "train.jsonl")]
    assert not any(t.startswith("Question:") for t in texts)
    assert len(texts) == 80 + st["train_english"]
    # English is about half of the training characters, taken from Python's own docs
    names = {p["name"] for p in world.build_world(SourceConfig(n_entities=20), 1)["people"]}
    english = [t for t in texts if not any(n in t for n in names)]
    assert len(english) == st["train_english"] > 0
    share = sum(map(len, english)) / sum(map(len, texts))
    assert 0.5 <= share < 0.5 + 800 / sum(map(len, texts))


# --- math -------------------------------------------------------------------------------

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _check_chain(answer: str, max_steps: int) -> int:
    """Check every ``a op b = c`` step and the ``#### N`` ending; return N."""
    m = re.search(r" #### (\d+)$", answer)
    assert m, answer
    steps = arithmetic.STEP_RE.findall(answer)
    assert 1 <= len(steps) <= max_steps, answer
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert OPS[op](a, b) == c, answer
        assert c > 0
        if prev is not None:
            assert a == prev, answer  # each step continues from the last result
        prev = c
    assert int(m.group(1)) == prev, answer
    return prev


@pytest.fixture(scope="module")
def math(tmp_path_factory):
    out = tmp_path_factory.mktemp("math")
    stats = build_math({}, 11, out)
    return {name: io.read_jsonl(out / f"{name}.jsonl") for name in ("train", "test", "generic")} | {
        "stats": stats
    }


def test_math_sizes_and_format(math):
    cfg = MathConfig()
    assert len(math["train"]) == cfg.n_train and len(math["test"]) == cfg.n_test
    assert len(math["generic"]) == cfg.n_generic
    for r in math["train"] + math["test"]:
        assert set(r) == {"id", "question", "answer", "text"}
        assert r["text"] == f"Question: {r['question']}\nAnswer: {r['answer']}"
        assert r["question"].endswith("?")
    ids = [r["id"] for r in math["train"] + math["test"]]
    assert len(set(ids)) == len(ids)


def test_math_answers_are_correct(math):
    cfg = MathConfig()
    for r in math["train"] + math["test"]:
        _check_chain(r["answer"], cfg.max_steps)
        # every operand of the worked steps that is not a previous result is in the question
        steps = arithmetic.STEP_RE.findall(r["answer"])
        q_numbers = set(re.findall(r"\d+", r["question"]))
        assert steps[0][0] in q_numbers
        for _, op, b, _ in steps:
            if op != "*" or b not in ("2", "3") or b in q_numbers:
                assert b in q_numbers, r
        for n in q_numbers:
            assert 1 <= int(n) <= max(cfg.max_operand, cfg.max_multiplier)


def test_math_uses_all_operations_and_steps(math):
    ops = collections.Counter(op for r in math["train"] for _, op, _, _ in
                              arithmetic.STEP_RE.findall(r["answer"]))
    assert all(ops[o] > 100 for o in "+-*")
    n_steps = collections.Counter(
        len(arithmetic.STEP_RE.findall(r["answer"])) for r in math["train"]
    )
    assert set(n_steps) == {1, 2}


def test_math_train_test_disjoint(math):
    train_q = {r["question"] for r in math["train"]}
    test_q = {r["question"] for r in math["test"]}
    assert len(train_q) == len(math["train"]) and len(test_q) == len(math["test"])
    assert not train_q & test_q


def test_math_generic(math):
    with_answer = 0
    for r in math["generic"]:
        t = r["text"]
        eqs = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", t)
        assert eqs and t.startswith(" ".join(f"{a} {o} {b} = {c}." for a, o, b, c in eqs)), t
        for a, o, b, c in eqs:
            assert OPS[o](int(a), int(b)) == int(c)
        if "####" in t:
            with_answer += 1
            assert t.endswith(f" #### {eqs[-1][3]}")
    assert 0.15 < with_answer / len(math["generic"]) < 0.35


def test_math_deterministic(tmp_path):
    cfg = {"n_train": 50, "n_test": 10, "n_generic": 20, "max_steps": 3}
    build_math(cfg, 5, tmp_path / "a")
    build_math(cfg, 5, tmp_path / "b")
    build_math(cfg, 6, tmp_path / "c")
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b and a["train.jsonl"] != c["train.jsonl"]
    for r in io.read_jsonl(tmp_path / "a" / "train.jsonl"):
        _check_chain(r["answer"], 3)


def test_math_too_many_problems_rejected(tmp_path, monkeypatch):
    # shrink the story space so that only a handful of distinct questions exist
    for attr in ("START", "START_MUL", "ADD", "SUB", "ENDINGS", "OBJECTS"):
        monkeypatch.setattr(arithmetic, attr, getattr(arithmetic, attr)[:1])
    monkeypatch.setattr(arithmetic, "NAMES", ("Ann", "Bo"))
    with pytest.raises(ValueError, match="n_train"):
        build_math({"n_train": 50, "n_test": 10, "max_operand": 2, "max_steps": 1,
                    "max_multiplier": 2, "n_generic": 0}, 0, tmp_path)


# --- code -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    out = {}
    for seed in (0, 1):
        d = tmp_path_factory.mktemp(f"code{seed}")
        stats = build_code(SMALL_CODE, seed, d)
        out[seed] = {"dir": d, "stats": stats, "train": io.read_jsonl(d / "train.jsonl"),
                     "test": io.read_jsonl(d / "test.jsonl")}
    return out


def test_code_split_stable_and_disjoint(code):
    frac = CodeConfig().test_fraction
    for seed in (0, 1):
        train_paths = {r["path"] for r in code[seed]["train"]}
        test_paths = {r["path"] for r in code[seed]["test"]}
        assert train_paths and test_paths and not train_paths & test_paths
        assert not any(stdlib_code.is_test_path(p, frac) for p in train_paths)
        assert all(stdlib_code.is_test_path(p, frac) for p in test_paths)
    # the seed changes the sample, never which side a file is on
    assert {r["id"] for r in code[0]["train"]} != {r["id"] for r in code[1]["train"]}
    all_test = {r["path"] for s in (0, 1) for r in code[s]["test"]}
    all_train = {r["path"] for s in (0, 1) for r in code[s]["train"]}
    assert not all_test & all_train
    # sha256 of the path, so the answer is a constant
    assert [stdlib_code.is_test_path(p, 0.1) for p in ("os.py", "json/decoder.py")] == [
        stdlib_code.is_test_path(p, 0.1) for p in ("os.py", "json/decoder.py")
    ]
    n_test = sum(stdlib_code.is_test_path(f"m{i}.py", 0.1) for i in range(2000))
    assert 140 < n_test < 260


def test_code_same_seed_identical(code, tmp_path):
    build_code(SMALL_CODE, 0, tmp_path)
    assert _files(tmp_path) == _files(code[0]["dir"])


def test_code_records(code):
    cfg = CodeConfig()
    root = stdlib_code.stdlib_root()
    recs = code[0]["train"] + code[0]["test"]
    assert len(code[0]["train"]) == SMALL_CODE["max_records_train"]
    assert len(code[0]["test"]) == SMALL_CODE["max_records_test"]
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) == {"id", "path", "text", "prompt", "response"}
        assert r["id"].startswith(r["path"] + ":")
        assert r["prompt"] + r["response"] == r["text"]
        assert cfg.min_chars <= len(r["text"]) <= cfg.max_chars
        parts = Path(r["path"]).parts
        assert not set(parts) & stdlib_code.SKIP_DIRS
        tree = ast.parse(r["text"])
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(fn, clean=False) is not None
        assert r["id"].split(":")[1].split("@")[0].rsplit(".", 1)[-1] == fn.name
        # prompt ends right after the docstring, response is the (non-empty) rest
        assert r["prompt"].rstrip().endswith(('"""', "'''", '"', "'"))
        assert r["response"].strip()
        # the text is real source: every line appears in the file
        src = (root / r["path"]).read_text(encoding="utf-8")
        for line in r["text"].splitlines():
            assert line.strip() in src


def test_code_extraction_on_fixture(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "idlelib").mkdir()
    (root / "notapkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "idlelib" / "__init__.py").write_text("")
    body = "    x = 1\n    return x + 2\n"
    (root / "pkg" / "mod.py").write_text(
        "import os\n\n"
        "class A:\n"
        "    @staticmethod\n"
        "    def meth(a,\n"
        "             b):\n"
        '        """Docstring\n        two lines."""\n'
        "        y = a\n\n"
        "        return y\n\n"
        "def nodoc():\n    return 1\n\n"
        "def only_doc():\n    '''Nothing after.'''\n\n"
        f"def f():\n    'One line.'\n{body}"
    )
    (root / "pkg" / "tests" / "test_x.py").write_text(f"def t():\n    'doc'\n{body}")
    (root / "idlelib" / "y.py").write_text(f"def t():\n    'doc'\n{body}")
    (root / "notapkg" / "z.py").write_text(f"def t():\n    'doc'\n{body}")
    (root / "latin.py").write_bytes(b"# caf\xe9\ndef g():\n    'doc'\n    return 1\n")
    (root / "top.py").write_text(f"async def h(q):\n    \"doc\"\n{body}")

    assert stdlib_code.source_files(root, 10_000) == ["latin.py", "pkg/__init__.py",
                                                      "pkg/mod.py", "top.py"]
    funcs = stdlib_code.extract_functions((root / "pkg" / "mod.py").read_text())
    assert [f["qualname"] for f in funcs] == ["A.meth", "f"]
    meth = funcs[0]
    assert meth["prompt"] == (
        '@staticmethod\ndef meth(a,\n         b):\n    """Docstring\n    two lines."""\n'
    )
    assert meth["response"] == "    y = a\n\n    return y\n"
    assert funcs[1]["prompt"] == "def f():\n    'One line.'\n" and funcs[1]["response"] == body

    d = tmp_path / "out"
    # sha256 puts pkg/mod.py at 0.083 and top.py at 0.287 of the unit interval
    stats = build_code({"stdlib_dir": str(root), "min_chars": 10, "test_fraction": 0.2}, 0, d)
    assert sorted(r["id"] for r in io.read_jsonl(d / "test.jsonl")) == [
        "pkg/mod.py:A.meth", "pkg/mod.py:f"]
    assert [r["id"] for r in io.read_jsonl(d / "train.jsonl")] == ["top.py:h"]
    assert stats["files_train"] == 2 and stats["files_test"] == 1  # latin.py: not UTF-8


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SourceConfig, MathConfig, CodeConfig])
def test_unknown_key_named(cls):
    with pytest.raises(ValueError, match="bogus_key"):
        from_dict(cls, {"bogus_key": 1})
    assert from_dict(cls, None) == cls()
    assert from_dict(cls, {}) == cls()


@pytest.mark.parametrize(
    "builder, cfg, field",
    [
        (build_source, {"n_entities": 0}, "n_entities"),
        (build_source, {"n_entities": True}, "n_entities"),
        (build_source, {"attributes": ["city", "shoe_size"]}, "shoe_size"),
        (build_source, {"attributes": []}, "attributes"),
        (build_source, {"n_train_templates": 99}, "n_train_templates"),
        (build_source, {"qa_fraction": 1.5}, "qa_fraction"),
        (build_source, {"biography": "yes"}, "biography"),
        (build_source, {"n_quiz": 10_000}, "n_quiz"),
        (build_source, {"english_fraction": 0.95}, "english_fraction"),
        (build_math, {"n_train": -1}, "n_train"),
        (build_math, {"min_steps": 3, "max_steps": 2}, "min_steps"),
        (build_math, {"max_operand": 2.5}, "max_operand"),
        (build_math, {"generic_answer_fraction": -0.1}, "generic_answer_fraction"),
        (build_code, {"test_fraction": 0.0}, "test_fraction"),
        (build_code, {"min_chars": 500, "max_chars": 100}, "max_chars"),
        (build_code, {"stdlib_dir": "/nonexistent/dir"}, "stdlib_dir"),
    ],
)
def test_bad_values_named(builder, cfg, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        builder(cfg, 0, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_config_lists_become_tuples():
    cfg = from_dict(SourceConfig, {"attributes": ["pet", "city"]})
    assert cfg.attributes == ("pet", "city")
    hash(cfg)  # frozen and hashable
    with pytest.raises(Exception):
        cfg.n_entities = 3  # type: ignore[misc]
