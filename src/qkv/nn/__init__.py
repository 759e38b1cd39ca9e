"""Attention modules built on :func:`qkv.attention`.

- :class:`MultiHeadAttention`: self-/cross-attention with GQA/MQA, fused or separate projections,
  QK-norm, attention sinks, RoPE and KV caches; :mod:`qkv.nn.compat` has a drop-in for
  :class:`torch.nn.MultiheadAttention`.
- :mod:`qkv.nn.positional`: sinusoidal and learned embeddings, :class:`RotaryEmbedding`, :class:`ALiBi`.
- :class:`TransformerBlock`: pre-/post-norm, LayerNorm/RMSNorm, GELU/ReLU/SwiGLU, optional cross-attention.
- :class:`Encoder`, :class:`Decoder`: stacks of blocks; the decoder is a small causal LM whose
  ``generate`` decodes from a KV cache (:mod:`qkv.cache`), inside :func:`qkv.nn.fused.fused_projections`
  (stacked q/k/v and gate/up products for a step's few rows) or with a compiled step
  (:mod:`qkv.nn.compiled`).
"""

from . import compat, fused, positional
from .attention import MultiHeadAttention
from .block import TransformerBlock
from .generation import filter_logits, sample_next_token
from .mlp import MLP, SwiGLU
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalEmbedding
from .transformer import Decoder, DecoderConfig, Encoder

__all__ = [
    "MultiHeadAttention", "TransformerBlock", "MLP", "SwiGLU", "Encoder", "Decoder", "DecoderConfig",
    "RotaryEmbedding", "SinusoidalEmbedding", "LearnedPositionalEmbedding", "ALiBi", "positional", "compat",
    "fused",
    "filter_logits", "sample_next_token",
]
