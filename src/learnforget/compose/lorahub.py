"""Composing adapters (LoRAHub, Huang et al. 2023): weighted combinations of trained adapters.

A LoRA adapter is a small patch on a base model: keep one per task, switch between them, and
combine them. LoRAHub combines the adapters of several tasks into one,
``m = sum_i w_i * adapter_i``, and finds the weights ``w`` by a gradient-free search on a few
examples of a new task: minimise the few-shot loss plus an L1 penalty
(``loss + l1 * mean |w|``), every weight within ``[-bound, bound]``.

Here:

- the combination is peft's own :meth:`peft.LoraModel.add_weighted_adapter`:
  ``combination_type="linear"`` (LoRAHub's: the A matrices and the B matrices are each summed
  with weights ``sqrt(w_i * scaling_i)``; the adapters need equal ranks) or ``"cat"`` (the
  adapters side by side, exactly ``sum_i w_i * scaling_i * B_i A_i``; rank = the sum of the
  ranks). Either way a weight of 1 on one adapter and 0 on the others gives back that adapter;
- the search is Nelder-Mead (:func:`nelder_mead`, written here, deterministic) from the
  uniform weights ``1/n`` within the bounds, for ``budget`` evaluations of the objective;
- the baselines are the uniform combination and every adapter alone (weight 1), evaluated on
  the same examples (and, in the workflow, on every domain's learning group and the
  forgetting group, like any checkpoint);
- every composite is written as a checkpoint folder: ``model/`` is a standard peft adapter
  (with a model card, :mod:`learnforget.core.modelcard`) and ``manifest.json`` lists the sha256 of
  every file (:mod:`learnforget.core.integrity`), so the evaluate job verifies and loads it like a
  trained checkpoint.

The examples are ``k`` records of a domain's training or test data, drawn with a seed and
tokenized as the runs are (instruction form: loss on the response; continued pretraining: loss
on every token), each cut to ``seq_len`` tokens. The few-shot loss is the mean token loss over
all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from learnforget.compose.check import COMPOSABLE
from learnforget.core.integrity import verify_managed
from learnforget.core.io import atomic_path, read_json, sha256_file, write_json
from learnforget.core.modelcard import base_model_of, render, write_card
from learnforget.data import IFT_TEMPLATES
from learnforget.data.tokenizer import load_tokenizer
from learnforget.study.basics import format_duration
from learnforget.study.config import expand_runs

#: The ``method`` of composite rows in ``metrics.csv`` (figures and the report draw them apart).
METHOD = "compose"
COMBINATIONS = ("linear", "cat")
SEARCH_JSON = "search.json"
_COMBINED = "default"  # the composite's adapter name: peft saves "default" at the folder's top


# ----------------------------------------------------------------------------- the plan
def default_regime(domain: str) -> str:
    return "ift" if domain == "math" else "cpt"


def plan(cfg: Mapping) -> dict | None:
    """The resolved compose stage of a validated config (None when it is off):

    ``runs`` (the combined runs, in order: weights are lists in this order), ``adapters``
    (run -> the duration label combined), ``durations`` (run -> its value),
    ``unit``, ``target`` (domain, regime, split, k, seed, seq_len resolved), ``combination``,
    ``search``, and ``composites``: name -> ``{"kind": "search" | "uniform" | "single",
    "weights": [...] (None for the searched one), "run": the single adapter's run}``, the
    searched composite first.
    """
    c = cfg.get("compose") or {}
    if not c.get("enabled"):
        return None
    runs = {r.name: r for r in expand_runs(cfg)}
    names = list(c["adapters"]) or [r.name for r in runs.values() if r.method["type"] in COMPOSABLE]
    adapters, durations = {}, {}
    for name in names:
        run = runs[name]
        label = format_duration(c["duration"]) if c["duration"] is not None else run.labels[-1]
        adapters[name] = label
        durations[name] = run.duration_value(label)
    t = dict(c["target"])
    if t["regime"] is None:
        same = [runs[n].regime for n in names if runs[n].domain == t["domain"]]
        t["regime"] = same[0] if same else default_regime(t["domain"])
    if t["seq_len"] is None:
        t["seq_len"] = int(cfg["finetune"].get("seq_len", 128))
    n = len(names)
    composites = {c["name"]: {"kind": "search", "weights": None, "run": None},
                  f"{c['name']}-uniform": {"kind": "uniform", "weights": [1.0 / n] * n, "run": None}}
    for i, name in enumerate(names):
        composites[f"{c['name']}-{name}"] = {"kind": "single", "weights": [float(j == i) for j in range(n)],
                                             "run": name}
    units = {runs[n].unit for n in names}
    return {"name": c["name"], "runs": names, "adapters": adapters, "durations": durations, "unit": units.pop() if len(units) == 1
            else "mixed", "target": t, "combination": c["combination"], "search": dict(c["search"]),
            "composites": composites}


# ----------------------------------------------------------------------------- examples
def few_shot_records(records: Sequence[Mapping], k: int, seed: int) -> list[Mapping]:
    """``k`` records drawn without replacement with ``seed`` (in the drawn order)."""
    if k > len(records):
        raise ValueError(f"asked for {k} examples but the data has {len(records)} records")
    order = np.random.default_rng(seed).permutation(len(records))[:k]
    return [records[int(i)] for i in order]


def tokenize_examples(records: Sequence[Mapping], tokenizer, *, domain: str, regime: str, seq_len: int,
                      template: Sequence[str] | None = None):
    """``(input_ids, attention_mask, labels)`` tensors of the examples, one per row, cut to
    ``seq_len`` inputs and right-padded; labels are -100 where the loss does not count (the
    prompt of an instruction example, padding). Instruction examples are formatted with
    ``template`` (prompt, response format strings; default the domain's, as the runs are
    tokenized), continued-pretraining ones are the records' ``text``."""
    import torch

    # lazy: data.tokens imports torch, kept out of Snakemake's main process (which plans)
    from learnforget.data.tokens import IGNORE_INDEX, tokenize_cpt, tokenize_ift

    if regime == "cpt":
        td = tokenize_cpt([r["text"] for r in records], tokenizer)
    else:
        prompt, response = template or IFT_TEMPLATES[domain]
        chat = bool(getattr(tokenizer, "chat_template", None))
        td = tokenize_ift([prompt.format(**r) for r in records], [response.format(**r) for r in records],
                          tokenizer, use_chat_template=chat, drop_empty=False)
    rows = []
    for i in range(td.n_docs):
        ids, mask = td.doc(i)
        ids, mask = np.asarray(ids[: seq_len + 1], dtype=np.int64), np.asarray(mask[: seq_len + 1])
        labels = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
        rows.append((ids[:-1], labels))
    width = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        input_ids[i, : len(x)] = torch.from_numpy(x)
        attention[i, : len(x)] = 1
        labels[i, : len(y)] = torch.from_numpy(y)
    if int((labels != IGNORE_INDEX).sum()) == 0:
        raise ValueError("the examples have no token where the loss counts (seq_len too short?)")
    return input_ids, attention, labels


def loss_of(model, batch) -> float:
    """Mean token loss of the model on ``(input_ids, attention_mask, labels)``."""
    import torch
    import torch.nn.functional as F

    input_ids, attention, labels = batch
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                reduction="sum")
    return float(total) / int((labels != -100).sum())


