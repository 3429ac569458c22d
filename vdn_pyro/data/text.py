r"""Character corpora for sequence models: a vocabulary, padded and ragged batches, splits.

The bundled corpus is the US census name lists that ship as files inside the ``names`` pip
package (read from the installed package with :mod:`importlib.resources`; nothing is downloaded).

A text of n characters becomes one training pair of length T = n + 1, the usual teacher-forcing
shift around a single boundary token ``"."`` (index 0) that marks both the start and the end::

    text   "emma"
    x      .  e  m  m  a        (inputs:  boundary, then the characters)
    y      e  m  m  a  .        (targets: the characters, then the boundary)

Rows of a batch are padded on the right with :data:`PAD` (-1) in both ``x`` and ``y``; the mask of
real positions is ``y != PAD``.
"""

import dataclasses
import importlib.resources
import numbers

import torch

__all__ = [
    "BOUNDARY",
    "BOUNDARY_ID",
    "NAME_LISTS",
    "PAD",
    "CharCorpus",
    "Vocabulary",
    "encode_texts",
    "load_names",
    "load_names_corpus",
    "ragged_batches",
    "split_texts",
    "trim_padding",
]

#: The boundary character: start-of-sequence in ``x`` and end-of-sequence in ``y``.
BOUNDARY = "."
#: Index of :data:`BOUNDARY` in every :class:`Vocabulary`.
BOUNDARY_ID = 0
#: Padding value in padded id tensors (never a valid class label).
PAD = -1

#: Name lists of the ``names`` package: ``kind -> file names`` inside the package.
NAME_LISTS = {
    "first": ("dist.male.first", "dist.female.first"),
    "male": ("dist.male.first",),
    "female": ("dist.female.first",),
    "last": ("dist.all.last",),
}


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Characters and their integer ids; id :data:`BOUNDARY_ID` is the boundary ``"."``.

    :ivar tuple chars: the characters with ids ``1, 2, ...``, in order.
    """

    chars: tuple

    def __post_init__(self):
        chars = tuple(self.chars)
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"Expected single characters, but got {chars!r}.")
        if len(set(chars)) != len(chars):
            raise ValueError(f"Expected distinct characters, but got {chars!r}.")
        if BOUNDARY in chars:
            raise ValueError(f"The boundary character {BOUNDARY!r} is reserved; remove it from chars.")
        object.__setattr__(self, "chars", chars)
        object.__setattr__(self, "_index", {c: i + 1 for i, c in enumerate(chars)})

    @classmethod
    def from_texts(cls, texts):
        """The sorted set of characters of ``texts``."""
        return cls(tuple(sorted(set("".join(texts)))))

    @property
    def size(self):
        """Number of ids V, boundary included."""
        return len(self.chars) + 1

    def __len__(self):
        return self.size

    def encode(self, text):
        """Ids of the characters of ``text`` (no boundary added).

        :raises ValueError: for a character outside the vocabulary.
        """
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"Character {e.args[0]!r} of {text!r} is not in the vocabulary "
                f"{''.join(self.chars)!r}; build the vocabulary from all texts or clean them."
            ) from None

    def decode(self, ids):
        """The text of a sequence of ids: stops at the first boundary, skips :data:`PAD`.

        :param ids: a sequence or 1-D tensor of ids.
        :raises ValueError: for an id outside ``[-1, V)``.
        """
        out = []
        for i in ids.tolist() if torch.is_tensor(ids) else ids:
            i = int(i)
            if i == PAD:
                continue
            if not 0 <= i < self.size:
                raise ValueError(f"Expected ids in [0, {self.size}) or {PAD}, but got {i}.")
            if i == BOUNDARY_ID:
                break
            out.append(self.chars[i - 1])
        return "".join(out)


def load_names(kind="first", lowercase=True):
    """The census name lists of the ``names`` package, deduplicated, in file order.

    :param str kind: ``"first"`` (male and female first names, about 5,200), ``"male"``,
        ``"female"`` or ``"last"`` (about 88,800 surnames).
    :param bool lowercase: lower-case the (upper-case) names.
    :returns: a list of str.
    :raises ImportError: if the ``names`` package is not installed.
    """
    if kind not in NAME_LISTS:
        raise ValueError(f"Expected kind in {sorted(NAME_LISTS)}, but got {kind!r}.")
    try:
        import names  # noqa: F401  (only its data files are read)
    except ImportError as e:
        raise ImportError(
            "The name corpus ships with the 'names' package, which the examples extra installs: "
            "pip install 'vdn_pyro[examples]' (or pip install names)."
        ) from e
    seen, out = set(), []
    root = importlib.resources.files("names")
    for filename in NAME_LISTS[kind]:
        for line in root.joinpath(filename).read_text(encoding="ascii").splitlines():
            if not line.strip():
                continue
            name = line.split()[0]
            name = name.lower() if lowercase else name
            if name not in seen:
                seen.add(name)
                out.append(name)
    return out


def encode_texts(texts, vocabulary, max_len=None):
    """Teacher-forcing pairs for a list of texts, right-padded with :data:`PAD`.

    :param list texts: N strings, each non-empty.
    :param Vocabulary vocabulary: the vocabulary.
    :param int max_len: pad to this many positions T (default: the longest text + 1).
    :returns: ``(x, y)``, each a long tensor ``(N, T)``.
    :raises ValueError: for an empty text, or a text longer than ``max_len - 1``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("Expected at least one text, but got none.")
    ids = [vocabulary.encode(t) for t in texts]
    lengths = [len(i) + 1 for i in ids]
    if min(lengths) < 2:
        raise ValueError(f"Expected non-empty texts, but text {lengths.index(1)} is empty.")
    longest = max(lengths)
    max_len = longest if max_len is None else max_len
    if longest > max_len:
        raise ValueError(f"Expected texts of at most {max_len - 1} characters, but one has {longest - 1}.")
    x = torch.full((len(texts), max_len), PAD, dtype=torch.long)  # (N, T)
    y = torch.full((len(texts), max_len), PAD, dtype=torch.long)  # (N, T)
    for row, (seq, n) in enumerate(zip(ids, lengths)):
        x[row, :n] = torch.tensor([BOUNDARY_ID] + seq)
        y[row, :n] = torch.tensor(seq + [BOUNDARY_ID])
    return x, y


