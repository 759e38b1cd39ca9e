"""``qkv train``: train the small byte-level causal LM with teacher forcing."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

from qkv.models import corpus, gpt
from qkv.models.training import TrainSettings, train
from qkv.nn.transformer import DecoderConfig

from .usage import UsageError, existing_file, positive, trained_checkpoint

DEFAULTS = TrainSettings()
#: flag -> TrainSettings field, and flag -> model field; a flag left unset keeps the default (or,
#: with --resume, the checkpoint's value).
SETTING_FLAGS = {"steps": "steps", "batch_size": "batch_size", "context": "context", "lr": "lr",
                 "eval_every": "eval_every", "seed": "seed"}
MODEL_FLAGS = {"dim": "dim", "layers": "num_layers", "heads": "num_heads"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", metavar="FILE", help="UTF-8 training text (default: Python's pydoc_data topics)")
    parser.add_argument("--out", default="out/gpt", help="checkpoint directory (default: out/gpt)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run checkpointed in --out (same settings; --steps may grow)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an --out that already holds files, replacing its checkpoint "
                             "(default: refuse)")
    parser.add_argument("--steps", type=int, help=f"total optimizer steps (default {DEFAULTS.steps})")
    parser.add_argument("--stop-after", type=int, metavar="N", help="stop this run after N steps, to resume later (default: run to --steps)")
    parser.add_argument("--batch-size", type=int, help=f"windows per step (default {DEFAULTS.batch_size})")
    parser.add_argument("--context", type=int, help=f"bytes per training window (default {DEFAULTS.context})")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS.lr})")
    parser.add_argument("--eval-every", type=int, help=f"steps between evaluations (default {DEFAULTS.eval_every})")
    parser.add_argument("--seed", type=int, help=f"random seed (default {DEFAULTS.seed})")
    parser.add_argument("--dim", type=int, help="model width (default 128)")
    parser.add_argument("--layers", type=int, help="transformer blocks (default 4)")
    parser.add_argument("--heads", type=int, help="attention heads (default 4)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (evaluation lines still print; default: a bar)")


def _given(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    return {field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag) is not None}


def _check_options(args: argparse.Namespace) -> None:
    """Everything checkable before the text is read and the model built."""
    existing_file("--text", args.text)
    for flag in ("steps", "batch_size", "context", "eval_every", "dim", "layers", "heads", "stop_after"):
        positive("--" + flag.replace("_", "-"), getattr(args, flag))
    positive("--lr", args.lr)
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other: continue the run, or replace it")
    if args.resume:
        trained_checkpoint("--out", out, hint=" to resume (train one first: qkv train --out DIR)")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory, but {out} is a file")
    elif out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} already holds files; pass --resume to continue its run or --overwrite "
                         "to replace it")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    text = corpus.read_text(args.text)
    settings_changes, model_changes = _given(args, SETTING_FLAGS), _given(args, MODEL_FLAGS)
    if "dim" in model_changes:  # SwiGLU width ~ 8/3 of the model width, rounded to 32
        model_changes["mlp_dim"] = (model_changes["dim"] * 8 // 3 + 31) // 32 * 32
    if args.overwrite:  # the old run's checkpoint goes: its step directories, LATEST, flat files
        out = Path(args.out)
        for old in out.glob("step-*"):
            if old.is_dir():
                shutil.rmtree(old)
        for name in (gpt.POINTER, gpt.CONFIG, gpt.WEIGHTS, gpt.TRAINER):
            (out / name).unlink(missing_ok=True)
    if args.resume:
        meta = gpt.read_meta(args.out)
        saved_settings, saved_model = TrainSettings(**meta["train"]), DecoderConfig(**meta["model"])
        settings = dataclasses.replace(saved_settings, **settings_changes)
        config = dataclasses.replace(saved_model, **model_changes)
    else:
        settings, config = TrainSettings(**settings_changes), gpt.default_config(**model_changes)
    summary = train(args.out, text, settings, config, resume=args.resume, stop_after=args.stop_after,
                    progress=not args.no_progress)
    final = summary["history"][-1] if summary["history"] else None
    if summary["step"] < settings.steps:  # --stop-after: not done, and the last evaluation may be older
        measured = (f" (last validation loss {final['val_loss']:.3f} nats/byte, at step {final['step']})"
                    if final else "")
        print(f"stopped at step {summary['step']} of {settings.steps}{measured}; checkpoint in {summary['out_dir']}; "
              "continue with --resume")
    elif final:
        beat = summary["unigram_loss"] - final["val_loss"]
        side = "below" if beat >= 0 else "above (train longer: --steps)"
        print(f"done: step {summary['step']}, validation loss {final['val_loss']:.3f} nats/byte, {abs(beat):.3f} "
              f"{side} the unigram baseline of {summary['unigram_loss']:.3f}; checkpoint in {summary['out_dir']}")
        print(f"next: qkv generate --checkpoint {summary['out_dir']} --prompt 'The '")
    else:
        print(f"done: step {summary['step']}; checkpoint in {summary['out_dir']}")
    return 0
