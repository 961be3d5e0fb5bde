"""Evaluate one checkpoint (or the base) on its evaluation plan (learnforget.evaluate.harness)."""

from pathlib import Path

import torch

from learnforget.evaluate.harness import evaluate_checkpoint, resolve_model
from learnforget.core.integrity import verify_managed
from learnforget.core.logs import setup

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
settings = snakemake.params.settings
meta = snakemake.params.meta
base = Path(snakemake.input.base)
for path in (base, snakemake.input.get("checkpoint")):
    if path:
        verify_managed(path)  # its manifest's checksums, before anything is loaded
if "checkpoint" in snakemake.input.keys():
    model_dir, adapter_dir = resolve_model(Path(snakemake.input.checkpoint) / "model", base)
else:
    model_dir, adapter_dir = base, None
data_root = Path(snakemake.input.source_train).parents[1]
out = evaluate_checkpoint(
    model_dir,
    settings["plan"],
    data_root,
    snakemake.output.results,
    adapter_dir=adapter_dir,
    tokenizer_dir=base,
    task_dirs=settings["task_dirs"],
    datasets=settings["datasets"],
    log_samples_path=snakemake.output.samples,
    extra_meta=meta,
    # on a GPU (resources.evaluate.gpu) in bfloat16, else on the CPU in float32
    **({"device": "cuda", "dtype": "bfloat16"} if int(snakemake.resources.get("gpu", 0) or 0) else {}),
)
log.info("%s@%s evaluated on %s", meta["run"], meta["duration"], ", ".join(i["task"] for i in settings["plan"]))
