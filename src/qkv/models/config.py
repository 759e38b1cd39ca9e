"""The architecture of a BERT-family checkpoint, read from its ``config.json`` and checked.

Only what the encoder needs is kept. Every value is validated here, so that a wrong architecture
fails with the file and the field named, before a single tensor is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

#: model_type -> how the family numbers positions. BERT counts from 0; the RoBERTa family counts
#: from ``pad_token_id + 1`` and gives padding the position ``pad_token_id``.
FAMILIES = {
    "bert": "from_zero",
    "roberta": "after_padding",
    "xlm-roberta": "after_padding",
    "camembert": "after_padding",
}

#: config ``hidden_act`` -> ``qkv.nn.TransformerBlock`` activation (only exact equivalents).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}

_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings")


def read_json(path: Path, what: str) -> dict:
    """The JSON object in ``path``; ``what`` says in errors what the file is for."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"is not valid JSON ({e})", file=path) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"must hold a JSON object, got {type(data).__name__}", file=path)
    return data


@dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT-family encoder (names as in Hugging Face ``config.json``)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def activation(self) -> str:
        """The ``qkv.nn.TransformerBlock`` activation equal to ``hidden_act``."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def position_offset(self) -> int:
        """Position id of the first token (0 for BERT, ``pad_token_id + 1`` for RoBERTa)."""
        return 0 if FAMILIES[self.model_type] == "from_zero" else self.pad_token_id + 1

    @property
    def max_tokens(self) -> int:
        """The longest input the position table covers."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dict(cls, d: dict, file: Path | str = "config.json") -> BertConfig:
        """Validate a parsed ``config.json``; errors name ``file`` and the field."""
        def fail(field: str, problem: str):
            raise CheckpointError(f"field {field!r} {problem}", file=file)

        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            archs = d.get("architectures")
            fail("model_type", f"is {model_type!r} (architectures: {archs}); qkv.models.bert loads BERT-family "
                               f"encoders: {', '.join(sorted(FAMILIES))}")
        for field in _REQUIRED_INTS:
            if field not in d:
                fail(field, "is missing")
        values = {f: d[f] for f in _REQUIRED_INTS}
        values["type_vocab_size"] = d.get("type_vocab_size", 2)
        values["pad_token_id"] = 0 if d.get("pad_token_id") is None else d["pad_token_id"]
        for field, v in values.items():
            minimum = 0 if field == "pad_token_id" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                fail(field, f"must be an integer >= {minimum}, got {v!r}")
        if values["hidden_size"] % values["num_attention_heads"]:
            fail("num_attention_heads", f"({values['num_attention_heads']}) must divide hidden_size "
                                        f"({values['hidden_size']})")
        hidden_act = d.get("hidden_act", "gelu")
        if hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"is {hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        eps = d.get("layer_norm_eps", 1e-12)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            fail("layer_norm_eps", f"must be a positive number, got {eps!r}")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            fail("position_embedding_type", f"is {position_type!r}; only 'absolute' is supported")
        for flag in ("is_decoder", "add_cross_attention"):
            if d.get(flag):
                fail(flag, "is true; qkv.models.bert loads encoders only")
        config = cls(**values, hidden_act=hidden_act, layer_norm_eps=float(eps), model_type=model_type)
        if config.max_tokens < 1:
            fail("max_position_embeddings", f"({config.max_position_embeddings}) leaves no positions after the "
                                            f"padding offset {config.position_offset}")
        return config

    @classmethod
    def from_file(cls, path: Path | str) -> BertConfig:
        """Read and validate ``config.json``."""
        path = Path(path)
        return cls.from_dict(read_json(path, "model configuration (config.json)"), file=path)
