# Singular values of each weight change dW = W_finetuned - W_base (LoRA: peft's B@A*scale).


rule analyze:
    input:
        unpack(checkpoint_input),
    output:
        f"{R}/spectral/{{run}}/{{duration}}.csv",
    log:
        f"{R}/logs/analyze/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/analyze/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["analyze"]
    params:
        settings=analysis_params,
        meta=run_meta,
    script:
        "../scripts/analyze.py"
