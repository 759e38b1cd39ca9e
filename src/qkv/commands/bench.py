"""``qkv bench``: time qkv's backends, its automatic choice and FlexAttention side by side."""

from __future__ import annotations

import argparse

import torch

from qkv import bench

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="sequence lengths (default: 1024 4096)")
    parser.add_argument("--masks", nargs="+", default=list(bench.MASKS), choices=bench.MASKS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512, help="sliding window size (keys before the query)")
    parser.add_argument("--documents", type=int, default=8, help="packed documents per sequence")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per problem (best is kept)")
    parser.add_argument("--flex", action="store_true", help="also time FlexAttention called directly (flex_direct: its own create_block_mask, compiled per shape)")
    parser.add_argument("--json", metavar="PATH", help="write the results with device, versions and date")


def run(args: argparse.Namespace) -> int:
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    env = bench.environment()
    direction = "forward + backward" if args.backward else "forward"
    print(f"qkv bench: B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} {direction} on {args.device}; "
          f"best of {args.repeat}, milliseconds")
    print(f"torch {env['torch']}, {env['cpu_threads']} CPU threads{', ' + env['gpu'] if 'gpu' in env else ''}, {env['date']}")
    rows = []
    for seq in args.seq:
        for mask in args.masks:
            rows.append(bench.run_problem(seq, mask, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                                          dtype=DTYPES[args.dtype], device=args.device, window=args.window,
                                          documents=args.documents, backward=args.backward, repeat=args.repeat,
                                          peers=("flex",) if args.flex else ()))
            print(f"  N={seq:<6} {mask:<9} done", flush=True)
    columns = [c for c in ("tiled", "sdpa", "reference", "flex", "flex_direct", "auto") if any(c in r.times for r in rows)]
    print()
    print(bench.format_table(rows, columns))
    print(f"\nflex compiles: {rows[-1].flex_compiles} in all (one per mask kind: new lengths, windows and ids reuse them)")
    notes = sorted({f"{name}: {why}" for r in rows for name, why in r.notes.items()})
    if notes:
        print("\nnot run: " + "\n         ".join(notes))
    if args.json:
        bench.save(rows, args.json, settings)
        print(f"\nwrote {args.json}")
    return 0
