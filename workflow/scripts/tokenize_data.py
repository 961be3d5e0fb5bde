"""Tokenize one dataset into token files (learnforget.data.tokens)."""

from learnforget.data import tokens
from learnforget.core.io import read_jsonl
from learnforget.core.logs import setup
from learnforget.data.tokenizer import load_tokenizer

log = setup(snakemake.log[0])
spec = snakemake.params.spec
tokenizer = load_tokenizer(snakemake.input.tokenizer)
records = read_jsonl(snakemake.input.data)
if spec["regime"] == "cpt":
    td = tokens.tokenize_cpt([r["text"] for r in records], tokenizer)
else:
    prompt, response = spec["template"]
    # the tokenizer's chat template when it has one (a chat model's), else the plain template
    chat = bool(getattr(tokenizer, "chat_template", None))
    td = tokens.tokenize_ift(
        [prompt.format(**r) for r in records],
        [response.format(**r) for r in records],
        tokenizer,
        use_chat_template=chat,
    )
    td.meta["chat_template"] = chat
meta = {"dataset": snakemake.wildcards.dataset, "source": tokens.fingerprint([snakemake.input.data])}
tokens.save_tokens(td, snakemake.output[0], meta)
log.info("%s: %d documents, %d tokens (%s)", snakemake.wildcards.dataset, td.n_docs, td.n_tokens, spec["regime"])
