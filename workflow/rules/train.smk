# Finetune each run to each duration. How a duration relates to the shorter ones is the run's
# mode (learnforget.train.settings.MODES): it continues the previous checkpoint, branches a cool-down
# off a shared trunk (rule train_trunk), or starts from the base. Only what changes a job's
# result is in its params, so evaluation settings, threads or resources never retrain.
# A killed job leaves a snapshot in results/resume/ and continues from it when rerun.


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
        gpu=train_gpus,
        mem_mb=train_mem_mb,
        runtime=train_runtime,
        cpus_per_task=train_cpus,
    params:
        spec=train_params,
        resume=f"{R}/resume/{{run}}/{{duration}}",
    script:
        "../scripts/train.py"


rule train_trunk:
    input:
        unpack(trunk_input),
    output:
        directory(f"{R}/runs/{{run}}/trunk/{{duration}}"),
    log:
        f"{R}/logs/train/{{run}}/trunk-{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{run}}/trunk-{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["train"]
    resources:
        gpu=train_gpus,
        mem_mb=train_mem_mb,
        runtime=trunk_runtime,
        cpus_per_task=train_cpus,
    params:
        spec=trunk_params,
        resume=f"{R}/resume/{{run}}/trunk-{{duration}}",
    script:
        "../scripts/train.py"
