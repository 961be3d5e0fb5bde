"""Benchmarks: each figure is a ratio against a baseline measured in the same run.

    python bench/run.py            # prints a markdown table and writes bench/results.md

- training: tokens/s of LoRA r8 vs full finetuning on the default study's model (same data,
  batch and thread count), both regimes;
- spectral: seconds per singular-value computation, torch.linalg.svdvals vs numpy.linalg.svd,
  on the default model's 192x512 MLP shape and on a 1024x2752 one.
Timings depend on the machine and its load; the table records both.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from learnforget import data  # noqa: E402
from learnforget.io import read_jsonl, write_text  # noqa: E402
from learnforget.methods import method_from_dict  # noqa: E402
from learnforget.modeling import build_model  # noqa: E402
from learnforget.tokenizer import train_tokenizer  # noqa: E402
from learnforget.tokens import Batches, tokenize_cpt, tokenize_ift  # noqa: E402
from learnforget.train import TrainConfig, train  # noqa: E402

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
STEPS = int(os.environ.get("BENCH_STEPS", "30"))


def train_tps(arch, tok, td, regime, method, cfg) -> float:
    model = method_from_dict(method).prepare(build_model(arch, tok, seed=0))
    batches = Batches(td, regime, cfg.batch_size, cfg.seq_len, seed=0, pad_id=tok.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        model, state = train(model, batches, cfg, end_step=3, log_path=Path(tmp) / "w.jsonl", progress=False)
        t0, tok0 = time.perf_counter(), state["tokens"]
        model, state = train(model, batches, cfg, start_step=3, end_step=3 + STEPS, state=state,
                             log_path=Path(tmp) / "log.jsonl", progress=False)
        return (state["tokens"] - tok0) / (time.perf_counter() - t0)


def svd_seconds(fn, m, repeat=3) -> float:
    fn(m)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(m)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    torch.set_num_threads(THREADS)
    cfg_all = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    arch = cfg_all["model"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data.build_math(cfg_all["data"]["math"], 0, tmp / "math")
        data.build_code(cfg_all["data"]["code"], 0, tmp / "code")
        tok = train_tokenizer([tmp / "math/train.jsonl", tmp / "code/train.jsonl"], tmp / "tok",
                              vocab_size=cfg_all["tokenizer"]["vocab_size"])
        math_recs = read_jsonl(tmp / "math/train.jsonl")
        ift = tokenize_ift([f"Question: {r['question']}\nAnswer:" for r in math_recs],
                           [f" {r['answer']}" for r in math_recs], tok)
        cpt = tokenize_cpt([r["text"] for r in read_jsonl(tmp / "code/train.jsonl")], tok)
        cfg = TrainConfig.from_dict({**cfg_all["finetune"], "lr": 1e-3, "threads": THREADS})
        lora = {"type": "lora", "rank": 8, "target": "all"}
        for regime, td in (("ift", ift), ("cpt", cpt)):
            full = train_tps(arch, tok, td, regime, {"type": "full"}, cfg)
            lo = train_tps(arch, tok, td, regime, lora, cfg)
            rows.append((f"train {regime}: LoRA r8 vs full tokens/s", f"{lo:,.0f}", f"{full:,.0f}", f"{lo / full:.2f}x"))
    rng = np.random.default_rng(0)
    for shape in ((arch["hidden_size"], arch["intermediate_size"]), (1024, 2752)):
        m = rng.standard_normal(shape).astype(np.float32)
        t_torch = svd_seconds(lambda x: torch.linalg.svdvals(torch.from_numpy(x)), m)
        t_numpy = svd_seconds(lambda x: np.linalg.svd(x, compute_uv=False), m)
        rows.append((f"svd {shape[0]}x{shape[1]}: torch.svdvals vs numpy.svd seconds", f"{t_torch:.4f}",
                     f"{t_numpy:.4f}", f"{t_numpy / t_torch:.2f}x speed-up"))
    header = "| benchmark | ours | baseline | ratio |\n|---|---:|---:|---:|\n"
    table = header + "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in rows)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {THREADS} threads"
    out = f"# Benchmarks\n\nMeasured on {machine}; {STEPS} timed steps per training case.\n\n{table}"
    write_text(ROOT / "bench" / "results.md", out)
    print(out)


if __name__ == "__main__":
    main()
