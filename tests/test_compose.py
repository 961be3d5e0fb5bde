"""Adapters as plugins: model cards, plain-peft loading, LoRAHub composition and its search."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from learnforget.compose import lorahub as compose
from learnforget.report import figures
from learnforget.core import integrity
from learnforget.core import modelcard
from learnforget.study.config import ConfigError, validate
from learnforget.core.io import read_json
from learnforget.train.modeling import build_model, load_model
from learnforget.report.markdown import compose_section
from learnforget.data.tokens import save_tokens, tokenize_cpt, tokenize_ift
from learnforget.train.loop import finetune
from workflow_utils import REPO, planned_jobs, snakemake

torch.set_num_threads(1)

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# two genuinely different tasks: arithmetic questions (instruction form) and facts (plain text)
MATH = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}. #### {a + b}", "id": f"m{a}-{b}"}
        for a in range(8) for b in range(6)]
FACTS = [f"Person {i} lives in town {i % 7} and likes the colour {['red', 'blue', 'green'][i % 3]}." for i in range(48)]
TEMPLATE = ("Question: {question}\nAnswer:", " {answer}")
LORA = {"type": "lora", "rank": 4, "alpha": 8}


def _tokenizer(texts):
    from learnforget.data.tokenizer import build_tokenizer

    return build_tokenizer(texts, vocab_size=300, min_frequency=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base model, and two LoRA adapters trained briefly on different data (arithmetic
    instructions, facts text) by the training engine: checkpoint folders with manifests."""
    root = tmp_path_factory.mktemp("compose")
    tok = _tokenizer(FACTS + [TEMPLATE[0].format(**r) + TEMPLATE[1].format(**r) for r in MATH])
    save_tokens(tokenize_ift([TEMPLATE[0].format(**r) for r in MATH], [TEMPLATE[1].format(**r) for r in MATH], tok),
                root / "tokens" / "math_ift")
    save_tokens(tokenize_cpt(FACTS, tok), root / "tokens" / "source_cpt")
    base = build_model(ARCH, tok, seed=0)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    cfg = dict(lr=5e-2, batch_size=8, seq_len=32, threads=1, seed=0, save_every_minutes=0)
    for name, data, regime in (("math", "math_ift", "ift"), ("facts", "source_cpt", "cpt")):
        finetune(root / "base", root / "tokens" / data, regime, LORA, cfg, duration=20, unit="epochs",
                 out_dir=root / "runs" / name / "3", run_name=name, progress=False)
    return root


def _batch(world, records=MATH[:6]):
    from learnforget.data.tokenizer import load_tokenizer

    return compose.tokenize_examples(records, load_tokenizer(world / "base"), domain="math", regime="ift",
                                     seq_len=32, template=TEMPLATE)


# ----------------------------------------------------------------------------- model cards
def test_adapter_checkpoint_has_a_model_card_covered_by_its_manifest(world):
    ckpt = world / "runs" / "math" / "3"
    card = ckpt / "model" / "README.md"
    front = modelcard.read_front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == str(world / "base")
    assert {"learn-forget", "peft", "lora", "math", "ift"} <= set(front["tags"])
    text = card.read_text()
    for section in ("## Data", "## Method", "## Duration", "## Scores", "## How to load it"):
        assert section in text, section
    assert "math_ift" in text and "| rank | 4 |" in text and "20 epochs" in text and "More Information Needed" not in text
    assert "Not evaluated yet" in text
    files = read_json(ckpt / "manifest.json")["files"]
    assert "model/README.md" in files
    integrity.verify(ckpt, cache=False)
    # the full-finetuning checkpoint is a plain HF model: no adapter card there
    scored = modelcard.with_scores(text, [{"task": "math", "role": "learning", "metric": "exact_match", "value": 0.25}])
    assert "| math | learning | exact_match | 0.25 |" in scored and "Not evaluated yet" not in scored
    assert scored.startswith("---\n") and modelcard.read_front_matter(card) == front


