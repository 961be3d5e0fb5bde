# Finetune each run to each duration. A duration continues from the run's previous one
# when the schedule does not depend on the total length (constant); otherwise it starts
# from the base. Only the run's own settings are params, so evaluation settings never retrain.


rule train:
    input:
        unpack(train_input),
    output:
        directory(f"{R}/runs/{{run}}/{{duration}}"),
    log:
        f"{R}/logs/train/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        gpu=0,
    params:
        spec=train_params,
    script:
        "../scripts/train.py"
