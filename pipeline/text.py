"""Caption text: tokenisation that needs no downloaded data, and the vocabulary.

Tokenisation follows common captioning practice (Karpathy's preprocessing): lowercase, Penn
Treebank word tokenisation (nltk's ``TreebankWordTokenizer``, rule-based, so no ``punkt`` data is
needed), and punctuation-only tokens dropped.
"""

import json
from collections import Counter
from pathlib import Path

from nltk.tokenize import TreebankWordTokenizer

from .io.atomic import atomic_path, json_text
from .io.errors import PipelineError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
_TOKENIZER = TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Lowercased word tokens of ``caption``, punctuation-only tokens removed.

    >>> tokenize("A dog's ball, in the snow.")
    ['a', 'dog', "'s", 'ball', 'in', 'the', 'snow']
    """
    return [t for t in _TOKENIZER.tokenize(caption.lower()) if any(c.isalnum() for c in t)]


class Vocabulary:
    """Word <-> index map with ``<pad>=0, <start>=1, <end>=2, <unk>=3`` first.

    Words are ordered by descending count, ties alphabetically, so the same captions always give
    the same indices.
    """

    def __init__(self, words: list[str]):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad, self.start, self.end, self.unk = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, token_lists, min_count: int = 5) -> "Vocabulary":
        """Vocabulary of the words that occur at least ``min_count`` times in ``token_lists``.

        token_lists: iterable of token lists (count them on the training split only).
        """
        counts = Counter(t for tokens in token_lists for t in tokens)
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, tokens: list[str]) -> list[int]:
        """``<start> tokens <end>`` as indices; out-of-vocabulary words map to ``<unk>``."""
        return [self.start] + [self.index.get(t, self.unk) for t in tokens] + [self.end]

    def decode(self, ids) -> list[str]:
        """Words of ``ids`` up to the first ``<end>``, without ``<start>`` and ``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.start, self.pad):
                words.append(self.words[i])
        return words

    def to_json(self) -> str:
        """The JSON text that :meth:`save` writes: the word list."""
        return json_text({"words": self.words})

    def save(self, path) -> None:
        """Write :meth:`to_json` to ``path`` (atomically)."""
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path, fix: str = "rerun `cli.py features`") -> "Vocabulary":
        """Read a vocabulary written by :meth:`save`.

        Raises PipelineError, saying ``fix``, if the file is missing or not a vocabulary.
        """
        path = Path(path)
        try:
            words = json.loads(path.read_text(encoding="utf-8"))["words"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PipelineError(f"{path}: not a readable vocabulary file ({e}); {fix}") from e
        if not isinstance(words, list) or words[: len(SPECIALS)] != list(SPECIALS):
            raise PipelineError(f"{path}: vocabulary must start with {', '.join(SPECIALS)}; {fix}")
        return cls(words)
