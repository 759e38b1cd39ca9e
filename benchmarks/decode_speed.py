"""Decode speed: tokens/s with a KV cache versus recomputing the whole sequence for every token.

A small decoder (``qkv.nn.Decoder``) generates at contexts 256 .. 4096. *Cached*: the context is
prefilled into a ``qkv.cache.KVCache`` once (not timed), then each new token is one forward step of
a single token over the cache. *Recompute*: each new token is a full causal forward pass over the
context plus that token, which is what decoding without a cache costs. A cached step does
``O(context)`` attention work and a recomputation ``O(context^2)``; the log-log plot shows the
slopes. Each cached token's logits are checked against the recomputation's before timing.

    python benchmarks/decode_speed.py                  # writes benchmarks/results/decode_speed.{json,png}
    python benchmarks/decode_speed.py --contexts 256 512 --steps 8   # quick look

Results depend on the machine; the JSON records device, thread count, versions, date and load
average (other work on the machine slows both columns).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import qkv
from qkv.cache import KVCache
from qkv.nn import Decoder

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model: Decoder, context: int, steps: int, repeats: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, context + steps), generator=torch.Generator().manual_seed(context))
    # Cached: prefill `context` tokens, then time `steps` single-token steps (the context grows by one each).
    cache = KVCache(batch_size=1, capacity=context + steps, **model.cache_spec())
    model(ids[:, :context], cache)
    step_times = []
    for t in range(context, context + steps):
        start = time.perf_counter()
        logits = model(ids[:, t:t + 1], cache)
        step_times.append(time.perf_counter() - start)
        if t == context:  # the cached step computes what a full pass computes
            full = model(ids[:, :t + 1])[:, -1:]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    cached = statistics.median(step_times)
    recompute = seconds(lambda: model(ids[:, :context + 1]), repeats)
    return {"context": context, "cached_s_per_token": cached, "recompute_s_per_token": recompute,
            "cached_tokens_per_s": 1 / cached, "recompute_tokens_per_s": 1 / recompute, "speedup": recompute / cached}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    cached = [r["cached_s_per_token"] * 1e3 for r in rows]
    recompute = [r["recompute_s_per_token"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.loglog(ctx, recompute, "o-", label="recompute full sequence", color="tab:red")
    ax.loglog(ctx, cached, "o-", label="KV cache (one token per step)", color="tab:blue")
    # reference slopes: context^2 through the last recomputation, context through the last cached step
    ax.loglog(ctx, [recompute[-1] * (c / ctx[-1]) ** 2 for c in ctx], "--", color="gray", label="∝ context²")
    ax.loglog(ctx, [cached[-1] * c / ctx[-1] for c in ctx], ":", color="gray", label="∝ context")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| context | cached tokens/s | recompute tokens/s | speed-up |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['cached_tokens_per_s']:.1f} | {r['recompute_tokens_per_s']:.2f} "
                     f"| {r['speedup']:.0f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=32, help="cached decode steps timed per context")
    parser.add_argument("--repeats", type=int, default=3, help="timed recomputations per context")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a single-token step is too small to split, and "
                             "extra threads only add synchronisation, badly so on a busy machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = dict(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads)
    model = Decoder(**config).eval()
    load_before = os.getloadavg()
    rows = []
    for context in args.contexts:
        rows.append(measure(model, context, args.steps, args.repeats, args.vocab))
        r = rows[-1]
        print(f"context {context:>6}: cached {r['cached_tokens_per_s']:8.1f} tok/s, "
              f"recompute {r['recompute_tokens_per_s']:7.2f} tok/s", flush=True)
    ctx = [r["context"] for r in rows]
    slopes = {"cached": loglog_slope(ctx, [r["cached_s_per_token"] for r in rows]),
              "recompute": loglog_slope(ctx, [r["recompute_s_per_token"] for r in rows])} if len(rows) > 1 else {}
    result = {
        "benchmark": "decode_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "name": cpu_name(), "logical_cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
                   "load_average_after": os.getloadavg()},
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "platform": platform.platform()},
        "model": {**config, "mlp_dim": 4 * args.dim, "positional": "rope", "activation": "swiglu",
                  "dtype": "float32", "batch_size": 1},
        "method": {"cached": f"median of {args.steps} single-token steps after prefilling the context",
                   "recompute": f"median of {args.repeats} full causal forward passes over context + 1 tokens"},
        "loglog_slopes": slopes,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"qkv.nn.Decoder d={args.dim} L={args.layers} H={args.heads}, batch 1, float32, "
             f"{torch.get_num_threads()} threads\n{cpu_name()}")
    plot(rows, args.out.with_suffix(".png"), title)
    print()
    print(table(rows))
    if slopes:
        print(f"\nlog-log slope of time per token vs context: cached {slopes['cached']:.2f}, "
              f"recompute {slopes['recompute']:.2f}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
