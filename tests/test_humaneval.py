"""HumanEval scoring: pass@k, programs, hostile completions, the real problems via the CLI."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from learnforget.score.humaneval import (STOP_SEQUENCES, aggregate_pass_at_k, build_program, load_problems,
                                   pass_at_k, score_file, score_samples, truncate_completion)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "learnforget.cli", "humaneval-score", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4), (5, 2, 2, 0.7), (5, 0, 1, 0.0), (5, 0, 5, 0.0), (5, 4, 2, 1.0),
    (5, 5, 1, 1.0), (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomials():
    for n, c, k in [(10, 3, 5), (20, 7, 10), (200, 13, 100), (200, 1, 1)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (0, 0, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_aggregate_skips_k_above_the_fewest_samples():
    scores, notes = aggregate_pass_at_k({"a": (5, 2), "b": (3, 3)}, ks=(1, 2, 5))
    assert scores == {"pass@1": pytest.approx(0.7), "pass@2": pytest.approx(0.85)}
    assert len(notes) == 1 and "pass@5" in notes[0] and "3" in notes[0]


def test_truncate_completion():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    assert truncate_completion("    return 1\ndef foo():\n    pass\n") == "    return 1"
    assert truncate_completion("    x = 1\n    return x\n\nif __name__ == '__main__':\n") == "    x = 1\n    return x\n"
    assert truncate_completion("    return 2\n# tests\nprint(f())\n") == "    return 2"
    assert truncate_completion("    return 3\n") == "    return 3\n"
    assert truncate_completion("ab STOP cd", ["STOP", "cd"]) == "ab "


def test_load_problems_and_build_program(problems):
    assert len(problems) == 164
    p = problems["HumanEval/0"]
    assert {"prompt", "entry_point", "canonical_solution", "test"} <= set(p)
    program = build_program(p, p["canonical_solution"])
    assert program.startswith(p["prompt"] + p["canonical_solution"] + "\n")
    assert program.endswith(f"\ncheck({p['entry_point']})\n")


def test_hostile_completions_are_contained_and_scoring_goes_on(problems, tmp_path, monkeypatch):
    p0 = problems["HumanEval/0"]
    canonical = p0["canonical_solution"]
    outside = tmp_path / "outside.txt"
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("precious")
    secret = "lf-humaneval-secret-424242"
    monkeypatch.setenv("LF_HUMANEVAL_SECRET", secret)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    port = srv.getsockname()[1]

    def then_correct(attack):
        # each attack is followed by the correct body: a pass would mean the attack got through
        return textwrap.indent(textwrap.dedent(attack), "    ") + canonical

    hostile = {
        "infinite loop": "    while True:\n        pass\n",
        "fork bomb": then_correct("import os\nwhile True:\n    os.fork()\n"),
        "huge allocation": then_correct("x = bytearray(64 * 1024 ** 3)\n"),
        "write outside": then_correct(f"open({str(outside)!r}, 'w').write('pwned')\n"),
        "rmtree": then_correct(f"import shutil\nshutil.rmtree({str(keep)!r})\n"),
        "network": then_correct(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"),
        "kill parent": then_correct("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"),
        "secret": ("    import os\n    seen = repr(dict(os.environ))\n"
                   "    for path in ('/proc/%d/environ' % os.getppid(), '/proc/1/environ'):\n"
                   "        try:\n            seen += open(path, 'rb').read().decode('latin-1')\n"
                   "        except Exception:\n            pass\n"
                   f"    if {secret!r} not in seen:\n        return None\n" + canonical),
        "early exit": "    import sys\n    sys.exit(0)\n",
    }
    correct = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/53"]
    samples = []
    for i, completion in enumerate(hostile.values()):
        samples.append({"task_id": "HumanEval/0", "completion": completion})
        tid = correct[i % len(correct)]
        samples.append({"task_id": tid, "completion": problems[tid]["canonical_solution"]})
    try:
        records = score_samples(samples, problems, timeout_s=3, workers=3, progress=False)
        with pytest.raises(socket.timeout):
            srv.accept()[0].close()
    finally:
        srv.close()
    assert len(records) == len(samples)
    by_name = dict(zip(hostile, records[0::2]))
    for name, rec in by_name.items():
        assert not rec["passed"], (name, rec)
    assert by_name["infinite loop"]["status"] == "timeout"
    assert all(r["status"] == "failed" for n, r in by_name.items() if n != "infinite loop")
    assert "MemoryError" in by_name["huge allocation"]["reason"]
    assert all(r["passed"] and r["status"] == "passed" for r in records[1::2]), records[1::2]
    assert not outside.exists()
    assert (keep / "precious.txt").read_text() == "precious"
    assert set(records[0]) >= {"task_id", "completion", "status", "passed", "reason", "wall_s"}


def test_score_samples_rejects_unknown_task(problems):
    with pytest.raises(ValueError, match="HumanEval/999"):
        score_samples([{"task_id": "HumanEval/999", "completion": ""}], problems, progress=False)


def test_score_file_pass_at_k_and_per_sample_output(problems, tmp_path):
    records = []
    for tid in ("HumanEval/0", "HumanEval/4", "HumanEval/7"):
        records += [{"task_id": tid, "completion": problems[tid]["canonical_solution"]},
                    {"task_id": tid, "completion": "    return None\n"}]
    path = _write_jsonl(tmp_path / "samples.jsonl", records)
    result = score_file(path, ks=(1, 2, 10), problems=problems, per_sample_out=True, workers=2,
                        progress=False)
    assert result["pass@1"] == pytest.approx(0.5) and result["pass@2"] == pytest.approx(1.0)
    assert "pass@10" not in result and any("pass@10" in n for n in result["notes"])
    assert result["n_problems"] == 3 and result["n_samples"] == 6
    assert result["status_counts"] == {"passed": 3, "failed": 3, "timeout": 0, "error": 0}
    out = tmp_path / "samples.jsonl_results.jsonl"
    assert result["per_sample"] == str(out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["passed"] for r in lines] == [True, False] * 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "atomic write left temp files"


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "HumanEval/0", "completion": ""}\n{not json\n', ":2: not valid JSON"),
    ('{"task_id": "HumanEval/0", "completion": ""}\n\n{"task_id": "Nope/1", "completion": ""}\n',
     ":3: unknown task_id 'Nope/1'"),
    ('{"task_id": "HumanEval/0"}\n', ":1: 'completion' is missing"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ("\n", "no samples"),
])
def test_score_file_bad_input(problems, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        score_file(path, problems=problems, progress=False)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": 3}\n')
    proc = _cli(str(path), "--no-progress")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and ":2:" in proc.stderr
    proc = _cli(str(tmp_path / "missing.jsonl"), "--no-progress")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_cli_canonical_solutions_all_pass(problems, tmp_path):
    path = _write_jsonl(tmp_path / "canonical.jsonl",
                        [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()])
    out = tmp_path / "per_sample.jsonl"
    proc = _cli(str(path), "--k", "1", "10", "--workers", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pass@1"] == 1.0
    assert result["n_problems"] == 164 and result["n_samples"] == 164
    assert result["status_counts"]["passed"] == 164
    assert "pass@10" not in result
    assert len(out.read_text().splitlines()) == 164


def test_empty_completions_score_zero(problems, tmp_path):
    path = _write_jsonl(tmp_path / "empty.jsonl", [{"task_id": t, "completion": ""} for t in problems])
    result = score_file(path, ks=(1,), problems=problems, workers=4, progress=False, timeout_s=5)
    assert result["pass@1"] == 0.0
    assert result["status_counts"]["passed"] == 0 and result["n_samples"] == 164

