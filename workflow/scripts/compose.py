"""Compose the study's adapters (LoRAHub): search the weights, write every composite (learnforget.compose.lorahub)."""

import torch

from learnforget.compose import lorahub as compose
from learnforget.core.io import read_jsonl
from learnforget.core.logs import setup

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
spec = snakemake.params.spec
adapters = dict(zip(spec["runs"], snakemake.input.adapters))  # in the config's order
out_dirs = dict(zip(snakemake.params.composites, snakemake.output.adapters))
compose.run(snakemake.input.base, adapters, read_jsonl(snakemake.input.data), spec, out_dirs,
            snakemake.output.search, template=snakemake.params.template, log=log.info)
