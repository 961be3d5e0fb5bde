"""Model cards of adapter checkpoints: the ``README.md`` of a peft adapter folder.

An adapter checkpoint's ``model/`` folder is a standard peft adapter (``adapter_config.json``,
``adapter_model.safetensors``, the tokenizer files) that ``PeftModel.from_pretrained(base,
folder)`` loads without learn-forget. Its ``README.md`` is a Hugging Face model card: YAML front
matter with the hub's fields (``base_model``, ``library_name: peft``, ``tags``) and a body that
states what the adapter was trained on (data), how (method and training settings), for how
long (duration) and how it scored. peft's own ``save_pretrained`` writes a template card full
of "More Information Needed"; training replaces it with :func:`training_card` before the
checkpoint's manifest hashes the folder, so the card is covered by the manifest like any other
file. Scores are only known after evaluation: a training card says so, and the ``cards`` rule
writes a copy of the card with the scores to ``results/cards/`` (a complete checkpoint folder
is never rewritten).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from learnforget.core.io import write_text

CARD = "README.md"
LIBRARY = "peft"
TAG = "learn-forget"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (list, tuple)):
        text = ", ".join(_cell(x) for x in v)
    elif isinstance(v, Mapping):
        text = json.dumps(v, sort_keys=True, default=str)
    elif v is None:
        text = "–"
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(items: Mapping[str, Any], head: tuple[str, str] = ("key", "value")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in items.items()]
    return lines


def base_model_of(adapter_dir: str | os.PathLike, default: str | None = None) -> str | None:
    """``base_model_name_or_path`` of a peft adapter folder (``default`` when it has none)."""
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    return cfg.get("base_model_name_or_path") or default


def render(*, base_model: str, title: str, summary: str, tags: Iterable[str], data: Mapping[str, Any],
           method: Mapping[str, Any], duration: Mapping[str, Any],
           scores: Sequence[Mapping[str, Any]] | None = None, extra: Mapping[str, Mapping[str, Any]] | None = None,
           scores_note: str | None = None) -> str:
    """The card's text: front matter, then a summary, how to load it, data, method, duration,
    any ``extra`` sections (title -> key/value table) and the scores (rows with ``task``,
    ``role``, ``metric``, ``value``; ``None``: not evaluated yet, with ``scores_note``)."""
    tags = list(dict.fromkeys([TAG, LIBRARY, *[str(t) for t in tags if t], f"base_model:adapter:{base_model}"]))
    front = yaml.safe_dump({"base_model": str(base_model), "library_name": LIBRARY, "tags": tags},
                           sort_keys=False, allow_unicode=True)
    lines = ["---", front.rstrip(), "---", "", f"# {title}", "", summary, "",
             "## How to load it", "",
             "A standard peft adapter folder: it needs peft and transformers, nothing from learn-forget.", "",
             "```python",
             "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "",
             f"base = AutoModelForCausalLM.from_pretrained({json.dumps(str(base_model))})",
             'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
             'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
             "```", "",
             "## Data", "", *_table(data), "",
             "## Method", "", *_table(method), "",
             "## Duration", "", *_table(duration), ""]
    for name, items in (extra or {}).items():
        lines += [f"## {name}", "", *_table(items), ""]
    lines += ["## Scores", ""]
    if scores:
        lines += ["| task | role | metric | value |", "|---|---|---|---:|"]
        lines += [f"| {_cell(r.get('task'))} | {_cell(r.get('role'))} | {_cell(r.get('metric'))} | "
                  f"{_cell(r.get('value'))} |" for r in scores]
        lines.append("")
    else:
        lines += [scores_note or "Not evaluated when this card was written.", ""]
    return "\n".join(lines).rstrip() + "\n"


def training_card(*, base_model: str, run: str | None, method: Mapping[str, Any], regime: str,
                  dataset: str, data_meta: Mapping[str, Any], duration: float, unit: str, step: int,
                  tokens: int, epochs: float, part: str, train: Mapping[str, Any], seed: int | None,
                  final_loss: float | None, domain: str | None = None) -> str:
    """The card training writes into an adapter checkpoint (no scores yet)."""
    name = run or method.get("type", "adapter")
    domain = domain or dataset.split("_")[0]
    what = "instruction finetuning (loss on the responses)" if regime == "ift" else "continued pretraining"
    summary = (f"A {method.get('type', 'adapter')} adapter of the learn-forget run `{name}`: {what} on the "
               f"`{dataset}` data for {duration:g} {unit}"
               + (" (the shared trunk up to this duration's cool-down)" if part == "trunk" else "") + ".")
    data = {"dataset": dataset, "domain": domain, "regime": regime,
            **{k: data_meta[k] for k in ("n_docs", "n_tokens", "source") if k in data_meta}}
    hyper = {k: train[k] for k in ("lr", "batch_size", "seq_len", "optimizer", "schedule", "weight_decay",
                                   "warmup_steps", "precision") if k in train}
    return render(
        base_model=base_model, title=f"{name}: {method.get('type', 'adapter')} adapter at {duration:g} {unit}",
        summary=summary, tags=[method.get("type"), domain, regime], data=data,
        method={"type": method.get("type"), **{k: v for k, v in method.items() if k != "type"}},
        duration={"duration": f"{duration:g} {unit}", "part": part, "optimizer steps": step,
                  "tokens seen": tokens, "epochs seen": round(float(epochs), 4), "final training loss": final_loss},
        extra={"Training settings": {**hyper, "seed": seed}},
        scores_note=("Not evaluated yet when this card was written (at the end of training). After the study's "
                     "evaluation, `results/cards/<run>/<duration>.md` holds this card with its scores, and "
                     "`results/metrics.csv` every number."))


def with_scores(card_text: str, scores: Sequence[Mapping[str, Any]]) -> str:
    """A card's text with its Scores section replaced by a table of ``scores``."""
    head, sep, _ = card_text.partition("\n## Scores\n")
    if not sep:
        head = card_text.rstrip() + "\n"
    lines = [head.rstrip(), "", "## Scores", ""]
    if scores:
        lines += ["| task | role | metric | value |", "|---|---|---|---:|"]
        lines += [f"| {_cell(r.get('task'))} | {_cell(r.get('role'))} | {_cell(r.get('metric'))} | "
                  f"{_cell(r.get('value'))} |" for r in scores]
    else:
        lines.append("No scores were found for this checkpoint.")
    return "\n".join(lines).rstrip() + "\n"


