"""Multi-process training through accelerate: 2 CPU processes (DDP over gloo) train like one,
also when each accumulates its share over several passes (micro_batch_size).

Each process takes every second row of the global batch; the loss is scaled by the global
number of loss tokens so that DDP's averaged gradient equals the one-process gradient. The
two runs then differ only by the order of floating-point sums (the all-reduce).
"""

import socket

import pytest
import torch

from learnforget.core.io import read_jsonl
from learnforget.train.launch import finetune_job
from test_train import world  # noqa: F401  (the tiny tokenizer, token folders and base model)

TOLERANCE = 1e-4  # max relative difference of any step's loss; measured about 2e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("regime", ["ift"])  # ift: unequal loss tokens per process, the harder case
def test_two_cpu_processes_match_one(world, tmp_path, regime):
    kw = dict(base_dir=world / "base", token_dir=world / f"math_{regime}", regime=regime,
              method={"type": "lora", "rank": 4, "dropout": 0.0},
              train_cfg=dict(lr=3e-3, batch_size=8, seq_len=24, threads=1, seed=0), duration=12, unit="steps",
              progress=False)
    one = finetune_job({**kw, "out_dir": tmp_path / "one"}, processes=1)
    two = finetune_job({**kw, "out_dir": tmp_path / "two"}, processes=2, main_port=_free_port())
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["tokens"] == one["tokens"] and two["loss_tokens"] == one["loss_tokens"]
    l1 = [r["loss"] for r in read_jsonl(tmp_path / "one" / "train_log.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(tmp_path / "two" / "train_log.jsonl")]
    assert len(l1) == len(l2) == 12
    worst = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    assert worst < TOLERANCE, (worst, l1, l2)
    assert l1[-1] < l1[0]  # it trained
    # one checkpoint, written once, by the main process
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "model" / "adapter_model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)
    # gradient accumulation on top (micro_batch_size; no all-reduce until a step's last pass)
    acc = {**kw, "train_cfg": {**kw["train_cfg"], "micro_batch_size": 2}, "out_dir": tmp_path / "acc"}
    finetune_job(acc, processes=2, main_port=_free_port())
    l3 = [r["loss"] for r in read_jsonl(tmp_path / "acc" / "train_log.jsonl")]
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l3)) < TOLERANCE
    w3 = load_file(str(tmp_path / "acc" / "model" / "adapter_model.safetensors"))
    assert all(torch.allclose(w1[k], w3[k], atol=1e-5, rtol=1e-4) for k in w1)


def test_full_finetuning_is_sharded_with_fsdp_and_matches_one_process(world, tmp_path):
    """Full finetuning over 2 processes runs FSDP2 (learnforget.train.fsdp): sharded weights, gradients
    and optimizer state, gathered on the main process for snapshots and to save; same losses and
    weights as one process, and a one-process job continues from the FSDP job's optimizer state."""
    kw = dict(base_dir=world / "base", token_dir=world / "math_ift", regime="ift", method={"type": "full"},
              train_cfg=dict(lr=1e-3, batch_size=8, seq_len=24, threads=1, seed=0, optimizer="lion",
                             grad_clip=0.5),
              duration=6, unit="steps", progress=False)
    one = finetune_job({**kw, "out_dir": tmp_path / "one"}, processes=1)
    # snapshots every 2 steps gather the sharded state mid-run (a collective on every process)
    snap = {**kw, "train_cfg": {**kw["train_cfg"], "save_every_steps": 2}, "resume_dir": tmp_path / "resume"}
    two = finetune_job({**snap, "out_dir": tmp_path / "two"}, processes=2, main_port=_free_port())
    assert one["fsdp"] is False and two["fsdp"] is True and two["processes"] == 2
    assert not (tmp_path / "resume").exists()  # written during the job, removed once it is complete
    l1 = [r["loss"] for r in read_jsonl(tmp_path / "one" / "train_log.jsonl")]
    l2 = [r["loss"] for r in read_jsonl(tmp_path / "two" / "train_log.jsonl")]
    g1 = [r["grad_norm"] for r in read_jsonl(tmp_path / "one" / "train_log.jsonl")]
    g2 = [r["grad_norm"] for r in read_jsonl(tmp_path / "two" / "train_log.jsonl")]
    assert max(abs(a - b) / abs(a) for a, b in zip(l1 + g1, l2 + g2)) < TOLERANCE, (l1, l2, g1, g2)
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4) for k in w1)
    # the optimizer state saved under FSDP is a plain one: a one-process job continues from it
    more = finetune_job({**kw, "duration": 8, "prev_checkpoint_dir": tmp_path / "two",
                         "durations": [6, 8], "out_dir": tmp_path / "more"}, processes=1)
    assert more["continued_from"] == str(tmp_path / "two") and more["step"] == 8
