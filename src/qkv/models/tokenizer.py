"""Text -> token ids with the ``tokenizers`` package, padding and truncation chosen per call.

A ``tokenizer.json`` may carry its own padding and truncation settings (all-MiniLM-L6-v2's pads
every text to 128 tokens and cuts at 128). They are switched off when loaded: each call pads a
batch to its longest text, and cuts only when asked to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from .errors import CheckpointError


@dataclass
class TokenBatch:
    """A tokenized batch, padded on the right to its longest text.

    ``input_ids``, ``attention_mask`` (1 = real token, 0 = padding) and ``token_type_ids`` are int64
    ``(B, N)``; ``tokens[b]`` and ``offsets[b]`` (character spans into the text, ``(0, 0)`` for
    special tokens) cover the real tokens of text ``b`` only.
    """

    input_ids: Tensor
    attention_mask: Tensor
    token_type_ids: Tensor
    tokens: list[list[str]]
    offsets: list[list[tuple[int, int]]]

    @property
    def lengths(self) -> Tensor:
        """Real tokens per text, ``(B,)``."""
        return self.attention_mask.sum(dim=1)

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for ``BertModel.forward``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}


class BertTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``.

    Args:
        tokenizer: the loaded tokenizer (its own padding/truncation settings are cleared).
        pad_id: id that fills padded positions (the model's ``pad_token_id``).
        max_length: the longest input the model takes, in tokens (special tokens included).
    """

    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int):
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length
        tokenizer.no_padding()
        tokenizer.no_truncation()

    @classmethod
    def from_file(cls, path: Path | str, *, pad_id: int, max_length: int) -> BertTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file (tokenizer.json) not found")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception for malformed files
            raise CheckpointError(f"cannot be read by the tokenizers package ({e})", file=path) from e
        return cls(tokenizer, pad_id=pad_id, max_length=max_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: str | list[str], pairs: str | list[str] | None = None, *,
                 truncation: bool = False, max_length: int | None = None) -> TokenBatch:
        """Tokenize ``texts`` (and, for sentence-pair models, their ``pairs``, token type 1).

        Args:
            texts: one text or a list of them.
            pairs: optional second segments, one per text.
            truncation: cut texts longer than ``max_length`` (otherwise they raise ``ValueError``).
            max_length: the longest allowed length in tokens, default (and at most) the model's.
        """
        texts = as_text_list(texts, "texts")
        if pairs is not None:
            pairs = as_text_list(pairs, "pairs")
            if len(pairs) != len(texts):
                raise ValueError(f"pairs must have one entry per text ({len(texts)}), got {len(pairs)}")
        if max_length is None:
            max_length = self.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= self.max_length:
            raise ValueError(f"max_length must be an integer in [1, {self.max_length}] (the model's limit), "
                             f"got {max_length!r}")
        if truncation:
            self.tokenizer.enable_truncation(max_length)
        try:
            inputs = texts if pairs is None else list(zip(texts, pairs))
            encodings = self.tokenizer.encode_batch(inputs)
        finally:
            self.tokenizer.no_truncation()
        for i, e in enumerate(encodings):
            if len(e.ids) > max_length:
                raise ValueError(f"texts[{i}] is {len(e.ids)} tokens long, more than max_length={max_length} "
                                 f"(the model takes at most {self.max_length}); pass truncation=True to cut it")
        return self._collate(encodings)

    def _collate(self, encodings) -> TokenBatch:
        n = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), n), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(encodings), n), dtype=torch.int64)
        types = torch.zeros((len(encodings), n), dtype=torch.int64)
        for b, e in enumerate(encodings):
            ids[b, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
            mask[b, : len(e.ids)] = 1
            types[b, : len(e.ids)] = torch.tensor(e.type_ids, dtype=torch.int64)
        return TokenBatch(ids, mask, types, [list(e.tokens) for e in encodings],
                          [list(e.offsets) for e in encodings])


def as_text_list(texts, name: str) -> list[str]:
    """``texts`` (a str or a non-empty list of str) as a list; TypeError/ValueError naming ``name``."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"{name} must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"{name} must not be empty")
    return list(texts)
