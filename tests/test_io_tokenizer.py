"""Atomic outputs, the study tokenizer, and provenance."""

from __future__ import annotations

import json

import pytest

from learnforget.core import io
from learnforget.core import provenance
from learnforget.data.tokenizer import load_tokenizer, train_tokenizer


def test_atomic_file_is_not_visible_until_complete(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    io.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_atomic_directory_replaces_the_old_one_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with io.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_read_jsonl_names_the_bad_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="x.jsonl:2"):
        io.read_jsonl(f)


def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    src = tmp_path / "corpus.jsonl"
    io.write_jsonl(src, [{"text": f"Question: what is {a} + {b}?\nAnswer: {a + b}. #### {a + b}"}
                         for a in range(30) for b in range(30)] + [{"text": "def f(x):\n    return x * 2\n"}])
    one = train_tokenizer([src], tmp_path / "t1", vocab_size=400)
    two = train_tokenizer([src], tmp_path / "t2", vocab_size=400)
    assert one.get_vocab() == two.get_vocab() and 257 < len(one) <= 400
    loaded = load_tokenizer(tmp_path / "t1")
    text = "def g(y):\n    return y + 17  # ünïcode\n"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"


def test_stage_times_sum_benchmarks(tmp_path):
    bench = tmp_path / "benchmarks"
    (bench / "train" / "r").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\n"
    (bench / "base.tsv").write_text(header + "10.5\t0:00:10\t100\n")
    (bench / "train" / "r" / "1.tsv").write_text(header + "2.0\t0:00:02\t50\n")
    (bench / "train" / "r" / "2.tsv").write_text(header + "3.0\t0:00:03\t70\n")
    times = provenance.stage_times(bench)
    assert times["base"]["seconds"] == 10.5 and times["train"] == {"jobs": 2, "seconds": 5.0, "max_rss_mib": 70.0}