def test_adapter_loads_with_plain_peft_without_learnforget(world, tmp_path):
    """A copy of the checkpoint's adapter folder loads with PeftModel.from_pretrained in an
    interpreter where learn-forget cannot be imported, and gives the same logits as here."""
    from peft import PeftModel

    share = tmp_path / "share"
    shutil.copytree(world / "runs" / "math" / "3" / "model", share / "adapter")
    shutil.copytree(world / "base", share / "base")
    ids = [[1, 5, 9, 13, 17, 21]]
    ours = PeftModel.from_pretrained(load_model(share / "base"), str(share / "adapter")).eval()
    with torch.no_grad():
        expected = ours(torch.tensor(ids)).logits
    libs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    code = f"""
import importlib.util, json, sys
sys.path.extend({libs!r})
assert importlib.util.find_spec("learnforget") is None, "learn-forget is importable"
try:
    import learnforget
except ImportError:
    pass
else:
    raise SystemExit("import learnforget worked")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter").eval()
with torch.no_grad():
    logits = model(torch.tensor({ids!r})).logits
print(json.dumps(logits.flatten().tolist()))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=share, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])).reshape(expected.shape)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(expected, load_model(share / "base")(torch.tensor(ids)).logits, atol=1e-3)


# ----------------------------------------------------------------------------- combining
@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weight_one_on_one_adapter_scores_as_that_adapter(world, combination):
    from peft import PeftModel

    batch = _batch(world)
    dirs = [world / "runs" / n / "3" / "model" for n in ("math", "facts")]
    model = compose.load_adapters(world / "base", dirs)
    losses = []
    for i, d in enumerate(dirs):
        alone = PeftModel.from_pretrained(load_model(world / "base"), str(d)).eval()
        compose.combine(model, [float(i == j) for j in range(2)], combination)
        with torch.no_grad():
            a = model(input_ids=batch[0], attention_mask=batch[1]).logits
            b = alone(input_ids=batch[0], attention_mask=batch[1]).logits
        assert torch.allclose(a, b, atol=1e-4), (combination, i, (a - b).abs().max())
        assert compose.loss_of(model, batch) == pytest.approx(compose.loss_of(alone, batch), abs=1e-5)
        losses.append(compose.loss_of(model, batch))
    assert abs(losses[0] - losses[1]) > 0.1  # the two adapters really differ on these examples
    compose.remove(model)
    assert list(model.peft_config) == ["a0", "a1"]


def test_rslora_adapters_combine_to_themselves(tmp_path):
    """peft copies the first adapter's use_rslora to the combination; its own scale must stay 1."""
    from peft import LoraConfig, PeftModel, get_peft_model

    tok = _tokenizer(FACTS)
    build_model(ARCH, tok, seed=0).save_pretrained(tmp_path / "base")
    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
        get_peft_model(load_model(tmp_path / "base"), cfg).save_pretrained(tmp_path / f"a{seed}")
        dirs.append(tmp_path / f"a{seed}")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model = compose.combine(compose.load_adapters(tmp_path / "base", dirs), [1.0, 0.0], "linear")
    alone = PeftModel.from_pretrained(load_model(tmp_path / "base"), str(dirs[0])).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, alone(ids).logits, atol=1e-5)


def test_nelder_mead_finds_a_minimum_within_the_box_and_budget():
    calls = []

    def f(x):
        calls.append(x.copy())
        return float((x[0] - 0.7) ** 2 + 2 * (x[1] + 0.4) ** 2)

    best, value, trace = compose.nelder_mead(f, [0.5, 0.5], bound=1.5, budget=60)
    assert len(trace) == len(calls) == 60 and trace[0][0] == [0.5, 0.5]
    assert np.allclose(best, [0.7, -0.4], atol=0.02) and value == min(y for _, y in trace)
    # a minimum outside the box: the search ends on the bound; every point stays inside
    best, _, trace = compose.nelder_mead(lambda x: float((x[0] - 3) ** 2 + x[1] ** 2), [0.0, 0.0], bound=1.5,
                                         budget=40)
    assert best[0] == pytest.approx(1.5) and all(abs(v) <= 1.5 for x, _ in trace for v in x)
    again = compose.nelder_mead(lambda x: float((x[0] - 3) ** 2 + x[1] ** 2), [0.0, 0.0], bound=1.5, budget=40)
    assert again[2] == trace  # deterministic


