"""``qkv generate``: sample text from a trained causal LM, decoding token by token from the KV
cache, and report tokens/s with the cache against recomputing the whole sequence per token."""

from __future__ import annotations

import argparse
import time

import torch

from qkv.models import corpus, gpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="out/gpt", help="directory written by `qkv train`")
    parser.add_argument("--prompt", default="The ", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compare", action="store_true", help="skip the run without the cache")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    model = gpt.load_model_from(args.checkpoint)
    prompt = corpus.encode(args.prompt)[None]
    if prompt.shape[1] == 0:
        raise SystemExit("--prompt must not be empty")
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
              f"({t_plain / t_cached:.1f}x slower; {same})")
    return 0
