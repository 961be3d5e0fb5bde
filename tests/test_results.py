"""Evaluation JSONs -> tidy rows: names, roles, sorting."""

from __future__ import annotations

import copy
import json

import pytest

from learnforget.report import metrics as results
from learnforget.report.metrics import COLUMNS, collect, metric_name, primary_metric, tidy_rows


def eval_json(meta: dict) -> dict:
    """A hand-written evaluation JSON shaped like evaluate_checkpoint's output."""
    return {
        "results": {
            "lf_math": {
                "alias": "lf_math",
                "name": "lf_math",
                "sample_len": 200,
                "exact_match,strict-match": 0.125,
                "exact_match_stderr,strict-match": "N/A",
            },
            "lf_math_answer": {"alias": "lf_math_answer", "perplexity,none": 40.5, "acc,none": 0.25},
            "lf_code": {
                "alias": "lf_code",
                "word_perplexity,none": 900.0,
                "byte_perplexity,none": 3.0,
                "bits_per_byte,none": 1.58,
                "bits_per_byte_stderr,none": 0.01,
            },
            "lf_facts": {"alias": "lf_facts", "acc,none": 0.55, "acc_norm,none": 0.5, "acc_stderr,none": 0.02},
            "lf_source_heldout": {"alias": "lf_source_heldout", "bits_per_byte,none": 0.9, "word_perplexity,none": 7.0},
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.3, "acc_norm,none": 0.31},
        },
        "versions": {"lf_math": 1.0, "lf_math_answer": 1.0, "lf_code": 1.0, "lf_facts": 2.0,
                     "lf_source_heldout": 1.0, "hellaswag": 1.0},
        "higher_is_better": {
            "lf_math": {"exact_match": True},
            "lf_math_answer": {"perplexity": False, "acc": True},
            "lf_code": {"word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False},
            "lf_facts": {"acc": True, "acc_norm": True},
            "lf_source_heldout": {"bits_per_byte": False, "word_perplexity": False},
            "hellaswag": {"acc": True, "acc_norm": True},
        },
        "learnforget": dict(meta),
    }  # fmt: skip


BASE = {"run": "base", "method": "base", "method_type": "base", "domain": "", "regime": "", "duration": 0.0}
MATH = {"run": "math-cpt-lora", "method": "lora", "method_type": "lora", "domain": "math", "regime": "cpt",
        "duration": 2}


def by_key(rows):
    return {(r["task"], r["metric"]): r for r in rows}


def test_metric_names_and_primary():
    assert metric_name("acc,none") == "acc"
    assert metric_name("exact_match,strict-match") == "exact_match_strict-match"
    assert primary_metric("lf_math") == "exact_match_strict-match"
    assert primary_metric("lf_facts") == "acc"
    assert primary_metric("lf_code") == "bits_per_byte"
    with pytest.raises(KeyError, match="gsm8k"):
        primary_metric("gsm8k")


def test_columns_and_dropped_fields():
    rows = tidy_rows(eval_json(MATH))
    assert all(list(r) == COLUMNS for r in rows)
    keys = by_key(rows)
    assert ("lf_math", "exact_match_strict-match") in keys
    assert not any("stderr" in m or m in ("alias", "name", "sample_len") for _, m in keys)
    assert {m for t, m in keys if t == "lf_code"} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    r = keys[("lf_facts", "acc")]
    assert r["value"] == 0.55 and r["task_version"] == "2.0" and r["higher_is_better"] is True
    assert r["duration"] == 2.0 and isinstance(r["duration"], float)
    assert keys[("lf_math_answer", "perplexity")]["higher_is_better"] is False


def test_task_rows_have_role_task_and_the_runs_domain():
    keys = by_key(tidy_rows(eval_json(MATH)))
    assert {r["role"] for r in keys.values()} == {"task"}
    assert {r["domain"] for r in keys.values()} == {"math"}
    assert {r["regime"] for r in keys.values()} == {"cpt"}
    base = by_key(tidy_rows(eval_json(BASE)))
    assert {r["domain"] for r in base.values()} == {""}
    assert {(r["run"], r["method"], r["duration"]) for r in base.values()} == {("base", "base", 0.0)}


