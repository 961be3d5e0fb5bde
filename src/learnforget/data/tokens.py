"""Tokenized datasets: flat token files on disk, and the batch iterator training reads.

A tokenized dataset (docs/architecture.md, "Tokens") is a folder with

- ``ids.npy``     int32, every document's token ids concatenated (each document ends in EOS),
- ``mask.npy``    uint8, 1 where the loss counts (every token for CPT; response + EOS for IFT),
- ``offsets.npy`` int64, document start positions, length ``n_docs + 1``,
- ``meta.json``   ``regime``, ``n_docs``, ``n_tokens``, ``eos_id`` and whatever the caller adds
  (the source file fingerprint).

Batches (:class:`Batches`) are built from those arrays:

- ``cpt`` (continued pretraining): the whole stream is cut into windows of ``seq_len + 1``
  tokens that overlap by one token (inputs ``w[:-1]``, targets ``w[1:]``), so every token of the
  stream but the first is a target exactly once per epoch; the tail shorter than a window is
  left out. Documents are packed across window boundaries (EOS separates them).
- ``ift`` (instruction finetuning): one example per row, truncated to ``seq_len`` inputs and
  right-padded to the longest row of the batch; targets are -100 on padding and where
  ``mask == 0`` (the prompt). With ``packing=True`` IFT examples are packed like CPT windows
  instead (no padding; an example may continue into the next window; the loss still counts
  only where ``mask == 1``). With ``group_by_length=True`` (padded IFT only) each epoch's
  shuffled order is cut into groups of ``GROUP_BATCHES`` batches and each group is sorted by
  example length, longest first (as transformers' ``group_by_length``): a batch then holds
  examples of similar length and little padding, and every example is still seen once per
  epoch; which examples share a batch changes, and so do the results.

Epochs are shuffled with ``numpy.random.default_rng([seed, epoch])``, so the order depends
only on the seed and the epoch. Batches are drawn from the endless sequence of shuffled
epochs: a batch that runs past the end of an epoch is filled from the next one, so every
batch is full and every item is seen once per epoch. The position is ``(epoch, index)``
(the next item of that epoch's permutation); ``steps_per_epoch`` is ``n_items / batch_size``
(a float) and :meth:`Batches.steps_for_epochs` rounds up.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from learnforget.core.io import atomic_path, read_json, write_json

REGIMES = ("cpt", "ift")
IGNORE_INDEX = -100
GROUP_BATCHES = 64  # group_by_length: batches per length-sorted group


@dataclass
class TokenData:
    """A tokenized dataset held in memory (or memory-mapped)."""

    ids: np.ndarray  # int32, all documents concatenated
    mask: np.ndarray  # uint8, 1 where the loss counts
    offsets: np.ndarray  # int64, document starts, length n_docs + 1
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"ids ({len(self.ids)}) and mask ({len(self.mask)}) differ in length")
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(len(self.ids))

    @property
    def regime(self) -> str | None:
        return self.meta.get("regime")

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[a:b], self.mask[a:b]


def _from_docs(docs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], meta: dict) -> TokenData:
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=int(offsets[-1]))
    mask = np.fromiter((m for ms in masks for m in ms), dtype=np.uint8, count=int(offsets[-1]))
    meta = dict(meta, n_docs=len(docs), n_tokens=int(offsets[-1]))
    return TokenData(ids, mask, offsets, meta)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token")
    return int(tokenizer.eos_token_id)


def tokenize_cpt(texts: Iterable[str], tokenizer) -> TokenData:
    """Continued-pretraining form: each document's ids followed by EOS; the loss counts everywhere."""
    eos = _eos(tokenizer)
    docs = [ids + [eos] for ids in _encode(tokenizer, list(texts))]
    return _from_docs(docs, [[1] * len(d) for d in docs], {"regime": "cpt", "eos_id": eos})


