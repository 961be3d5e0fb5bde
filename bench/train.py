"""Training speed: our trainer vs Hugging Face's Trainer, MFU, LoRA vs full; ratios of the same run.

    python bench/train.py          # prints a markdown table and writes bench/train-results.md

- tokens/s: ``learnforget.train.loop.train`` (ours) vs a plain ``transformers.Trainer`` (the
  baseline) on the default study's model (config/config.yaml ``model:``, built by
  ``build_model`` with seed 0, so both start from the same weights), for full finetuning and
  LoRA (r 8, alpha 16, all linear modules of the blocks: ours through the method registry,
  the baseline through ``peft.LoraConfig(target_modules="all-linear")``; the same trainable
  count is checked), on math IFT (one right-padded row per example) and code CPT (packed
  windows). Both get the same batches in the same order (the Trainer's data collator is
  ``Batches.make_batch`` over our loop's item sequence, sequential sampler; the already
  shifted targets are passed as ``shift_labels``), batch 16, seq_len 128 (the study's
  ``finetune:``), AdamW with lr 1e-3, betas (0.9, 0.95), eps 1e-8, no weight decay, constant
  LR without warm-up, gradient clipping at 1.0, the same torch thread count and the same
  number of steps. The Trainer keeps its default optimizer implementation (with torch >= 2.8
  ``adamw_torch_fused``; ours is fused too, ``learnforget.train.optim``) and runs without evaluation, saving,
  reporting, progress bar or dataloader workers, logging once. Tokens are the non-padding
  input tokens (every token for CPT; the same count for both trainers). The first
  ``BENCH_WARMUP`` steps are not timed: rates run from the end of that step to the end of the
  last one. The table shows both trainers' mean training loss: equal, they computed the same.
- MFU: our achieved FLOP/s over the float32 matmul peak measured in this run with the same
  thread count (``learnforget.train.accounting.measured_peak_flops``, best of 5, n = 1024 and 2048,
  at the start and at the end: the largest), through ``accounting.speed``. FLOPs per token,
  full: ``modeling.flops_per_token`` (6 N + attention; N = matmul weights incl. the output
  head); LoRA: that - 2 N + 6 N_lora (forward 2 N, backward through the frozen weights 2 N for
  the activations only, no frozen-weight gradients; 6 per adapter weight). seq_len 128 for
  the attention term; padding is not counted.
- optimizer: median milliseconds of gradient clipping + AdamW step on the model's trainable
  parameters, ours vs the Trainer's implementation (the only code the two loops do not
  share); measured before and after the training cases, the faster of the two.
- settings (code CPT, full finetuning, ours, one thing changed each): glibc's default heap
  thresholds (``LEARNFORGET_MALLOC=default``) vs the raised ones ``train`` sets
  (``learnforget.core.perf``); the model under ``torch.compile`` (``train.compile``; inductor, a cold
  cache folder) vs eager, with the first step's seconds and after how many steps compiling
  pays, and its MFU; two 1-thread jobs at once (what the default study runs on 2 cores) vs
  one job with ``BENCH_THREADS``; and on math IFT ``train.group_by_length`` vs the plain
  shuffled order (other batches, so other losses: a speed figure only).
- LoRA vs full (ours): seconds per step, and peak memory: the peak resident set during
  training minus the resident set just before it (Linux: VmHWM reset through
  /proc/self/clear_refs; elsewhere the process peak), which includes what the allocator
  keeps; and, exact, the bytes of the activations autograd saves for backward on one batch.

Every training case runs in a fresh process (clean allocator and peak RSS; data, tokenizer and
token files are built once, in a temporary folder, as bench/run.py does); every case runs
``BENCH_REPEATS`` times, best of each, and ours and the baseline alternate which goes first.
Progress goes to stderr. Environment: ``BENCH_STEPS`` (timed steps per case, default 40),
``BENCH_WARMUP`` (untimed steps first, default 5), ``BENCH_THREADS`` (default 2),
``BENCH_REPEATS`` (default 2). The whole bench takes about 6-7 minutes on 2 idle cores.
Timings depend on the machine and its load: with 2 threads on 2 cores, another busy process
makes every multi-threaded op wait for a time slice (milliseconds each); the output records
the load average at the start, after each training case and at the end.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

from learnforget import data  # noqa: E402
from learnforget.core.io import read_jsonl, write_text  # noqa: E402
from learnforget.data.tokenizer import train_tokenizer  # noqa: E402
from learnforget.data.tokens import Batches, load_tokens, save_tokens, tokenize_cpt, tokenize_ift  # noqa: E402
from learnforget.train.accounting import measured_peak_flops, peak_memory_mib, speed  # noqa: E402
from learnforget.train.loop import make_optimizer, train  # noqa: E402
from learnforget.train.methods import method_from_dict  # noqa: E402
from learnforget.train.modeling import build_model, count_parameters, flops_per_token  # noqa: E402
from learnforget.train.settings import TrainConfig  # noqa: E402

STEPS = int(os.environ.get("BENCH_STEPS", "40"))
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "5"))
LR = 1e-3
LORA = {"type": "lora", "rank": 8, "alpha": 16, "target": "all"}
REGIMES = {"ift": "math IFT", "cpt": "code CPT"}


def log(msg: str) -> None:
    print(f"[bench/train] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- pure helpers
def steady_rate(records: list[dict], warmup: int) -> dict:
    """Tokens, seconds and rates between the end of step ``warmup`` and the end of the last step.

    ``records``: one per step with ``step`` (1-based, after the update), ``tokens``
    (cumulative) and ``elapsed`` (cumulative seconds), as in the training log. ``warmup`` 0
    measures from the first record's start (tokens and seconds 0 before it).
    """
    recs = sorted(records, key=lambda r: r["step"])
    if not recs or recs[-1]["step"] <= warmup:
        raise ValueError(f"need steps after the {warmup} warm-up steps, got {len(recs)} records")
    start = {"step": 0, "tokens": 0, "elapsed": 0.0}
    if warmup:
        start = next((r for r in recs if r["step"] == warmup), None)
        if start is None:
            raise ValueError(f"no record for step {warmup}")
    end = recs[-1]
    steps, tokens, seconds = end["step"] - start["step"], end["tokens"] - start["tokens"], \
        end["elapsed"] - start["elapsed"]
    if seconds <= 0:
        raise ValueError(f"non-positive time between steps {start['step']} and {end['step']}")
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "step_s": seconds / steps}


def step_records(step_ends: list[float], step_tokens: list[int], t0: float) -> list[dict]:
    """Training-log-like records from step end times (perf_counter) and tokens per step."""
    if len(step_ends) > len(step_tokens):
        raise ValueError(f"{len(step_ends)} steps but tokens for {len(step_tokens)}")
    recs, tokens = [], 0
    for i, (t, n) in enumerate(zip(step_ends, step_tokens)):
        tokens += n
        recs.append({"step": i + 1, "tokens": tokens, "elapsed": t - t0})
    return recs


def item_sequence(batches, steps: int) -> list[int]:
    """The items of the next ``steps`` batches of ``batches``, in order (what our loop trains on)."""
    return [i for _ in range(steps) for i in batches.next_items()]


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of the matrix multiplications a token goes through: every ``nn.Linear`` weight
    (once, tied ones too), adapters (``lora_`` modules) left out; for a Llama this is the N of
    ``modeling.flops_per_token`` (blocks + output head)."""
    seen, n = set(), 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lora_" not in name and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            n += mod.weight.numel()
    return n


