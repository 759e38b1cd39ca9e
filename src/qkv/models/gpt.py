"""A small byte-level GPT: a :class:`qkv.nn.Decoder` plus checkpoints on disk.

A checkpoint is a directory: ``config.json`` (the model's :class:`~qkv.nn.transformer.DecoderConfig`,
the training settings and the step reached), ``model.safetensors`` (weights) and
``trainer.safetensors`` (optimizer moments and random-number-generator states, so that training
resumes bit for bit).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from ..nn import Decoder
from ..nn.transformer import DecoderConfig
from .corpus import VOCAB_SIZE

CONFIG, WEIGHTS, TRAINER = "config.json", "model.safetensors", "trainer.safetensors"


def default_config(**overrides) -> DecoderConfig:
    """The default byte-level model: 4 layers of width 128, 4 heads, RoPE, SwiGLU, RMSNorm
    (about 0.8 M parameters; a few minutes of training on 2 CPU cores)."""
    fields = dict(vocab_size=VOCAB_SIZE, dim=128, num_layers=4, num_heads=4, mlp_dim=352, positional="rope",
                  norm="rmsnorm", activation="swiglu", tie_weights=True)
    fields.update(overrides)
    return DecoderConfig(**fields)


def save_checkpoint(directory: str | Path, model: Decoder, optimizer: torch.optim.Optimizer, *, step: int,
                    train_settings: dict, rng: dict[str, torch.Tensor], history: list[dict],
                    text_sha256: str | None = None) -> None:
    """Write ``model``, ``optimizer`` state and RNG states to ``directory`` (created if needed).

    Each file is written under a temporary name and then renamed over the old one, ``config.json``
    last; both weight files record the step in their metadata, so a save cut short (the old
    ``config.json`` beside a new weight file) is detected on loading rather than silently resumed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stamp = {"step": str(step)}
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{name}": value for index, moments in state["state"].items()
               for name, value in moments.items()}
    tensors.update({f"rng.{name}": value for name, value in rng.items()})
    meta = {"model": dataclasses.asdict(model.config), "train": train_settings, "step": step,
            "param_groups": state["param_groups"], "history": history, "tokenizer": "utf-8 bytes",
            "text_sha256": text_sha256}
    save_model(model, str(directory / (WEIGHTS + ".tmp")), metadata=stamp)
    save_file(tensors, str(directory / (TRAINER + ".tmp")), metadata=stamp)
    (directory / (CONFIG + ".tmp")).write_text(json.dumps(meta, indent=1))
    for name in (WEIGHTS, TRAINER, CONFIG):
        os.replace(directory / (name + ".tmp"), directory / name)


def _check_step(path: Path, meta: dict) -> None:
    """Raise if the weight file at ``path`` was written at another step than ``config.json`` says."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("step")
    except Exception as err:  # safetensors reports a damaged header with its own error type
        raise ValueError(f"checkpoint: {path} is damaged: {err}") from err
    if saved is not None and saved != str(meta["step"]):
        raise ValueError(f"checkpoint: {path} is from step {saved} but {CONFIG} says step {meta['step']}: "
                         "a save was interrupted; the checkpoint is inconsistent")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {CONFIG} in {directory} (train one with `qkv train --out {directory}`)")
    return json.loads(path.read_text())


def load_weights(model: Decoder, directory: str | Path) -> None:
    """Load ``model.safetensors`` from ``directory`` into ``model`` (every tensor must fit)."""
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint: no {WEIGHTS} in {directory}")
    _check_step(weights, read_meta(directory))
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as err:  # safetensors' own error types, torch's RuntimeError on a size mismatch
        detail = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"checkpoint: {weights} does not fit the model in {CONFIG} or is damaged: "
                         + " ".join(detail[1:2] or detail[:1])) from err
    if missing or unexpected:
        raise ValueError(f"checkpoint: {weights} does not fit the model in {CONFIG}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_model_from(directory: str | Path) -> Decoder:
    """The model saved in ``directory``, in eval mode."""
    model = Decoder(DecoderConfig(**read_meta(directory)["model"]))
    load_weights(model, directory)
    return model.eval()


def load_trainer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Restore ``optimizer`` from ``directory``; return the saved RNG states by name."""
    meta = read_meta(directory)
    _check_step(Path(directory) / TRAINER, meta)
    tensors = load_file(str(Path(directory) / TRAINER))
    moments: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for key, value in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "rng":
            rng[rest] = value
        else:
            index, name = rest.split(".", 1)
            moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
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