# ----------------------------------------------------------------------------- combining
def load_adapters(base_dir: str | os.PathLike, adapter_dirs: Sequence[str | os.PathLike]):
    """The base model with every adapter loaded (named ``a0``, ``a1``, ...; peft's PeftModel)."""
    from peft import PeftModel

    from learnforget.train.modeling import load_model  # lazy: keeps torch out of Snakemake's main process

    if not adapter_dirs:
        raise ValueError("no adapters to load")
    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    return model


def combine(model, weights: Sequence[float], combination: str = "linear", name: str = _COMBINED):
    """Add the weighted combination of the loaded adapters as adapter ``name`` and make it the
    active one (replacing an earlier one of that name); returns the model."""
    from peft.tuners.lora import LoraLayer

    if combination not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
    sources = [a for a in model.peft_config if a != name]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} adapters")
    if name in model.peft_config:
        remove(model, name)
    model.add_weighted_adapter(sources, [float(w) for w in weights], name, combination_type=combination)
    cfg = model.peft_config[name]
    if cfg.use_rslora:  # peft copies the first adapter's flag; the combined adapter's own scale must be 1
        cfg.use_rslora = False
        for module in model.modules():
            if isinstance(module, LoraLayer) and name in module.scaling:
                module.scaling[name] = 1.0
    model.set_adapter(name)
    return model


