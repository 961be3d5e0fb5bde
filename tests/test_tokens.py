"""Tokenized datasets and batches: IFT masking, CPT packing, shuffling, resuming, mixing."""

import numpy as np
import pytest
import torch

from learnforget.data.tokens import (
    IGNORE_INDEX,
    Batches,
    load_tokens,
    mix,
    save_tokens,
    tokenize_cpt,
    tokenize_ift,
)

torch.set_num_threads(1)

PROMPTS = [f"what is {a} + {b}?" for a in range(6) for b in range(5)]
RESPONSES = [f" {a} + {b} = {a + b}. #### {a + b}" for a in range(6) for b in range(5)]
FACTS = [f"Person {i} lives in town {i % 7} and likes {['red', 'blue', 'green'][i % 3]}." for i in range(40)]


def make_tokenizer(texts, vocab=300):
    from learnforget.data.tokenizer import build_tokenizer

    return build_tokenizer(texts, vocab_size=vocab, min_frequency=0)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(FACTS + PROMPTS + RESPONSES)


def test_cpt_docs_end_in_eos_and_mask_all(tok):
    td = tokenize_cpt(FACTS, tok)
    assert td.n_docs == len(FACTS) and td.meta["regime"] == "cpt"
    for i in (0, 7, len(FACTS) - 1):
        ids, mask = td.doc(i)
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[:-1]) == FACTS[i]
        assert mask.all()


@pytest.mark.parametrize("template", ["{prompt}{response}", "Q: {prompt}\nA:{response}\n"])
def test_ift_labels_only_on_response_and_eos(tok, template):
    td = tokenize_ift(PROMPTS, RESPONSES, tok, template=template)
    suffix = template.split("{response}")[1]
    b = Batches(td, "ift", batch_size=4, seq_len=64, seed=0)
    batch = b.make_batch([0, 3, 11, 29])
    for row, i in enumerate([0, 3, 11, 29]):
        prompt_text = template.split("{response}")[0].replace("{prompt}", PROMPTS[i])
        n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
        ids, _ = td.doc(i)
        x, y = batch.input_ids[row], batch.targets[row]
        n_in = len(ids) - 1
        # targets are next tokens: the first n_prompt - 1 inputs predict prompt tokens
        assert (y[: n_prompt - 1] == IGNORE_INDEX).all()
        assert (y[n_prompt - 1: n_in] != IGNORE_INDEX).all()
        # padding: ignored, filled with the pad id
        assert (y[n_in:] == IGNORE_INDEX).all()
        assert (x[n_in:] == tok.pad_token_id).all()
        learned = y[y != IGNORE_INDEX].tolist()
        assert learned[-1] == tok.eos_token_id
        assert tok.decode(learned[:-1]) == RESPONSES[i] + suffix
    assert batch.n_loss_tokens == int((batch.targets != IGNORE_INDEX).sum())


def test_ift_truncates_to_seq_len_and_drops_empty(tok):
    td = tokenize_ift(["a", "b", "c"], [" long answer " * 10, "", "  "], tok)
    assert td.n_docs == 1 and td.meta["n_dropped"] == 2
    b = Batches(td, "ift", batch_size=2, seq_len=8, seed=0)
    batch = next(b)
    assert batch.input_ids.shape == (2, 8)


def test_ift_template_must_have_both_fields(tok):
    with pytest.raises(ValueError, match="template"):
        tokenize_ift(["a"], ["b"], tok, template="{response}{prompt}")
    with pytest.raises(ValueError, match="chat template"):
        tokenize_ift(["a"], ["b"], tok, use_chat_template=True)


def test_cpt_packing_covers_the_stream_once_per_epoch(tok):
    td = tokenize_cpt(FACTS, tok)
    T = 16
    b = Batches(td, "cpt", batch_size=3, seq_len=T, seed=1)
    n = b.n_items
    assert n == (td.n_tokens - 1) // T
    seen_targets = np.zeros(td.n_tokens, dtype=int)
    for _ in range(int(np.ceil(n / 3))):
        assert next(b).input_ids.shape == (3, T)
    # the permutation of epoch 0 is every window once
    assert sorted(b.permutation(0).tolist()) == list(range(n))
    for w in range(n):
        bt = b.make_batch([w])
        x, y = bt.input_ids[0].numpy(), bt.targets[0].numpy()
        assert (x == td.ids[w * T:(w + 1) * T]).all()
        assert (y == td.ids[w * T + 1:(w + 1) * T + 1]).all()
        seen_targets[w * T + 1:(w + 1) * T + 1] += 1
    # every target position up to the dropped tail exactly once
    assert (seen_targets[1:n * T + 1] == 1).all() and seen_targets[0] == 0
    assert td.n_tokens - 1 - n * T < T


