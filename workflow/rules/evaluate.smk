# Score the base (duration 0) and every checkpoint through lm-eval, one model load per job.


rule evaluate:
    input:
        unpack(evaluate_input),
    output:
        results=f"{R}/evals/{{run}}/{{duration}}.json",
        samples=f"{R}/evals/{{run}}/{{duration}}.samples.jsonl",
    params:
        settings=eval_params,
        meta=run_meta,
    threads: config["threads"]["evaluate"]
    log:
        f"{R}/logs/evaluate/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    script:
        "../scripts/evaluate.py"
