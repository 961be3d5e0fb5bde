"""Spectral analysis of one checkpoint's weight changes (learnforget.analyze.spectral)."""

import torch

from learnforget.analyze.spectral import resolve_device

from learnforget.core.integrity import verify_managed
from learnforget.core.io import atomic_path
from learnforget.core.logs import setup
from learnforget.analyze.spectral import analyze

log = setup(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
meta = snakemake.params.meta
settings = snakemake.params.settings
for path in (snakemake.input.base, snakemake.input.checkpoint):
    verify_managed(path)  # its manifest's checksums, before anything is loaded
table = analyze(
    snakemake.input.base,
    snakemake.input.checkpoint,
    fraction=settings["fraction"],
    lora_rank=meta.get("rank"),
    device=resolve_device(snakemake.config["analysis"]["device"]),
    spectra_path=snakemake.output.spectra,
)
for key in ("run", "method", "method_type", "domain", "regime", "duration"):
    table.insert(0, key, meta[key])
with atomic_path(snakemake.output.table) as tmp:
    table.to_csv(tmp, index=False)
log.info("%s@%s: %d matrices, max rank90 %d", meta["run"], meta["duration"], len(table), table["rank90"].max())
