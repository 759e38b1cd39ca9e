"""``qkv bench``: time qkv's backends, its automatic choice and FlexAttention side by side.

Prints the table the README shows (median of ``--repeat`` interleaved rounds, milliseconds;
``auto picks``, ``auto/best`` and ``picked/best`` say whether the dispatcher chose well;
``sdpa/tiled`` is tiled's speed-up) and,
below it, each timing's spread over the runs (min / median / max), which says how far the ratios
can be trusted on a busy machine. The ``flex`` backend (FlexAttention through qkv) compiles once per
mask kind, on its first row; the count is printed. ``--flex`` adds FlexAttention called directly
(``flex_direct``, its own ``create_block_mask``); ``--json`` writes every run's time with device,
versions and date.

Adding an option: put it in :func:`add_arguments` (in its group) and use it in :func:`run`;
checks go in :func:`check_options`, which runs before anything is timed.
"""

from __future__ import annotations

import argparse

import torch

from qkv import bench
from qkv.commands import bench_scaling

from .usage import UsageError, output_file, positive

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qkv.backends import REGISTRY

    problem = parser.add_argument_group("the problems (one per sequence length and mask)")
    problem.add_argument("--seq", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    problem.add_argument("--masks", nargs="+", default=list(bench.MASKS), choices=bench.MASKS, help="masks")
    problem.add_argument("--batch", type=int, default=1, help="batch size")
    problem.add_argument("--heads", type=int, default=4, help="attention heads")
    problem.add_argument("--head-dim", type=int, default=64, help="head dimension")
    problem.add_argument("--window", type=int, default=512, help="sliding window size (keys before the query)")
    problem.add_argument("--documents", type=int, default=8, help="packed documents per sequence")
    problem.add_argument("--dtype", default="float32", choices=DTYPES, help="data type")
    problem.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         help="device (default: cuda if available, else cpu)")
    problem.add_argument("--backward", action="store_true", help="time forward + backward (default: forward)")
    timing = parser.add_argument_group("what is timed, and how")
    timing.add_argument("--backends", nargs="+", choices=list(REGISTRY), metavar="NAME",
                        default=[name for name in REGISTRY if name != "reference"],
                        help=f"qkv backends to time, of {', '.join(REGISTRY)}")
    timing.add_argument("--repeat", type=int, default=3, help="timed rounds per problem, every backend once per round (the table shows the median)")
    timing.add_argument("--clock", default="wall", choices=bench.CLOCKS,
                        help="the table's times: median wall time, or median process CPU time (steadier on a busy "
                             "machine; default: wall)")
    timing.add_argument("--flex", action="store_true",
                        help="also time FlexAttention called directly (flex_direct: its own create_block_mask, "
                             "compiled once per shape: slow; default: off)")
    timing.add_argument("--json", metavar="PATH", help="write every run's time with device, versions and date "
                                                       "(default: none)")
    bench_scaling.add_arguments(parser)
    timing.add_argument("--gpu-suite", action="store_true",
                        help="CUDA only: run the triton backend's GPU benchmark (benchmarks/gpu_attention.py) "
                             "with its defaults instead, writing --json (default: gpu_attention.json)")


def check_options(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the options, before anything is timed."""
    for flag in ("batch", "heads", "head_dim", "window", "documents", "repeat"):
        positive("--" + flag.replace("_", "-"), getattr(args, flag), allow_none=False)
    for seq in args.seq:
        positive("--seq", seq, allow_none=False)
    output_file("--json", args.json)  # before the run, not after it
    output_file("--plot", getattr(args, "plot", None))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device (use --device cpu)")
    try:
        torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be a torch device such as cpu or cuda, got {args.device!r}") from None


def run(args: argparse.Namespace) -> int:
    if args.gpu_suite:
        return _gpu_suite(args)
    check_options(args)
    if args.scaling:
        return bench_scaling.run(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "debug")}
    env = bench.environment()
    direction = "forward + backward" if args.backward else "forward"
    print(f"qkv bench: B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} {direction} on {args.device}; "
          f"median of {args.repeat} interleaved rounds, milliseconds of {args.clock} time")
    print(f"torch {env['torch']}, {env['cpu_threads']} CPU threads{', ' + env['gpu'] if 'gpu' in env else ''}, {env['date']}, "
          f"load average {env['load_average']}")
    rows = []
    for seq in args.seq:
        for mask in args.masks:
            rows.append(bench.run_problem(seq, mask, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                                          dtype=DTYPES[args.dtype], device=args.device, window=args.window,
                                          documents=args.documents, backward=args.backward, repeat=args.repeat,
                                          peers=("flex",) if args.flex else (), backends=args.backends,
                                          clock=args.clock))
            print(f"  N={seq:<6} {mask:<9} done", flush=True)
    report(rows, args)
    if args.json:
        bench.save(rows, args.json, settings)
        print(f"\nwrote {args.json}")
    return 0


def report(rows: list[bench.Row], args: argparse.Namespace) -> None:
    """The timing table, the spread table and the reasons a backend did not run."""
    columns = [c for c in (*args.backends, "flex_direct") if any(r.times.get(c) is not None for r in rows)]
    print()
    print(bench.format_table(rows, columns))
    print(f"\nspread over the {args.repeat} timed rounds, milliseconds of {args.clock} time min / median / max:")
    print(bench.format_spread(rows, [*columns, "auto"], args.clock))
    if rows and rows[-1].flex_compiles is not None:
        print(f"\nflex compiles: {rows[-1].flex_compiles} (one per kind of problem; new lengths, windows, ids reuse them)")
    notes = sorted({f"{name}: {why}" for r in rows for name, why in r.notes.items()})
    if notes:
        print("\nnot run: " + "\n         ".join(notes))


def _gpu_suite(args: argparse.Namespace) -> int:
    """``--gpu-suite``: the triton backend's GPU benchmark (see ``qkv.backends.triton.benchmark``)."""
    if not torch.cuda.is_available():
        raise UsageError("--gpu-suite needs a CUDA device")
    from qkv.backends.triton import benchmark

    suite = argparse.ArgumentParser()
    benchmark.add_arguments(suite)
    return benchmark.main(suite.parse_args([] if args.json is None else ["--out", args.json]))
