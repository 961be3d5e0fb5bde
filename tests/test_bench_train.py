"""Pure helpers of bench/train.py (the benchmark itself takes minutes and is not run here)."""

import numpy as np
import pytest
import torch

from workflow_utils import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("train")


def _recs(tokens_per_step, seconds_per_step):
    out, tok, el = [], 0, 0.0
    for i, (n, s) in enumerate(zip(tokens_per_step, seconds_per_step)):
        tok, el = tok + n, el + s
        out.append({"step": i + 1, "tokens": tok, "elapsed": el})
    return out


def test_steady_rate_skips_warmup(bench):
    recs = _recs([100] * 10, [5.0, 5.0] + [1.0] * 8)  # two slow warm-up steps
    r = bench.steady_rate(recs, warmup=2)
    assert (r["steps"], r["tokens"]) == (8, 800)
    assert r["seconds"] == pytest.approx(8.0)
    assert r["tokens_per_s"] == pytest.approx(100.0) and r["step_s"] == pytest.approx(1.0)
    r0 = bench.steady_rate(list(reversed(recs)), warmup=0)  # order does not matter; 0: from the start
    assert (r0["steps"], r0["tokens"], r0["seconds"]) == (10, 1000, pytest.approx(18.0))
    with pytest.raises(ValueError):
        bench.steady_rate(recs[:2], warmup=2)
    with pytest.raises(ValueError):
        bench.steady_rate([r for r in recs if r["step"] != 2], warmup=2)


def test_step_records_match_the_training_log_form(bench):
    recs = bench.step_records([11.0, 12.5, 13.0], [10, 20, 30, 40], t0=10.0)
    assert recs == [{"step": 1, "tokens": 10, "elapsed": 1.0}, {"step": 2, "tokens": 30, "elapsed": 2.5},
                    {"step": 3, "tokens": 60, "elapsed": 3.0}]
    with pytest.raises(ValueError):
        bench.step_records([1.0, 2.0], [5], t0=0.0)


def test_lora_flops_formula(bench):
    # 6N + attention, less 2N (no frozen-weight gradients), plus 6 per adapter weight
    assert bench.lora_flops_per_token(6 * 1000 + 60, 1000, 10) == 4 * 1000 + 60 + 60


