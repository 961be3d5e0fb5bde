# Tidy tables, the paper's figures and report.md, all generated from the results. Which
# figures exist follows from the config (learnforget.report.registry.figure_names): a figure is drawn
# only when the study provides its data, and a drawn figure is never empty.


rule report:
    input:
        evals=all_evaluations,
        spectral=all_spectral,
        spectra=all_spectra,
        training=all_training_jobs,
        compose=compose_report_input,
    output:
        **figure_outputs(),
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
        figures=FIGURES,
    script:
        "../scripts/report.py"
