# Score the base (duration 0) and every checkpoint through lm-eval, one model load per job.


rule evaluate:
    input:
        unpack(evaluate_input),
    output:
        results=f"{R}/evals/{{run}}/{{duration}}.json",
        samples=f"{R}/evals/{{run}}/{{duration}}.samples.jsonl",
    log:
        f"{R}/logs/evaluate/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["evaluate"]
    params:
        settings=eval_params,
        meta=run_meta,
    script:
        "../scripts/evaluate.py"
