"""Train the study's byte-level BPE tokenizer with Hugging Face ``tokenizers``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from learnforget.core.io import atomic_path, read_jsonl

EOS = "<|endoftext|>"
TEXT_FIELDS = ("text", "question", "answer", "prompt", "response")


def iter_texts(files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Every text field of every record, in file order (deterministic)."""
    for f in files:
        for rec in read_jsonl(f):
            for key in TEXT_FIELDS:
                value = rec.get(key)
                if isinstance(value, str) and value:
                    yield value
            for choice in rec.get("choices", []) or []:
                yield choice


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2):
    """Byte-level BPE trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``.

    Byte-level BPE covers any input (no unknown tokens); ``<|endoftext|>`` is BOS, EOS and PAD.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                 model_max_length=1 << 30)
    hf.padding_side = "right"
    return hf


def train_tokenizer(files: list, out_dir: str | os.PathLike, *, vocab_size: int = 4096, min_frequency: int = 2):
    """Train the tokenizer on every text field of ``files`` (JSONL) and save it to ``out_dir``."""
    hf = build_tokenizer(iter_texts(files), vocab_size=vocab_size, min_frequency=min_frequency)
    with atomic_path(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
    return hf


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path)))
