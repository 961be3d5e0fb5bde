"""FSDP2 on 2 CPU processes (gloo) trains a tiny Llama like one process does (learnforget.train.fsdp).

Two processes, spawned once for the module, train a tiny tied-embedding Llama with full
finetuning under ``fully_shard`` with AdamW and with Lion: each takes every second row of the
global batch and scales its summed loss by the global number of loss tokens, as
``learnforget.train.loop.train`` does. One process trains the same model on whole batches here. The
two runs differ only by the order of floating-point sums (reduce-scatter, sharded norms).

They also train with bf16 mixed precision (``precision="bf16"``: FSDP's policy, bf16 compute on
float32 shards), which must stay near the float32 losses.

Midway the workers gather the full model and optimizer state to rank 0, then (a) keep training
and (b) restore that state, broadcast from rank 0, into a freshly sharded model with other
initial values and train the same steps again; (b) must repeat (a) exactly. The gathered
optimizer state has the format of a plain ``optimizer.state_dict()``: it is compared with the
one-process optimizer's, and a plain model and optimizer continued from it train like (a). The
unsharded model is saved with ``save_pretrained`` and loaded back as a plain Llama.
"""

from __future__ import annotations

import copy
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F

TOLERANCE = 1e-4  # max relative difference of a step's loss or gradient norm, FSDP vs one process
SPLIT, STEPS = 3, 6  # the state is gathered after SPLIT steps; STEPS in all
BATCH, SEQ, WORLD = 4, 16, 2
OPTIMIZERS = ("adamw", "lion")
HYPER = {"adamw": dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
         "lion": dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)}
CLIP = 0.5  # below the initial gradient norm (~1), so clipping acts


def _config():
    from transformers import LlamaConfig

    # vocab 301: the embedding rows do not split evenly over 2 ranks (FSDP pads the last shard)
    return LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0,
                       pad_token_id=0)


def _model(seed: int):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(_config()).float()


