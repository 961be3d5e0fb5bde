"""Multi-process training through accelerate: 2 CPU processes (DDP over gloo) train like one.

Each process takes every second row of the global batch; the loss is scaled by the global
number of loss tokens so that DDP's averaged gradient equals the one-process gradient. The
two runs then differ only by the order of floating-point sums (the all-reduce).
"""

import socket

import pytest
import torch

from learnforget.io import read_jsonl
from learnforget.launch import finetune_job
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
