# Offline corpora, hub datasets (data.hub), the tokenizer, and token files.


rule data_source:
    output:
        train=f"{R}/data/source/train.jsonl",
        quiz=f"{R}/data/source/quiz.jsonl",
        heldout=f"{R}/data/source/heldout.jsonl",
    log:
        f"{R}/logs/data/source.log",
    conda:
        ENV
    params:
        domain="source",
        cfg=config["data"]["source"],
        seed=config["seed"],
    script:
        "../scripts/data.py"


rule data_math:
    output:
        train=f"{R}/data/math/train.jsonl",
        test=f"{R}/data/math/test.jsonl",
        generic=f"{R}/data/math/generic.jsonl",
    log:
        f"{R}/logs/data/math.log",
    conda:
        ENV
    params:
        domain="math",
        cfg=config["data"]["math"],
        seed=config["seed"],
    script:
        "../scripts/data.py"


rule data_code:
    output:
        train=f"{R}/data/code/train.jsonl",
        test=f"{R}/data/code/test.jsonl",
    log:
        f"{R}/logs/data/code.log",
    conda:
        ENV
    params:
        domain="code",
        cfg=config["data"]["code"],
        seed=config["seed"],
    script:
        "../scripts/data.py"


rule data_hub:
    input:
        tokenizer=TOKENIZER,
    output:
        f"{R}/data/hub/{{dataset}}.jsonl",
    log:
        f"{R}/logs/data/hub-{{dataset}}.log",
    conda:
        ENV
    params:
        p=hub_data_params,
    script:
        "../scripts/data_hub.py"


rule tokenizer:
    input:
        source=f"{R}/data/source/train.jsonl",
        math=f"{R}/data/math/train.jsonl",
        generic=f"{R}/data/math/generic.jsonl",
        code=f"{R}/data/code/train.jsonl",
    output:
        directory(f"{R}/tokenizer"),
    log:
        f"{R}/logs/tokenizer.log",
    conda:
        ENV
    params:
        cfg=config["tokenizer"],
    script:
        "../scripts/tokenizer.py"


rule tokenize:
    input:
        unpack(tokenize_input),
    output:
        directory(f"{R}/tokens/{{dataset}}"),
    log:
        f"{R}/logs/tokens/{{dataset}}.log",
    conda:
        ENV
    params:
        spec=tokenize_params,
    script:
        "../scripts/tokenize_data.py"