def remove(model, name: str = _COMBINED) -> None:
    """Delete a combined adapter (the first loaded adapter becomes the active one)."""
    if name in model.peft_config:
        keep = next(a for a in model.peft_config if a != name)
        model.set_adapter(keep)
        model.delete_adapter(name)


# ----------------------------------------------------------------------------- the search
class _Exhausted(Exception):
    pass


def nelder_mead(f: Callable[[np.ndarray], float], x0: Sequence[float], *, bound: float, budget: int,
                step: float = 0.5) -> tuple[np.ndarray, float, list[tuple[list[float], float]]]:
    """Minimise ``f`` over ``[-bound, bound]^n`` by Nelder-Mead (reflection 1, expansion 2,
    contraction 1/2, shrink 1/2; every point clipped to the box) with at most ``budget``
    evaluations, starting from the simplex ``x0``, ``x0 + step * e_i`` (``- step`` where that
    leaves the box). Deterministic. Returns the best point, its value and every evaluation
    ``(x, f(x))`` in order (``x0`` first)."""
    trace: list[tuple[list[float], float]] = []

    def ev(x):
        if len(trace) >= budget:
            raise _Exhausted
        x = np.clip(np.asarray(x, dtype=float), -bound, bound)
        y = float(f(x))
        trace.append(([float(v) for v in x], y))
        return x, y

    x0 = np.clip(np.asarray(x0, dtype=float), -bound, bound)
    n = len(x0)
    try:
        simplex = [ev(x0)]
        for i in range(n):
            x = x0.copy()
            x[i] = x[i] + step if x[i] + step <= bound else x[i] - step
            simplex.append(ev(x))
        while True:
            simplex.sort(key=lambda p: p[1])
            best, worst, second = simplex[0], simplex[-1], simplex[-2]
            centroid = np.mean([p[0] for p in simplex[:-1]], axis=0)
            xr, fr = ev(centroid + (centroid - worst[0]))
            if fr < best[1]:
                xe, fe = ev(centroid + 2.0 * (centroid - worst[0]))
                simplex[-1] = (xe, fe) if fe < fr else (xr, fr)
            elif fr < second[1]:
                simplex[-1] = (xr, fr)
            else:
                inside = fr >= worst[1]
                xc, fc = ev(centroid + 0.5 * ((worst[0] if inside else xr) - centroid))
                if fc < (worst[1] if inside else fr):
                    simplex[-1] = (xc, fc)
                else:
                    simplex = [best] + [ev(best[0] + 0.5 * (p[0] - best[0])) for p in simplex[1:]]
    except _Exhausted:
        pass
    i = int(np.argmin([y for _, y in trace]))  # the first of equal values
    return np.asarray(trace[i][0]), trace[i][1], trace


def objective(loss: float, weights: Sequence[float], l1: float) -> float:
    """LoRAHub's objective: the few-shot loss plus ``l1`` times the mean absolute weight."""
    return float(loss) + float(l1) * float(np.mean(np.abs(np.asarray(weights, dtype=float))))


def search(model, batch, *, combination: str = "linear", bound: float = 1.5, budget: int = 40, l1: float = 0.05,
           step: float = 0.5, x0: Sequence[float] | None = None) -> dict:
    """LoRAHub's search over the loaded adapters' weights on one batch of examples.

    Returns ``{"weights", "loss", "objective", "trace": [{"weights", "loss", "objective"}]}``.
    """
    n = len([a for a in model.peft_config if a != _COMBINED])
    losses: dict[tuple, float] = {}

    def f(w):
        combine(model, w, combination)
        loss = loss_of(model, batch)
        losses[tuple(float(v) for v in w)] = loss
        return objective(loss, w, l1)

    start = [1.0 / n] * n if x0 is None else list(x0)
    best, best_obj, trace = nelder_mead(f, start, bound=bound, budget=budget, step=step)
    remove(model)
    steps = [{"weights": x, "loss": losses[tuple(x)], "objective": y} for x, y in trace]
    return {"weights": [float(v) for v in best], "loss": losses[tuple(float(v) for v in best)],
            "objective": best_obj, "trace": steps}