def test_search_lowers_the_few_shot_loss_below_the_uniform_combination(world, tmp_path):
    spec = {"name": "hub", "runs": ["math", "facts"], "adapters": {"math": "3", "facts": "3"},
            "durations": {"math": 3.0, "facts": 3.0}, "unit": "epochs", "combination": "linear",
            "target": {"domain": "math", "regime": "ift", "split": "train", "k": 6, "seed": 0, "seq_len": 32},
            "search": {"budget": 25, "bound": 1.5, "l1": 0.05, "step": 0.5},
            "composites": {"hub": {"kind": "search", "weights": None, "run": None},
                           "hub-uniform": {"kind": "uniform", "weights": [0.5, 0.5], "run": None},
                           "hub-math": {"kind": "single", "weights": [1.0, 0.0], "run": "math"},
                           "hub-facts": {"kind": "single", "weights": [0.0, 1.0], "run": "facts"}}}
    outs = {n: tmp_path / "adapters" / n for n in spec["composites"]}
    record = compose.run(world / "base", {n: world / "runs" / n / "3" for n in ("math", "facts")}, MATH, spec, outs,
                         tmp_path / "search.json", template=TEMPLATE)
    comps = record["composites"]
    assert comps["hub"]["loss"] < comps["hub-uniform"]["loss"] - 0.05
    assert comps["hub-math"]["loss"] < comps["hub-facts"]["loss"] and record["base_loss"] > comps["hub-math"]["loss"]
    assert len(record["trace"]) == 25 and all(abs(w) <= 1.5 for w in comps["hub"]["weights"].values())
    assert comps["hub"]["weights"]["math"] > comps["hub"]["weights"]["facts"]
    assert comps["hub"]["objective"] == min(s["objective"] for s in record["trace"])
    # every composite is a checkpoint folder: verified, a peft adapter with a card, loss reproduced by plain peft
    from peft import PeftModel

    for name, c in comps.items():
        integrity.verify(outs[name], cache=False)
        assert modelcard.read_front_matter(outs[name] / "model" / "README.md")["library_name"] == "peft"
        model = PeftModel.from_pretrained(load_model(world / "base"), str(outs[name] / "model"))
        assert compose.loss_of(model, _batch(world, compose.few_shot_records(MATH, 6, 0))) == \
            pytest.approx(c["loss"], abs=1e-5), name
    # the same inputs give the same numbers
    again = compose.run(world / "base", {n: world / "runs" / n / "3" for n in ("math", "facts")}, MATH, spec,
                        {n: tmp_path / "again" / n for n in spec["composites"]}, tmp_path / "again.json",
                        template=TEMPLATE)
    assert again["composites"] == record["composites"] and again["trace"] == record["trace"]


# ----------------------------------------------------------------------------- config
def _tiny(**compose_cfg):
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["compose"] = compose_cfg
    return cfg


@pytest.mark.parametrize("settings, path", [
    ({"adapters": ["math-full", "code-lora"]}, "compose.adapters[0]"),
    ({"adapters": ["nope", "code-lora"]}, "compose.adapters[0]"),
    ({"adapters": ["math-lora", "math-lora"]}, "compose.adapters[1]"),
    ({"adapters": ["math-lora"]}, "compose.adapters"),
    ({"duration": 3}, "compose.duration"),
    ({"name": "math-lora"}, "compose.name"),
    ({"combination": "svd"}, "compose.combination"),
    ({"target": {"k": 0}}, "compose.target.k"),
    ({"target": {"seq_len": 1000}}, "compose.target.seq_len"),
    ({"search": {"bound": 0}}, "compose.search.bound"),
])
def test_bad_compose_config_names_the_key(settings, path):
    with pytest.raises(ConfigError) as err:
        validate(_tiny(enabled=True, **settings))
    assert err.value.path == path, str(err.value)


