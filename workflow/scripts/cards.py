"""Model cards with scores of every adapter checkpoint (learnforget.core.modelcard), from metrics.csv."""

from pathlib import Path

import pandas as pd

from learnforget.core import modelcard
from learnforget.core.io import atomic_path
from learnforget.core.logs import setup

log = setup(snakemake.log[0])
metrics = pd.read_csv(snakemake.input.metrics)
with atomic_path(snakemake.output[0]) as tmp:
    tmp.mkdir()
    for (run, label), ckpt in zip(snakemake.params.checkpoints, snakemake.input.checkpoints):
        text = modelcard.scored_card(Path(ckpt) / "model" / modelcard.CARD, metrics, run=run, duration=float(label))
        out = tmp / run / f"{label}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        log.info("card %s", out.relative_to(tmp))
