# Singular values of each weight change dW = W_finetuned - W_base (LoRA: peft's B@A*scale):
# per-matrix ranks (.csv) and the full spectra of W, W + dW, dW and a Gaussian (.npz).


rule analyze:
    input:
        unpack(checkpoint_input),
    output:
        table=f"{R}/spectral/{{run}}/{{duration}}.csv",
        spectra=f"{R}/spectral/{{run}}/{{duration}}.npz",
    log:
        f"{R}/logs/analyze/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/analyze/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["analyze"]
    resources:
        gpu=analyze_gpus,
        mem_mb=analyze_mem_mb,
        runtime=analyze_runtime,
    params:
        settings=analysis_params,
        meta=run_meta,
    script:
        "../scripts/analyze.py"