def test_linear_needs_equal_ranks_cat_does_not():
    cfg = _tiny(enabled=True)
    cfg["methods"]["lora8"] = {"type": "lora", "rank": 8}
    cfg["runs"][2]["method"] = "lora8"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.path == "compose.combination" and "cat" in str(err.value)
    cfg["compose"]["combination"] = "cat"
    assert compose.plan(validate(cfg))["combination"] == "cat"


def test_plan_off_by_default_and_resolved_when_on():
    assert validate(_tiny())["compose"]["enabled"] is False and compose.plan(validate(_tiny())) is None
    p = compose.plan(validate(_tiny(enabled=True, duration=1, target={"domain": "code"})))
    assert p["runs"] == ["math-lora", "code-lora"] and p["adapters"] == {"math-lora": "1", "code-lora": "1"}
    assert p["target"]["regime"] == "cpt" and p["target"]["seq_len"] == 64  # code-lora's regime, finetune.seq_len
    assert list(p["composites"]) == ["lorahub", "lorahub-uniform", "lorahub-math-lora", "lorahub-code-lora"]
    assert p["composites"]["lorahub-code-lora"]["weights"] == [0.0, 1.0]
    p = compose.plan(validate(_tiny(enabled=True, adapters=["code-lora", "math-lora"])))
    assert p["adapters"] == {"code-lora": "2", "math-lora": "2"} and p["target"]["regime"] == "ift"


# ----------------------------------------------------------------------------- figure and report
def _metrics_with_composites():
    rows = []

    def add(run, method, domain, regime, d, task, metric, value, role, hib):
        rows.append({"run": run, "method": method, "method_type": method, "domain": domain, "regime": regime, "duration": d, "task": task,
                     "metric": metric, "value": value, "role": role, "higher_is_better": hib, "series": run})

    add("base", "base", "", "", 0.0, "math", "acc", 0.1, "learning", True)
    add("base", "base", "source", "", 0.0, "forgetting", "acc", 0.8, "forgetting", True)
    for d, (m, f) in {1.0: (0.3, 0.7), 2.0: (0.5, 0.6)}.items():
        add("math-lora", "lora", "math", "ift", d, "math", "acc", m, "learning", True)
        add("math-lora", "lora", "math", "ift", d, "forgetting", "acc", f, "forgetting", True)
    for run, (m, f) in {"hub": (0.45, 0.75), "hub-uniform": (0.3, 0.72)}.items():
        add(run, "compose", "math", "ift", 2.0, "math", "acc", m, "learning", True)
        add(run, "compose", "math", "ift", 2.0, "forgetting", "acc", f, "forgetting", True)
    return pd.DataFrame(rows)


def test_composites_are_points_of_their_own_on_the_tradeoff_figure(tmp_path):
    metrics = _metrics_with_composites()
    learning, forgetting = {"math": ("math", "acc")}, ("forgetting", "acc")
    assert set(figures.run_settings(metrics)) == {"math-lora"}  # no series, no curve for a composite
    data = figures.tradeoff_data(metrics, learning=learning, forgetting=forgetting)
    assert set(data[("math", "ift")]) == {"base", "math-lora"}
    pts = figures.composite_points(metrics, learning=learning, forgetting=forgetting, keys=list(data))
    assert pts == {("math", "ift"): {"hub": (0.75, 0.45), "hub-uniform": (0.72, 0.3)}}
    files = figures.tradeoff(metrics, tmp_path, learning=learning, forgetting=forgetting,
                             composites={"hub": "search", "hub-uniform": "uniform"})
    assert any(f.endswith("tradeoff.png") for f in files) and (tmp_path / "tradeoff.png").stat().st_size > 10_000


