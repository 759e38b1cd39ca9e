"""A small byte-level GPT: a :class:`qkv.nn.Decoder` plus checkpoints on disk.

A training directory holds its checkpoint in a step directory ``step-<step>/`` named by the file
``LATEST``: ``config.json`` (the model's :class:`~qkv.nn.transformer.DecoderConfig`, the training
settings and the step reached), ``model.safetensors`` (weights) and ``trainer.safetensors``
(optimizer moments and random-number-generator states, so that training resumes bit for bit).
Saving writes a new step directory and then switches ``LATEST`` atomically, so that a crash at
any instant leaves a complete checkpoint (see :func:`save_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..nn import Decoder
from ..nn.transformer import DecoderConfig
from .config import read_json
from .corpus import VOCAB_SIZE
from .errors import CheckpointError

CONFIG, WEIGHTS, TRAINER = "config.json", "model.safetensors", "trainer.safetensors"


def default_config(**overrides) -> DecoderConfig:
    """The default byte-level model: 4 layers of width 128, 4 heads, RoPE, SwiGLU, RMSNorm
    (about 0.8 M parameters; a few minutes of training on 2 CPU cores)."""
    fields = dict(vocab_size=VOCAB_SIZE, dim=128, num_layers=4, num_heads=4, mlp_dim=352, positional="rope",
                  norm="rmsnorm", activation="swiglu", tie_weights=True)
    fields.update(overrides)
    return DecoderConfig(**fields)


#: The file naming the complete checkpoint (a step directory) in a training directory.
POINTER = "LATEST"
#: What ``config.json`` must hold.
_META_FIELDS = {"model": dict, "train": dict, "step": int, "param_groups": list, "history": list}


def checkpoint_dir(directory: str | Path) -> Path:
    """The directory holding the complete checkpoint of ``directory``: the step directory that its
    ``LATEST`` file names, or ``directory`` itself (a step directory, or an older flat checkpoint)."""
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.is_file():
        return directory
    name = pointer.read_text(encoding="utf-8").strip()
    if not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(f"must name a step directory inside {directory}, got {name!r}", file=pointer)
    target = directory / name
    if not target.is_dir():
        raise CheckpointError(f"names {name!r}, which is not a directory in {directory}", file=pointer)
    return target


def checkpoint_marker(directory: str | Path | None) -> str:
    """The file whose presence makes ``directory`` a checkpoint: ``LATEST``, or ``config.json`` for
    a step directory or an older flat checkpoint (what the CLI checks before loading)."""
    return POINTER if directory is not None and (Path(directory) / POINTER).is_file() else CONFIG


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_directory(path: Path) -> None:
    """Make the renames and new files in ``path`` durable (where the OS allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of a tied tensor (safetensors stores each once)."""
    seen, tensors = set(), {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            tensors[name] = t.detach().contiguous()
    return tensors


def save_checkpoint(directory: str | Path, model: Decoder, optimizer: torch.optim.Optimizer, *, step: int,
                    train_settings: dict, rng: dict[str, torch.Tensor], history: list[dict],
                    text_sha256: str | None = None) -> Path:
    """Write ``model``, ``optimizer`` state and RNG states as a new checkpoint of ``directory``.

    Crash-safe: the files go into a new step directory ``step-<step>`` (each flushed to disk),
    then the ``LATEST`` pointer is switched to it with one atomic ``os.replace``, and only then are
    older step directories removed. Interrupted at any instant, ``directory`` holds either the
    previous complete checkpoint or the new one. Returns the new step directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    current = checkpoint_dir(directory) if (directory / POINTER).is_file() else None
    name, n = f"step-{step:08d}", 1
    while current is not None and current.name == name:  # saving the same step again: never overwrite it
        name, n = f"step-{step:08d}.{n}", n + 1
    target = directory / name
    if target.exists():  # left by a save that never switched the pointer
        shutil.rmtree(target)
    target.mkdir()
    stamp = {"step": str(step)}
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value for index, moments in state["state"].items()
               for key, value in moments.items()}
    tensors.update({f"rng.{key}": value for key, value in rng.items()})
    meta = {"model": dataclasses.asdict(model.config), "train": train_settings, "step": step,
            "param_groups": state["param_groups"], "history": history, "tokenizer": "utf-8 bytes",
            "text_sha256": text_sha256}
    _write_durably(target / WEIGHTS, save(_unique_tensors(model), metadata=stamp))
    _write_durably(target / TRAINER, save(tensors, metadata=stamp))
    _write_durably(target / CONFIG, json.dumps(meta, indent=1).encode("utf-8"))
    _sync_directory(target)
    _write_durably(directory / (POINTER + ".tmp"), (name + "\n").encode("utf-8"))
    os.replace(directory / (POINTER + ".tmp"), directory / POINTER)
    _sync_directory(directory)
    for old in sorted(directory.iterdir()):  # the new checkpoint is whole and current: drop the others
        if old.name.startswith("step-") and old.name != name and old.is_dir():
            shutil.rmtree(old)
    for flat in (CONFIG, WEIGHTS, TRAINER):  # an older flat checkpoint in the same directory
        if (directory / flat).is_file():
            (directory / flat).unlink()
    return target


