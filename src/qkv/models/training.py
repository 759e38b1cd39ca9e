"""Training the small causal LM with teacher forcing: every position of a window predicts the next
byte in one pass, under the causal mask.

Deterministic given the seed: initial weights from ``torch.manual_seed(seed)``, training windows
from their own generator, evaluation windows from a third, fixed one (so evaluating never changes
what is trained on). Checkpoints hold the optimizer and the generators' states, so a resumed run
continues bit for bit where the interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..nn import Decoder
from ..nn.transformer import DecoderConfig
from ..validate import positive_int
from . import gpt
from .corpus import Corpus


@dataclass
class TrainSettings:
    steps: int = 600
    batch_size: int = 32
    context: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    seed: int = 0
    val_fraction: float = 0.05

    def __post_init__(self):
        for name in ("steps", "batch_size", "context", "eval_every", "eval_batches", "checkpoint_every"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        for name, ok, expected in (("lr", 0 < self.lr < math.inf, "a finite number > 0"),
                                   ("grad_clip", self.grad_clip > 0, "> 0"),
                                   ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite number >= 0"),
                                   ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                                   ("val_fraction", 0 < self.val_fraction < 1, "in (0, 1)")):
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine decay towards ``min_lr_ratio * lr``,
        reached at step ``steps`` (just after the last step taken)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Decoder, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


def lm_loss(model: Decoder, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a teacher-forced causal pass."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: Decoder, corpus: Corpus, settings: TrainSettings) -> float:
    """Mean validation loss over a fixed set of windows."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed + 2)
    losses = [lm_loss(model, *corpus.batch("val", settings.batch_size, settings.context, generator)).item()
              for _ in range(settings.eval_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def check_resumable(meta: dict, settings: TrainSettings, model_config: DecoderConfig, text_sha256: str) -> None:
    """Refuse to resume with settings, architecture or text other than the checkpoint's; only
    ``steps`` may grow (the cosine schedule then stretches to the new total from this step on)."""
    saved_settings, saved_model = TrainSettings(**meta["train"]), DecoderConfig(**meta["model"])
    changed = [f"{name} ({getattr(saved_settings, name)!r} in the checkpoint, {getattr(settings, name)!r} now)"
               for name in dataclasses.asdict(saved_settings)
               if name != "steps" and getattr(saved_settings, name) != getattr(settings, name)]
    changed += [f"model {name} ({getattr(saved_model, name)!r} in the checkpoint, {getattr(model_config, name)!r} now)"
                for name in dataclasses.asdict(saved_model) if getattr(saved_model, name) != getattr(model_config, name)]
    if meta.get("text_sha256") not in (None, text_sha256):
        changed.append("the training text (--text) differs from the one this run was trained on")
    if settings.steps < meta["step"]:
        changed.append(f"steps ({settings.steps}) is below the step already reached ({meta['step']})")
    if changed:
        raise ValueError("cannot resume: " + "; ".join(changed))


def train(out_dir: str | Path, text: str, settings: TrainSettings | None = None,
          model_config: DecoderConfig | None = None, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, log=print) -> dict:
    """Train (or, with ``resume``, continue training) a byte-level GPT and checkpoint it in ``out_dir``.

    ``stop_after`` ends this run after that many steps (the schedule still spans ``settings.steps``),
    as an interruption would. ``resume=True`` picks up from the checkpoint: ``settings`` and
    ``model_config`` default to the saved ones and must otherwise equal them, except that ``steps``
    may grow; the text must be the same. Returns a summary with the loss history and the unigram
    baseline.
    """
    out_dir = Path(out_dir)
    text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    history: list[dict] = []
    meta = gpt.read_meta(out_dir) if resume else None
    if resume:
        settings = settings or TrainSettings(**meta["train"])
        model_config = model_config or DecoderConfig(**meta["model"])
        check_resumable(meta, settings, model_config, text_sha256)
    settings = settings or TrainSettings()
    model_config = model_config or gpt.default_config()
    torch.manual_seed(settings.seed)
    model = Decoder(model_config)
    optimizer = make_optimizer(model, settings)
    data_generator = torch.Generator().manual_seed(settings.seed + 1)
    step = 0
    if resume:
        gpt.load_weights(model, out_dir)
        rng = gpt.load_trainer_state(out_dir, optimizer)
        data_generator.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        step, history = meta["step"], meta["history"]
    corpus = Corpus(text, settings.val_fraction)
    for split, data in (("training", corpus.train), ("validation", corpus.val)):
        if len(data) <= settings.context:
            raise ValueError(f"the text's {split} part has {len(data)} bytes, not more than the context of "
                             f"{settings.context}: use a longer --text or a smaller --context")
    baseline = corpus.unigram_loss()
    last = settings.steps if stop_after is None else min(settings.steps, step + stop_after)
    log(f"model: {gpt.count_parameters(model) / 1e6:.2f} M parameters, {model_config.num_layers} layers, "
        f"dim {model_config.dim}; corpus: {len(corpus.train):,} training / {len(corpus.val):,} validation bytes; "
        f"unigram baseline {baseline:.3f} nats/byte")
    model.train()
    tokens_per_step = settings.batch_size * settings.context
    bar = tqdm(total=settings.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_second = 0.0

    def checkpoint(at: int) -> None:
        gpt.save_checkpoint(out_dir, model, optimizer, step=at, train_settings=dataclasses.asdict(settings),
                            rng={"data": data_generator.get_state(), "torch": torch.get_rng_state()},
                            history=history, text_sha256=text_sha256)

    while step < last:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        inputs, targets = corpus.batch("train", settings.batch_size, settings.context, data_generator)
        loss = lm_loss(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step += 1
        window_steps += 1
        elapsed = time.perf_counter() - window_start
        tokens_per_second = window_steps * tokens_per_step / elapsed
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_second:,.0f}")
        bar.update(1)
        if step % settings.eval_every == 0 or step == settings.steps:
            val = evaluate(model, corpus, settings)
            history.append({"step": step, "train_loss": round(loss.item(), 5), "val_loss": round(val, 5),
                            "tokens_per_second": round(tokens_per_second)})
            (bar.write if progress else log)(f"step {step:>5}: train loss {loss.item():.3f}, val loss {val:.3f} "
                                             f"(unigram {baseline:.3f}), {tokens_per_second:,.0f} tokens/s")
            window_start, window_steps = time.perf_counter(), 0
        if step % settings.checkpoint_every == 0 or step == last:
            checkpoint(step)
    bar.close()
    return {"step": step, "history": history, "unigram_loss": baseline, "out_dir": str(out_dir),
            "parameters": gpt.count_parameters(model)}
