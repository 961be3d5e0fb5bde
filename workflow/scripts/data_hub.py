"""Read one data.hub dataset into records (learnforget.data.sources.build_dataset)."""

from learnforget.core.logs import setup
from learnforget.data.sources import build_dataset
from learnforget.data.tokenizer import load_tokenizer

log = setup(snakemake.log[0], offline=False)  # it may download what the config names
p = snakemake.params.p
tokenizer = load_tokenizer(snakemake.input.tokenizer) if p["spec"].get("token_budget") else None
counts = build_dataset(p["spec"], p["regime"], snakemake.output[0], name=snakemake.wildcards.dataset,
                       tokenizer=tokenizer, log=log.info)
