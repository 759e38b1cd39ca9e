"""Byte-level text corpora for the small causal LM.

The default corpus ships with every Python: the documentation topics of ``pydoc_data`` (about
465 KB of English prose and code). Text is encoded as UTF-8 bytes, so the vocabulary is the 256
byte values and nothing needs to be learned before training.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256


def default_text() -> str:
    """The ``pydoc_data`` topic texts, in sorted topic order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def read_text(path: str | Path | None = None) -> str:
    """The text of ``path`` (UTF-8), or :func:`default_text` for None."""
    if path is None:
        return default_text()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text: no such file: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if len(text.encode()) < 2:
        raise ValueError(f"--text: {path} holds fewer than 2 bytes; nothing to learn from")
    return text


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as an int64 tensor of token ids in ``[0, 256)``."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def decode(ids) -> str:
    """Token ids back to text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class Corpus:
    """A token stream split into training and validation parts (the last ``val_fraction``)."""

    def __init__(self, text: str, val_fraction: float = 0.05):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        ids = encode(text)
        cut = int(len(ids) * (1 - val_fraction))
        self.train, self.val = ids[:cut], ids[cut:]

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) on the validation part of the best context-free model:
        byte frequencies of the training part (add-one smoothed). A model must beat this."""
        counts = Counter(self.train.tolist())
        total = len(self.train) + VOCAB_SIZE
        return -sum(math.log((counts.get(t, 0) + 1) / total) for t in self.val.tolist()) / len(self.val)

    def batch(self, split: str, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows: inputs ``(B, context)`` and next-token targets ``(B, context)``."""
        data = self.train if split == "train" else self.val
        if len(data) <= context:
            raise ValueError(f"the {split} split has {len(data)} tokens, fewer than context + 1 = {context + 1}")
        starts = torch.randint(0, len(data) - context, (batch_size,), generator=generator)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]
