"""BlockMask build time: qkv's analytic block view versus FlexAttention's ``create_block_mask``.

    python benchmarks/blockmask_build.py                    # CPU: N = 8k, 32k, 128k
    python benchmarks/blockmask_build.py --device cuda

qkv builds the ``BlockMask`` from its masks' block views (``O(tiles)``: tile bounds compared, no
score evaluated) with ``BlockMask.from_kv_blocks``; ``create_block_mask`` evaluates the mask_mod on
every one of the ``N x N`` scores (``_compile=True`` compiles that evaluation). Both build the
backward's q-block lists too (``compute_q_blocks``), so they build the same object. "qkv" is a
first call (the layouts cached on the mask object are forgotten before each run), "qkv_cached" a
later call with the same shapes (a model's other layers and steps), which reuses them. Masks: causal,
a causal sliding window of 1024, and 64 packed documents. Times are the best of ``--repeat`` runs
after a warm-up; ``create_block_mask`` is skipped (with the reason) where its dense evaluation
would need more than ``--max-dense-gib`` of memory. Writes ``benchmarks/results/blockmask_build_<device>.json``.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import qkv
from qkv import bench
from qkv.backends import flex
from qkv.problem import make_problem

WINDOW, DOCUMENTS = 1024, 64


def cpu_seconds(fn, repeat: int) -> float:
    """Best process CPU time of ``repeat`` runs after a warm-up: on a shared, overloaded machine the
    wall time mostly measures waiting for a core, the CPU time the work itself (threads summed)."""
    import time

    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def masks(n: int, device):
    seg = torch.arange(n, device=device) * DOCUMENTS // n
    return {
        "causal": (qkv.causal(), lambda b, h, i, j: j <= i),
        "window": (qkv.sliding_window(WINDOW), lambda b, h, i, j: (j <= i) & (j >= i - WINDOW)),
        "document": (qkv.document(seg), lambda b, h, i, j: seg[i] == seg[j]),
    }


def qkv_block_mask(mask, n: int, device, cold: bool = True) -> BlockMask:
    """The BlockMask from qkv's block view. ``cold``: first forget the layouts cached on the mask
    object (``qkv.layout.cached_layout``), so the time is that of a first call; a model's later
    calls with the same shapes reuse them (``cold=False``)."""
    if cold:
        vars(mask).pop("_qkv_layouts", None)
    q = torch.empty(1, 1, n, 64, device=device)
    problem = make_problem(q, q, q, mask)
    blocks = flex.kv_blocks(problem)
    return BlockMask.from_kv_blocks(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                                    blocks.full_kv_indices, BLOCK_SIZE=flex.BLOCK, mask_mod=flex.mask_mod(problem),
                                    seq_lengths=(n, n), compute_q_blocks=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-dense-gib", type=float, default=4.0,
                        help="skip create_block_mask where N*N mask elements exceed this (bytes)")
    parser.add_argument("--compiled", action="store_true", help="also time create_block_mask(_compile=True)")
    args = parser.parse_args()
    rows = []
    for n in args.seq:
        for name, (mask, mask_mod) in masks(n, args.device).items():
            row = {"seq": n, "mask": name, "times": {}, "notes": {}}
            ours = qkv_block_mask(mask, n, args.device)
            # cheap, so many runs: the best of them is the build time without the shared machine's hiccups
            for label, cold in (("qkv", True), ("qkv_cached", False)):
                build = lambda: qkv_block_mask(mask, n, args.device, cold)  # noqa: E731
                row["times"][label] = bench.best_time(build, 10 * args.repeat, args.device)
                if args.device == "cpu":
                    row.setdefault("cpu_times", {})[label] = cpu_seconds(build, 10 * args.repeat)
            variants = {"create_block_mask": False, **({"create_block_mask_compiled": True} if args.compiled else {})}
            for label, compiled in variants.items():
                if n * n / 2**30 > args.max_dense_gib and not compiled:
                    row["times"][label] = None
                    row["notes"][label] = f"skipped: evaluates N*N = {n * n / 2**30:.0f} Gi mask elements"
                    continue
                build = lambda: create_block_mask(mask_mod, None, None, n, n, device=args.device,  # noqa: E731
                                                  _compile=compiled)
                try:
                    theirs = build()
                    if args.device == "cpu":  # one run: seconds of work, measured both ways
                        import time
                        wall, cpu = time.perf_counter(), time.process_time()
                        build()
                        row["times"][label] = time.perf_counter() - wall
                        row["cpu_times"][label] = time.process_time() - cpu
                    else:
                        row["times"][label] = bench.best_time(build, args.repeat, args.device)
                    same = (torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
                            and torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
                            and torch.equal(ours.to_dense(), theirs.to_dense()))
                    row["notes"][label + " same blocks"] = str(same)
                except (RuntimeError, MemoryError) as err:
                    row["times"][label] = None
                    row["notes"][label] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            rows.append(row)
            times = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row["times"].items() if v is not None)
            cpu = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row.get("cpu_times", {}).items())
            print(f"N={n} {name}: wall {times}; cpu {cpu} {row['notes']}", flush=True)
            with open(f"benchmarks/results/blockmask_build_{args.device}.json", "w") as f:
                json.dump({"environment": bench.environment(), "settings": vars(args), "rows": rows}, f, indent=1)
    print("\n| N | mask | qkv block view (first call) | cached | create_block_mask | speed-up (first call) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        times = r.get("cpu_times", r["times"])  # CPU: the work; GPU: wall time, synchronised
        ours, theirs = times["qkv"], times.get("create_block_mask")
        print(f"| {r['seq']} | {r['mask']} | {ours * 1e3:.2f} ms | {times['qkv_cached'] * 1e3:.2f} ms | "
              + (f"{theirs * 1e3:.1f} ms | {theirs / ours:.0f}x |" if theirs else "— | — |"))


if __name__ == "__main__":
    main()