# ----------------------------------------------------------------------------- writing
def write_composite(model, weights: Sequence[float], out_dir: str | os.PathLike, *, combination: str,
                    tokenizer=None, card: str | None = None, manifest: Mapping[str, Any] | None = None) -> dict:
    """Write the combination as a checkpoint folder, atomically: ``model/`` a peft adapter
    (plus the tokenizer and ``card`` as its README.md), ``manifest.json`` the given fields plus
    ``files`` (sha256 of every file). Returns the manifest."""
    combine(model, weights, combination)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(str(tmp / "model"), selected_adapters=[_COMBINED])
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "model"))
        if card is not None:
            write_card(tmp / "model", card)
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        out = {**dict(manifest or {}), "files": files}
        write_json(tmp / "manifest.json", out)
    remove(model)
    return out


def composite_card(*, name: str, kind: str, base_model: str, adapters: Sequence[str], weights: Sequence[float],
                   combination: str, target: Mapping, durations: Mapping[str, float], unit: str,
                   fewshot_loss: float) -> str:
    """The model card of a composite (no scores: the ``cards`` rule adds them after evaluation)."""
    what = {"search": "weights found by LoRAHub's gradient-free search",
            "uniform": "uniform weights (a baseline)", "single": "one adapter alone (a baseline)"}[kind]
    summary = (f"A composite of {len(adapters)} LoRA adapters ({what}), combined with peft's "
               f"add_weighted_adapter (combination_type {combination!r}) on the learn-forget study's base model.")
    method = {"type": "lorahub composite", "combination": combination, "kind": kind,
              **{f"weight of {run}": round(float(w), 6) for run, w in zip(adapters, weights)}}
    data = {"adapters": ", ".join(f"{run} at {durations[run]:g} {unit}" for run in adapters),
            "target examples": f"{target['k']} from {target['domain']}/{target['split']} ({target['regime']}, "
                               f"seed {target['seed']}, up to {target['seq_len']} tokens)",
            "few-shot loss": round(float(fewshot_loss), 6)}
    return render(base_model=base_model, title=f"{name}: composite of {', '.join(adapters)}", summary=summary,
                  tags=["lora", "lorahub", target["domain"]], data=data, method=method,
                  duration={run: f"{durations[run]:g} {unit}" for run in adapters},
                  scores_note="Not evaluated yet when this card was written; `results/cards/<name>/<duration>.md` "
                              "holds the card with the scores after the study's evaluation.")