def test_matmul_params_is_flops_per_token_n(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    from learnforget.train.modeling import flops_per_token

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    n = bench.matmul_params(model)
    kv = 1 * (16 // 2)
    assert n == 2 * (16 * 16 * 2 + 16 * kv * 2 + 3 * 16 * 24) + 64 * 16  # tied head counted once
    seq = 8
    assert flops_per_token(cfg, seq) == 6 * n + 6 * 2 * 2 * seq * 16

    class Wrapped(torch.nn.Module):  # adapter modules (peft's lora_A / lora_B) are left out
        def __init__(self):
            super().__init__()
            self.base = model
            self.lora_A = torch.nn.Linear(16, 4, bias=False)

    assert bench.matmul_params(Wrapped()) == n


def test_item_sequence_is_our_batch_order(bench):
    from learnforget.data.tokens import Batches, TokenData

    docs = [np.arange(1, 3 + i % 5, dtype=np.int32) for i in range(11)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    ids = np.concatenate(docs)
    td = TokenData(ids, np.ones_like(ids, dtype=np.uint8), offsets, {"regime": "ift", "eos_id": 0})
    ours = Batches(td, "ift", 4, 8, seed=3)
    items = bench.item_sequence(Batches(td, "ift", 4, 8, seed=3), 5)  # crosses two epoch boundaries
    assert len(items) == 20
    other = Batches(td, "ift", 4, 8, seed=3)
    for k in range(5):
        a, b = next(ours), other.make_batch(items[4 * k:4 * k + 4])
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
        assert a.n_tokens == b.n_tokens


def test_train_cfg_is_valid_and_plain_adamw(bench):
    from learnforget.train.settings import TrainConfig

    cfg = TrainConfig.from_dict(bench.train_cfg_dict())
    assert (cfg.optimizer, cfg.weight_decay, cfg.schedule, cfg.warmup_steps) == ("adamw", 0.0, "constant", 0)
    assert cfg.threads == bench.THREADS and (cfg.batch_size, cfg.seq_len) == (16, 128)


def test_text_helpers(bench):
    status = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n"
    assert bench.proc_status_mib(status, "VmRSS") == 100.0
    assert bench.proc_status_mib(status, "VmHWM") == 200.0
    with pytest.raises(KeyError):
        bench.proc_status_mib(status, "VmSwap")
    assert bench.cpu_model("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\n") == "Some CPU @ 2.0GHz"
    assert bench.fmt_load((0.5, 1.25, 2.0)) == "0.50/1.25/2.00"
    table = bench.markdown_table([("a", "1", "2", "0.50x")])
    assert table.splitlines()[0] == "| measurement | ours | baseline | ratio |"
    assert table.splitlines()[2] == "| a | 1 | 2 | 0.50x |"


def test_saved_tensor_bytes_leaves_parameters_out(bench):
    model = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    # the weight gradient needs the input (5 x 8 float32); the weight itself is a parameter
    assert bench.saved_tensor_bytes(model, lambda m: m(x).sum()) == 5 * 8 * 4
    assert bench.saved_tensor_bytes(model, lambda m: (m(x) * m(x)).sum()) == 5 * 8 * 4 + 2 * 5 * 4 * 4


def test_settings_rows_are_ratios_against_the_main_case(bench):
    main = {"tokens_per_s": 1000.0, "step_s": 0.2, "mean_loss": 7.5, "tokens": 2000, "seconds": 2.0}
    best = {("ours", "cpt", "full"): main,
            "malloc-default": {**main, "tokens_per_s": 800.0},
            "compile": {**main, "tokens_per_s": 1250.0, "step_s": 0.16, "first_step_s": 20.16, "seconds": 1.6},
            "2x1-thread": {**main, "tokens_per_s": 1100.0},
            ("ours", "ift", "full"): {**main, "tokens_per_s": 500.0},
            "group-by-length": {**main, "tokens_per_s": 600.0, "mean_loss": 7.4}}
    rows = bench.settings_rows(best, 2, ((1e6, "6N"), 1e10))
    assert [r[3] for r in rows] == ["1.25x", "1.25x", "12.5%", "1.20x", "1.10x"]
    assert "mean loss 7.4000 vs 7.5000" in rows[3][0]
    assert "pays after 500 steps (1.7 min)" in rows[1][0]  # 20 s of compiling / 0.04 s saved per step
    slower = {**best, "compile": {**best["compile"], "step_s": 0.3}}
    assert "never pays" in bench.settings_rows(slower, 2)[1][0]


def test_run_gathers_job_overheads_and_table_rows(tmp_path):
    """bench/run.py: the fixed cost of a job is its Snakemake wall time less its own work."""
    import json

    run = load_bench("run")
    res = tmp_path / "results"
    for rel, secs in {"train/math-full/1.tsv": 50.0, "evaluate/math-full/1.tsv": 20.0, "base.tsv": 100.0,
                      "score/math-full/1.tsv": 7.0}.items():
        (res / "benchmarks" / rel).parent.mkdir(parents=True, exist_ok=True)
        (res / "benchmarks" / rel).write_text(f"s\th:m:s\n{secs}\t0:00:{int(secs)}\n")
    (res / "runs/math-full/1").mkdir(parents=True)
    (res / "runs/math-full/1/manifest.json").write_text(json.dumps({"job_train_seconds": 38.0}))
    (res / "evals/math-full").mkdir(parents=True)
    (res / "evals/math-full/1.json").write_text(json.dumps({"timing_s": {"evaluate": 13.0}}))
    got = run.job_overheads(res)
    assert got["train"] == {"jobs": 1, "wall": 50.0, "work": 38.0, "timed": 1}
    assert got["evaluate"]["work"] == 13.0 and got["base"]["timed"] == 0 and got["score"]["wall"] == 7.0
    text = "# T\n\n| measurement | ours | baseline | ratio |\n|---|---|---|---|\n| tokens/s, x: a | 1 | 2 | 0.50x |\n"
    assert run.table_row(text, "tokens/s, x") == ["tokens/s, x: a", "1", "2", "0.50x"]
    assert run.table_row(text, "MFU") is None
    assert run.first_table(text + "\n| rule | s |\n|---|---|\n| x | 1 |\n") == [["tokens/s, x: a", "1", "2", "0.50x"]]
