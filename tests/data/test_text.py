import string

import pytest
import torch

from vdn_pyro.data.text import (
    BOUNDARY_ID,
    PAD,
    CharCorpus,
    Vocabulary,
    encode_texts,
    load_names,
    load_names_corpus,
    ragged_batches,
    split_texts,
    trim_padding,
)

VOCAB = Vocabulary(("a", "b", "c"))


def test_vocabulary_round_trip():
    assert VOCAB.size == len(VOCAB) == 4
    assert VOCAB.encode("cab") == [3, 1, 2]
    assert VOCAB.decode([3, 1, 2]) == "cab"
    assert VOCAB.decode(torch.tensor([1, 2, BOUNDARY_ID, 3])) == "ab"  # stops at the boundary
    assert VOCAB.decode([1, PAD, 2]) == "ab"  # skips padding
    assert Vocabulary.from_texts(["ba", "ca"]) == VOCAB


@pytest.mark.parametrize(
    "chars,match",
    [(("a", "a"), "distinct"), (("a", "."), "reserved"), (("ab",), "single characters")],
    ids=["duplicate", "boundary", "multi-char"],
)
def test_vocabulary_rejects(chars, match):
    with pytest.raises(ValueError, match=match):
        Vocabulary(chars)


def test_vocabulary_errors():
    with pytest.raises(ValueError, match="'z' of 'az' is not in the vocabulary"):
        VOCAB.encode("az")
    with pytest.raises(ValueError, match=r"ids in \[0, 4\)"):
        VOCAB.decode([1, 4])


def test_load_names():
    first = load_names("first")
    assert len(first) > 5000 and len(set(first)) == len(first)
    assert set("".join(first)) <= set(string.ascii_lowercase)
    assert "mary" in first and "james" in first
    male, female = load_names("male"), load_names("female")
    assert set(first) == set(male) | set(female)
    assert load_names("male", lowercase=False)[0] == "JAMES"
    assert len(load_names("last")) > 80000
    with pytest.raises(ValueError, match="Expected kind in"):
        load_names("middle")


def test_encode_texts_shift_and_padding():
    x, y = encode_texts(["ab", "c"], VOCAB)
    assert x.dtype == y.dtype == torch.long
    assert x.tolist() == [[0, 1, 2], [0, 3, PAD]]
    assert y.tolist() == [[1, 2, 0], [3, 0, PAD]]
    x, y = encode_texts(["ab"], VOCAB, max_len=5)
    assert x.shape == y.shape == (1, 5) and x[0, 3:].tolist() == [PAD, PAD]
    with pytest.raises(ValueError, match="at most 1 characters"):
        encode_texts(["ab"], VOCAB, max_len=2)
    with pytest.raises(ValueError, match="non-empty texts"):
        encode_texts(["ab", ""], VOCAB)
    with pytest.raises(ValueError, match="at least one text"):
        encode_texts([], VOCAB)


def test_ragged_batches_trim_and_cover():
    texts = ["a", "abcab", "ab", "c", "cc"]
    x, y = encode_texts(texts, VOCAB, max_len=8)
    seen = []
    for xb, yb in ragged_batches(x, y, 2, shuffle=True, generator=torch.Generator().manual_seed(0)):
        lengths = (yb != PAD).sum(1)
        assert xb.shape == yb.shape and xb.shape[1] == int(lengths.max())  # trimmed to the longest
        seen += [VOCAB.decode(row) for row in yb]
    assert sorted(seen) == sorted(texts)
    assert [VOCAB.decode(r) for _, yb in ragged_batches(x, y, 10) for r in yb] == texts
    xt, yt = trim_padding(x, y)
    assert xt.shape == (5, 6)
    with pytest.raises(ValueError, match="batch_size"):
        next(ragged_batches(x, y, 0))


def test_split_texts():
    texts = [str(i) for i in range(100)]
    train, val, test = split_texts(texts, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (80, 10, 10)
    assert sorted(train + val + test) == sorted(texts)
    assert split_texts(texts, seed=3) == (train, val, test)
    assert split_texts(texts, seed=4)[0] != train
    with pytest.raises(ValueError, match="summing to 1"):
        split_texts(texts, (0.5, 0.1, 0.1))


def test_load_names_corpus():
    corpus = load_names_corpus(limit=300, seed=1)
    assert isinstance(corpus, CharCorpus)
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 300
    assert corpus.vocabulary.size == 27  # boundary + a-z
    x, y = corpus.tensors("val")
    assert x.shape == (len(corpus.val), corpus.max_len)
    assert int((y != PAD).sum()) == corpus.num_chars("val")
    assert [corpus.vocabulary.decode(r) for r in y] == corpus.val
    with pytest.raises(ValueError, match="split"):
        corpus.tensors("dev")
    with pytest.raises(ValueError, match="limit"):
        load_names_corpus(limit=2)
