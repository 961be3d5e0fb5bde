# learn-forget: finetune -> evaluate -> analyze studies of LLMs.
# The embedded default study runs offline on a laptop: `snakemake --cores 2`.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default study, unless a study config is given: `--configfile` replaces it
# (a study config is complete on its own, nothing is merged in from the default).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/compose.smk"


rule all:
    default_target: True
    input:
        rules.report.output,
        STUDY.cards_outputs(),