def lora_flops_per_token(full_flops_per_token: float, n_matmul: int, n_adapter: int) -> float:
    """Training FLOPs per token with frozen matmul weights and ``n_adapter`` trainable adapter
    weights: the full figure (6 N + attention) less the frozen weights' gradients (2 N), plus
    forward and backward of the adapters (6 per weight)."""
    return full_flops_per_token - 2 * n_matmul + 6 * n_adapter


def proc_status_mib(text: str, key: str) -> float:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM) in MiB."""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            value, unit = line.split(":", 1)[1].split()
            if unit != "kB":
                raise ValueError(f"unexpected unit {unit!r} for {key}")
            return int(value) / 1024
    raise KeyError(key)


EXTRAS = {  # full finetuning, ours: (regime, one setting changed from that regime's main case)
    "malloc-default": ("cpt", {"env": {"LEARNFORGET_MALLOC": "default"}}),
    "compile": ("cpt", {"compile": True}),
    "2x1-thread": ("cpt", {"threads": 1, "concurrent": 2}),
    "group-by-length": ("ift", {"group_by_length": True}),
}


def settings_rows(best: dict, threads: int, fpt_peak: tuple | None = None) -> list[tuple]:
    """Rows for the settings the trainer chose, each against the main code CPT full case (``best``
    keyed as in ``main``): the heap thresholds, torch.compile, and the study's 2 jobs x 1 thread."""
    main = best[("ours", "cpt", "full")]
    rows = []
    off = best["malloc-default"]
    rows.append(("tokens/s, full, code CPT: ours vs ours with glibc's default heap thresholds "
                 "(LEARNFORGET_MALLOC=default; learnforget.core.perf)", f"{main['tokens_per_s']:,.0f}",
                 f"{off['tokens_per_s']:,.0f}", f"{main['tokens_per_s'] / off['tokens_per_s']:.2f}x"))
    comp = best["compile"]
    gain = main["step_s"] - comp["step_s"]
    compile_s = comp["first_step_s"] - comp["step_s"]
    pays = (f"pays after {compile_s / gain:,.0f} steps ({compile_s / gain * main['step_s'] / 60:.1f} min)"
            if gain > 0 else "never pays")
    rows.append((f"tokens/s, full, code CPT: torch.compile (inductor, cold cache) vs eager (ours); first step "
                 f"{comp['first_step_s']:.1f} s, so compiling {pays}; mean loss {comp['mean_loss']:.4f} vs "
                 f"{main['mean_loss']:.4f}", f"{comp['tokens_per_s']:,.0f}", f"{main['tokens_per_s']:,.0f}",
                 f"{comp['tokens_per_s'] / main['tokens_per_s']:.2f}x"))
    if fpt_peak is not None:
        (f, _), peak = fpt_peak
        mfu = speed(comp["tokens"], comp["seconds"], f, peak)
        rows.append(("MFU, full, code CPT, train.compile: achieved GFLOP/s vs matmul peak",
                     f"{mfu['gflops_per_s']:.2f}", f"{peak / 1e9:.1f}", f"{mfu['mfu']:.1%}"))
    if "group-by-length" in best and ("ours", "ift", "full") in best:
        g, p = best["group-by-length"], best[("ours", "ift", "full")]
        rows.append((f"tokens/s, full, math IFT: train.group_by_length vs one shuffled order (other batches: mean "
                     f"loss {g['mean_loss']:.4f} vs {p['mean_loss']:.4f}; non-padding tokens counted)",
                     f"{g['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}",
                     f"{g['tokens_per_s'] / p['tokens_per_s']:.2f}x"))
    par = best["2x1-thread"]
    rows.append((f"tokens/s, full, code CPT: 2 jobs x 1 thread at once (the default study's train jobs) vs 1 job x "
                 f"{threads} threads, summed", f"{par['tokens_per_s']:,.0f}", f"{main['tokens_per_s']:,.0f}",
                 f"{par['tokens_per_s'] / main['tokens_per_s']:.2f}x"))
    return rows


