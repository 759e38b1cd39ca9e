"""One word in two sentences: how much context changes its vector.

A word's static vector (its row of the input embedding table) is the same in every sentence; its
contextual vector (the encoder's output at its tokens) depends on the words around it. For
"I sat on the river bank" versus "I deposited cash at the bank" the static cosine similarity of
"bank" is exactly 1, the contextual one is lower: attention has mixed in the context.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .bert import BertModel


@dataclass
class WordVectors:
    """A word's vectors in one sentence. ``tokens``/``positions``: its sub-word tokens and their
    indices in the tokenized sentence; ``static (E,)`` and ``contextual`` (``num_layers + 1``
    tensors ``(E,)``: the embedding output, then each layer's output) are means over those tokens."""

    tokens: list[str]
    positions: list[int]
    static: Tensor
    contextual: list[Tensor]


def find_word(text: str, word: str) -> tuple[int, int]:
    """Character span of the first whole-word, case-insensitive occurrence of ``word`` in ``text``."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    match = re.search(rf"(?<!\w){re.escape(word.strip())}(?!\w)", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"word {word!r} does not occur (as a whole word) in {text!r}")
    return match.span()


@torch.no_grad()
def word_vectors(model: BertModel, text: str, word: str) -> WordVectors:
    """Static and per-layer contextual vectors of ``word``'s first occurrence in ``text``."""
    start, end = find_word(text, word)
    batch = model.tokenize(text)
    positions = [i for i, (s, e) in enumerate(batch.offsets[0]) if e > s and s >= start and e <= end]
    if not positions:
        raise ValueError(f"word {word!r} in {text!r} maps to no token")
    out = model(**batch.model_inputs(), output_hidden_states=True)
    ids = batch.input_ids[0, positions].to(model.device)
    static = model.embeddings.word_embeddings.weight[ids].mean(dim=0)
    contextual = [h[0, positions].mean(dim=0) for h in out.hidden_states]
    return WordVectors([batch.tokens[0][i] for i in positions], positions, static, contextual)


def compare_word_in_contexts(model: BertModel, text_a: str, text_b: str, word: str) -> dict:
    """Cosine similarity of ``word``'s vectors in ``text_a`` versus ``text_b``.

    Returns a dict with ``word``; ``tokens_a``/``tokens_b`` (its sub-word tokens in each text);
    ``static_cosine`` (input word embeddings; 1.0 when both texts tokenize the word alike);
    ``contextual_cosine`` (the last layer's output); ``contextual_cosine_by_layer`` (index 0 the
    embedding output, which already adds position, then layers 1..L).
    """
    a, b = word_vectors(model, text_a, word), word_vectors(model, text_b, word)
    by_layer = [_cosine(x, y) for x, y in zip(a.contextual, b.contextual)]
    return {"word": word, "tokens_a": a.tokens, "tokens_b": b.tokens, "static_cosine": _cosine(a.static, b.static),
            "contextual_cosine": by_layer[-1], "contextual_cosine_by_layer": by_layer}


def _cosine(x: Tensor, y: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0))
