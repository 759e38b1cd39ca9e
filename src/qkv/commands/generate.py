"""``qkv generate``: sample text from a trained causal LM, decoding token by token from the KV
cache, and report tokens/s with the cache against recomputing the whole sequence per token."""

from __future__ import annotations

import argparse
import math
import time

import torch

from qkv.models import corpus, gpt

from .usage import UsageError, positive, trained_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="out/gpt", help="directory written by `qkv train`")
    parser.add_argument("--prompt", default="The ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest bytes (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the likeliest bytes holding this probability, in (0, 1] (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the run without the cache (default: time both)")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    positive("--max-new-tokens", args.max_new_tokens, allow_none=False)
    positive("--top-k", args.top_k)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    trained_checkpoint("--checkpoint", args.checkpoint, hint=" (train a model first: qkv train, or pass --checkpoint DIR)")
    model = gpt.load_model_from(args.checkpoint)
    prompt = corpus.encode(args.prompt)[None]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    cached, t_cached = _timed(lambda: model.generate(prompt, args.max_new_tokens, **sampling,
                                                     generator=torch.Generator().manual_seed(args.seed)))
    print(args.prompt + corpus.decode(cached[0].tolist()))
    n = cached.shape[1]
    print(f"\nwith KV cache:    {n} tokens in {t_cached:.2f} s = {n / t_cached:,.1f} tokens/s")
    if not args.no_compare:
        plain, t_plain = _timed(lambda: gpt.generate_without_cache(
            model, prompt, n, **sampling, generator=torch.Generator().manual_seed(args.seed)))
        same = "same tokens" if torch.equal(plain, cached) else "different tokens (float rounding changed a draw)"
        print(f"without cache:    {n} tokens in {t_plain:.2f} s = {n / t_plain:,.1f} tokens/s "
              f"({relative_speed(t_plain, t_cached)}; {same})")
    return 0


def relative_speed(t_plain: float, t_cached: float) -> str:
    """How the run without the cache compared: ``"13.1x slower"``, or ``"1.3x faster"`` where
    recomputing won (a few tokens of a tiny model), never ``"0.8x slower"``."""
    if t_plain >= t_cached:
        return f"{t_plain / t_cached:.1f}x slower"
    return f"{t_cached / t_plain:.1f}x faster"