#: Roles of the metrics.csv rows a scored card lists (the task groups' scores).
SCORE_ROLES = ("learning", "forgetting", "other")


def scores_of(metrics, *, run: str, duration: float) -> list[dict]:
    """The task-group rows of one checkpoint in ``metrics`` (a metrics.csv DataFrame)."""
    sel = metrics[(metrics["run"] == run) & (metrics["duration"].astype(float) == float(duration))
                  & metrics["role"].isin(SCORE_ROLES)]
    return [{"task": r.task, "role": r.role, "metric": r.metric, "value": float(r.value)}
            for r in sel.sort_values(["role", "task"], kind="mergesort").itertuples(index=False)]


def scored_card(card_path: str | os.PathLike, metrics, *, run: str, duration: float) -> str:
    """The text of a checkpoint's card with the scores of ``metrics`` (its task groups)."""
    return with_scores(Path(card_path).read_text(encoding="utf-8"), scores_of(metrics, run=run, duration=duration))


def read_front_matter(path: str | os.PathLike) -> dict:
    """The YAML front matter of a card (``{}`` when it has none)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    block = text[4:].split("\n---\n", 1)[0]
    return yaml.safe_load(block) or {}


def write_card(model_dir: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``model_dir/README.md`` (atomically); returns the path."""
    path = Path(model_dir) / CARD
    write_text(path, text)
    return path
