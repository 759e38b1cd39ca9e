"""Backends side by side: tiled, sdpa, flex (FlexAttention through qkv), FlexAttention called
directly (``flex_direct``: its own ``create_block_mask``, compiled per shape) and qkv's automatic
choice, at N = 1k..16k for full, causal, sliding-window (1024), packed-document (8 per sequence),
prefix-LM (N/4) and window | global-token masks.

    python benchmarks/attention_speed.py                 # forward; ~30 minutes on 2 cores
    python benchmarks/attention_speed.py --backward      # forward + backward
    python benchmarks/attention_speed.py --reference     # also the materialising reference backend

Writes ``benchmarks/results/attention_speed_<device>[_backward].json`` (device, versions, date,
load average, every timing, flex's compile count) and prints a Markdown table. Per problem, every
backend, ``auto`` (``qkv.attention`` with ``backend=None``, dispatch included) and ``flex_direct``
run once to warm up (compile time is excluded: qkv's flex kernel compiles once per mask kind, on
its first row, flex_direct once per shape), then ``--repeat`` interleaved rounds, each running all
of them once; a time is the median over the rounds, so that a busy machine's load falls on every
column alike. ``auto`` runs after the backends, with qkv's flex kernels compiled: the steady state
of a training or inference loop.
"""

from __future__ import annotations

import argparse

import torch

from qkv import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--masks", nargs="+", default=list(bench.MASKS), choices=bench.MASKS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved timed rounds per problem")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=bench.CLOCKS,
                        help="what the table shows: median wall time, or median process CPU time (steadier on a "
                             "shared machine, best with --threads 1); both are saved")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention called directly")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--reference", action="store_true", help="also time the reference backend")
    parser.add_argument("--out", help="result file (default: benchmarks/results/attention_speed_<device>[_backward].json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32", "window": args.window, "documents": 8,
                "backward": args.backward, "repeat": args.repeat, "device": args.device,
                "threads": torch.get_num_threads(), "clock": args.clock,
                "timing": f"median of interleaved rounds, {args.clock} time (times); samples wall, cpu_samples process CPU"}
    rows = []
    for seq in args.seq:
        for mask in args.masks:
            backends = ["tiled", "sdpa", "flex"] + (["reference"] if args.reference else [])
            row = bench.run_problem(seq, mask, device=args.device, backward=args.backward, repeat=args.repeat,
                                    window=args.window, peers=() if args.no_flex else ("flex",), backends=backends,
                                    clock=args.clock)
            rows.append(row)
            times = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row.times.items() if v is not None)
            print(f"N={seq} {mask}: {times} (auto -> {row.auto_choice}; load {row.load[0]:.1f}-{row.load[1]:.1f})",
                  flush=True)
            suffix = "_backward" if args.backward else ""
            bench.save(rows, args.out or f"benchmarks/results/attention_speed_{args.device}{suffix}.json", settings)
    print()
    columns = [c for c in ("tiled", "sdpa", "reference", "flex", "flex_direct", "auto") if any(c in r.times for r in rows)]
    print(bench.format_table(rows, columns))
    print(f"\nflex compiles: {rows[-1].flex_compiles} in all")
    for r in rows:
        for name, why in r.notes.items():
            print(f"N={r.seq} {r.mask} {name}: {why}")


if __name__ == "__main__":
    main()
