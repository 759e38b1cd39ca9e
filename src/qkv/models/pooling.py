"""Token vectors -> one sentence vector, as a sentence-transformers checkpoint prescribes.

A sentence-transformers directory lists its stages in ``modules.json`` (transformer, pooling,
optionally normalisation) and the pooling in ``<pooling dir>/config.json``: which of CLS, max,
mean and mean-times-sqrt-length vectors to concatenate. A plain Hugging Face directory has neither;
sentence-transformers then mean-pools without normalising, and so does :func:`read_pooling`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import read_json
from .errors import CheckpointError

#: Pooling modes in the order their vectors are concatenated, with their config.json flags.
MODES = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
         "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
_UNSUPPORTED_FLAGS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")

#: sentence-transformers module classes we can run (their package path varies between versions).
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """How to turn token vectors into a sentence vector.

    ``modes`` are concatenated in order; ``normalize`` scales the result to unit length;
    ``max_length`` is the token limit sentence-transformers applies (None = the model's).
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_length: int | None = None

    def __call__(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``hidden (B, N, E)``, ``attention_mask (B, N)`` (1 = real token) -> ``(B, E * len(modes))``."""
        real = attention_mask.to(hidden.dtype).unsqueeze(-1)
        counts = real.sum(dim=1).clamp(min=1e-9)
        vectors = []
        for mode in self.modes:
            if mode == "cls":
                vectors.append(hidden[:, 0])
            elif mode == "max":
                vectors.append(hidden.masked_fill(real == 0, float("-inf")).amax(dim=1))
            else:
                total = (hidden * real).sum(dim=1)
                vectors.append(total / (counts if mode == "mean" else counts.sqrt()))
        out = torch.cat(vectors, dim=-1)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


def read_pooling(directory: Path) -> Pooling:
    """The pooling a checkpoint directory prescribes (mean, not normalised, when it has no
    ``modules.json``). Errors name the file and the field."""
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [m["type"] for m in modules]
        paths = [m.get("path", "") for m in modules]
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"is not a sentence-transformers module list ({e})", file=modules_file) from e
    kinds = [t.rsplit(".", 1)[-1] for t in types]
    for kind, full in zip(kinds, types):
        if kind not in _KNOWN_MODULES:
            raise CheckpointError(f"lists module {full!r}; qkv supports Transformer, Pooling and Normalize only",
                                  file=modules_file)
    modes: tuple[str, ...] = ("mean",)
    if "Pooling" in kinds:
        pooling_file = directory / paths[kinds.index("Pooling")] / "config.json"
        modes = _read_modes(read_json(pooling_file, "pooling configuration"), pooling_file)
    return Pooling(modes=modes, normalize="Normalize" in kinds, max_length=_read_max_length(directory))


def _read_modes(config: dict, file: Path) -> tuple[str, ...]:
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise CheckpointError(f"field {flag!r} is set; qkv supports {', '.join(MODES.values())}", file=file)
    if isinstance(config.get("pooling_mode"), str):  # newer files name the mode directly
        mode = {"mean_sqrt_len_tokens": "mean_sqrt_len"}.get(config["pooling_mode"], config["pooling_mode"])
        if mode not in MODES:
            raise CheckpointError(f"field 'pooling_mode' is {config['pooling_mode']!r}; qkv supports "
                                  f"{', '.join(MODES)}", file=file)
        return (mode,)
    modes = tuple(mode for mode, flag in MODES.items() if config.get(flag))
    if not modes:
        raise CheckpointError(f"enables no pooling mode; set one of {', '.join(MODES.values())}", file=file)
    return modes


def _read_max_length(directory: Path) -> int | None:
    file = directory / "sentence_bert_config.json"
    if not file.is_file():
        return None
    value = read_json(file, "sentence-transformers configuration").get("max_seq_length")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise CheckpointError(f"field 'max_seq_length' must be a positive integer, got {value!r}", file=file)
    return value
