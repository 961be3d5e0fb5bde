"""Train the study's BPE tokenizer (learnforget.data.tokenizer)."""

from learnforget.core.logs import setup
from learnforget.data.tokenizer import train_tokenizer

log = setup(snakemake.log[0])
files = [snakemake.input[k] for k in ("source", "math", "generic", "code")]
tok = train_tokenizer(files, snakemake.output[0], **snakemake.params.cfg)
log.info("tokenizer with %d tokens written to %s", len(tok), snakemake.output[0])