def _global_batch(step: int):
    """Step ``step``'s rows: random ids, a prompt of 3 tokens and padding after a random length
    excluded from the loss (IGNORE_INDEX), so the ranks' loss-token counts differ."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 301, (BATCH, SEQ + 1), generator=g)
    lengths = torch.randint(6, SEQ + 2, (BATCH,), generator=g)
    inputs, targets = ids[:, :-1].clone(), ids[:, 1:].clone()
    for r, n in enumerate(lengths.tolist()):
        inputs[r, n:] = 0
        targets[r, n - 1:] = -100
        targets[r, :3] = -100
    return inputs, targets


def _step(model, opt, step: int, rank: int, world: int, all_reduce) -> tuple[float, float]:
    """One optimizer step on this rank's rows (train.py's loss scaling); (global loss, grad norm)."""
    from learnforget.train import fsdp

    inputs, targets = _global_batch(step)
    n_loss = int((targets != -100).sum())
    inputs, targets = inputs[rank::world], targets[rank::world]
    logits = model(input_ids=inputs, use_cache=False).logits
    ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                         reduction="sum")
    loss = ce * (world / n_loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = fsdp.clip_grad_norm([p for g in opt.param_groups for p in g["params"]], CLIP)
    opt.step()
    return all_reduce(float(ce.detach())) / n_loss, gnorm


def _optimizer(model, name):
    from learnforget.train.optim import make_optimizer

    return make_optimizer(model, name, **HYPER[name])


# ----------------------------------------------------------------------------- the 2 workers
def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from learnforget.train import fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def all_reduce(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    try:
        mesh = fsdp.device_mesh("cpu")
        # bf16 mixed precision (FSDP's policy, what precision: bf16 means under FSDP)
        model = fsdp.shard_model(_model(0), mesh, precision="bf16")
        opt = _optimizer(model, "adamw")
        bf16 = [_step(model, opt, s, rank, world, all_reduce) for s in range(STEPS)]
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        if rank == 0:
            torch.save({"log": bf16, "dtypes": dtypes}, os.path.join(out, "bf16.pt"))
        for name in OPTIMIZERS:
            t0 = time.perf_counter()
            model = fsdp.shard_model(_model(0), mesh)
            assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
            opt = _optimizer(model, name)
            log = [_step(model, opt, s, rank, world, all_reduce) for s in range(SPLIT)]
            snap_model = fsdp.full_model_state_dict(model)
            snap_opt = fsdp.full_optimizer_state_dict(model, opt)
            log += [_step(model, opt, s, rank, world, all_reduce) for s in range(SPLIT, STEPS)]
            final = fsdp.full_model_state_dict(model)
            plain = fsdp.unsharded_model(model)
            if rank == 0:
                plain.save_pretrained(os.path.join(out, f"{name}-model"))

            # resume from the gathered state: other initial values, overwritten from rank 0
            model2 = fsdp.shard_model(_model(1), mesh)
            fsdp.load_full_model_state_dict(model2, snap_model)
            opt2 = _optimizer(model2, name)
            fsdp.load_full_optimizer_state_dict(model2, opt2, snap_opt)
            resumed = [_step(model2, opt2, s, rank, world, all_reduce) for s in range(SPLIT, STEPS)]
            final2 = fsdp.full_model_state_dict(model2)
            if rank == 0:  # the loads left the caller's state dicts as they were
                assert all(type(v) is torch.Tensor for v in snap_model.values())
                assert all(type(v) is torch.Tensor for s in snap_opt["state"].values() for v in s.values())
                torch.save({"log": log, "resumed": resumed, "snap_model": snap_model, "snap_opt": snap_opt,
                            "final": final, "final2": final2, "seconds": time.perf_counter() - t0},
                           os.path.join(out, f"{name}.pt"))
            else:
                assert snap_model is None and snap_opt is None and final is None and plain is None
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{optimizer: (FSDP results, one-process results)}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("fsdp")
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    spawn_seconds = time.perf_counter() - t0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = {}
        for name in OPTIMIZERS:
            model = _model(0)
            opt = _optimizer(model, name)
            log = [_step(model, opt, s, 0, 1, float) for s in range(SPLIT)]
            snap_opt = copy.deepcopy(opt.state_dict())
            log += [_step(model, opt, s, 0, 1, float) for s in range(SPLIT, STEPS)]
            two = torch.load(out / f"{name}.pt", weights_only=True)
            result[name] = (two, {"log": log, "snap_opt": snap_opt, "final": model.state_dict(), "model": model},
                            out / f"{name}-model")
    finally:
        torch.set_num_threads(threads)
    result["spawn_seconds"] = spawn_seconds
    result["bf16"] = torch.load(out / "bf16.pt", weights_only=True)
    return result


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp_matches_one_process(runs, name):
    two, one, _ = runs[name]
    assert len(two["log"]) == len(one["log"]) == STEPS
    loss_diff = max(_rel(a[0], b[0]) for a, b in zip(two["log"], one["log"]))
    norm_diff = max(_rel(a[1], b[1]) for a, b in zip(two["log"], one["log"]))
    assert loss_diff < TOLERANCE, (loss_diff, two["log"], one["log"])
    assert norm_diff < TOLERANCE, (norm_diff, two["log"], one["log"])
    assert one["log"][-1][0] < one["log"][0][0]  # it trained
    assert one["log"][0][1] > CLIP  # clipping acted
    final = two["final"]
    assert final.keys() == one["final"].keys()
    worst = max(float((final[k] - one["final"][k]).abs().max()) for k in final)
    assert all(torch.allclose(final[k], one["final"][k], atol=1e-5, rtol=1e-4) for k in final), worst


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_restored_optimizer_state_continues_identically(runs, name):
    two, _, _ = runs[name]
    assert two["resumed"] == two["log"][SPLIT:]  # bitwise: same ops, same processes
    assert all(torch.equal(two["final2"][k], two["final"][k]) for k in two["final"])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gathered_optimizer_state_is_a_plain_state_dict(runs, name):
    """Same layout as the one-process optimizer's state_dict (so state.pt files are
    interchangeable), close values, and a plain model + optimizer continue from it like FSDP."""
    two, one, _ = runs[name]
    got, ref = two["snap_opt"], one["snap_opt"]
    assert got["param_groups"] == ref["param_groups"]
    assert got["state"].keys() == ref["state"].keys()
    for i, s in ref["state"].items():
        assert got["state"][i].keys() == s.keys()
        for k, v in s.items():
            assert torch.allclose(got["state"][i][k], v, atol=1e-6, rtol=1e-3), (i, k)
    model = _model(1)
    model.load_state_dict(two["snap_model"])  # also the gathered full model state dict
    model.tie_weights()
    opt = _optimizer(model, name)
    opt.load_state_dict(got)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cont = [_step(model, opt, s, 0, 1, float) for s in range(SPLIT, STEPS)]
    finally:
        torch.set_num_threads(threads)
    worst = max(_rel(a[0], b[0]) for a, b in zip(cont, two["log"][SPLIT:]))
    assert worst < TOLERANCE, (worst, cont, two["log"][SPLIT:])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unsharded_model_saves_a_plain_checkpoint(runs, name):
    from learnforget.train.modeling import load_model

    two, one, saved = runs[name]
    model = load_model(saved)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = model.state_dict()
    assert sd.keys() == two["final"].keys()
    assert all(torch.equal(sd[k], two["final"][k]) for k in sd)
    ids, _ = _global_batch(99)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
        ref = one["model"](input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), float((got - ref).abs().max())


def test_bf16_mixed_precision_keeps_float32_master_weights(runs):
    """bf16 compute (MixedPrecisionPolicy) on float32 shards: losses near the float32 run's."""
    bf16, (_, one, _) = runs["bf16"], runs["adamw"]
    assert bf16["dtypes"] == ["torch.float32"]
    worst = max(_rel(a[0], b[0]) for a, b in zip(bf16["log"], one["log"]))
    assert 0 < worst < 1e-2, (worst, bf16["log"], one["log"])