GROUPS = {
    "math": {"role": "learning", "domain": "math", "tasks": ["lf_math"], "metric": "exact_match",
             "filter": "strict-match"},
    "code": {"role": "learning", "domain": "code", "tasks": ["lf_code"], "metric": "bits_per_byte"},
    "forgetting": {"role": "forgetting", "tasks": ["lf_facts", "hellaswag"], "metric": "acc"},
    "probe": {"role": "other", "tasks": ["lf_source_heldout"], "metric": "bits_per_byte"},
}


def test_group_rows_roles_and_domains(tmp_path):
    paths = []
    for meta in (BASE, MATH):
        p = tmp_path / f"{meta['run']}.json"
        p.write_text(json.dumps(eval_json(meta)))
        paths.append(p)
    df = collect(paths, groups=GROUPS)
    g = {(r.run, r.task): r for r in df[df.role != "task"].itertuples()}
    assert g[("base", "math")].role == "learning" and g[("base", "math")].domain == "math"
    assert g[("base", "code")].domain == "code" and g[("base", "code")].higher_is_better is False
    assert g[("base", "forgetting")].domain == "source"
    assert g[("base", "forgetting")].value == pytest.approx((0.55 + 0.3) / 2)
    assert g[("math-cpt-lora", "forgetting")].domain == "math" and g[("math-cpt-lora", "forgetting")].metric == "acc"
    assert g[("math-cpt-lora", "probe")].role == "other"
    assert len(df) == 2 * len(tidy_rows(eval_json(MATH))) + 2 * len(GROUPS)


def test_method_type_follows_method_and_comes_from_the_meta_not_the_name(tmp_path):
    assert COLUMNS[COLUMNS.index("method") + 1] == "method_type"
    full = {**MATH, "run": "math-baseline", "method": "baseline", "method_type": "full"}
    paths = []
    for meta in (BASE, full):
        p = tmp_path / f"{meta['run']}.json"
        p.write_text(json.dumps(eval_json(meta)))
        paths.append(p)
    df = collect(paths, groups=GROUPS)
    assert list(df.columns[:3]) == ["run", "method", "method_type"]
    types = {(r.run, r.method, r.method_type) for r in df.itertuples()}  # task and group rows alike
    assert types == {("base", "base", "base"), ("math-baseline", "baseline", "full")}


def test_registry_filters_metrics_but_not_unknown_tasks():
    js = eval_json(MATH)
    js["results"]["lf_facts"]["acc_mutual_info,none"] = 0.4  # not kept by the registry
    js["results"]["hellaswag"]["f1,none"] = 0.2  # unknown task: everything numeric is kept
    js["results"]["hellaswag"]["weird,none"] = "N/A"
    keys = by_key(tidy_rows(js))
    assert ("lf_facts", "acc_mutual_info") not in keys
    assert ("hellaswag", "f1") in keys and ("hellaswag", "weird") not in keys
    assert keys[("hellaswag", "f1")]["higher_is_better"] is None


def test_missing_meta_is_an_error():
    js = eval_json(MATH)
    del js["learnforget"]["duration"]
    with pytest.raises(ValueError, match="duration"):
        tidy_rows(js)


def test_collect_sorts_numerically_and_rejects_duplicates(tmp_path):
    paths = []
    for run, dur in [("math-cpt-lora", "10"), ("math-cpt-lora", "2"), ("base", 0.0), ("math-cpt-lora", "0.5")]:
        meta = BASE if run == "base" else {**MATH, "duration": dur}
        p = tmp_path / f"{run}-{dur}.json"
        p.write_text(json.dumps(eval_json(meta)))
        paths.append(p)
    df = collect(paths)
    assert list(df.columns) == COLUMNS
    assert list(df.drop_duplicates("duration")["duration"]) == [0.0, 0.5, 2.0, 10.0]
    lora = df[df.run == "math-cpt-lora"]
    assert list(lora.drop_duplicates("duration")["duration"]) == [0.5, 2.0, 10.0]
    first = df[(df.run == "base")]
    assert list(first["task"]) == sorted(first["task"])
    assert len(df) == 4 * len(tidy_rows(eval_json(MATH)))
    # the same rows again: identical output (deterministic), duplicates rejected
    assert collect(list(reversed(paths))).equals(df)
    with pytest.raises(ValueError, match="duplicate"):
        collect(paths + paths[:1])


def test_tidy_rows_does_not_modify_input():
    js = eval_json(MATH)
    before = copy.deepcopy(js)
    tidy_rows(js)
    assert js == before
    assert results.ROW_ROLES == ("task", "diversity", "learning", "forgetting", "other")