def run(base_dir: str | os.PathLike, adapter_dirs: Mapping[str, str | os.PathLike], records: Sequence[Mapping],
        spec: Mapping, out_dirs: Mapping[str, str | os.PathLike], search_json: str | os.PathLike,
        *, template: Sequence[str] | None = None, log: Callable[[str], object] | None = None) -> dict:
    """The compose stage: load the adapters (``run -> checkpoint folder``), draw and tokenize
    the examples from ``records`` (instruction ones with ``template``), search the weights,
    write every composite of ``spec`` (:func:`plan`) to ``out_dirs[name]`` and the search's
    record to ``search_json``."""
    say = log or (lambda msg: None)
    runs = list(spec["runs"])
    for r in runs:
        verify_managed(adapter_dirs[r])
    model_dirs = [Path(adapter_dirs[r]) / "model" for r in runs]
    for r, d in zip(runs, model_dirs):
        if not (d / "adapter_config.json").is_file():
            raise ValueError(f"run {r!r}: {d} is not a peft adapter folder")
    tokenizer = load_tokenizer(base_dir)
    t = spec["target"]
    chosen = few_shot_records(records, t["k"], t["seed"])
    batch = tokenize_examples(chosen, tokenizer, domain=t["domain"], regime=t["regime"], seq_len=t["seq_len"],
                              template=template)
    model = load_adapters(base_dir, model_dirs)
    s = spec["search"]
    combination = spec["combination"]
    n = len(runs)
    base_loss = _loss_at(model, [0.0] * n, combination, batch)
    say(f"few-shot loss of the base model: {base_loss:.4f} on {t['k']} {t['domain']}/{t['split']} examples")
    found = search(model, batch, combination=combination, bound=s["bound"], budget=s["budget"], l1=s["l1"],
                   step=s["step"])
    say("search: weights " + ", ".join(f"{r} {w:+.3f}" for r, w in zip(runs, found["weights"]))
        + f"; loss {found['loss']:.4f} after {len(found['trace'])} evaluations")
    base_model = base_model_of(model_dirs[0], str(base_dir))
    composites = {}
    for name, c in spec["composites"].items():
        weights = found["weights"] if c["kind"] == "search" else list(c["weights"])
        loss = found["loss"] if c["kind"] == "search" else _loss_at(model, weights, combination, batch)
        composites[name] = {"kind": c["kind"], "run": c["run"], "weights": dict(zip(runs, weights)),
                            "loss": loss, "objective": objective(loss, weights, s["l1"])}
        card = composite_card(name=name, kind=c["kind"], base_model=base_model, adapters=runs,
                              weights=weights, combination=combination, target=t, durations=spec["durations"],
                              unit=spec["unit"], fewshot_loss=loss)
        write_composite(model, weights, out_dirs[name], combination=combination, tokenizer=tokenizer, card=card,
                        manifest={"kind": "compose", "run": name, "composite": composites[name],
                                  "combination": combination, "target": t,
                                  "adapters": {r: {"dir": str(adapter_dirs[r]), "duration": spec["durations"][r],
                                                   "manifest_sha256": sha256_file(Path(adapter_dirs[r]) /
                                                                                  "manifest.json")}
                                               for r in runs},
                                  "base": str(base_dir), "versions": _versions()})
        say(f"{name} ({c['kind']}): loss {loss:.4f}")
    record = {"name": spec["name"], "runs": runs, "adapters": dict(spec["adapters"]), "durations": dict(spec["durations"]),
              "unit": spec["unit"], "combination": combination, "target": t, "search": s,
              "examples": [r.get("id", i) for i, r in enumerate(chosen)], "base_loss": base_loss,
              "composites": composites, "trace": found["trace"]}
    write_json(search_json, record)
    return read_json(search_json)


def _loss_at(model, weights, combination, batch) -> float:
    combine(model, weights, combination)
    try:
        return loss_of(model, batch)
    finally:
        remove(model)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


# ----------------------------------------------------------------------------- reading
def summary_table(record: Mapping, metrics=None, *, learning: Mapping | None = None, forgetting=None):
    """One row per composite: kind, weights, few-shot loss, and (with ``metrics``) each domain's
    learning metric and the forgetting score of its evaluation; the base model's few-shot loss
    as a first row. A pandas DataFrame."""
    import pandas as pd

    rows = [{"composite": "base model", "kind": "base", "few-shot loss": record.get("base_loss")}]
    for name, c in record["composites"].items():
        row = {"composite": name, "kind": c["kind"]}
        row.update({f"w[{r}]": float(c["weights"][r]) for r in record.get("runs") or c["weights"]})
        row["few-shot loss"] = float(c["loss"])
        rows.append(row)
    df = pd.DataFrame(rows)
    wcols = [c for c in df.columns if c.startswith("w[")]
    df = df[["composite", "kind", *wcols, "few-shot loss"]]
    if metrics is not None and len(metrics):
        specs = {f"{dom} ({m})": (g, m) for dom, (g, m) in sorted((learning or {}).items())}
        if forgetting and len(forgetting) == 2 and all(isinstance(x, str) for x in forgetting):
            specs[f"forgetting ({forgetting[1]})"] = tuple(forgetting)
        for col, (task, metric) in specs.items():
            sel = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)]
            values = dict(zip(sel["run"], sel["value"]))
            base = sel[sel["method"] == "base"]["value"]
            df[col] = [(float(base.iloc[0]) if len(base) else math.nan) if name == "base model"
                       else values.get(name, math.nan) for name in df["composite"]]
    return df
