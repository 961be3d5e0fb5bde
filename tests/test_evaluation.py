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

from learnforget import evaluation as ev  # noqa: E402
from learnforget.evaluation import TASKS, evaluate_checkpoint  # noqa: E402

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
            {"id": i, "path": "m.py", "text": f"def f{i}(x):\n    return x + {i}\n", "prompt": "", "response": ""}
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
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
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
    assert set(TASKS) == {"lf_math", "lf_math_answer", "lf_facts", "lf_source_heldout", "lf_code"}
    yamls = sorted(p.name for p in ev.TASK_DIR.glob("*.yaml"))
    assert yamls == sorted(t.yaml for t in TASKS.values() if t.local)
    for name, task in TASKS.items():
        cfg = yaml.safe_load((ev.TASK_DIR / task.yaml).read_text())
        assert cfg["task"] == name
        assert "version" in cfg["metadata"]
        # the YAML shows the same data files as the registry (which is what the code uses)
        assert cfg["dataset_kwargs"]["data_files"] == {s: f"{{data_root}}/{rel}" for s, rel in task.data.items()}
        listed = {m["metric"] for m in cfg["metric_list"]}
        filters = {f["name"] for f in cfg.get("filter_list", [])} or {"none"}
        for key in task.metrics:
            metric, filt = key.split(",")
            assert metric in listed and filt in filters, (name, key)
        if cfg.get("fewshot_split"):
            assert cfg["fewshot_split"] in task.data


def test_required_data_and_get_task(tmp_path):
    paths = ev.required_data(["lf_math", "lf_facts", "gsm8k"], tmp_path)
    expected = [tmp_path / "math/test.jsonl", tmp_path / "math/train.jsonl", tmp_path / "source/quiz.jsonl"]
    assert paths == sorted(expected)
    with pytest.raises(KeyError, match="lf_nonexistent"):
        ev.get_task("lf_nonexistent")


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
    ev.render_tasks(list(TASKS), tmp_path / "data", tmp_path / "tasks", cache_dir=str(tmp_path / "cache"))
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    lm = ScriptedLM()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=tm, bootstrap_iters=0, log_samples=False)
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
    ev.render_tasks(["lf_math"], tmp_path / "data", tmp_path / "tasks")
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    objs = ev._load_task_objects(tm, ["lf_math"], {"lf_math": 3})
    lm = ScriptedLM()
    out = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, bootstrap_iters=0, fewshot_random_seed=7)
    assert out["n-shot"]["lf_math"] == 3
    train = {json.loads(line)["question"] for line in (tmp_path / "data/math/train.jsonl").read_text().splitlines()}
    ctx = lm.seen["generate_until"][0][0]
    shots = re.findall(r"Question: (.*?)\nAnswer: .*? #### \d+\n\n", ctx)
    assert len(shots) == 3 and set(shots) <= train
    assert "Answer:  " not in ctx and ctx.endswith("How many?\nAnswer:")
    with pytest.raises(ValueError, match="lf_code"):
        ev._load_task_objects(tm, ["lf_math"], {"lf_code": 1})


# ------------------------------------------------------------------ tiny model end to end


def test_evaluate_checkpoint_all_tasks_with_adapter(tiny, tmp_path):
    out_json, samples = tmp_path / "evals/r/1.json", tmp_path / "evals/r/1.samples.jsonl"
    meta = {"run": "r", "method": "lora", "domain": "math", "regime": "cpt", "duration": 1.0}
    out = evaluate_checkpoint(
        tiny / "model", list(TASKS), tiny / "data", out_json, adapter_dir=tiny / "adapter",
        tokenizer_dir=tiny / "tok", batch_size=8, log_samples_path=samples, extra_meta=meta,
    )  # fmt: skip
    assert json.loads(out_json.read_text()) == out
    assert out["learnforget"] == meta
    for key in ("results", "versions", "n-shot", "higher_is_better", "configs", "n-samples"):
        assert set(out[key]) == set(TASKS), key
    got = _metrics(out)
    for name, task in TASKS.items():
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
    assert out["configs"]["lf_math"]["metadata"]["config_source"] == "learnforget/tasks/lf_math.yaml"
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

    from learnforget.results import tidy_rows

    rows = tidy_rows(out)
    assert {(r["task"], r["metric"]) for r in rows} == {
        (n, m.replace(",none", "").replace(",", "_")) for n, t in TASKS.items() for m in t.metrics
    }

    # the same adapter merged into the weights scores the same; the bare base does not
    merged = evaluate_checkpoint(
        tiny / "merged", list(TASKS), tiny / "data", tmp_path / "merged.json", tokenizer_dir=tiny / "tok", batch_size=8
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


def test_unknown_task_is_named_and_only_then_builtins_are_indexed(tiny, tmp_path, monkeypatch):
    import lm_eval.tasks

    calls = []
    real = lm_eval.tasks.TaskManager

    def fake_task_manager(include_path=None, include_defaults=True, **kw):
        calls.append(include_defaults)
        # never index lm-eval's ~15k built-in YAMLs in a unit test (about 10 s)
        return real(include_path=include_path, include_defaults=False, **kw)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", fake_task_manager)
    with pytest.raises(KeyError, match="lf_no_such_task"):
        evaluate_checkpoint(
            tiny / "model", ["lf_facts", "lf_no_such_task"], tiny / "data", tmp_path / "x.json",
            tokenizer_dir=tiny / "tok",
        )  # fmt: skip
    assert calls == [True]
    assert not (tmp_path / "x.json").exists()
    evaluate_checkpoint(
        tiny / "model", ["lf_facts"], tiny / "data", tmp_path / "y.json", tokenizer_dir=tiny / "tok", limit=1
    )
    assert calls == [True, False]


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
