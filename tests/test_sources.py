"""Pretrained models and datasets by hub id, local path or cache (learnforget.data.sources), the
paper's config and the workstation preset planned offline, and a study on a pretrained model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from learnforget.study import config as lfconfig
from learnforget.core import integrity
from learnforget.data import sources
from learnforget.study.config import ConfigError
from workflow_utils import REPO, planned_jobs, snakemake

TINY = REPO / "tests" / "tiny.yaml"
ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline():
    return False


# ----------------------------------------------------------------------------- fixtures
def _save_tiny_model(folder: Path) -> None:
    from learnforget.train.modeling import build_model
    from learnforget.data.tokenizer import build_tokenizer

    texts = [f"Question: What is {a} + {b}?\nAnswer: {a + b}\ndef f{a}(x):\n    return x + {b}\n"
             for a in range(30) for b in range(10)]
    tok = build_tokenizer(texts, vocab_size=320)
    model = build_model(ARCH, tok, seed=3)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny-llama"
    _save_tiny_model(folder)
    return folder


def _put_in_cache(hf_home: Path, repo_id: str, folder: Path, repo_type: str = "model") -> Path:
    """Lay ``folder`` out as the hub cache does: blobs, a snapshot of links, refs/main."""
    repo = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            blob = repo / "blobs" / f"blob-{abs(hash(str(f)))}"
            blob.write_bytes(f.read_bytes())
            dest = snap / f.relative_to(folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, dest.parent), dest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return home


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- locating
def test_locate_local_cache_hub_and_unavailable(tiny_model, hf_home, tmp_path):
    assert sources.locate(str(tiny_model), "model", key="model.pretrained").kind == "local"
    snap = _put_in_cache(hf_home, "org/tiny", tiny_model)
    found = sources.locate("org/tiny", "model", key="model.pretrained", reachable=offline)
    assert (found.kind, found.path, found.revision) == ("cache", snap, COMMIT)
    assert sources.locate("org/other", "model", key="model.pretrained", reachable=lambda: True).kind == "hub"
    with pytest.raises(sources.SourceUnavailable) as err:
        sources.locate("org/other", "model", key="model.pretrained", reachable=offline)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.pretrained: the model 'org/other'")
    assert "hf download org/other" in msg and str(hf_home / "hub") in msg
    # a revision that is not cached is not replaced by the cached main
    with pytest.raises(sources.SourceUnavailable, match="at revision v2"):
        sources.locate("org/tiny", "model", key="model.pretrained", revision="v2", reachable=offline)
    assert sources.locate("org/tiny", "model", key="k", revision=COMMIT, reachable=offline).path == snap
    # a path that does not exist, and a folder that is not a model
    with pytest.raises(sources.SourceUnavailable, match="is not a folder"):
        sources.locate(str(tmp_path / "nope"), "model", key="model.pretrained")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceUnavailable, match="without config.json"):
        sources.locate(str(tmp_path / "empty"), "model", key="model.pretrained")


def test_cache_snapshot_without_weights_is_not_the_model(tiny_model, hf_home):
    only_config = tiny_model.parent / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny_model / "config.json").read_text())
    _put_in_cache(hf_home, "org/cfg-only", only_config)
    with pytest.raises(sources.SourceUnavailable):
        sources.locate("org/cfg-only", "model", key="model.pretrained", reachable=offline)
    # ... but its config.json plans the jobs
    arch = sources.read_local_arch({"pretrained": "org/cfg-only"})
    assert arch["hidden_size"] == 32 and arch["vocab_size"] > 256


def test_datasets_locate_builder_folder_cache(hf_home, tmp_path):
    assert sources.locate("json", "dataset", key="k", data_files="x.jsonl").kind == "builder"
    with pytest.raises(sources.SourceUnavailable, match="give data_files"):
        sources.locate("parquet", "dataset", key="data.hub.code_cpt.path")
    folder = tmp_path / "ds"
    _jsonl(folder / "train.jsonl", [{"a": 1}])
    assert sources.locate(str(folder), "dataset", key="k").kind == "local"
    _put_in_cache(hf_home, "org/ds", folder, "dataset")
    assert sources.locate("org/ds", "dataset", key="k", reachable=offline).kind == "cache"


def test_check_available_names_the_first_missing_source(tiny_model, hf_home):
    cfg = {"model": {"pretrained": str(tiny_model)},
           "data": {"hub": {"math_ift": {"path": "org/missing"}, "code_cpt": {"path": "org/also-missing"}}}}
    with pytest.raises(sources.SourceUnavailable, match=r"^data.hub.code_cpt.path: the dataset 'org/also-missing'"):
        sources.check_available(cfg, reachable=offline)
    # only the datasets the study trains on are checked
    with pytest.raises(sources.SourceUnavailable, match="^data.hub.math_ift.path"):
        sources.check_available(cfg, reachable=offline, datasets=["math_ift"])
    assert set(sources.check_available(cfg, reachable=offline, datasets=[])) == {"model"}


# ----------------------------------------------------------------------------- architecture
def test_arch_from_config_json_checked_against_the_config(tiny_model):
    arch = sources.resolve_arch({"pretrained": str(tiny_model)}, reachable=offline)
    assert {k: arch[k] for k in ARCH} == ARCH and arch["tie_word_embeddings"] is True
    with pytest.raises(ValueError, match=r"^model.hidden_size: 64 in the config, but .* has 32"):
        sources.resolve_arch({"pretrained": str(tiny_model), "hidden_size": 64}, reachable=offline)
    # offline and unknown: the config's keys plan the jobs, and missing ones are named
    given = {"pretrained": "org/unknown", **ARCH, "vocab_size": 1000}
    assert sources.resolve_arch(given, reachable=offline)["vocab_size"] == 1000
    with pytest.raises(ValueError, match=r"give model.intermediate_size, model.vocab_size"):
        sources.resolve_arch({"pretrained": "org/unknown", "hidden_size": 8, "num_hidden_layers": 1,
                              "num_attention_heads": 1}, reachable=offline)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        sources.arch_from_hf_config({"model_type": "gpt2", "hidden_size": 8})


# ----------------------------------------------------------------------------- the base model folder
def test_fetch_model_links_files_with_a_verified_manifest(tiny_model, hf_home, tmp_path):
    _put_in_cache(hf_home, "org/tiny", tiny_model)
    out = tmp_path / "results" / "base" / "model"
    manifest = sources.fetch_model("org/tiny", None, out, reachable=offline, log=lambda _: None)
    assert manifest["kind"] == "pretrained" and manifest["source"] == "cache" and manifest["commit"] == COMMIT
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert all((out / name).is_symlink() for name in manifest["files"])
    integrity.verify(out)  # the manifest's checksums hold
    from learnforget.train.modeling import load_model
    from learnforget.data.tokenizer import load_tokenizer

    a, b = load_model(out), load_model(tiny_model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert load_tokenizer(out).encode("def f(x):") == load_tokenizer(tiny_model).encode("def f(x):")
    # a changed weight file behind the link is caught before use
    weights = Path(os.path.realpath(out / "model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(integrity.CorruptCheckpoint, match="model.safetensors"):
        integrity.verify(out, cache=False)


# ----------------------------------------------------------------------------- dataset rows
IFT = {"prompt": "Question: {query}\nAnswer:", "response": " {answer}", "id": "{qid}"}


def test_render_rules_drop_and_count():
    rows = [
        {"query": "1+1?", "answer": "2", "qid": "a"},
        {"query": "again", "answer": "2", "qid": "a"},       # duplicate id
        {"query": "blank", "answer": "  \n", "qid": "b"},   # empty response
        {"query": None, "answer": "3", "qid": "c"},          # missing field
        {"query": "bad \ud800", "answer": "4", "qid": "d"},  # not UTF-8
        {"query": 7, "answer": 8, "qid": 9},                  # numbers render
    ]
    counts = sources.DropCounts()
    out = list(sources.render_records(rows, IFT, "ift", key="data.hub.math_ift", counts=counts))
    assert out == [{"id": "a", "prompt": "Question: 1+1?\nAnswer:", "response": " 2"},
                   {"id": "9", "prompt": "Question: 7\nAnswer:", "response": " 8"}]
    assert counts.as_dict() == {"read": 6, "kept": 2, "tokens": 0, "stopped_by": None, "dropped": {
        "missing field": 1, "not UTF-8": 1, "empty": 1, "duplicate id": 1}}


def test_render_first_row_without_a_template_field_is_a_config_error():
    with pytest.raises(ValueError, match=r"^data.hub.math_ift.prompt: field 'query' is not a column .*question, answer"):
        list(sources.render_records([{"question": "q", "answer": "a"}], IFT, "ift", key="data.hub.math_ift"))


def test_max_records_and_token_budget_stop_the_stream():
    rows = ({"content": "x " * 10} for _ in range(1000))
    counts = sources.DropCounts()
    out = list(sources.render_records(rows, {"text": "{content}", "token_budget": 95}, "cpt", key="k",
                                      count_tokens=lambda texts: [len(t.split()) for t in texts], counts=counts))
    assert len(out) == 10 and counts.tokens == 100 and counts.stopped_by == "token_budget"
    assert counts.read == 10  # a stream is read no further than needed
    out = list(sources.render_records(({"content": str(i)} for i in range(50)), {"text": "{content}", "max_records": 7},
                                      "cpt", key="k"))
    assert [r["text"] for r in out] == [str(i) for i in range(7)]


def test_build_dataset_from_files_shuffled_streamed_and_budgeted(tmp_path, tiny_model):
    from learnforget.data.tokenizer import load_tokenizer

    pd.DataFrame({"content": [f"def f{i}(x):\n    return x + {i}\n" for i in range(300)]}).to_parquet(
        tmp_path / "code.parquet")
    spec = {"path": "parquet", "data_files": str(tmp_path / "code.parquet"), "streaming": True,
            "shuffle": {"seed": 1, "buffer_size": 64}, "text": "{content}", "token_budget": 400}
    tok = load_tokenizer(tiny_model)
    stats = sources.build_dataset(spec, "cpt", tmp_path / "a.jsonl", name="code_cpt", tokenizer=tok,
                                  log=lambda _: None)
    sources.build_dataset(spec, "cpt", tmp_path / "b.jsonl", name="code_cpt", tokenizer=tok,
                                  log=lambda _: None)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()  # deterministic
    texts = [json.loads(line)["text"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert stats["stopped_by"] == "token_budget" and 400 <= stats["tokens"] < 400 + 40
    assert texts != sorted(texts, key=lambda t: int(t.split("(")[0][5:]))  # shuffled
    assert stats["tokens"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def test_non_utf8_json_lines_are_rejected_naming_file_and_line(tmp_path):
    folder = tmp_path / "ds"
    _jsonl(folder / "train.jsonl", [{"query": "ok", "answer": "1"}])
    with open(folder / "train.jsonl", "ab") as fh:
        fh.write(b'{"query": "caf\xe9", "answer": "2"}\n')
    spec = {"path": str(folder), "split": "train", **IFT}
    with pytest.raises(ValueError, match=r"^data.hub.math_ift: .*train.jsonl line 2: not valid UTF-8"):
        sources.build_dataset(spec, "ift", tmp_path / "out.jsonl", name="math_ift", log=lambda _: None)
    (folder / "train.jsonl").write_text('{"query": "ok", "answer": "1"}\n{"query": "x\\ud800", "answer": "2"}\n')
    with pytest.raises(ValueError, match="line 2: text that is not valid UTF-8"):
        sources.build_dataset(spec, "ift", tmp_path / "out.jsonl", name="math_ift", log=lambda _: None)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_dataset_with_nothing_left_is_an_error_and_writes_nothing(tmp_path):
    folder = tmp_path / "ds"
    _jsonl(folder / "train.jsonl", [{"query": "q", "answer": " ", "qid": str(i)} for i in range(3)])
    with pytest.raises(ValueError, match=r"^data.hub.math_ift: no records kept .*3 rows read, 0 kept, dropped: 3 empty"):
        sources.build_dataset({"path": str(folder), "split": "train", **IFT}, "ift", tmp_path / "o.jsonl",
                              name="math_ift", log=lambda _: None)
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- config
def _tiny_pretrained(model: str | Path, **extra) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    cfg.pop("tokenizer")
    cfg["model"] = {"pretrained": str(model)}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("change, path, words", [
    (lambda c: c.update(tokenizer={"vocab_size": 500}), "tokenizer", "brings its own tokenizer"),
    (lambda c: c["model"].update(pretrained="./no/such/folder"), "model.pretrained", "not a folder"),
    (lambda c: c["model"].update(hidden_size=48), "model.hidden_size", "config.json has 32"),
    (lambda c: c.update(data={"hub": {"math_ift": {"path": "x", "text": "{t}"}}}), "data.hub.math_ift",
     "needs a 'prompt' template"),
    (lambda c: c.update(data={"hub": {"code_cpt": {"path": "x", "text": "{t}", "prompt": "{p}"}}}),
     "data.hub.code_cpt.prompt", "has no 'prompt' template"),
    (lambda c: c.update(data={"hub": {"code_cpt": {"path": "x", "text": "{0}"}}}), "data.hub.code_cpt.text",
     "fields must be named"),
    (lambda c: c.update(data={"hub": {"code_sft": {"path": "x"}}}), "data.hub", "code_sft"),
    (lambda c: c.update(data={"hub": {"code_cpt": {"path": "x", "text": "{t}", "token_budget": 0}}}),
     "data.hub.code_cpt.token_budget", "0"),
])
def test_bad_pretrained_and_hub_configs(tiny_model, change, path, words):
    cfg = _tiny_pretrained(tiny_model)
    change(cfg)
    with pytest.raises(ConfigError) as err:
        lfconfig.validate(cfg)
    assert err.value.path == path and words in str(err.value)


def test_revision_without_pretrained_is_an_error():
    cfg = yaml.safe_load(TINY.read_text())
    cfg["model"]["revision"] = "main"
    with pytest.raises(ConfigError) as err:
        lfconfig.validate(cfg)
    assert err.value.path == "model.revision"


def test_pretrained_config_takes_arch_and_vocabulary_from_the_model(tiny_model):
    cfg = lfconfig.validate(_tiny_pretrained(tiny_model))
    assert cfg["model"]["hidden_size"] == 32 and cfg["model"]["pretrained"] == str(tiny_model)
    assert cfg["tokenizer"]["vocab_size"] == json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert lfconfig.token_datasets(cfg) == ["code_cpt", "math_ift"]  # no base pretraining mix


@pytest.mark.parametrize("argv, dry", [
    (["snakemake", "-n"], True), (["snakemake", "--dry-run", "-c1"], True), (["snakemake", "-pn"], True),
    (["snakemake", "--dryrun"], True), (["snakemake", "-c1"], False), (["snakemake", "--cores", "2"], False),
    (["snakemake", "--notemp"], False), (["snakemake", "-s", "Snakefile"], False),
])
def test_dry_run_detection(argv, dry, monkeypatch):
    monkeypatch.delenv("LEARNFORGET_DRY_RUN", raising=False)
    assert lfconfig.dry_run_requested(argv) is dry


# ----------------------------------------------------------------------------- gradient accumulation
def test_gradient_accumulation_matches_one_pass(tiny_model):
    """micro_batch_size splits each step's batch into passes: same loss and weights up to float
    rounding (it is a runtime setting, so changing it must not change results)."""
    from learnforget.train.modeling import load_model
    from learnforget.data.tokens import Batches, tokenize_ift
    from learnforget.data.tokenizer import load_tokenizer
    from learnforget.train.loop import train

    tok = load_tokenizer(tiny_model)
    prompts = [f"Question: {a} + {a % 7}?\nAnswer:" for a in range(40)]
    answers = [f" {a + a % 7}" + " ok" * (a % 5) for a in range(40)]
    td = tokenize_ift(prompts, answers, tok)
    results = []
    for mb in (None, 3):
        batches = Batches(td, "ift", 8, 32, seed=0, pad_id=tok.pad_token_id)
        model, state = train(load_model(tiny_model), batches, {"lr": 1e-3, "batch_size": 8, "seq_len": 32,
                                                              "micro_batch_size": mb, "threads": 1},
                             end_step=4, schedule_total=4, progress=False)
        results.append((model.state_dict(), state))
    (a, sa), (b, sb) = results
    assert sa["tokens"] == sb["tokens"] and sa["loss_tokens"] == sb["loss_tokens"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the shipped configs
# Jobs per rule of each shipped config's dry run, offline with nothing downloaded: 40 runs of the
# paper (4 settings x full + LoRA ranks 16/64/256 on attention/mlp/all); CPT durations 8 token
# counts on a shared trunk, IFT 5 epochs; sampled code generations scored on the code runs; one job
# writes the adapters' model cards with their scores.
EXPECTED_JOBS = {
    "config/paper.yaml": {
        "data_source": 1, "data_math": 1, "data_code": 1, "data_hub": 4, "tokenize": 4, "base": 1,
        "train_trunk": 20 * 8, "train": 20 * 8 + 20 * 5, "evaluate": 1 + 260, "score": 1 + 10 * 8 + 10 * 5,
        "analyze": 260, "cards": 1, "report": 1, "all": 1,
    },
    "config/workstation.yaml": {
        "data_source": 1, "data_math": 1, "data_code": 1, "data_hub": 4, "tokenize": 4, "base": 1,
        "train_trunk": 4 * 3, "train": 8 * 3, "evaluate": 1 + 24, "score": 1 + 4 * 3, "analyze": 24,
        "cards": 1, "report": 1, "all": 1,
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
def test_shipped_config_dry_run_offline(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = snakemake(tmp_path, REPO / name, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert planned_jobs(proc) == EXPECTED_JOBS[name]
    warnings = [line for line in out.splitlines() if line.startswith("learn-forget: warning")]
    assert any("model.pretrained" in w for w in warnings) and any("evaluation task" in w for w in warnings)
    assert "tokenizer" not in planned_jobs(proc)  # the pretrained model's own tokenizer
    plans = [line for line in out.splitlines() if line.startswith("learn-forget plan: train")]
    assert len(plans) == len(yaml.safe_load((REPO / name).read_text())["runs"])
    # the same command without -n stops before any job, with one line
    real = snakemake(tmp_path, REPO / name, "--cores", "1", check=False)
    lines = [line for line in (real.stdout + real.stderr).splitlines() if line.startswith("learn-forget:")]
    assert real.returncode != 0 and len(lines) == 1 and "model.pretrained" in lines[0]
    assert not (tmp_path / "results").exists()


def test_paper_config_is_the_paper_grid():
    cfg = lfconfig.validate(yaml.safe_load((REPO / "config/paper.yaml").read_text()))
    runs = lfconfig.expand_runs(cfg)
    assert cfg["model"]["pretrained"] == "meta-llama/Llama-2-7b-hf" and cfg["model"]["hidden_size"] == 4096
    lora = [r for r in runs if r.method["type"] == "lora"]
    assert {(r.method["rank"], r.method["target"]) for r in lora} == {
        (r, t) for r in (16, 64, 256) for t in ("attention", "mlp", "all")}
    assert all(r.method["alpha"] == 2 * r.method["rank"] for r in lora)
    assert {(r.domain, r.regime) for r in runs} == {("code", "cpt"), ("math", "cpt"), ("code", "ift"), ("math", "ift")}
    assert {cfg["data"]["hub"][k]["path"] for k in cfg["data"]["hub"]} == {
        "bigcode/starcoderdata", "open-web-math/open-web-math", "ise-uiuc/Magicoder-Evol-Instruct-110K",
        "meta-math/MetaMathQA"}
    cpt = [r for r in runs if r.regime == "cpt"]
    assert all(r.unit == "tokens" and r.durations[-1] == 2e10 and r.mode == "branch" for r in cpt)
    ift = [r for r in runs if r.regime == "ift"]
    assert all(r.durations == (1, 2, 4, 8, 16) and r.mode == "restart" for r in ift)
    assert all(r.train_config.optimizer == "lion" and r.train_config.precision == "bf16" for r in runs)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_study_on_a_cached_pretrained_model_and_hub_datasets(tiny_model, hf_home, tmp_path, monkeypatch):
    """A pretrained model by hub id from the cache, an IFT dataset from a local folder (renamed
    fields, bad rows) and a CPT corpus streamed from parquet to a token budget: no tokenizer
    training, no base pretraining, bad rows dropped and counted, a complete report."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _put_in_cache(hf_home, "tiny-org/tiny-llama", tiny_model)
    math = tmp_path / "metamath"
    rows = [{"query": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}\n#### {a + b}", "qid": f"{a}-{b}"}
            for a in range(12) for b in range(8)]
    rows += [{"query": "dup", "response": "1", "qid": "0-0"}, {"query": "blank", "response": "", "qid": "z"}]
    _jsonl(math / "data" / "train.jsonl", rows)
    pd.DataFrame({"content": [f"def add_{i}(x):\n    return x + {i}\n" for i in range(400)]}).to_parquet(
        tmp_path / "code.parquet")
    cfg = _tiny_pretrained("tiny-org/tiny-llama")
    cfg["data"] = {**cfg["data"], "hub": {
        "math_ift": {"path": str(math), "prompt": "Question: {query}\nAnswer:", "response": " {response}",
                     "id": "{qid}"},
        "code_cpt": {"path": "parquet", "data_files": str(tmp_path / "code.parquet"), "streaming": True,
                     "shuffle": {"seed": 5, "buffer_size": 100}, "text": "{content}", "token_budget": 3000}}}
    cfg["runs"] = [{"name": "math-lora", "domain": "math", "regime": "ift", "method": "lora"},
                   {"name": "code-full", "domain": "code", "regime": "cpt", "method": "full"}]
    cfg["durations"] = {"unit": "epochs", "values": [1, 2]}
    cfg["evaluation"]["groups"].pop("samples")
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    proc = snakemake(work, path, "--cores", "2")
    ran = proc.stdout + proc.stderr
    assert "rule tokenizer:" not in ran and "rule data_hub:" in ran
    results = work / "results"
    assert not (results / "tokenizer").exists()
    base = json.loads((results / "base" / "model" / "manifest.json").read_text())
    assert base["kind"] == "pretrained" and base["source"] == "cache" and base["commit"] == COMMIT
    log = (results / "logs" / "data" / "hub-math_ift.log").read_text()
    assert "98 rows read, 96 kept, dropped: 1 empty, 1 duplicate id" in log
    code = [json.loads(line) for line in (results / "data" / "hub" / "code_cpt.jsonl").read_text().splitlines()]
    assert 0 < len(code) < 400
    metrics = pd.read_csv(results / "metrics.csv")
    assert set(metrics["run"]) == {"base", "math-lora", "code-full"}
    assert (results / "report.md").is_file()
    train_log = json.loads((results / "runs" / "math-lora" / "1" / "manifest.json").read_text())
    assert train_log["run_cfg"]["base_sha256"]
    assert planned_jobs(snakemake(work, path, "-n")) == {}  # nothing to redo: the links verify
