"""Cluster resources of every job, from the study config: GPUs, host memory and wall time.

The Snakemake rules take these as resources through the input functions of
``workflow/rules/common.smk``; a cluster executor turns them into its requests (the
``gpu-cluster`` SLURM profile: ``gpu`` -> ``--gpus``, ``mem_mb`` -> ``--mem``, ``runtime`` (minutes)
-> ``-t``, ``cpus_per_task`` -> ``--cpus-per-task``). A local run enforces none of them but the
cores (and ``mem_mb`` only when ``--resources mem_mb=...`` is given). Resources say how a job
runs, not what it computes: none is a Snakemake param, so changing them retrains nothing.

**Finetuning jobs** (:func:`train_plan`, :func:`train_runtime`). Config ``resources.gpu``:

- ``0``: a CPU job of ``cpu_processes`` processes; ``mem_mb`` is the memory planner's CPU estimate
  (:func:`learnforget.cluster.planner.gpu_plan_for_job` without GPUs).
- ``"auto"``: the planner picks the fewest GPUs, up to ``max_gpus``, on which the job fits in
  ``gpu_memory_gb`` (with its 10% margin); a job that fits on none raises ValueError naming it.
- ``N``: N GPUs; the plan at N GPUs is still computed (for ``mem_mb`` and the dry-run line) and
  flagged when it exceeds what ``auto`` would allow (one GPU's memory less the 10% margin).

The layout is the training loop's: full finetuning over several GPUs is sharded with FSDP
(learnforget.train.fsdp), adapter methods keep one replica per GPU (DDP). Gradient checkpointing, which
the planner models, is planned only when a run's training settings have it. On GPUs
``mem_mb`` is the host memory (:func:`learnforget.cluster.planner.host_memory_bytes`: per process the
float32 model that is loaded before it moves to the GPU, plus 2 GiB).

**Runtime estimate** (minutes, what ``runtime`` asks for):

1. Steps, as the trainer counts them (:func:`learnforget.train.loop.duration_to_steps` and
   :func:`learnforget.train.settings.plan_segment`): a duration in epochs is ``ceil(epochs x items /
   batch_size)`` steps, in tokens ``ceil(tokens / (batch_size x seq_len))``, in steps itself. A job
   trains from where it starts (the base, the previous duration's checkpoint, or its trunk, by
   the run's mode) to its end step, so a job that continues the previous duration is charged only
   the difference.
2. Items per epoch: exact from the token folder's ``meta.json`` when it exists (it does when the
   job is submitted: Snakemake evaluates resources again once a job's inputs are there);
   otherwise, in a dry run before tokenization, from the config's data sizes, each record taken
   as one ``seq_len`` window (an IFT row is padded to at most ``seq_len`` tokens; for CPT this
   errs long for records shorter than a window and short for longer ones).
3. Tokens = steps x ``batch_size`` x ``seq_len``; FLOPs = tokens x
   :func:`learnforget.train.modeling.flops_per_token` (6 per weight and token, plus attention), times 2/3
   for adapter methods (frozen weights get no weight gradient).
4. Seconds = FLOPs / (devices x peak x ``mfu``): on GPUs, GPUs x ``gpu_tflops[precision]``; on the
   CPU, processes x threads x ``cpu_tflops``.
5. Runtime = max(``min_runtime``, ceil(``runtime_safety`` x seconds / 60)) x attempt (a retried job
   gets longer; training resumes from its snapshot).

The base pretraining job (a CPU job) is estimated the same way over its token mix (one pass over
the mix per epoch, datasets repeated by their weights). Evaluation and analysis jobs take fixed
runtimes from the config; their memory comes from the model's size (:func:`evaluate_mem_mb`,
:func:`analyze_mem_mb`) unless the config sets it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

from learnforget import data as data_mod
from learnforget.cluster import planner
from learnforget.train.methods import as_method
from learnforget.train.modeling import flops_per_token, validate_arch
from learnforget.train.settings import TrainConfig, plan_segment

MiB = 2**20
GiB = 2**30
AUTO = "auto"
ADAPTER_FLOPS = 2 / 3  # share of full finetuning's FLOPs an adapter method spends (no frozen weight gradients)
MARGIN = 0.1  # share of a GPU's memory the planner keeps free (planner.plan_gpus's margin)


# ----------------------------------------------------------------------------- GPUs and memory
def wants_gpus(cfg: dict) -> bool:
    """Whether finetuning jobs run on GPUs (``resources.gpu`` auto or > 0)."""
    gpu = cfg["resources"]["gpu"]
    return gpu == AUTO or (isinstance(gpu, int) and gpu > 0)


def _layout(tc) -> dict[str, Any]:
    """How the trainer lays a job out: full finetuning over several GPUs is sharded with FSDP,
    adapter methods are replicated with DDP (``fsdp=None``: the planner's auto rule, the same);
    no gradient checkpointing."""
    return {"fsdp": None, "gradient_checkpointing": bool(getattr(tc, "gradient_checkpointing", False))}


def train_plan(cfg: dict, run) -> dict[str, Any]:
    """The resources of every job of ``run`` (a :class:`learnforget.study.config.Run`) but its runtime:
    ``{"gpus", "mem_mb", "per_gpu_mb", "fits", "mode", "summary"}`` (``mode``: cpu, auto or fixed;
    ``summary``: the planner's one line). ValueError when ``gpu: auto`` finds no GPU count that fits."""
    res = cfg["resources"]
    vocab = cfg["tokenizer"]["vocab_size"]
    tc = run.train_config
    gpu = res["gpu"]
    layout = _layout(tc)
    if gpu == 0:
        kw = dict(vocab_size=vocab, cpu_processes=res["cpu_processes"], name=run.name,
                  gradient_checkpointing=layout["gradient_checkpointing"])
        try:
            job = planner.gpu_plan_for_job(cfg["model"], run.method, run.train, None, **kw)
        except ValueError:  # a method the planner has no model of: sized as full finetuning (CPU jobs never stop)
            job = planner.gpu_plan_for_job(cfg["model"], {"type": "full"}, run.train, None, **kw)
            job["summary"] += f" (sized as full finetuning: no memory model of method type {run.method['type']!r})"
        return {"gpus": 0, "mem_mb": job["mem_mb"], "per_gpu_mb": 0, "fits": True, "mode": "cpu",
                "summary": job["summary"]}
    if gpu == AUTO:
        job = planner.gpu_plan_for_job(cfg["model"], run.method, run.train, res["gpu_memory_gb"], vocab_size=vocab,
                                       max_gpus=res["max_gpus"], margin=MARGIN, name=run.name, **layout)
        out = {"gpus": job["gpus"], "mem_mb": job["mem_mb"], "per_gpu_mb": job["per_gpu_mb"], "fits": True,
               "mode": "auto", "summary": job["summary"]}
        limit = res.get("max_runtime")
        if not limit:
            return out
        # more GPUs than memory needs when the longest job would outlast the cluster's time limit
        n = job["gpus"]
        while longest_job_minutes(cfg, run, n) > limit and n < min(res["max_gpus"], tc.batch_size):
            n += 1
        if n != job["gpus"]:
            out = {**train_plan({**cfg, "resources": {**res, "gpu": n}}, run), "mode": "auto"}
            out["summary"] += f" ({n} GPUs rather than {job['gpus']}: resources.max_runtime {limit} min)"
        out["over_runtime"] = longest_job_minutes(cfg, run, n) > limit
        return out
    n = int(gpu)
    mb = math.ceil(tc.batch_size / n)
    plan = planner.estimate(cfg["model"], run.method, micro_batch=min(mb, tc.micro_batch_size or mb), seq_len=tc.seq_len,
                            vocab_size=vocab, precision=tc.precision, optimizer=tc.optimizer, n_gpus=n,
                            fsdp=as_method(run.method).shards_with_fsdp and n > 1,
                            gradient_checkpointing=layout["gradient_checkpointing"],
                            name=run.name)
    host = planner.host_memory_bytes(cfg["model"], run.method, vocab_size=vocab, processes=n, optimizer=tc.optimizer)
    return {"gpus": n, "mem_mb": int(math.ceil(host / MiB)), "per_gpu_mb": int(math.ceil(plan.total / MiB)),
            "fits": plan.total <= (1 - MARGIN) * res["gpu_memory_gb"] * GiB, "mode": "fixed",
            "summary": plan.summary()}


def longest_job_minutes(cfg: dict, run, gpus: int) -> int:
    """The estimated runtime in minutes of ``run``'s longest job (trunks included) on ``gpus``
    GPUs, before tokenization (:func:`train_runtime` without a token folder)."""
    jobs = [(lab, "trunk") for lab in run.trunk_labels] + [(lab, "final") for lab in run.labels]
    return max(train_runtime(cfg, run, lab, part, gpus=gpus) for lab, part in jobs)


def train_plans(cfg: dict, runs: Iterable, *, fallback_gpus: int | None = None) -> dict[str, dict[str, Any]]:
    """:func:`train_plan` of each run, by name. With ``fallback_gpus`` (a dry run), a run that
    fits on no GPU count under ``gpu: auto`` is planned on that many GPUs (``fits`` False, so its
    plan line warns) instead of raising."""
    plans = {}
    for run in runs:
        try:
            plans[run.name] = train_plan(cfg, run)
        except ValueError:
            if fallback_gpus is None:
                raise
            plans[run.name] = train_plan({**cfg, "resources": {**cfg["resources"], "gpu": int(fallback_gpus)}}, run)
            plans[run.name]["fits"] = False
    return plans


def train_cpus(cfg: dict, gpus: int, threads: int) -> int:
    """CPU cores of a finetuning job: its processes (one per GPU, or ``cpu_processes``) x threads."""
    procs = gpus if gpus else cfg["resources"]["cpu_processes"]
    return max(1, procs) * max(1, threads)


def _params(cfg: dict) -> dict:
    return planner.count_params(cfg["model"], cfg["tokenizer"]["vocab_size"])


def evaluate_mem_mb(cfg: dict, run=None) -> int:
    """Host memory of an evaluation job: twice the float32 model (loading, the adapter applied)
    plus 4 GiB (Python, torch, lm-eval and its datasets); ``resources.evaluate.mem_mb`` if set."""
    fixed = cfg["resources"]["evaluate"]["mem_mb"]
    if fixed:
        return int(fixed)
    n = _params(cfg)["total"]
    if run is not None and run.is_adapter:
        n += planner.trainable_params(cfg["model"], run.method, cfg["tokenizer"]["vocab_size"])
    return int(math.ceil((2 * 4 * n + 4 * GiB) / MiB))


def analyze_mem_mb(cfg: dict) -> int:
    """Host memory of a spectral-analysis job, which streams one matrix at a time: 2 GiB plus
    eight float32 copies of the largest matrix (W, dW, W + dW, the Gaussian and work space);
    ``resources.analyze.mem_mb`` if set."""
    fixed = cfg["resources"]["analyze"]["mem_mb"]
    if fixed:
        return int(fixed)
    counts = _params(cfg)
    largest = max([counts["vocab_size"] * counts["final_norm"], *counts["modules"].values()])
    return int(math.ceil((2 * GiB + 8 * 4 * largest) / MiB))


def base_mem_mb(cfg: dict) -> int | None:
    """Host memory of the base pretraining job (one CPU process training every weight):
    the planner's CPU estimate; ``resources.base.mem_mb`` if set."""
    fixed = cfg["resources"]["base"]["mem_mb"]
    if fixed:
        return int(fixed)
    job = planner.gpu_plan_for_job(cfg["model"], {"type": "full"}, cfg["base"]["train"], None,
                                   vocab_size=cfg["tokenizer"]["vocab_size"], name="base")
    return job["mem_mb"]


# ----------------------------------------------------------------------------- runtime
#: Records assumed for a hub dataset that states neither ``records`` nor ``max_records``.
HUB_RECORDS_GUESS = 100_000


def dataset_records(cfg: dict, dataset: str) -> int:
    """Training records of a token dataset as the config's data sizes give them (an upper
    bound for code, whose records are at most ``max_records_train``)."""
    spec = cfg["data"].get("hub", {}).get(dataset)
    if spec:  # a hub dataset: its expected size as the config states it
        return int(spec.get("records") or spec.get("max_records") or HUB_RECORDS_GUESS)
    if dataset == "source":
        sc = data_mod.from_dict(data_mod.SourceConfig, cfg["data"]["source"])
        facts = sc.n_entities * len(sc.attributes)
        n = facts * (sc.n_train_templates + sc.qa_fraction) + (sc.n_entities if sc.biography else 0)
        return int(math.ceil(n / max(1e-9, 1 - sc.english_fraction)))
    domain = dataset.split("_")[0]
    if domain == "math":
        mc = data_mod.from_dict(data_mod.MathConfig, cfg["data"]["math"])
        return mc.n_generic if dataset == "math_generic" else mc.n_train
    if domain == "code":
        return data_mod.from_dict(data_mod.CodeConfig, cfg["data"]["code"]).max_records_train
    raise ValueError(f"unknown token dataset {dataset!r}")


def _token_meta(token_dir) -> dict | None:
    if token_dir is None:
        return None
    path = Path(token_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "n_docs" in meta and "n_tokens" in meta else None


def dataset_tokens(cfg: dict, dataset: str, seq_len: int, token_dir=None) -> tuple[int, int, bool]:
    """``(documents, tokens, exact)`` of a token dataset: from its folder's ``meta.json`` when it
    exists (exact), else estimated from the config (each record one ``seq_len`` window)."""
    meta = _token_meta(token_dir)
    if meta is not None:
        return int(meta["n_docs"]), int(meta["n_tokens"]), True
    spec = cfg["data"].get("hub", {}).get(dataset) or {}
    if spec.get("token_budget") and not spec.get("records"):
        tokens = int(spec["token_budget"])
        return max(1, tokens // seq_len), tokens, False
    n = dataset_records(cfg, dataset)
    return n, n * seq_len + 1, False


def items_per_epoch(cfg: dict, run, token_dir=None) -> tuple[int, bool]:
    """``(items, exact)`` per epoch of ``run``'s dataset at its ``seq_len``, as
    :class:`learnforget.data.tokens.Batches` counts them: packed windows for CPT (and packed IFT),
    documents for IFT."""
    seq_len = run.train_config.seq_len
    docs, tokens, exact = dataset_tokens(cfg, run.dataset, seq_len, token_dir)
    packed = run.regime == "cpt" or run.packing
    return max(1, (tokens - 1) // seq_len if packed else docs), exact


def _steps(duration: float, unit: str, items: int, batch_size: int, seq_len: int) -> int:
    if unit == "epochs":
        return math.ceil(duration * items / batch_size - 1e-9)
    if unit == "tokens":
        return int(math.ceil(duration / (batch_size * seq_len) - 1e-9))
    return int(duration)


def job_steps(run, label: str, part: str, items: int) -> tuple[int, int]:
    """``(start_step, end_step)`` of the job training ``run`` to duration ``label`` (``part``:
    ``final`` or ``trunk``), with ``items`` per epoch; as :func:`learnforget.train.settings.plan_segment`."""
    tc, m = run.train_config, run.method_config
    steps = {lab: _steps(d, run.unit, items, tc.batch_size, tc.seq_len) for lab, d in zip(run.labels, run.durations)}
    longest = max(steps.values())

    def end(lab: str, p: str) -> int:
        return plan_segment(tc, m, p, steps[lab], longest)["end_step"]

    seg = plan_segment(tc, m, part, steps[label], longest)
    i = run.labels.index(label)
    if seg["from"] == "base":
        start = 0
    elif seg["from"] == "trunk":
        start = end(label, "trunk")
    else:  # the previous duration's checkpoint of the same part (none for the first)
        start = end(run.labels[i - 1], part) if i > 0 else 0
    return start, seg["end_step"]


def _flops_per_token(cfg: dict, seq_len: int, adapter: bool) -> float:
    arch = SimpleNamespace(**validate_arch(cfg["model"]), vocab_size=cfg["tokenizer"]["vocab_size"])
    return flops_per_token(arch, seq_len) * (ADAPTER_FLOPS if adapter else 1.0)


def device_flops(cfg: dict, gpus: int, precision: str, *, processes: int = 1, threads: int = 1) -> float:
    """Achievable FLOP/s of a job: GPUs x ``gpu_tflops[precision]`` x ``mfu``, or without GPUs
    processes x threads x ``cpu_tflops`` x ``mfu``."""
    res = cfg["resources"]
    if gpus:
        peak = gpus * res["gpu_tflops"]["bf16" if precision in ("bf16", "pure_bf16") else "fp32"]
    else:
        peak = max(1, processes) * max(1, threads) * res["cpu_tflops"]
    return peak * 1e12 * res["mfu"]


def runtime_minutes(cfg: dict, flops: float, flops_per_s: float, attempt: int = 1) -> int:
    """``max(min_runtime, ceil(runtime_safety x flops / flops_per_s / 60)) x attempt``."""
    res = cfg["resources"]
    minutes = math.ceil(res["runtime_safety"] * flops / flops_per_s / 60 - 1e-9)
    return max(res["min_runtime"], minutes) * max(1, int(attempt))


def train_tokens(cfg: dict, run, label: str, part: str = "final", token_dir=None) -> tuple[int, bool]:
    """``(tokens, exact)``: tokens the job training ``run`` to ``label`` processes (padding
    included), and whether the items per epoch came from the token folder."""
    items, exact = items_per_epoch(cfg, run, token_dir)
    start, end = job_steps(run, label, part, items)
    tc = run.train_config
    return max(0, end - start) * tc.batch_size * tc.seq_len, exact


def train_runtime(cfg: dict, run, label: str, part: str = "final", *, gpus: int, token_dir=None,
                  attempt: int = 1) -> int:
    """Runtime in minutes of the job training ``run`` to duration ``label`` on ``gpus`` GPUs
    (0: ``cpu_processes`` processes of ``threads.train`` threads); see the module docstring."""
    tc = run.train_config
    tokens, _ = train_tokens(cfg, run, label, part, token_dir)
    flops = tokens * _flops_per_token(cfg, tc.seq_len, run.is_adapter)
    rate = device_flops(cfg, gpus, tc.precision, processes=cfg["resources"]["cpu_processes"],
                        threads=cfg["threads"]["train"])
    return runtime_minutes(cfg, flops, rate, attempt)


def base_runtime(cfg: dict, token_dirs: dict | None = None, attempt: int = 1) -> int:
    """Runtime in minutes of the base pretraining job (one CPU process of ``threads.base``
    threads): ``base.epochs`` passes over the token mix; ``token_dirs``: dataset -> folder, read
    when present. ``resources.base.runtime`` if set."""
    fixed = cfg["resources"]["base"]["runtime"]
    if fixed:
        return int(fixed) * max(1, int(attempt))
    tc = TrainConfig.from_dict(cfg["base"]["train"])
    mixed = 0.0
    for name, weight in cfg["base"]["mix"].items():
        if weight > 0:
            mixed += weight * dataset_tokens(cfg, name, tc.seq_len, (token_dirs or {}).get(name))[1]
    windows = max(1, (int(mixed) - 1) // tc.seq_len)
    steps = _steps(cfg["base"]["epochs"], "epochs", windows, tc.batch_size, tc.seq_len)
    flops = steps * tc.batch_size * tc.seq_len * _flops_per_token(cfg, tc.seq_len, adapter=False)
    return runtime_minutes(cfg, flops, device_flops(cfg, 0, tc.precision, threads=cfg["threads"]["base"]), attempt)


# ----------------------------------------------------------------------------- dry-run lines
def plan_lines(cfg: dict, runs: Iterable, plans: dict[str, dict], results_dir: str | None = None) -> list[str]:
    """One line per run for the dry run: its GPUs, host memory, the runtime in minutes of each of
    its jobs by duration (``trunk`` jobs first; "estimated before tokenization" when the token data
    is not there yet and items per epoch come from the config) and the planner's summary."""
    lines = []
    for run in runs:
        p = plans[run.name]
        token_dir = f"{results_dir}/tokens/{run.dataset}" if results_dir is not None else None
        jobs = [(lab, "trunk") for lab in run.trunk_labels] + [(lab, "final") for lab in run.labels]
        times, estimated = [], False
        for lab, part in jobs:
            minutes = train_runtime(cfg, run, lab, part, gpus=p["gpus"], token_dir=token_dir)
            estimated |= not train_tokens(cfg, run, lab, part, token_dir)[1]
            times.append(f"{'trunk ' if part == 'trunk' else ''}{lab} -> {minutes}")
        how = {"auto": "auto", "fixed": "resources.gpu", "cpu": "CPU"}[p["mode"]]
        warn = "" if p["fits"] else (f" WARNING: {p['per_gpu_mb'] / 1024:.1f} GiB per GPU exceeds the usable "
                                     f"{(1 - MARGIN) * cfg['resources']['gpu_memory_gb']:.1f} GiB of one GPU")
        if p.get("over_runtime"):
            warn += (f" WARNING: a job runs longer than resources.max_runtime "
                     f"({cfg['resources']['max_runtime']} min) even on {p['gpus']} GPUs")
        lines.append(f"learn-forget plan: train {run.name}: {p['gpus']} GPU(s) ({how}), host {p['mem_mb']} MiB, runtime in "
                     f"minutes by duration in {run.unit}: {', '.join(times)}"
                     f"{' (estimated before tokenization)' if estimated else ''}{warn}; {p['summary']}")
    return lines
