# Pretrain the base model on the source world (plus a small share of generic text).


rule base:
    input:
        tokenizer=f"{R}/tokenizer",
        tokens=base_tokens,
    output:
        directory(f"{R}/base/model"),
    log:
        f"{R}/logs/base.log",
    benchmark:
        f"{R}/benchmarks/base.tsv"
    conda:
        ENV
    threads: config["threads"]["base"]
    resources:
        gpu=0,
        mem_mb=base_mem_mb,
        runtime=base_runtime,
    params:
        spec=base_params,
    script:
        "../scripts/base.py"