def test_report_section_states_the_search_against_the_uniform_combination():
    record = {"runs": ["a", "b"], "adapters": {"a": "2", "b": "2"}, "durations": {"a": 2.0, "b": 2.0},
              "unit": "epochs", "combination": "linear", "base_loss": 3.0,
              "target": {"domain": "math", "split": "train", "regime": "ift", "k": 5},
              "search": {"bound": 1.5, "l1": 0.05}, "trace": [{}] * 7,
              "composites": {"hub": {"kind": "search", "run": None, "weights": {"a": 0.9, "b": 0.1}, "loss": 2.0},
                             "hub-uniform": {"kind": "uniform", "run": None, "weights": {"a": 0.5, "b": 0.5},
                                             "loss": 2.5},
                             "hub-a": {"kind": "single", "run": "a", "weights": {"a": 1.0, "b": 0.0}, "loss": 2.1}}}
    lines = "\n".join(compose_section(record, _metrics_with_composites(), {"math": ("math", "acc")},
                                      ("forgetting", "acc")))
    assert "## Composing adapters (LoRAHub)" in lines and "7 evaluations" in lines
    assert "the search lowered the few-shot loss below the uniform combination's" in lines
    assert "weights a +0.900, b +0.100" in lines and "the best single adapter, a, has 2.100" in lines
    assert "| hub | search | 0.900 | 0.100 | 2.000 | 0.450 | 0.750 |" in lines
    record["composites"]["hub"]["loss"] = 2.6
    assert "did not lower" in "\n".join(compose_section(record, None, {}, None))
    assert compose_section(None, None, {}, None) == []


# ----------------------------------------------------------------------------- the workflow
@pytest.mark.e2e
def test_workflow_with_compose_on(tmp_path):
    """The tiny study cut to its two LoRA runs at one duration, compose on: the composites are
    evaluated (every domain's learning group and the forgetting group) and appear in
    metrics.csv, on the trade-off figure and in the report; a composite of one adapter scores
    as that adapter's checkpoint; every adapter checkpoint gets a card with its scores."""
    cfg = yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())
    cfg["runs"] = [r for r in cfg["runs"] if r["method"] == "lora"]
    cfg["durations"]["values"] = [1]
    cfg["evaluation"]["groups"].pop("samples")
    cfg["compose"] = {"enabled": True, "search": {"budget": 10}}
    config = tmp_path / "compose.yaml"
    config.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tmp_path, config, "-n", "--cores", "2"))
    assert jobs["compose"] == 1 and jobs["evaluate_composite"] == 4 and jobs["cards"] == 1
    snakemake(tmp_path, config, "--cores", "2")
    res = tmp_path / "results"
    metrics = pd.read_csv(res / "metrics.csv")
    names = ["lorahub", "lorahub-uniform", "lorahub-math-lora", "lorahub-code-lora"]
    comp = metrics[metrics["method"] == "compose"]
    assert sorted(set(comp["run"])) == sorted(names)
    groups = comp[comp["role"].isin(["learning", "forgetting"])]
    assert len(groups) == 4 * 3 and set(groups["task"]) == {"math", "code", "forgetting"}

    def value(run, task):
        return float(metrics[(metrics["run"] == run) & (metrics["task"] == task) & (metrics["duration"] == 1)]
                     ["value"].iloc[0])

    assert value("lorahub-code-lora", "code") == pytest.approx(value("code-lora", "code"), rel=1e-6)
    assert value("lorahub-math-lora", "forgetting") == pytest.approx(value("math-lora", "forgetting"), rel=1e-6)
    record = read_json(res / "compose" / "search.json")
    assert record["composites"]["lorahub"]["loss"] <= record["composites"]["lorahub-uniform"]["loss"]
    assert (res / "figures" / "tradeoff.png").stat().st_size > 10_000
    report = (res / "report.md").read_text()
    assert "## Composing adapters (LoRAHub)" in report and "| lorahub-uniform | uniform |" in report
    card = (res / "cards" / "lorahub" / "1.md").read_text()
    assert "| forgetting | forgetting | acc |" in card and "library_name: peft" in card
    card = (res / "cards" / "math-lora" / "1.md").read_text()
    assert "| math | learning | exact_match_strict-match |" in card and "Not evaluated yet" not in card
    assert "Not evaluated yet" in (res / "runs" / "math-lora" / "1" / "model" / "README.md").read_text()
    assert planned_jobs(snakemake(tmp_path, config, "-n", "--cores", "2")) == {}