def tokenize_ift(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer,
    template: str = "{prompt}{response}",
    use_chat_template: bool = False,
    drop_empty: bool = True,
) -> TokenData:
    """Instruction form: prompt ids, then response ids, then EOS; the loss counts on response + EOS.

    ``template`` must contain ``{prompt}`` before ``{response}``; the text before ``{response}``
    is the prompt part and the rest the response part. The two parts are tokenized separately
    and concatenated, so the prompt/response boundary is exact (as when a model generates
    after the prompt). With ``use_chat_template`` the prompt part is the tokenizer's chat
    template applied to one user turn (with the generation prompt) and ``template`` is ignored.
    Pairs whose response is empty or whitespace are dropped when ``drop_empty`` (their count
    is ``meta["n_dropped"]``).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not use_chat_template:
        if "{response}" not in template or "{prompt}" not in template.split("{response}")[0]:
            raise ValueError("template must contain {prompt} followed by {response}")
        head, tail = template.split("{response}", 1)
    elif not getattr(tokenizer, "chat_template", None):
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    eos = _eos(tokenizer)
    p_texts, r_texts, dropped = [], [], 0
    for p, r in zip(prompts, responses):
        if drop_empty and not r.strip():
            dropped += 1
            continue
        if use_chat_template:
            p_texts.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
            )
            r_texts.append(r)
        else:
            p_texts.append(head.replace("{prompt}", p))
            r_texts.append(r + tail.replace("{prompt}", p))
    p_ids, r_ids = _encode(tokenizer, p_texts), _encode(tokenizer, r_texts)
    docs = [p + r + [eos] for p, r in zip(p_ids, r_ids)]
    masks = [[0] * len(p) + [1] * (len(r) + 1) for p, r in zip(p_ids, r_ids)]
    return _from_docs(docs, masks, {"regime": "ift", "eos_id": eos, "n_dropped": dropped})


def fingerprint(paths: Iterable[str | Path]) -> str:
    """sha256 over the given files' bytes (in the given order)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def save_tokens(td: TokenData, out_dir: str | Path, meta: dict | None = None) -> None:
    """Write ``td`` as a token folder, atomically (the folder appears complete or not at all)."""
    full_meta = dict(td.meta)
    full_meta.update(meta or {})
    full_meta.update(n_docs=td.n_docs, n_tokens=td.n_tokens)
    if full_meta.get("regime") not in REGIMES:
        raise ValueError(f"meta regime must be one of {REGIMES}, got {full_meta.get('regime')!r}")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        np.save(tmp / "ids.npy", np.ascontiguousarray(td.ids, dtype=np.int32))
        np.save(tmp / "mask.npy", np.ascontiguousarray(td.mask, dtype=np.uint8))
        np.save(tmp / "offsets.npy", np.ascontiguousarray(td.offsets, dtype=np.int64))
        write_json(tmp / "meta.json", full_meta)


def load_tokens(path: str | Path, mmap: bool = True) -> TokenData:
    path = Path(path)
    mode = "r" if mmap else None
    td = TokenData(
        np.load(path / "ids.npy", mmap_mode=mode),
        np.load(path / "mask.npy", mmap_mode=mode),
        np.load(path / "offsets.npy", mmap_mode=mode),
        read_json(path / "meta.json"),
    )
    if td.ids.dtype != np.int32 or td.mask.dtype != np.uint8 or td.offsets.dtype != np.int64:
        raise ValueError(f"{path}: wrong dtypes ({td.ids.dtype}, {td.mask.dtype}, {td.offsets.dtype})")
    return td


def mix(parts: Sequence[tuple[TokenData, float]], seed: int = 0) -> TokenData:
    """Mix datasets of one regime by repetition weights, at the document level.

    ``weight`` is how many times each of that dataset's documents appears per pass over the
    mix: 1 = every document once, 3 = three times, 0.5 = a seeded random half of them
    (``floor(w)`` full copies plus a random ``frac(w)`` share without replacement). The chosen
    documents of all parts are then shuffled together (seeded), so repeated copies are packed
    into different windows. To give a part a share ``s`` of the mixed tokens, pick
    ``w = s / (1 - s) * other_tokens / part_tokens``.
    """
    if not parts:
        raise ValueError("mix needs at least one dataset")
    regimes = {td.regime for td, _ in parts}
    if len(regimes) != 1:
        raise ValueError(f"cannot mix regimes {sorted(map(str, regimes))}")
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, int]] = []  # (part, doc)
    for k, (td, w) in enumerate(parts):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"mix weight must be a finite number >= 0, got {w!r}")
        reps, frac = int(math.floor(w)), w - math.floor(w)
        docs = list(range(td.n_docs)) * reps
        n_extra = int(round(frac * td.n_docs))
        docs += sorted(rng.choice(td.n_docs, size=n_extra, replace=False).tolist()) if n_extra else []
        chosen += [(k, d) for d in docs]
    if not chosen:
        raise ValueError("mix weights select no documents")
    order = rng.permutation(len(chosen))
    ids, masks = [], []
    for j in order:
        k, d = chosen[j]
        i, m = parts[k][0].doc(d)
        ids.append(i)
        masks.append(m)
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    meta = dict(parts[0][0].meta)
    meta.update(
        mixed_from=[dict(weight=w, n_docs=td.n_docs, n_tokens=td.n_tokens, meta=td.meta) for td, w in parts],
        mix_seed=seed,
        n_docs=len(ids),
        n_tokens=int(offsets[-1]),
    )
    return TokenData(
        np.concatenate(ids).astype(np.int32), np.concatenate(masks).astype(np.uint8), offsets, meta
    )


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, -100 where the loss does not count
    n_tokens: int  # real (non-padding) input tokens in the batch
    n_loss_tokens: int  # targets that count