def test_epochs_shuffle_by_seed_and_batches_run_across_epochs(tok):
    td = tokenize_ift(PROMPTS, RESPONSES, tok)  # 30 examples
    b = Batches(td, "ift", batch_size=8, seq_len=64, seed=3)
    assert b.steps_per_epoch == 30 / 8 and b.steps_for_epochs(1) == 4 and b.steps_for_epochs(2) == 8
    assert not np.array_equal(b.permutation(0), b.permutation(1))
    assert np.array_equal(b.permutation(0), Batches(td, "ift", 8, 64, seed=3).permutation(0))
    assert not np.array_equal(b.permutation(0), Batches(td, "ift", 8, 64, seed=4).permutation(0))
    for _ in range(4):
        assert next(b).input_ids.shape[0] == 8  # always full batches
    assert b.position == (1, 2)  # 32 items: epoch 0 (30) + 2 of epoch 1


def test_batches_resume_from_position(tok):
    td = tokenize_cpt(FACTS, tok)
    a = Batches(td, "cpt", batch_size=4, seq_len=8, seed=0)
    for _ in range(7):
        next(a)
    pos = a.position
    expected = [next(a).input_ids for _ in range(5)]
    b = Batches(td, "cpt", batch_size=4, seq_len=8, seed=0)
    b.set_position(pos)
    got = [next(b).input_ids for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    with pytest.raises(ValueError):
        b.set_position((0, b.n_items + 1))


def test_save_load_roundtrip(tok, tmp_path):
    td = tokenize_ift(PROMPTS, RESPONSES, tok)
    save_tokens(td, tmp_path / "t", {"fingerprint": "abc"})
    files = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert files == ["ids.npy", "mask.npy", "meta.json", "offsets.npy"]
    back = load_tokens(tmp_path / "t")
    assert back.ids.dtype == np.int32 and back.mask.dtype == np.uint8 and back.offsets.dtype == np.int64
    assert isinstance(back.ids, np.memmap)
    assert np.array_equal(back.ids, td.ids) and np.array_equal(back.mask, td.mask)
    assert back.meta["regime"] == "ift" and back.meta["fingerprint"] == "abc"
    assert back.meta["n_docs"] == len(PROMPTS) and back.meta["eos_id"] == tok.eos_token_id
    assert back.meta["n_tokens"] == len(td.ids) == back.offsets[-1]


def test_mix_repeats_by_weight(tok):
    a = tokenize_cpt(FACTS[:10], tok)
    b = tokenize_cpt(PROMPTS[:20], tok)
    m = mix([(a, 2.0), (b, 0.5)], seed=0)
    assert m.n_docs == 2 * 10 + 10
    assert m.n_tokens == int(m.offsets[-1]) == len(m.ids)
    docs = [tuple(m.doc(i)[0].tolist()) for i in range(m.n_docs)]
    for i in range(10):
        assert docs.count(tuple(a.doc(i)[0].tolist())) == 2
    b_docs = {tuple(b.doc(i)[0].tolist()) for i in range(20)}
    assert sum(d in b_docs for d in docs) == 10
    assert docs != sorted(docs, key=lambda d: d in b_docs)  # shuffled together
    assert mix([(a, 2.0), (b, 0.5)], seed=0).ids.tolist() == m.ids.tolist()
    with pytest.raises(ValueError, match="regime"):
        mix([(a, 1.0), (tokenize_ift(PROMPTS, RESPONSES, tok), 1.0)])


def test_group_by_length_sorts_groups_of_batches_and_cuts_padding(tok):
    from learnforget.data.tokens import GROUP_BATCHES

    rng = np.random.default_rng(0)
    prompts = [" ".join(["what is"] * int(k)) + "?" for k in rng.integers(1, 12, size=300)]
    td = tokenize_ift(prompts, [" 1. #### 1"] * 300, tok)
    grouped = Batches(td, "ift", batch_size=2, seq_len=64, seed=5, group_by_length=True)
    plain = Batches(td, "ift", batch_size=2, seq_len=64, seed=5)
    lengths = np.diff(td.offsets)
    for epoch in (0, 1):
        perm = grouped.permutation(epoch)
        assert sorted(perm.tolist()) == list(range(300))  # every example once per epoch
        size = GROUP_BATCHES * 2
        for start in range(0, 300, size):
            group = perm[start:start + size]
            assert set(group.tolist()) == set(plain.permutation(epoch)[start:start + size].tolist())
            assert np.all(np.diff(lengths[group]) <= 0)  # longest first within its group
    assert np.array_equal(grouped.permutation(1),
                          Batches(td, "ift", 2, 64, seed=5, group_by_length=True).permutation(1))

    def padding(b):
        pads = 0
        for _ in range(150):  # one epoch
            batch = next(b)
            pads += batch.input_ids.numel() - batch.n_tokens
        return pads

    assert padding(grouped) < padding(plain) / 4
    with pytest.raises(ValueError, match="group_by_length"):
        Batches(tokenize_cpt(FACTS, tok), "cpt", 2, 8, group_by_length=True)
