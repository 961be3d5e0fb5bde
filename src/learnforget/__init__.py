"""learn-forget: finetune -> evaluate -> analyze studies of LLMs, as a Snakemake pipeline."""

__version__ = "0.1.0"