class Batches:
    """Endless, resumable batches over shuffled epochs of a :class:`TokenData` (see module doc)."""

    def __init__(self, td: TokenData, regime: str, batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int | None = None, packing: bool = False, group_by_length: bool = False):
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
        if td.regime is not None and td.regime != regime:
            raise ValueError(f"tokens are {td.regime!r} but regime {regime!r} was asked for")
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        self.td, self.regime, self.batch_size, self.seq_len, self.seed = td, regime, batch_size, seq_len, seed
        self.pad_id = int(pad_id if pad_id is not None else (td.eos_id if td.eos_id is not None else 0))
        self.packed = regime == "cpt" or bool(packing)
        if group_by_length and self.packed:
            raise ValueError("group_by_length applies to padded ift batches (cpt and packed ift have no padding)")
        self.group_by_length = bool(group_by_length)
        if self.packed:
            self.n_items = (td.n_tokens - 1) // seq_len
            if self.n_items < 1:
                raise ValueError(f"{td.n_tokens} tokens do not fill one window of {seq_len + 1}")
        else:
            self.n_items = td.n_docs
            if self.n_items < 1:
                raise ValueError("no documents")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> float:
        """Items per epoch / batch size (a float: batches run on across epoch boundaries)."""
        return self.n_items / self.batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        return math.ceil(epochs * self.n_items / self.batch_size - 1e-9)

    @property
    def position(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    def set_position(self, position: Sequence[int]) -> None:
        epoch, index = int(position[0]), int(position[1])
        if epoch < 0 or not 0 <= index <= self.n_items:
            raise ValueError(f"bad position {position!r} for {self.n_items} items per epoch")
        self.epoch, self.index = epoch, index

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
            if self.group_by_length:
                lengths = np.minimum(np.diff(self.td.offsets), self.seq_len + 1)
                size = GROUP_BATCHES * self.batch_size
                self._perm = np.concatenate([
                    g[np.argsort(-lengths[g], kind="stable")]
                    for g in np.split(self._perm, range(size, self.n_items, size))])
            self._perm_epoch = epoch
        return self._perm

    def next_items(self) -> list[int]:
        items: list[int] = []
        while len(items) < self.batch_size:
            if self.index >= self.n_items:
                self.epoch, self.index = self.epoch + 1, 0
            take = min(self.batch_size - len(items), self.n_items - self.index)
            items += self.permutation(self.epoch)[self.index:self.index + take].tolist()
            self.index += take
        return items

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return self.make_batch(self.next_items())

    def make_batch(self, items: Sequence[int]) -> Batch:
        T, td = self.seq_len, self.td
        if self.packed:
            starts = np.asarray(items, dtype=np.int64) * T
            idx = starts[:, None] + np.arange(T + 1)[None, :]
            w = np.asarray(td.ids[idx], dtype=np.int64)
            m = np.asarray(td.mask[idx[:, 1:]])
            x, y = w[:, :-1], np.where(m > 0, w[:, 1:], IGNORE_INDEX)
            return Batch(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y)),
                         int(x.size), int((y != IGNORE_INDEX).sum()))
        rows = []
        for i in items:
            ids, mask = td.doc(int(i))
            ids = np.asarray(ids[: T + 1], dtype=np.int64)
            mask = np.asarray(mask[: T + 1])
            rows.append((ids[:-1], np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)))
        L = max(1, max(len(r[0]) for r in rows))
        x = np.full((len(rows), L), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), L), IGNORE_INDEX, dtype=np.int64)
        for r, (xi, yi) in enumerate(rows):
            x[r, : len(xi)], y[r, : len(yi)] = xi, yi
        n_real = sum(len(r[0]) for r in rows)
        return Batch(torch.from_numpy(x), torch.from_numpy(y), n_real, int((y != IGNORE_INDEX).sum()))
