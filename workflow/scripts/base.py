"""Pretrain the base model (learnforget.train.loop.pretrain_base)."""

from learnforget.core.logs import setup
from learnforget.train.loop import pretrain_base

log = setup(snakemake.log[0])
spec = snakemake.params.spec
mix = {path: spec["base"]["mix"][path.rstrip("/").split("/")[-1]] for path in snakemake.input.tokens}
train_cfg = {**spec["base"]["train"], "threads": snakemake.threads}
manifest = pretrain_base(
    snakemake.input.tokenizer,
    mix,
    spec["model"],
    train_cfg,
    snakemake.output[0],
    seed=spec["seed"],
    duration=spec["base"]["epochs"],
    unit="epochs",
)
log.info("base: %d steps, %d tokens, %.0f tokens/s, final loss %.3f, %d parameters",
         manifest["step"], manifest["tokens"], manifest["tokens_per_s"], manifest["final_loss"],
         manifest["parameters"]["total"])
