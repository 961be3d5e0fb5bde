# Tidy tables, the paper's figures and report.md, all generated from the results.

FIGURES = ["tradeoff", "learning", "forgetting", "spectral_ranks"]


rule report:
    input:
        evals=all_evaluations,
        spectral=all_spectral,
        training=all_training_jobs,
    output:
        metrics=report(
            f"{R}/metrics.csv",
            caption="../report/metrics.rst",
            category="Tables",
        ),
        spectral=report(
            f"{R}/spectral.csv",
            caption="../report/spectral.rst",
            category="Tables",
        ),
        tradeoff=report(
            f"{R}/figures/tradeoff.png",
            caption="../report/tradeoff.rst",
            category="Figures",
        ),
        learning=report(
            f"{R}/figures/learning.png",
            caption="../report/learning.rst",
            category="Figures",
        ),
        forgetting=report(
            f"{R}/figures/forgetting.png",
            caption="../report/forgetting.rst",
            category="Figures",
        ),
        spectral_ranks=report(
            f"{R}/figures/spectral_ranks.png",
            caption="../report/spectral_ranks.rst",
            category="Figures",
        ),
        training=report(
            f"{R}/training.csv",
            caption="../report/training.rst",
            category="Tables",
        ),
        report=f"{R}/report.md",
    log:
        f"{R}/logs/report.log",
    conda:
        ENV
    params:
        spec=report_params,
    script:
        "../scripts/report.py"