def trim_padding(x, y):
    """Drop the trailing columns that are padding in every row.

    :param x: ``(B, T)``. :param y: ``(B, T)``.
    :returns: ``(x, y)`` of shape ``(B, T_b)`` with ``T_b`` the longest row.
    """
    length = int((y != PAD).sum(-1).max()) if y.numel() else 0
    return x[:, :length], y[:, :length]  # (B, T_b)


def ragged_batches(x, y, batch_size, shuffle=False, generator=None):
    """Minibatches of padded pairs, each trimmed to its own longest row.

    :param x: ``(N, T)``. :param y: ``(N, T)``.
    :param int batch_size: rows per batch (the last may be smaller).
    :param bool shuffle: draw rows in a random order (from ``generator``).
    :param torch.Generator generator: the random source for ``shuffle``.
    :returns: an iterator of ``(x_b, y_b)``, each ``(B, T_b)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"Expected batch_size to be an int >= 1, but got {batch_size!r}.")
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield trim_padding(x[idx], y[idx])


def split_texts(texts, fractions=(0.8, 0.1, 0.1), seed=0):
    """Shuffle texts and split them into train/validation/test lists.

    :param list texts: the texts.
    :param tuple fractions: three non-negative fractions summing to 1.
    :param int seed: seed of the shuffle.
    :returns: ``(train, val, test)`` lists.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"Expected three non-negative fractions summing to 1, but got {fractions!r}.")
    texts = list(texts)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_train = int(round(fractions[0] * len(texts)))
    n_val = int(round(fractions[1] * len(texts)))
    shuffled = [texts[i] for i in order]
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


@dataclasses.dataclass
class CharCorpus:
    """A character corpus split into train/validation/test texts with one vocabulary.

    :ivar Vocabulary vocabulary: built from all texts, so that every split can be encoded.
    :ivar list train: training texts.
    :ivar list val: validation texts.
    :ivar list test: held-out test texts.
    """

    vocabulary: Vocabulary
    train: list
    val: list
    test: list

    @property
    def max_len(self):
        """Positions T of the longest pair (longest text + 1)."""
        return max(len(t) for t in self.train + self.val + self.test) + 1

    def tensors(self, split):
        """``(x, y)`` long tensors ``(N, T)`` of a split, padded to :attr:`max_len`.

        :param str split: ``"train"``, ``"val"`` or ``"test"``.
        """
        if split not in ("train", "val", "test"):
            raise ValueError(f"Expected split 'train', 'val' or 'test', but got {split!r}.")
        return encode_texts(getattr(self, split), self.vocabulary, self.max_len)

    def num_chars(self, split):
        """Predicted positions in a split (characters plus one end boundary per text)."""
        return sum(len(t) + 1 for t in getattr(self, split))


def load_names_corpus(kind="first", fractions=(0.8, 0.1, 0.1), seed=0, limit=None):
    """The ``names`` package's census names as a :class:`CharCorpus`.

    :param str kind: see :func:`load_names`.
    :param tuple fractions: train/validation/test fractions.
    :param int seed: seed of the split.
    :param int limit: keep only this many names (after shuffling), for quick runs.
    :returns: a :class:`CharCorpus` (lower-case names, vocabulary ``"." + a-z``).
    """
    texts = load_names(kind)
    vocabulary = Vocabulary.from_texts(texts)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 3:
            raise ValueError(f"Expected limit to be None or an int >= 3, but got {limit!r}.")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed + 1))
        texts = [texts[i] for i in order[:limit].tolist()]
    train, val, test = split_texts(texts, fractions, seed)
    return CharCorpus(vocabulary, train, val, test)