def _stored_step(path: Path, meta: dict) -> None:
    """Refuse the weight file at ``path`` unless it records the step that ``config.json`` says."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("step")
    except Exception as err:  # safetensors reports a damaged header with its own error type
        raise CheckpointError(f"is damaged: {err}", file=path) from err
    if saved is None:
        raise CheckpointError(f"has no step in its metadata, so it cannot be matched with {CONFIG} "
                              f"(step {meta['step']}); it was not written by qkv train", file=path)
    if saved != str(meta["step"]):
        raise CheckpointError(f"is from step {saved} but {CONFIG} says step {meta['step']}: a save was "
                              "interrupted; the checkpoint is inconsistent", file=path)


def read_meta(directory: str | Path) -> dict:
    """``config.json`` of the checkpoint in ``directory``, checked (errors name the file)."""
    path = checkpoint_dir(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {CONFIG} in {directory} "
                                f"(train one with `qkv train --out {directory}`)")
    meta = read_json(path, "training checkpoint configuration")
    for field, kind in _META_FIELDS.items():
        if field not in meta:
            raise CheckpointError(f"field {field!r} is missing", file=path)
        if not isinstance(meta[field], kind) or (kind is int and isinstance(meta[field], bool)):
            raise CheckpointError(f"field {field!r} must be a {kind.__name__}, got {type(meta[field]).__name__}",
                                  file=path)
    try:
        DecoderConfig(**meta["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"field 'model' is not a valid model configuration: {err}", file=path) from err
    from .training import TrainSettings  # here, not at the top: training imports this module

    try:
        TrainSettings(**meta["train"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"field 'train' is not valid training settings: {err}", file=path) from err
    return meta


def load_weights(model: Decoder, directory: str | Path) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model``: every tensor must be there,
    with the model's shape and dtype (nothing is cast)."""
    weights = checkpoint_dir(directory) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint: no {WEIGHTS} in {directory}")
    _stored_step(weights, read_meta(directory))
    expected = model.state_dict()
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = set(f.keys())
            unexpected = sorted(stored - set(expected))
            if unexpected:
                raise CheckpointError(f"does not fit the model in {CONFIG}: unexpected tensors {unexpected[:5]}",
                                      file=weights)
            state = {}
            for name in sorted(stored):
                info = f.get_slice(name)
                want = expected[name]
                shape, dtype = tuple(info.get_shape()), _DTYPES.get(info.get_dtype())
                if shape != tuple(want.shape):
                    raise CheckpointError(f"has shape {shape}, but the model in {CONFIG} needs "
                                          f"{tuple(want.shape)}: it does not fit the model", file=weights, tensor=name)
                if dtype != want.dtype:
                    raise CheckpointError(f"is {info.get_dtype()}, expected {str(want.dtype).replace('torch.', '')}: "
                                          "refusing to cast weights", file=weights, tensor=name)
                state[name] = f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' own error types for damaged data
        raise CheckpointError(f"is damaged: {err}", file=weights) from err
    tied = {name for name in expected if name not in state and _tied_to(model, name, state)}
    missing = sorted(set(expected) - set(state) - tied)
    if missing:
        raise CheckpointError(f"does not fit the model in {CONFIG}: missing tensors {missing[:5]}", file=weights)
    model.load_state_dict(state, strict=False)


#: safetensors dtype names -> torch dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _tied_to(model: nn.Module, name: str, state: dict) -> bool:
    """Whether ``name`` shares its storage with a tensor in ``state`` (tied embeddings)."""
    params = model.state_dict()
    ptr = params[name].untyped_storage().data_ptr()
    return any(params[other].untyped_storage().data_ptr() == ptr for other in state)


def load_model_from(directory: str | Path) -> Decoder:
    """The model saved in ``directory``, in eval mode."""
    model = Decoder(DecoderConfig(**read_meta(directory)["model"]))
    load_weights(model, directory)
    return model.eval()


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Restore ``optimizer`` from ``directory``; return the saved RNG states by name."""
    meta = read_meta(directory)
    path = checkpoint_dir(directory) / TRAINER
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {TRAINER} in {directory}")
    _stored_step(path, meta)
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"is damaged: {err}", file=path) from err
    moments: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if kind == "rng" and rest and value.dtype == torch.uint8:
            rng[rest] = value
        elif kind == "optimizer" and index.isdigit() and name and value.is_floating_point():
            moments.setdefault(int(index), {})[name] = value
        else:
            raise CheckpointError("is not an optimizer moment ('optimizer.<i>.<name>', floating) or an RNG state "
                                  f"('rng.<name>', uint8); got {value.dtype}", file=path, tensor=key)
    try:
        optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"does not fit the optimizer: {err}", file=path) from err
    for missing in ("data", "torch"):
        if missing not in rng:
            raise CheckpointError(f"has no RNG state 'rng.{missing}'", file=path)
    return rng


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate_without_cache(model: Decoder, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                           top_k: int | None = None, top_p: float | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Like ``model.generate`` but recomputing the whole sequence for every new token (``O(n^2)``
    per token): the baseline the KV cache is measured against. Returns ``(B, max_new_tokens)``."""
    from ..nn.generation import sample_next_token

    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(ids)[:, -1]
        token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids[:, input_ids.shape[1]:]
