# Adapters as plugins. With `compose.enabled`, LoRAHub: the study's LoRA adapters combined by
# peft's add_weighted_adapter, the weights searched without gradients on a few examples of a
# target domain, next to the uniform combination and each adapter alone; every composite is a
# checkpoint folder evaluated like any other (rule evaluate_composite, the evaluate script) and
# drawn on the trade-off figure. Rule cards: the model card of every adapter checkpoint with
# its scores, once the report's metrics.csv exists (checkpoint folders are never rewritten).


rule compose:
    input:
        unpack(compose_input),
    output:
        search=f"{R}/compose/{lfcompose.SEARCH_JSON}",
        adapters=[directory(d) for d in STUDY.compose_adapter_dirs()],
    log:
        f"{R}/logs/compose/search.log",
    benchmark:
        f"{R}/benchmarks/compose/search.tsv"
    conda:
        ENV
    threads: config["threads"]["evaluate"]
    params:
        spec=compose_params,
        template=compose_template,
        composites=COMPOSITES,
    script:
        "../scripts/compose.py"


rule evaluate_composite:
    input:
        unpack(composite_evaluate_input),
    output:
        results=f"{R}/compose/evals/{{composite}}.json",
        samples=f"{R}/compose/evals/{{composite}}.samples.jsonl",
    log:
        f"{R}/logs/compose/evaluate/{{composite}}.log",
    benchmark:
        f"{R}/benchmarks/compose/evaluate/{{composite}}.tsv"
    wildcard_constraints:
        composite="|".join(COMPOSITES) or "(?!)",
    conda:
        ENV
    threads: config["threads"]["evaluate"]
    resources:
        mem_mb=composite_mem_mb,
        runtime=evaluate_runtime,
    params:
        settings=composite_eval_params,
        meta=composite_meta,
    script:
        "../scripts/evaluate.py"


rule cards:
    input:
        unpack(cards_input),
    output:
        directory(f"{R}/cards"),
    log:
        f"{R}/logs/cards.log",
    conda:
        ENV
    params:
        checkpoints=cards_params,
    script:
        "../scripts/cards.py"
