# The base model: pretrained by the study on the source world (plus a small share of generic
# text), or, with model.pretrained, a link to a pretrained model's files (local, cached or
# downloaded), never a copy.

if PRETRAINED:

    rule base:
        output:
            directory(f"{R}/base/model"),
        log:
            f"{R}/logs/base.log",
        conda:
            ENV
        resources:
            gpu=0,
            mem_mb=2048,
            runtime=config["resources"]["base"]["runtime"] or 120,
        params:
            spec=base_fetch_params,
        script:
            "../scripts/fetch_model.py"

else:

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
