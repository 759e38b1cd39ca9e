"""Measure the peak memory of a block-pooled attention map at long length (CPU, Linux).

Builds random ``q, k`` of ``(1, heads, N, head_dim)`` float32, then computes
:func:`qkv.inspect.pooled_attention_map` and reports how much the process's resident memory
peaked above what it held before the call (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
next to what the dense ``(heads, N, N)`` float32 weights alone would take.

Usage::

    python benchmarks/pooled_map_memory.py                  # N=32768, 4 heads, causal, block 128
    python benchmarks/pooled_map_memory.py --n 8192 --mask none --reduce max
    python benchmarks/pooled_map_memory.py --json benchmarks/results/pooled_map_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

import qkv
from qkv.inspect import pooled_attention_map

MASKS = {"none": lambda n: None, "causal": lambda n: qkv.causal(),
         "window": lambda n: qkv.sliding_window(1024) | qkv.global_tokens([0])}


def status_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Make ``VmHWM`` restart from the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32768, help="sequence length (Nq = Nk)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--mask", choices=sorted(MASKS), default="causal")
    parser.add_argument("--reduce", choices=["mean", "max"], default="mean")
    parser.add_argument("--json", type=Path, help="also write the result (with environment) to this JSON file")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, args.n, args.head_dim, generator=g)
    k = torch.randn(1, args.heads, args.n, args.head_dim, generator=g)
    mask = MASKS[args.mask](args.n)
    pooled_attention_map(q[:, :, :256], k[:, :, :256], mask, block=args.block)  # warm up (lazy inits)

    before = status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    pooled = pooled_attention_map(q, k, mask, block=args.block, reduce=args.reduce)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")

    dense_bytes = args.heads * args.n * args.n * 4
    dense_gib = dense_bytes / 2**30
    environment = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "torch": torch.__version__, "qkv": qkv.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    print(", ".join(f"{key} {value}" for key, value in environment.items()))
    print(f"pooled_attention_map: N={args.n}, heads={args.heads}, head_dim={args.head_dim}, mask={args.mask}, "
          f"block={args.block}, reduce={args.reduce} -> map {tuple(pooled.shape)}")
    print(f"  inputs q + k: {(q.numel() + k.numel()) * 4 / 2**20:.0f} MiB; "
          f"dense float32 weights would take {dense_gib:.1f} GiB")
    print(f"  peak resident memory above the pre-call level: {(peak - before) / 1024:.0f} MiB "
          f"(process peak {peak / 1024:.0f} MiB); time {seconds:.1f} s")
    if args.json:
        row = {"seq": args.n, "heads": args.heads, "head_dim": args.head_dim, "mask": args.mask, "block": args.block,
               "reduce": args.reduce, "peak_rss_above_before_bytes": (peak - before) * 1024,
               "peak_rss_bytes": peak * 1024, "seconds": seconds, "dense_weights_bytes": dense_bytes}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment, "rows": [row]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
