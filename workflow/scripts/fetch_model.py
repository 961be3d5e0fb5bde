"""Link a pretrained base model's files into the study (learnforget.data.sources.fetch_model)."""

from learnforget.core.logs import setup
from learnforget.data.sources import fetch_model

log = setup(snakemake.log[0], offline=False)  # it may download what the config names
spec = snakemake.params.spec
manifest = fetch_model(spec["pretrained"], spec.get("revision"), snakemake.output[0], log=log.info)
log.info("base model %s (%s, commit %s): %d files, %.2f GB", spec["pretrained"], manifest["source"],
         manifest["commit"], len(manifest["files"]), manifest["bytes"] / 1e9)
