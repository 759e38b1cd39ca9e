"""Hugging Face BERT tensor names -> ``qkv.models.bert.BertModel`` parameter names.

A Hugging Face BERT stores ``embeddings.*`` and ``encoder.layer.{i}.*``, prefixed with the
family name (``bert.``, ``roberta.``) when saved from a model with a task head. The prefix is
found from the word-embedding table; task heads (``cls.*``, ``lm_head.*``), the pooler and the
``embeddings.position_ids`` buffer are not used. Old checkpoints name LayerNorm parameters
``gamma``/``beta``; both spellings load.
"""

from __future__ import annotations

from torch import Tensor, nn

from .checkpoint import Checkpoint
from .errors import CheckpointError

#: Our embedding modules -> Hugging Face names.
EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
}

#: Submodules of one ``qkv.nn.TransformerBlock`` -> names inside Hugging Face ``encoder.layer.{i}``.
LAYER_NAMES = {
    "attn.q_proj": "attention.self.query",
    "attn.k_proj": "attention.self.key",
    "attn.v_proj": "attention.self.value",
    "attn.out_proj": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
    "mlp_norm": "output.LayerNorm",
}

#: Stored tensors inside the encoder's namespace that the model does not need.
UNUSED = ("embeddings.position_ids",)

_OLD_LAYER_NORM_NAMES = {"weight": "gamma", "bias": "beta"}


def hf_name(name: str) -> str:
    """The Hugging Face name (without family prefix) of our parameter ``name``."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, part = module.split(".", 2)
        return f"encoder.layer.{index}.{LAYER_NAMES[part]}.{param}"
    return f"{EMBEDDING_NAMES[module]}.{param}"


def find_prefix(checkpoint: Checkpoint) -> str:
    """The prefix in front of ``embeddings.word_embeddings.weight`` ("" or e.g. "bert.")."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = sorted(name[: -len(anchor)] for name in checkpoint.names() if name.endswith(anchor))
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    if not prefixes:
        raise CheckpointError("is missing (looked for it with and without a prefix such as 'bert.'); is this a "
                              "BERT-family checkpoint?", file=checkpoint.weights_file, tensor=anchor)
    if len(prefixes) > 1:
        raise CheckpointError(f"is stored under several prefixes {prefixes}; cannot tell which model to load",
                              file=checkpoint.weights_file, tensor=anchor)
    return prefixes[0]


def _stored_name(checkpoint: Checkpoint, prefix: str, name: str) -> str:
    stored = prefix + hf_name(name)
    if stored in checkpoint:
        return stored
    module, param = stored.rsplit(".", 1)
    if module.endswith("LayerNorm") and f"{module}.{_OLD_LAYER_NORM_NAMES[param]}" in checkpoint:
        return f"{module}.{_OLD_LAYER_NORM_NAMES[param]}"
    raise CheckpointError(f"is missing (needed for {name})", file=checkpoint.weights_file, tensor=stored)


def load_bert_weights(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's tensors into ``model`` (a ``BertModel``), checking every name and shape.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape or a non-float dtype, or the file
            holds encoder tensors the configuration does not account for (e.g. more layers).
    """
    prefix = find_prefix(checkpoint)
    targets = model.state_dict()
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, target in targets.items():
        stored = _stored_name(checkpoint, prefix, name)
        file = checkpoint.file_of(stored)
        shape = checkpoint.shape(stored)
        if shape != tuple(target.shape):
            raise CheckpointError(f"has shape {shape}, but the model described by config.json needs "
                                  f"{tuple(target.shape)} (for {name})", file=file, tensor=stored)
        tensor = checkpoint.tensor(stored)
        if not tensor.is_floating_point():
            raise CheckpointError(f"has dtype {tensor.dtype}; a floating-point weight was expected", file=file,
                                  tensor=stored)
        state[name] = tensor
        used.add(stored)
    encoder_names = (n for n in checkpoint.names() if n.startswith((prefix + "embeddings.", prefix + "encoder.")))
    for stored in sorted(encoder_names):
        if stored not in used and stored[len(prefix):] not in UNUSED:
            raise CheckpointError("is not part of the model described by config.json (more layers, or another "
                                  "architecture, than the config says?)", file=checkpoint.file_of(stored),
                                  tensor=stored)
    model.load_state_dict(state, strict=True)


def check_sizes(config, checkpoint: Checkpoint, config_file) -> None:
    """Compare the sizes in ``config.json`` with the weight files' headers, before the model is
    built: a config that claims 20,000 layers or a vocabulary of 10**9 fails here, naming the
    field, instead of allocating gigabytes first. Reads only headers (shapes and names)."""
    prefix = find_prefix(checkpoint)
    expected = {  # tensor -> the config fields its shape must equal
        "embeddings.word_embeddings.weight": ("vocab_size", "hidden_size"),
        "embeddings.position_embeddings.weight": ("max_position_embeddings", "hidden_size"),
        "embeddings.token_type_embeddings.weight": ("type_vocab_size", "hidden_size"),
        "encoder.layer.0.intermediate.dense.weight": ("intermediate_size", "hidden_size"),
    }
    for name, fields in expected.items():
        stored = prefix + name
        if stored not in checkpoint:
            continue  # load_bert_weights names what is missing
        shape = checkpoint.shape(stored)
        needed = tuple(getattr(config, field) for field in fields)
        if shape != needed:
            wrong = [f for f, got, want in zip(fields, shape, needed) if got != want] or list(fields)
            claims = ", ".join(f"{f}={getattr(config, f)}" for f in wrong)
            raise CheckpointError(f"has shape {shape}, but {config_file} ({claims}) needs {needed}; checked "
                                  "before building the model", file=checkpoint.file_of(stored), tensor=stored)
    layer_prefix = prefix + "encoder.layer."
    layers = {name[len(layer_prefix):].split(".", 1)[0] for name in checkpoint.names()
              if name.startswith(layer_prefix)}
    count = len({n for n in layers if n.isdigit()})
    if count < config.num_hidden_layers:  # fewer in config.json: the unexpected tensors are named on loading
        raise CheckpointError(f"field 'num_hidden_layers' is {config.num_hidden_layers}, but "
                              f"{checkpoint.weights_file} stores {count} layers", file=config_file)
