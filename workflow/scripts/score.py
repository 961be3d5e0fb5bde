"""Score one checkpoint's sampled generations: HumanEval in the sandbox, syntax, diversity."""

from pathlib import Path

from learnforget.core.logs import setup
from learnforget.score.samples import score_generations

log = setup(snakemake.log[0])
out = score_generations(
    snakemake.input.samples,
    snakemake.params.plan,
    Path(snakemake.input.data).parents[1],
    snakemake.output.results,
    snakemake.output.executions,
    meta=snakemake.params.meta,
    workers=snakemake.threads,
)
log.info("%s@%s scored: %s", out["learnforget"]["run"], out["learnforget"]["duration"], out["results"])
