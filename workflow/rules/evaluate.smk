# Score the base (duration 0) and every checkpoint through lm-eval, one model load per job
# (evaluation.groups; learning groups only on their domain's runs), then score the sampled
# generations (HumanEval in the sandbox, code syntax, diversity) in a CPU job of their own.


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
    resources:
        gpu=config["resources"]["evaluate"]["gpu"],
        mem_mb=evaluate_mem_mb,
        runtime=evaluate_runtime,
    params:
        settings=eval_params,
        meta=run_meta,
    script:
        "../scripts/evaluate.py"


rule score:
    input:
        samples=f"{R}/evals/{{run}}/{{duration}}.samples.jsonl",
        data=STUDY.data_files()["code_test"],
    output:
        results=f"{R}/evals/{{run}}/{{duration}}.scored.json",
        executions=f"{R}/evals/{{run}}/{{duration}}.executions.jsonl",
    log:
        f"{R}/logs/score/{{run}}/{{duration}}.log",
    benchmark:
        f"{R}/benchmarks/score/{{run}}/{{duration}}.tsv"
    conda:
        ENV
    threads: config["threads"]["evaluate"]
    params:
        plan=score_plan,
        meta=run_meta,
    script:
        "../scripts/score.py"
