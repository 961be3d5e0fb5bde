"""Build one domain's offline corpus (learnforget.data)."""

from pathlib import Path

from learnforget import data
from learnforget.core.logs import setup

log = setup(snakemake.log[0])
domain = snakemake.params.domain
builder = {"source": data.build_source, "math": data.build_math, "code": data.build_code}[domain]
out_dir = Path(snakemake.output[0]).parent
stats = builder(dict(snakemake.params.cfg), snakemake.params.seed, out_dir)
log.info("%s corpus written to %s: %s", domain, out_dir, stats)