def markdown_table(rows: list[tuple]) -> str:
    lines = ["| measurement | ours | baseline | ratio |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("model name", "Hardware", "cpu model"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fmt_load(load: tuple) -> str:
    return "/".join(f"{x:.2f}" for x in load)


# ----------------------------------------------------------------------------- one case (child)
class Memory:
    """Resident memory of this process around a training call (see the module doc)."""

    def __init__(self):
        self.status = Path("/proc/self/status")
        self.hwm_reset = False
        self.before = None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.before = self._read("VmRSS")

    def _read(self, key):
        if self.status.exists():
            return proc_status_mib(self.status.read_text(), key)

        return peak_memory_mib("cpu")["peak_memory_mib"]

    def result(self) -> dict:
        peak = self._read("VmHWM")
        return {"rss_before_mib": round(self.before, 1), "peak_rss_mib": round(peak, 1),
                "peak_delta_mib": round(peak - self.before, 1),
                "peak_kind": "VmHWM reset before training" if self.hwm_reset else "process peak RSS"}


def _setup(work: Path, regime: str, group_by_length: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "tok")
    td = load_tokens(work / f"tokens-{regime}", mmap=False)
    finetune = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["finetune"]
    return tok, td, lambda: Batches(td, regime, finetune["batch_size"], finetune["seq_len"], seed=0,
                                    pad_id=tok.pad_token_id, group_by_length=group_by_length)


def train_cfg_dict() -> dict:
    finetune = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["finetune"]
    return {**finetune, "lr": LR, "schedule": "constant", "warmup_steps": 0, "threads": THREADS,
            "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0, "optimizer": "adamw"}


def run_ours(work: Path, arch: dict, regime: str, method: str, steps: int, warmup: int, threads: int = THREADS,
             compile: bool = False, group_by_length: bool = False) -> dict:
    torch.set_num_threads(threads)
    tok, _, make_batches = _setup(work, regime, group_by_length)
    # compile: train.compile (inductor; the first step compiles; TORCHINDUCTOR_CACHE_DIR: a fresh folder, cold)
    cfg = TrainConfig.from_dict({**train_cfg_dict(), "threads": threads, "compile": compile,
                                 "group_by_length": group_by_length})
    m = method_from_dict({"type": "full"} if method == "full" else LORA)
    torch.manual_seed(0)
    model = m.prepare(build_model(arch, tok, seed=0))
    batches = make_batches()
    mem = Memory()
    log_path = work / f"ours-{regime}-{method}-{os.getpid()}.jsonl"
    mem.start()
    model, state = train(model, batches, cfg, end_step=steps, log_path=log_path, progress=False, method=m)
    out = mem.result()
    recs = read_jsonl(log_path)
    log_path.unlink()
    return {**out, **steady_rate(recs, warmup), "threads": torch.get_num_threads(),
            "first_step_s": recs[0]["elapsed"],
            "trainable": count_parameters(model)[0], "mean_loss": sum(r["loss"] for r in recs) / len(recs)}


def run_hf(work: Path, arch: dict, regime: str, method: str, steps: int, warmup: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(THREADS)
    tok, _, make_batches = _setup(work, regime)
    cfg = train_cfg_dict()
    torch.manual_seed(0)
    model = build_model(arch, tok, seed=0)
    model.config.use_cache = False  # ours calls the model with use_cache=False
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=0.0, target_modules="all-linear", bias="none"))
    order = make_batches()
    items = item_sequence(order, steps)  # our trainer's item sequence, fed in order (sequential sampler)
    batches, step_tokens = make_batches(), []

    def collate(features):
        b = batches.make_batch(features)
        step_tokens.append(b.n_tokens)
        # labels as our loop uses them (already shifted); labels only switches the loss on
        return {"input_ids": b.input_ids, "labels": b.targets, "shift_labels": b.targets}

    class Times(TrainerCallback):
        def __init__(self):
            self.ends, self.t0, self.threads = [], None, None

        def on_train_begin(self, args, state, control, **kw):
            self.threads = torch.get_num_threads()

        def on_step_begin(self, args, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, max_steps=steps, per_device_train_batch_size=order.batch_size,
            learning_rate=cfg["lr"], adam_beta1=cfg["betas"][0], adam_beta2=cfg["betas"][1],
            adam_epsilon=cfg["eps"], weight_decay=0.0, max_grad_norm=cfg["grad_clip"],
            lr_scheduler_type="constant", warmup_steps=0, train_sampling_strategy="sequential",
            eval_strategy="no", save_strategy="no", report_to=[], logging_strategy="steps",
            logging_steps=steps, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            label_names=["labels"], use_cpu=True, seed=0)
        times = Times()
        trainer = Trainer(model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[times])
        mem = Memory()
        mem.start()
        result = trainer.train()
        out = mem.result()
    recs = step_records(times.ends, step_tokens, times.t0)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {**out, **steady_rate(recs, warmup), "threads": times.threads, "optim": args.optim.value,
            "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
            "trainable": count_parameters(model)[0], "mean_loss": result.training_loss}


def child(spec: str) -> None:
    s = json.loads(spec)
    args = (Path(s["work"]), s["arch"], s["regime"], s["method"], s["steps"], s["warmup"])
    res = run_ours(*args, threads=s["threads"], compile=s["compile"], group_by_length=s["group_by_length"]) \
        if s["trainer"] == "ours" else run_hf(*args)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the bench (parent)
def run_case(work: Path, arch: dict, trainer: str, regime: str, method: str, steps: int, *,
             threads: int = THREADS, compile: bool = False, group_by_length: bool = False, env: dict | None = None,
             concurrent: int = 1) -> dict:
    """One case in a fresh process (``concurrent`` identical processes at once: their results, summed
    tokens/s, in ``"each"`` / ``"tokens_per_s"``)."""
    spec = json.dumps({"work": str(work), "arch": arch, "trainer": trainer, "regime": regime, "method": method,
                       "steps": steps, "warmup": WARMUP, "threads": threads, "compile": compile,
                       "group_by_length": group_by_length})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        penv = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": cache, **(env or {})}
        procs = [subprocess.Popen([sys.executable, __file__, "--case", spec], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=penv) for _ in range(concurrent)]
        outs = [(p, *p.communicate()) for p in procs]
    each = []
    for proc, stdout, stderr in outs:
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(stderr[-4000:])
            raise RuntimeError(f"case {trainer} {regime} {method} failed (exit {proc.returncode})")
        each.append(json.loads(lines[-1][len("RESULT "):]))
    res = dict(each[0])
    if concurrent > 1:
        res["each"], res["tokens_per_s"] = each, sum(r["tokens_per_s"] for r in each)
    res["load"] = os.getloadavg()[0]
    what = f"{trainer}{' compiled' if compile else ''}{' grouped' if group_by_length else ''}" \
        f"{' ' + str(env) if env else ''}" + \
        (f" {concurrent} x {threads} thread(s)" if concurrent > 1 else "")
    log(f"{what} {regime} {method:4s}: {res['tokens_per_s']:8,.0f} tokens/s, {res['step_s']:.3f} s/step, "
        f"peak +{res['peak_delta_mib']:.0f} MiB, mean loss {res['mean_loss']:.4f} "
        f"({time.perf_counter() - t0:.0f} s with start-up; load {res['load']:.2f})")
    return res


def build_data(cfg_all: dict, work: Path) -> None:
    data.build_math(cfg_all["data"]["math"], 0, work / "math")
    data.build_code(cfg_all["data"]["code"], 0, work / "code")
    tok = train_tokenizer([work / "math/train.jsonl", work / "code/train.jsonl"], work / "tok",
                          vocab_size=cfg_all["tokenizer"]["vocab_size"])
    math_recs = read_jsonl(work / "math/train.jsonl")
    save_tokens(tokenize_ift([f"Question: {r['question']}\nAnswer:" for r in math_recs],
                             [f" {r['answer']}" for r in math_recs], tok), work / "tokens-ift")
    save_tokens(tokenize_cpt([r["text"] for r in read_jsonl(work / "code/train.jsonl")], tok), work / "tokens-cpt")


def peak_flops() -> float:
    return max(measured_peak_flops("cpu", torch.float32, n=n) for n in (1024, 2048))


def flops_per_token_of(work: Path, arch: dict, method: str, seq_len: int) -> tuple[float, str]:
    from transformers import AutoTokenizer

    base = build_model(arch, AutoTokenizer.from_pretrained(work / "tok"), seed=0)
    full = flops_per_token(base.config, seq_len)
    if method == "full":
        return full, "6N + attention"
    n = matmul_params(base)
    n_lora = count_parameters(method_from_dict(LORA).prepare(base))[0]
    return lora_flops_per_token(full, n, n_lora), f"6N + attention - 2N + 6 N_lora (N {n:,}, N_lora {n_lora:,})"


def optimizer_ms(work: Path, arch: dict, method: str, repeats: int = 20) -> tuple[float, float]:
    """Median milliseconds of gradient clipping + optimizer step on the model's trainable
    parameters (fixed random gradients): ours (``learnforget.train.loop.make_optimizer``: torch
    AdamW, fused; ``clip_grad_norm_(foreach=True)``, as ``train`` calls them) vs the HF
    Trainer's (AdamW fused=True, its default ``adamw_torch_fused`` with torch >= 2.8;
    ``clip_grad_norm_`` with torch's default), alternating."""
    from transformers import AutoTokenizer

    cfg = train_cfg_dict()
    tok = AutoTokenizer.from_pretrained(work / "tok")
    models, steps = {}, {}
    for who in ("ours", "hf"):
        torch.manual_seed(0)
        model = method_from_dict({"type": "full"} if method == "full" else LORA).prepare(build_model(arch, tok))
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        if who == "ours":
            opt = make_optimizer(model, TrainConfig.from_dict(cfg))
            clip = partial(torch.nn.utils.clip_grad_norm_, params, cfg["grad_clip"], foreach=True)
        else:
            opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=0.0,
                                    fused=True)
            clip = partial(torch.nn.utils.clip_grad_norm_, params, cfg["grad_clip"])
        models[who] = model
        steps[who] = (lambda clip=clip, opt=opt: (float(clip()), opt.step()))
    times = {"ours": [], "hf": []}
    for i in range(repeats + 3):
        for who in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            t0 = time.perf_counter()
            steps[who]()
            if i >= 3:
                times[who].append(time.perf_counter() - t0)
    return tuple(1e3 * sorted(times[w])[len(times[w]) // 2] for w in ("ours", "hf"))


def saved_activation_mib(work: Path, arch: dict, method: str) -> float:
    """MiB of the tensors autograd saves for backward (parameters left out) in one forward and
    loss of our loop, on the first code CPT batch (a full 16 x 128 one)."""
    import torch.nn.functional as F

    tok, _, make_batches = _setup(work, "cpt")
    model = method_from_dict({"type": "full"} if method == "full" else LORA).prepare(build_model(arch, tok))
    batch = next(make_batches())
    return saved_tensor_bytes(model, lambda m: F.cross_entropy(
        m(input_ids=batch.input_ids, use_cache=False).logits.float().flatten(0, 1), batch.targets.flatten(),
        ignore_index=-100)) / 2**20


def saved_tensor_bytes(model: torch.nn.Module, loss_fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``loss_fn(model)`` runs,
    the model's parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() and st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model)
    return sum(seen.values())


def main() -> None:
    torch.set_num_threads(THREADS)
    load0, date = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M")
    t_start = time.perf_counter()
    cfg_all = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    arch, seq_len = cfg_all["model"], cfg_all["finetune"]["seq_len"]
    log(f"matmul peak at the start ({THREADS} threads) ...")
    peak0 = peak_flops()
    total = WARMUP + STEPS
    best: dict = {}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log("building data, tokenizer and token files ...")
        build_data(cfg_all, work)
        log("optimizer + clipping micro-benchmark, and activations saved for backward ...")
        opt_ms = {m: optimizer_ms(work, arch, m) for m in ("full", "lora")}
        saved = {m: saved_activation_mib(work, arch, m) for m in ("full", "lora")}
        cases = [(regime, method) for regime in REGIMES for method in ("full", "lora")]
        for rep in range(REPEATS):
            for i, (regime, method) in enumerate(cases):
                for trainer in (("ours", "hf") if (rep + i) % 2 == 0 else ("hf", "ours")):
                    res = run_case(work, arch, trainer, regime, method, total)
                    loads.append(res["load"])
                    key = (trainer, regime, method)
                    if key not in best or res["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = res
        log("settings: glibc's default heap thresholds, torch.compile, 2 jobs x 1 thread (code CPT, full); "
            "group_by_length (math IFT, full) ...")
        for rep in range(REPEATS):
            for key, (regime, kw) in EXTRAS.items():
                res = run_case(work, arch, "ours", regime, "full", total, **kw)
                loads.append(res["load"])
                if key not in best or res["tokens_per_s"] > best[key]["tokens_per_s"]:
                    best[key] = res
        fpt = {m: flops_per_token_of(work, arch, m, seq_len) for m in ("full", "lora")}
        log("optimizer + clipping micro-benchmark again ...")
        for m in ("full", "lora"):  # the faster of the two runs of each, as for the matmul peak
            opt_ms[m] = tuple(min(a, b) for a, b in zip(opt_ms[m], optimizer_ms(work, arch, m)))
    log("matmul peak at the end ...")
    peak1 = peak_flops()
    peak = max(peak0, peak1)
    load1 = os.getloadavg()

    rows = []
    for regime, rname in REGIMES.items():
        for method in ("full", "lora"):
            o, h = best[("ours", regime, method)], best[("hf", regime, method)]
            if o["trainable"] != h["trainable"] or o["threads"] != h["threads"]:
                raise RuntimeError(f"{regime} {method}: not the same setting (trainable {o['trainable']} vs "
                                   f"{h['trainable']}, threads {o['threads']} vs {h['threads']})")
            what = "full finetuning" if method == "full" else "LoRA r8"
            rows.append((f"tokens/s, {what}, {rname}: ours vs HF Trainer (mean loss {o['mean_loss']:.4f} vs "
                         f"{h['mean_loss']:.4f})", f"{o['tokens_per_s']:,.0f}", f"{h['tokens_per_s']:,.0f}",
                         f"{o['tokens_per_s'] / h['tokens_per_s']:.2f}x"))
    for regime, rname in REGIMES.items():
        for method in ("full", "lora"):
            o, h = best[("ours", regime, method)], best[("hf", regime, method)]
            f, formula = fpt[method]
            so = speed(o["tokens"], o["seconds"], f, peak)
            sh = speed(h["tokens"], h["seconds"], f, peak)
            what = "full" if method == "full" else "LoRA r8"
            rows.append((f"MFU, {what}, {rname}: achieved GFLOP/s ({f / 1e6:.1f} MFLOP/token: {formula}) "
                         f"vs matmul peak", f"{so['gflops_per_s']:.2f}", f"{peak / 1e9:.1f}",
                         f"{so['mfu']:.1%} (HF Trainer {sh['mfu']:.1%})"))
    for method in ("full", "lora"):
        o, h = opt_ms[method]
        step = best[("ours", "cpt", method)]["step_s"] if "cpt" in REGIMES else None
        share = f"; ours = {o / 1e3 / step:.1%} of a code CPT step" if step else ""
        rows.append((f"gradient clipping + AdamW step, ms, {'full' if method == 'full' else 'LoRA r8'}: ours "
                     f"(fused AdamW, multi-tensor clip) vs HF Trainer's (fused AdamW, default clip); "
                     f"ratio HF/ours{share}",
                     f"{o:.1f}", f"{h:.1f}", f"{h / o:.2f}x"))
    rows += settings_rows(best, THREADS, (fpt["full"], peak))
    rows.append(("ours, code CPT: LoRA r8 vs full, activations saved for backward, one 16 x 128 batch, MiB",
                 f"{saved['lora']:.0f}", f"{saved['full']:.0f}", f"{saved['lora'] / saved['full']:.2f}x"))
    for regime, rname in REGIMES.items():
        lo, fu = best[("ours", regime, "lora")], best[("ours", regime, "full")]
        rows.append((f"ours, {rname}: LoRA r8 vs full, seconds per step", f"{lo['step_s']:.3f}",
                     f"{fu['step_s']:.3f}", f"{lo['step_s'] / fu['step_s']:.2f}x"))
        rows.append((f"ours, {rname}: LoRA r8 vs full, peak RSS during training minus RSS before, MiB "
                     f"(RSS before {lo['rss_before_mib']:.0f} / {fu['rss_before_mib']:.0f})",
                     f"{lo['peak_delta_mib']:.0f}", f"{fu['peak_delta_mib']:.0f}",
                     f"{lo['peak_delta_mib'] / fu['peak_delta_mib']:.2f}x"))

    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, {THREADS} torch threads, torch {torch.__version__}, "
               f"Python {platform.python_version()}; load average (1/5/15 min) {fmt_load(load0)} at the start, "
               f"{fmt_load(load1)} at the end, 1-min load after each training case {min(loads):.2f} to "
               f"{max(loads):.2f}; {date}")
    import peft
    import transformers

    hf_optim = ", ".join(sorted({f"{r['optim']} = {r['optimizer']}" for k, r in best.items() if k[0] == "hf"}))

    text = (f"# Training benchmark\n\nMachine: {machine}.\n\n"
            f"Default study's model and finetuning batch (16 x {seq_len}); {STEPS} timed steps after {WARMUP} "
            f"untimed ones per case, best of {REPEATS} (ours and the baseline alternating, each in a fresh "
            f"process); tokens = non-padding input tokens. Baseline: transformers {transformers.__version__} "
            f"Trainer (peft {peft.__version__}), its default optimizer {hf_optim}; ours: torch AdamW, fused, "
            f"with glibc's heap thresholds raised (learnforget.core.perf). "
            f"Matmul peak: float32, {THREADS} threads, "
            f"{peak0 / 1e9:.1f} GFLOP/s at the start, {peak1 / 1e9:.1f} at the end. "
            f"Whole bench: {time.perf_counter() - t_start:.0f} s.\n\n{markdown_table(rows)}")
    print(text)
    write_text(ROOT / "bench" / "train-results.md", text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        child(sys.argv[2])
    else:
        main()
