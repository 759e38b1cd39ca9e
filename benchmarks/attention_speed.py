"""Backends side by side on CPU: tiled, sdpa, reference, FlexAttention and qkv's automatic choice,
at N = 1k..16k for full, causal, sliding-window (512) and packed-document (8 per sequence) masks.

    python benchmarks/attention_speed.py                 # forward; ~10 minutes on 2 cores
    python benchmarks/attention_speed.py --backward      # forward + backward

Writes ``benchmarks/results/attention_speed_<device>[_backward].json`` (device, versions, date,
every timing) and prints a Markdown table. Times are the best of ``--repeat`` runs after a
warm-up; FlexAttention is compiled with torch.compile once per shape (compile time excluded).
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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    args = parser.parse_args()
    settings = {"batch": 1, "heads": 4, "head_dim": 64, "dtype": "float32", "window": 512, "documents": 8,
                "backward": args.backward, "repeat": args.repeat, "device": args.device}
    rows = []
    for seq in args.seq:
        for mask in args.masks:
            row = bench.run_problem(seq, mask, device=args.device, backward=args.backward, repeat=args.repeat,
                                    peers=() if args.no_flex else ("flex",))
            rows.append(row)
            times = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row.times.items() if v is not None)
            print(f"N={seq} {mask}: {times} (auto -> {row.auto_choice})", flush=True)
            suffix = "_backward" if args.backward else ""
            bench.save(rows, f"benchmarks/results/attention_speed_{args.device}{suffix}.json", settings)
    print()
    print(bench.format_table(rows, ["tiled", "sdpa", "reference", "flex", "auto"]))
    for r in rows:
        for name, why in r.notes.items():
            print(f"N={r.seq} {r.mask} {name}: {why}")


if __name__ == "__main__":
    main()
