"""Finetune one run to one duration (learnforget.train.finetune)."""

from learnforget.logs import setup
from learnforget.train import finetune

log = setup(snakemake.log[0])
spec = snakemake.params.spec
manifest = finetune(
    snakemake.input.base,
    snakemake.input.tokens,
    spec["regime"],
    spec["method"],
    {**spec["train"], "threads": snakemake.threads},
    duration=spec["duration"],
    unit=spec["unit"],
    durations=spec["durations"],
    prev_checkpoint_dir=snakemake.input.get("previous"),
    out_dir=snakemake.output[0],
    seed=spec["seed"],
    run_name=spec["run"],
)
log.info("%s to %s %s: step %d, %.0f tokens/s, final loss %.3f, continued from %s",
         spec["run"], spec["duration"], spec["unit"], manifest["step"], manifest["tokens_per_s"],
         manifest["final_loss"], manifest["continued_from"])
